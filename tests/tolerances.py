"""Per-dtype tolerances and comparison helpers: the one place they live (DESIGN.md section 4)."""
from __future__ import annotations

from typing import Optional

import torch

# ||out - ref|| / ||ref|| against a float64 reference.
REL_TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,   # tf32 off
    torch.float16: 2e-3,
    torch.bfloat16: 1e-2,
}
# ...and never worse than this multiple of the plain-torch expression's error in the same dtype.
TORCH_ERROR_FACTOR = 2.0
# Where the plain-torch expression happens to be (nearly) exact, compare against this fraction of
# the dtype tolerance instead, so that rounding-level noise does not fail a test.
TORCH_FLOOR_FRACTION = 0.05

POISON = float("nan")


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    denom = ref64.norm().item()
    num = (out64 - ref64).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: Optional[torch.dtype] = None,
                 torch_out: Optional[torch.Tensor] = None, what: str = "output") -> float:
    """`out` matches the float64 `ref` within the dtype's tolerance (and, when `torch_out` -- the
    plain-torch expression in the same dtype -- is given, within TORCH_ERROR_FACTOR of its error).
    NaN never passes."""
    dtype = dtype or out.dtype
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    err = rel_error(out, ref)
    tol = REL_TOL[dtype]
    assert err <= tol, f"{what}: relative error {err:.3e} exceeds {tol:.1e} ({dtype})"
    if torch_out is not None:
        torch_err = rel_error(torch_out, ref)
        bound = max(TORCH_ERROR_FACTOR * torch_err, TORCH_FLOOR_FRACTION * tol)
        assert err <= bound, (f"{what}: relative error {err:.3e} is more than {TORCH_ERROR_FACTOR}x "
                              f"the plain-torch expression's {torch_err:.3e} ({dtype})")
    return err


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill an output buffer with NaN so that any element a kernel fails to write is caught."""
    return t.fill_(POISON)


def rand(*shape, dtype=torch.float32, device="cpu", scale: float = 1.0) -> torch.Tensor:
    """Random normal inputs (never zeros), in float64 first so every dtype sees the same values."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


# In-place merge: every element is the float64 result rounded once to the weight's dtype, up to
# the error of forming delta in fp32 (on GPUs tf32x3 for fp32 adapters): at most
# DELTA_REL_ERROR_PER_RANK * (r + 2) of |W| + |s| |B| |A|, elementwise.
MANTISSA_BITS = {torch.float16: 10, torch.bfloat16: 7, torch.float32: 23}
MIN_EXPONENT = {torch.float16: -14, torch.bfloat16: -126, torch.float32: -126}
DELTA_REL_ERROR_PER_RANK = 2.0 ** -21


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The spacing of `dtype`'s values around each |x| (float64), subnormals included."""
    x = x.double().abs()
    exponent = torch.floor(torch.log2(torch.where(x > 0, x, 1.0))).clamp_min(MIN_EXPONENT[dtype])
    return torch.exp2(exponent - MANTISSA_BITS[dtype])


def assert_rounded_once(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, rank: int,
                        magnitude: torch.Tensor, what: str = "merged weight") -> None:
    """Elementwise |out - ref| <= ulp(ref) / 2 + the fp32 delta error bound (see above):
    `ref` is the float64 result, `magnitude` is |W| + |s| |B| |A|. A skipped or twice-applied
    element misses by a whole |delta| and fails."""
    out64, ref64 = out.double(), ref.double()
    assert torch.isfinite(out64).all(), f"{what}: non-finite values"
    bound = 0.5 * ulp(ref64, dtype) + DELTA_REL_ERROR_PER_RANK * (rank + 2) * magnitude.double()
    err = (out64 - ref64).abs()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} element(s) are not the float64 result rounded "
                           f"once to {dtype}; worst excess {float((err - bound).max()):.3e}")


def assert_close_to_magnitude(out: torch.Tensor, ref: torch.Tensor, magnitude: torch.Tensor,
                              dtype: torch.dtype, what: str = "output") -> float:
    """||out - ref|| / ||magnitude|| within the dtype's tolerance, where `magnitude` is the same
    computation on absolute values (sum of |terms|). For randomly drawn tiny shapes -- a single
    dot product that nearly cancels -- the plain relative error is unbounded in any precision;
    this is the bound a correctly accumulated sum meets. NaN never passes."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{what}: non-finite values (unwritten or overflowed elements)"
    denom = magnitude.detach().double().cpu().norm().item()
    err = (out.detach().double().cpu() - ref.detach().double().cpu()).norm().item() / max(denom, 1e-300)
    assert err <= REL_TOL[dtype], f"{what}: error {err:.3e} of the terms' magnitude exceeds {REL_TOL[dtype]:.1e} ({dtype})"
    return err
