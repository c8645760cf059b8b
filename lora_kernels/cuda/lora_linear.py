"""The CUDA C++ fused LoRA linear (``csrc/lora_linear.cuh``): input checks and the launcher, with
the contract of ``lora_kernels.triton.lora_linear`` so that ``lora_kernels.ops.lora_linear`` runs
either backend the same way. Loading the extension is ``loader``'s job.
"""
from __future__ import annotations

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


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor], save_t: bool,
                    out: Optional[torch.Tensor] = None, t_out: Optional[torch.Tensor] = None,
                    tile_kind: int = 0, tiles_per_cta: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the CUDA fused forward on validated inputs (the Triton launcher's contract).

    x [M, K] float16/bfloat16, weight [N, K] x's dtype, lora_a [r, K] and lora_b [N, r] in x's
    dtype or float32, bias [N] (x's dtype or float32) or None. Returns (y [M, N] in x.dtype,
    t [M, r] float32 = x @ lora_a.T if save_t else an empty [0, r]). `out` / `t_out` receive y / t
    when given (tests poison them); tile_kind (1 small-M, 2 large) and tiles_per_cta override the
    heuristics (tests use them to reach every path at small sizes).

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
    a_split = lora_a.dtype == torch.float32
    a = split_fp32_adapter(lora_a, x.dtype) if a_split else unit_stride_along_k(lora_a)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    torch.ops.lora_kernels.cuda_lora_linear_fwd(
        unit_stride_along_k(x), unit_stride_along_k(weight), a, lora_b, bias, float(scale), a_split,
        save_t, y, t, tile_kind, tiles_per_cta)
    return y, t
