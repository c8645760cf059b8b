"""The CUDA C++ fused LoRA linear: input checks, the kernel choice and the launcher, with the
contract of ``lora_kernels.triton.lora_linear`` so that ``lora_kernels.ops.lora_linear`` runs
either backend the same way. Loading the extension is ``loader``'s job.

Two kernels:

* ``csrc/lora_linear/lora_linear.cuh`` (sm_80 and later: mma.sync, cp.async): t = x @ A.T inside the kernel;
* ``csrc/lora_linear/lora_linear_sm90.cuh`` (Hopper, sm_90a: CUTLASS 4 TMA + wgmma, persistent): one GEMM
  whose K loop runs over x @ W.T and then over a short LoRA tail on the same accumulator,
  ``y = x @ W.T + tail_x @ tail_w.T + bias``, with ``tail_x = [t_hi | t_lo]``, ``tail_w = [B | B]``
  and t = scale * x @ A.T computed first in fp32 (cuBLAS) and split into two 16-bit halves
  (:func:`lora_tail`). :func:`sm90_plan` says when it runs.

The backward's dx on Hopper is the second kernel with its B operands MN-major (W and A read as
stored): ``dx = dy @ W + [u_hi | u_lo] @ [A; A]``, u = scale * dy @ B in fp32 (:func:`dx_tail`);
:func:`sm90_dx_choice` says when it runs and why not, :func:`lora_linear_dx` launches it. dA, dB
and dbias stay with the Triton (or torch) backward (``lora_kernels.ops.lora_linear``).
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .._validation import check_no_overlap
from ..errors import BackendUnavailable
from . import loader

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_A_ROWS = 128  # rank r (16-bit adapters) or 2r (fp32 adapters, split into two 16-bit halves)


def input_reason(x_dtype: torch.dtype, adapter_dtype: torch.dtype, rank: int) -> Optional[str]:
    """None when the CUDA kernel takes inputs of these dtypes and rank, else why not."""
    if x_dtype not in CUDA_DTYPES:
        return (f"cuda: dtype {str(x_dtype).replace('torch.', '')} is not supported by the CUDA kernel "
                f"(float16, bfloat16); float32 runs on backend='triton'")
    split = adapter_dtype == torch.float32
    limit = CUDA_MAX_A_ROWS // 2 if split else CUDA_MAX_A_ROWS
    if rank > limit:
        extra = " for float32 adapters (they run as a pair of 16-bit halves, 2r rows)" if split else ""
        return f"cuda: rank {rank} exceeds the CUDA kernel's limit of {limit}{extra}"
    return None


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------

def unit_stride_along_k(t: torch.Tensor) -> torch.Tensor:
    """The kernel reads rows as contiguous runs (16-byte cp.async when aligned): other layouts are
    copied. Row strides stay free (slices, padded rows)."""
    return t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous()


def split_fp32_adapter(lora_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[2r, K] 16-bit (A_hi; A_lo) with A_hi = A rounded to `dtype`, A_lo = (A - A_hi) rounded:
    x.A^T = x.A_hi^T + x.A_lo^T keeps about 16 significant bits of A (bf16) on 16-bit tensor cores."""
    hi = lora_a.to(dtype)
    lo = (lora_a - hi.float()).to(dtype)
    return torch.cat([hi, lo])


# ---------------------------------------------------------------------------------------------
# The Hopper kernel: when it runs, and its LoRA tail
# ---------------------------------------------------------------------------------------------

# Below this many rows the sm_80 decode tile runs (16 x 32 tiles stream W over all SMs; the sm90
# kernel's 128-row tiles would leave most SMs idle at N = 4096). A swap-AB sm90 decode variant is
# not written yet; the crossover is not measured (no GPU in the session that chose it; bench/).
SM90_MIN_M = 64
SM90_TILE_128x256, SM90_TILE_128x128, SM90_TILE_128x64 = 0, 1, 2   # csrc/lora_linear/lora_linear_sm90.h's Sm90Tile
TILE_KIND_SM90 = {3: SM90_TILE_128x256, 4: SM90_TILE_128x128, 5: SM90_TILE_128x64}  # tile_kind overrides (tests)
# (tile, rows, columns, relative throughput per tile area). The throughputs are guesses, not
# measured (bigger tiles read fewer operand bytes per FLOP of shared memory and L2):
# bench/ on an H200 is where they get measured and replaced.
SM90_TILES = ((SM90_TILE_128x256, 128, 256, 1.0), (SM90_TILE_128x128, 128, 128, 0.9),
              (SM90_TILE_128x64, 128, 64, 0.8))


def sm90_plan(M: int, N: int, K: int, capability: Tuple[int, int], num_sms: int, tma_ok: bool,
              built: bool = True) -> Optional[int]:
    """The sm90 tile for an [M, K] x [N, K] problem on a device of `capability` with `num_sms`
    SMs, or None for the sm_80 kernel: not Hopper, a build without the sm90 kernels, decode-size
    M, or operands TMA cannot read (`tma_ok`: 16-byte aligned starts and row strides, which
    needs K % 8 == 0 and N % 8 == 0 for 16-bit rows).

    The tile with the shortest modelled time, waves x tile area / throughput (one persistent CTA
    per SM; the larger tile among equals): e.g. N = 4096 on 132 SMs takes 128x256 at M = 4096
    (512 tiles, 4 waves), 128x128 at M = 512 (128 tiles: one wave, where 128x256 would idle half
    the SMs), 128x64 at M = 256."""
    if capability != (9, 0) or not built or not tma_ok or M < SM90_MIN_M or K < 8 or K % 8 or N % 8:
        return None
    return _fastest_tile(SM90_TILES, M, N, num_sms)


def _fastest_tile(tiles, M: int, N: int, num_sms: int) -> int:
    """The tile of `tiles` with the shortest modelled time for an [M, N] output (see sm90_plan)."""
    def modelled_time(bm, bn, speed):
        waves = -(-(-(-M // bm) * -(-N // bn)) // num_sms)
        return waves * bm * bn / speed
    return min(tiles, key=lambda t: modelled_time(*t[1:]))[0]


def tma_readable(t: torch.Tensor) -> bool:
    """A 2-D 16-bit tensor TMA can address: unit stride along rows, 16-byte aligned start and row stride."""
    rows, cols = t.shape
    return (t.data_ptr() % 16 == 0 and (cols <= 1 or t.stride(1) == 1)
            and (rows <= 1 or (t.stride(0) * t.element_size()) % 16 == 0))


@functools.lru_cache(maxsize=None)
def device_facts(index: int) -> Tuple[Tuple[int, int], int]:
    """(compute capability, SM count) of CUDA device `index`: read at its first launch, then cached."""
    props = torch.cuda.get_device_properties(index)
    return (props.major, props.minor), props.multi_processor_count


@functools.lru_cache(maxsize=None)
def sm90_built() -> bool:
    """Whether the loaded extension carries the sm90 kernels (an older build has no such op)."""
    op = getattr(torch.ops.lora_kernels, "cuda_lora_linear_sm90_built", None)
    return bool(op()) if op is not None else False


def _x_a_fp32(x: torch.Tensor, a16: torch.Tensor) -> torch.Tensor:
    """x @ a16.T in fp32 from 16-bit operands (products exact, fp32 accumulation)."""
    if x.is_cuda and hasattr(torch.ops.aten.mm, "dtype"):  # torch >= 2.8: cuBLAS with an fp32 output
        return torch.ops.aten.mm.dtype(x, a16.t(), torch.float32)
    return x.float() @ a16.float().t()


def split16(v: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) in `dtype` with hi = v rounded, lo = (v - hi) rounded: hi + lo is v to twice
    `dtype`'s significant bits (|v - hi - lo| <= 2^-16 |v| for bf16, 2^-22 for fp16 outside fp16's
    subnormal range; fp32 v is itself exact to 2^-24). fp16 halves overflow where |v| > 65504."""
    hi = v.to(dtype)
    return hi, (v - hi.float()).to(dtype)


def lora_tail(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
              t_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tail_x [M, L8], tail_w [N, L8]) in x's dtype with tail_x @ tail_w.T = scale * t @ lora_b.T
    to fp32-like accuracy, t = x @ lora_a.T in fp32 (written to `t_out` [M, r] when given)::

        ts = scale * t;  ts_hi, ts_lo = split16(ts)
        16-bit B:  tail_x = [ts_hi | ts_lo],          tail_w = [B | B]                  (L = 2r)
        fp32 B:    tail_x = [ts_hi | ts_lo | ts_hi],  tail_w = [B_hi | B_hi | B_lo]     (L = 3r)

    (the dropped ts_lo @ B_lo.T is below 2^-16 of the term in bf16), then zero columns up to
    L8 = L rounded up to a multiple of 8, so that both are dense with 16-byte rows, as TMA and
    CUTLASS's alignment checks want. An fp32 lora_a enters as its two 16-bit halves,
    t = x @ A_hi.T + x @ A_lo.T."""
    dtype = x.dtype
    if lora_a.dtype == torch.float32:
        a_hi, a_lo = split16(lora_a, dtype)
        t = _x_a_fp32(x, a_hi) + _x_a_fp32(x, a_lo)
    else:
        t = _x_a_fp32(x, lora_a)
    if t_out is not None:
        t_out.copy_(t)
    return hi_lo_tail(t * scale, lora_b, dtype)


def hi_lo_tail(ts: torch.Tensor, right: torch.Tensor, dtype: torch.dtype,
               rank_major: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tail_x [M, L8], tail_w) in `dtype` with tail_x @ tail_w'.T = ts @ right.T to fp32-like
    accuracy, for ts [M, r] fp32 and right [C, r] (16-bit or fp32): the rows of lora_tail's and
    dx_tail's tables. tail_w' is tail_w [C, L8], or with `rank_major` its transpose of a dense
    [L8, C] tensor (C contiguous: the dx kernel reads A that way, MN-major), which is returned."""
    M, r = ts.shape
    C = right.shape[0]
    ts_hi, ts_lo = split16(ts, dtype)
    right_fp32 = right.dtype == torch.float32
    L = 3 * r if right_fp32 else 2 * r
    L8 = -(-L // 8) * 8
    tail_x = torch.empty((M, L8), dtype=dtype, device=ts.device)
    stored = torch.empty((L8, C) if rank_major else (C, L8), dtype=dtype, device=ts.device)
    tail_w = stored.t() if rank_major else stored   # [C, L8] either way
    if L8 > L:
        tail_x[:, L:].zero_()
        tail_w[:, L:].zero_()
    tail_x[:, :r] = ts_hi
    tail_x[:, r:2 * r] = ts_lo
    if right_fp32:
        w_hi, w_lo = split16(right, dtype)
        tail_x[:, 2 * r:L] = ts_hi
        tail_w[:, :r] = w_hi
        tail_w[:, r:2 * r] = w_hi
        tail_w[:, 2 * r:L] = w_lo
    else:
        tail_w[:, :r] = right
        tail_w[:, r:L] = right
    return tail_x, stored


# ---------------------------------------------------------------------------------------------
# The backward's dx on Hopper: when it runs, its tail, its launcher
# ---------------------------------------------------------------------------------------------

# lora_linear_sm90.cuh's launch_dx: the two larger tiles (128x64 is not compiled for dx, to keep
# the build short; the mid-size M it would take runs on 128x128).
SM90_DX_TILES = SM90_TILES[:2]
TILE_KIND_SM90_DX = {3: SM90_TILE_128x256, 4: SM90_TILE_128x128}  # tile_kind overrides (tests)


def sm90_dx_plan(M: int, N: int, K: int, capability: Tuple[int, int], num_sms: int, tma_ok: bool,
                 built: bool = True) -> Optional[int]:
    """The sm90 tile for the backward's dx [M, K] = dy [M, N] @ W [N, K] + (LoRA tail), or None:
    not Hopper, a build without the sm90 dx kernels, M below SM90_MIN_M (as the forward: 128-row
    tiles), or operands TMA cannot read (`tma_ok`: dy's and W's rows 16-byte aligned, which needs
    N % 8 == 0 and K % 8 == 0). The tile as sm90_plan models it, over dx's [M, K] and the two dx
    tiles: e.g. 128x256 at M = K = 4096 on 132 SMs, 128x128 at M = 512, K = 4096."""
    if capability != (9, 0) or not built or not tma_ok or M < SM90_MIN_M or K < 8 or K % 8 or N < 8 or N % 8:
        return None
    return _fastest_tile(SM90_DX_TILES, M, K, num_sms)


@functools.lru_cache(maxsize=None)
def sm90_dx_built() -> bool:
    """Whether the loaded extension carries the sm90 dx kernels (an older build has no such op)."""
    op = getattr(torch.ops.lora_kernels, "cuda_lora_linear_sm90_dx_built", None)
    return bool(op()) if op is not None else False


@functools.lru_cache(maxsize=None)
def sm90_dx_device(device: torch.device) -> bool:
    """Whether the backward of a CUDA forward on `device` may take its dx from the sm90 kernel: an
    sm_90 GPU and an extension with the sm90 dx kernels (the shapes are :func:`sm90_dx_choice`'s,
    at the backward). Called after a CUDA forward, so the extension is loaded; cached per device."""
    if device.type != "cuda":
        return False
    capability, _ = device_facts(device.index if device.index is not None else torch.cuda.current_device())
    if capability != (9, 0):
        return False
    try:
        loader.load()
    except BackendUnavailable:
        return False
    return sm90_dx_built()


def _dx_refusal(dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, dropout: bool,
                shape_rules: bool = True) -> Optional[str]:
    """Why the sm90 dx does not run these operands, or None (see sm90_dx_choice); shape_rules
    False skips the M >= SM90_MIN_M rule (tile_kind overrides), never the TMA ones."""
    M, N = dy.shape
    K, r = weight.shape[1], lora_a.shape[0]
    if dropout:  # dx's LoRA part is masked, u @ A * keep / (1 - p): the tail GEMM cannot apply it
        return "not with dropout (the Triton backward applies the mask to dx's LoRA part)"
    reason = input_reason(dy.dtype, lora_a.dtype, r)
    if reason is not None:
        return reason.removeprefix("cuda: ")
    if weight.dtype != dy.dtype:
        return f"dy ({dy.dtype}) and weight ({weight.dtype}) differ in dtype"
    capability, _ = device_facts(dy.device.index or 0)  # CUDA tensors always carry their index
    if capability != (9, 0):
        return f"compute capability {capability[0]}.{capability[1]} is not sm_90"
    if not sm90_dx_built():
        return "the extension was built without the sm90 dx kernels"
    if shape_rules and M < SM90_MIN_M:
        return f"M = {M} rows is below SM90_MIN_M = {SM90_MIN_M} (128-row tiles)"
    if K < 8 or K % 8 or N < 8 or N % 8:
        return f"N = {N} and K = {K} must be multiples of 8 (16-byte TMA rows)"
    for name, t in (("dy", dy), ("weight", weight)):
        if not tma_readable(t):
            return f"{name} is not TMA-readable (strides {tuple(t.stride())}, address {t.data_ptr() % 16} mod 16)"
    return None


SM90_TILE_NAMES = {SM90_TILE_128x256: "128x256", SM90_TILE_128x128: "128x128", SM90_TILE_128x64: "128x64"}


def sm90_dx_choice(dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                   dropout: bool = False) -> Tuple[Optional[int], str]:
    """(tile, why): the sm90 tile the backward's dx of these operands runs on (dy [M, N], weight
    [N, K], lora_a [r, K] on a CUDA device; `dropout`: the forward drew a dropout mask) and a
    sentence naming it, or (None, the reason it does not run there): the Triton or torch backward
    computes dx then, as on sm_80. E.g. "sm90 dx: M = 16 rows is below SM90_MIN_M = 64 (...)"."""
    why = _dx_refusal(dy, weight, lora_a, dropout)
    if why is not None:
        return None, f"sm90 dx: {why}"
    M, N = dy.shape
    K = weight.shape[1]
    _, sms = device_facts(dy.device.index or 0)
    tile = sm90_dx_plan(M, N, K, (9, 0), sms, True)
    return tile, (f"sm90 dx: tile {SM90_TILE_NAMES[tile]} for dx [{M}, {K}] (reduction over N = {N}, "
                  f"rank {lora_a.shape[0]}, {sms} SMs)")


def dx_tail(dy: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            scale: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u [M, r] fp32, tail_x [M, L8], tail_w [L8, K]) in dy's dtype with tail_x @ tail_w =
    scale * u @ lora_a to fp32-like accuracy, u = dy @ lora_b in fp32 (the Triton backward's dA
    reuses it)::

        us = scale * u;  us_hi, us_lo = split16(us)
        16-bit A:  tail_x = [us_hi | us_lo],          tail_w = [A; A]               (L = 2r rows)
        fp32 A:    tail_x = [us_hi | us_lo | us_hi],  tail_w = [A_hi; A_hi; A_lo]   (L = 3r)

    then zeros up to L8 = L rounded up to a multiple of 8 (tail_x's rows 16-byte multiples, as TMA
    wants). tail_w is [L8, K], K contiguous: the dx kernel reads it MN-major, like W. An fp32
    lora_b enters as its two 16-bit halves, u = dy @ B_hi + dy @ B_lo (B kept to 2^-16 relative
    in bf16, 2^-22 in fp16). fp16 halves overflow where |us| > 65504 (as the forward's t; with
    fp16 loss scaling a large scale can overflow us before dx itself would: GradScaler then
    skips the step and lowers the scale)."""
    dtype = dy.dtype
    if lora_b.dtype == torch.float32:
        b_hi, b_lo = split16(lora_b, dtype)
        u = _x_a_fp32(dy, b_hi.t()) + _x_a_fp32(dy, b_lo.t())
    else:
        u = _x_a_fp32(dy, lora_b.t())
    return (u, *hi_lo_tail(u * scale, lora_a.t(), dtype, rank_major=True))


def _launch_sm90_dx(dy, weight, tail_x, tail_w, dx, tile: int) -> None:
    torch.ops.lora_kernels.cuda_lora_linear_sm90_dx(dy, weight, tail_x, tail_w, dx, tile)


def lora_linear_dx(dy: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                   scale: float, dropout: bool = False, out: Optional[torch.Tensor] = None,
                   tile_kind: int = 0) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """The backward's dx on the sm90 kernel, or None where :func:`sm90_dx_choice` says it does
    not run there (the caller computes dx another way)::

        u = dy @ lora_b                        # fp32 [M, r]
        dx = dy @ weight + scale * u @ lora_a  # [M, K] in dy's dtype, fp32 accumulate, one rounding

    dy [M, N] and weight [N, K] 16-bit, lora_a [r, K] / lora_b [N, r] in dy's dtype or float32.
    Returns (dx, u). `out` receives dx when given (tests poison it; one TMA cannot write gives
    None); tile_kind 3 / 4 force the 128x256 / 128x128 tile past the plan and its M rule (never
    past the device, the build, the dtypes or TMA's alignment)."""
    if tile_kind not in (0, *TILE_KIND_SM90_DX):
        raise ValueError(f"lora_linear_dx: tile_kind must be 0 (the plan), 3 (128x256) or 4 (128x128), "
                         f"got {tile_kind}")
    if tile_kind:
        tile = None if _dx_refusal(dy, weight, lora_a, dropout, shape_rules=False) else TILE_KIND_SM90_DX[tile_kind]
    else:
        tile, _ = sm90_dx_choice(dy, weight, lora_a, dropout)
    if tile is None or (out is not None and not tma_readable(out)):
        return None
    M, K = dy.shape[0], weight.shape[1]
    dx = torch.empty((M, K), dtype=dy.dtype, device=dy.device) if out is None else out
    u, tail_x, tail_w = dx_tail(dy, lora_a, lora_b, scale)
    _launch_sm90_dx(dy, weight, tail_x, tail_w, dx, tile)
    return dx, u


def _sm90_tile(x, weight, y, tile_kind: int) -> Optional[int]:
    """The sm90 tile for this launch (tile_kind 3 / 4 / 5 force 128x256 / 128x128 / 128x64), or None."""
    if tile_kind in (1, 2):
        return None
    if tile_kind in TILE_KIND_SM90:
        return TILE_KIND_SM90[tile_kind]
    capability, sms = device_facts(x.device.index or 0)  # CUDA tensors always carry their index
    if capability != (9, 0) or not sm90_built():
        return None
    M, K = x.shape
    return sm90_plan(M, weight.shape[0], K, capability, sms,
                     tma_readable(x) and tma_readable(weight) and (y is None or tma_readable(y)))


def _launch_sm90(x, weight, lora_a, lora_b, scale, bias, save_t, y, t, tile: int) -> None:
    tail_x, tail_w = lora_tail(x, lora_a, lora_b, scale, t if save_t else None)
    if bias is not None:  # the epilogue reads an fp32, contiguous, 16-byte aligned bias
        bias = bias.float().contiguous()
        bias = bias.clone() if bias.data_ptr() % 16 else bias
    torch.ops.lora_kernels.cuda_lora_linear_sm90_fwd(x, weight, tail_x, tail_w, bias, y, tile)


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor], save_t: bool,
                    out: Optional[torch.Tensor] = None, t_out: Optional[torch.Tensor] = None,
                    tile_kind: int = 0, tiles_per_cta: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the CUDA fused forward on validated inputs (the Triton launcher's contract).

    x [M, K] float16/bfloat16, weight [N, K] x's dtype, lora_a [r, K] and lora_b [N, r] in x's
    dtype or float32, bias [N] (x's dtype or float32) or None. Returns (y [M, N] in x.dtype,
    t [M, r] float32 = x @ lora_a.T if save_t else an empty [0, r]). `out` / `t_out` receive y / t
    when given (tests poison them); tile_kind (1 small-M, 2 large: the sm_80 kernel; 3 / 4 / 5: the
    sm90 kernel's 128x256 / 128x128 / 128x64 tile) and tiles_per_cta override the heuristics (tests use
    them to reach every path at small sizes). Otherwise :func:`sm90_plan` picks the kernel.

    Layouts: x, weight and lora_a are read row by row, so a tensor whose last dimension is not
    unit-stride (a transposed weight, a column-major x) is copied first -- on every call, which
    for the weight costs a pass over N x K: keep weights row-major. Row strides are free. An fp32
    lora_a is split into 16-bit halves (two small extra kernels per call)."""
    # The kernel reads x, weight and the adapters with non-coherent loads (ld.global.nc): an
    # output sharing their memory would be read stale or half-written. Checked before the
    # extension loads, so the check runs (and is tested) anywhere.
    if out is not None:
        check_no_overlap("lora_linear", "out", out, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias,
                         t_out=t_out)
    if t_out is not None:
        check_no_overlap("lora_linear", "t_out", t_out, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b,
                         bias=bias)
    loader.load()
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    reason = input_reason(x.dtype, lora_a.dtype, r)
    if reason is not None:
        raise BackendUnavailable(f"lora_linear: {reason}")
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    t = t_out if t_out is not None else torch.empty((M if save_t else 0, r), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        if save_t and M > 0:
            t.copy_(x.float() @ lora_a.float().t())
        return y, t
    if K == 0:  # empty sums: y = bias, t = 0 (no kernel needed)
        y.copy_(bias.expand(M, N) if bias is not None else torch.zeros((), dtype=y.dtype, device=y.device))
        t.zero_()
        return y, t
    tile = _sm90_tile(x, weight, out, tile_kind)
    if tile is not None:
        _launch_sm90(x, weight, lora_a, lora_b, scale, bias, save_t, y, t, tile)
        return y, t
    a_split = lora_a.dtype == torch.float32
    a = split_fp32_adapter(lora_a, x.dtype) if a_split else unit_stride_along_k(lora_a)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    torch.ops.lora_kernels.cuda_lora_linear_fwd(
        unit_stride_along_k(x), unit_stride_along_k(weight), a, lora_b, bias, float(scale), a_split,
        save_t, y, t, tile_kind, tiles_per_cta)
    return y, t
