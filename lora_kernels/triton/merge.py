"""Triton in-place merge / unmerge: the kernel and its launchers.

One program owns one [BLOCK_N, BLOCK_K] tile of the logical weight W [N, K] (a fan_in_fan_out
weight, stored [K, N], is the same W with its strides swapped) and is the only program that reads
or writes it, so the in-place update needs no synchronisation between programs:

    delta = scale * B[tile rows, :] @ A[:, tile cols]     fp32, formed in registers, never stored
    W[tile] = round(W[tile] + delta)                      W read once, written once, one rounding

The rank is swept in BLOCK_R chunks (any rank; ranks 1..256 are the tested range). A and B are
converted to fp32 before ``tl.dot``: for 16-bit adapters every product is then exact (a 16-bit
value fits in tf32's 10-bit mantissa and 8-bit exponent, so "tf32" on the GPU is exact; the
Triton interpreter's bf16 dot bug is not reached), for fp32 adapters "tf32x3" keeps fp32
accuracy on tensor cores. Several adapters arrive packed into one fp32 pair by the op layer.

Modes (the constexpr MODE) share the tile walk and the delta:

* ``APPLY``: W = round(W ± delta).
* ``COUNT_NONFINITE``: the first pass of a safe merge. Writes nothing to W; adds the number of
  non-finite round(W ± delta) elements to status[1].
* ``MERGE_EXACT``: W1 = round(W0 + delta), and an int8 code per element from which
  ``UNMERGE_EXACT`` restores W0 bit for bit (codes: ``lora_kernels.reference``; design and proof:
  ``lora_kernels.ops.merge``). Elements the code cannot restore go to an escape table.
* ``UNMERGE_EXACT``: W0 from W1 and the codes (escape-table entries are scattered afterwards).

GATED (APPLY / MERGE_EXACT): every load and store is masked off when status[1] != 0, so the
writing pass of a safe merge leaves W untouched after a failed count pass without a host sync.

Determinism: the exact modes rely on MERGE_EXACT and UNMERGE_EXACT computing bit-identical
deltas. Both use the same tile config (a function of shape, dtype and layout only) and launch
with ``enable_fp_fusion=False``, so no compilation can contract ``w ± scale * acc`` into an FMA
in one kernel and not in the other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import reference
from .lora_linear import _cdiv, block_r_for

MODE_APPLY = 0
MODE_COUNT_NONFINITE = 1
MODE_MERGE_EXACT = 2
MODE_UNMERGE_EXACT = 3

_ESCAPE = tl.constexpr(reference.CODE_ESCAPE)
_PENDING = tl.constexpr(reference.CODE_PENDING)
_POS_ZERO = tl.constexpr(reference.CODE_POS_ZERO)
_NEG_ZERO = tl.constexpr(reference.CODE_NEG_ZERO)
_MIN_RESTORED = tl.constexpr(reference.CODE_MIN_RESTORED)
_CODE_MIN = tl.constexpr(reference.CODE_MIN)
_CODE_MAX = tl.constexpr(reference.CODE_MAX)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_APPLY = tl.constexpr(MODE_APPLY)
_COUNT_NONFINITE = tl.constexpr(MODE_COUNT_NONFINITE)
_UNMERGE_EXACT = tl.constexpr(MODE_UNMERGE_EXACT)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """fp32 -> DTYPE, round to nearest even. bf16 is rounded with integer ops (the classic
    ``bits + 0x7FFF + lsb``): the interpreter's ``.to(bfloat16)`` truncates, the GPU's rounds,
    and the exact modes and tests need the same bits on both."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # NaN -> the canonical quiet NaN, as torch
        return rounded.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _ordered(x, BITS: tl.constexpr):
    """Integer keys in the order of the float values: +0 -> 0, -0 -> -1, neighbours -> +-1."""
    if BITS == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        mag = bits & 0x7FFF
    else:
        bits = x.to(tl.int32, bitcast=True).to(tl.int64)
        mag = bits & 0x7FFFFFFF
    return tl.where(bits < 0, -mag - 1, mag)


@triton.jit
def _from_ordered(key, DTYPE: tl.constexpr, BITS: tl.constexpr):
    """Inverse of _ordered."""
    neg = key < 0
    mag = tl.where(neg, -key - 1, key)
    if BITS == 16:
        return tl.where(neg, mag - 32768, mag).to(tl.int16).to(DTYPE, bitcast=True)
    else:
        return tl.where(neg, mag - 2147483648, mag).to(tl.int32).to(DTYPE, bitcast=True)


@triton.jit
def _delta_tile(a_ptr, b_ptr, offs_n, offs_k, N, K, R, scale,
                stride_ar, stride_ak, stride_bn, stride_br,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                PRECISION: tl.constexpr):
    """scale * B[offs_n, :] @ A[:, offs_k] in fp32 (zero outside the matrix)."""
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        offs_r = r0 + tl.arange(0, BLOCK_R)
        b_ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :].to(tl.int64) * stride_br
        a_ptrs = a_ptr + offs_r[:, None].to(tl.int64) * stride_ar + offs_k[None, :].to(tl.int64) * stride_ak
        b = tl.load(b_ptrs, mask=(offs_n[:, None] < N) & (offs_r[None, :] < R), other=0.0)
        a = tl.load(a_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(b.to(tl.float32), a.to(tl.float32), acc, input_precision=PRECISION)
    return acc * scale


@triton.jit
def merge_kernel(
    w_ptr, a_ptr, b_ptr, code_ptr, esc_index_ptr, esc_value_ptr, status_ptr,
    N, K, R, scale, esc_capacity,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br, stride_cn, stride_ck,
    MODE: tl.constexpr, SUBTRACT: tl.constexpr, GATED: tl.constexpr, N_FASTEST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, BITS: tl.constexpr,
):
    # Consecutive programs walk along W's contiguous dimension, so the programs in flight
    # together read one band of memory.
    pid = tl.program_id(0)
    if N_FASTEST:
        tiles_n = tl.cdiv(N, BLOCK_N)
        tile_n = pid % tiles_n
        tile_k = pid // tiles_n
    else:
        tiles_k = tl.cdiv(K, BLOCK_K)
        tile_k = pid % tiles_k
        tile_n = pid // tiles_k
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if GATED:
        mask = mask & (tl.load(status_ptr + 1) == 0)
    dtype = w_ptr.dtype.element_ty

    # Issue the W read before the rank-r product so that its latency hides the dot.
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :].to(tl.int64) * stride_wk
    w = tl.load(w_ptrs, mask=mask, other=0.0)
    delta = _delta_tile(a_ptr, b_ptr, offs_n, offs_k, N, K, R, scale, stride_ar, stride_ak,
                        stride_bn, stride_br, BLOCK_N, BLOCK_K, BLOCK_R, PRECISION)
    wf = w.to(tl.float32)
    code_ptrs = code_ptr + offs_n[:, None].to(tl.int64) * stride_cn + offs_k[None, :].to(tl.int64) * stride_ck

    if MODE == _UNMERGE_EXACT:
        code = tl.load(code_ptrs, mask=mask, other=_ESCAPE).to(tl.int32)
        u = _round_to(wf - delta, dtype)
        key = tl.where(code >= _CODE_MIN, _ordered(u, BITS) + code,
                       tl.where(code == _POS_ZERO, 0, -1))
        # escaped elements are scattered from the table afterwards; pending ones were never merged
        tl.store(w_ptrs, _from_ordered(key, dtype, BITS), mask=mask & (code >= _MIN_RESTORED))
    else:
        if SUBTRACT:
            new = _round_to(wf - delta, dtype)
        else:
            new = _round_to(wf + delta, dtype)
        if MODE == _APPLY:
            tl.store(w_ptrs, new, mask=mask)
        elif MODE == _COUNT_NONFINITE:
            bad = mask & ~(tl.abs(new.to(tl.float32)) <= _FLT_MAX)  # NaN compares false
            n_bad = tl.sum(bad.to(tl.int32), axis=None)
            if n_bad > 0:
                tl.atomic_add(status_ptr + 1, n_bad)
        else:  # MERGE_EXACT
            u = _round_to(new.to(tl.float32) - delta, dtype)  # what UNMERGE_EXACT will compute
            key0 = _ordered(w, BITS)
            q = key0 - _ordered(u, BITS)
            # A NaN W0 always escapes: float conversions need not keep a NaN's payload bits.
            fits = (q >= _CODE_MIN) & (q <= _CODE_MAX) & (w == w)
            code = tl.where(fits, q,
                            tl.where(key0 == 0, _POS_ZERO, tl.where(key0 == -1, _NEG_ZERO, _ESCAPE)))
            escape = mask & (code == _ESCAPE)
            pending = escape & (offs_n[:, None] < 0)  # all False, escape's shape and type
            n_escape = tl.sum(escape.to(tl.int32), axis=None)
            if n_escape > 0:  # rare: one atomic per tile, then slots by a prefix sum
                first = tl.atomic_add(status_ptr, n_escape)
                rank = tl.reshape(tl.cumsum(tl.reshape(escape.to(tl.int32), [BLOCK_N * BLOCK_K]), 0),
                                  [BLOCK_N, BLOCK_K])
                slot = first + rank - 1
                kept = escape & (slot < esc_capacity)
                flat = offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
                tl.store(esc_index_ptr + slot, flat, mask=kept)
                tl.store(esc_value_ptr + slot, w, mask=kept)
                pending = escape & (slot >= esc_capacity)
            code = tl.where(pending, _PENDING, code)
            tl.store(w_ptrs, new, mask=mask & ~pending)
            tl.store(code_ptrs, code.to(tl.int8), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MergeConfig:
    block_n: int
    block_k: int
    block_r: int
    num_warps: int


def merge_config(N: int, K: int, r: int, elem_bytes: int, n_contiguous: bool, exact: bool = False) -> MergeConfig:
    """Tile shape for the merge kernel. Design reasoning for Hopper, not measured (no GPU yet):

    * The kernel streams W once: it is bandwidth-bound when every SM keeps ~32 KB of loads in
      flight (4.2 TB/s x ~1 us latency / 132 SMs). A 64 x 128 tile of a 16-bit W is 16 KB, and
      4 warps with a 64-register fp32 delta leave room for 2-3 resident programs per SM.
    * The long side (128 16-bit or 64 fp32 elements = 256 bytes) runs along W's contiguous
      dimension, so each tile row is two full 128-byte lines.
    * BLOCK_R: the rank chunk, a power of two >= 16 (tl.dot's minimum) and <= 32, which keeps the
      fp32 A and B chunks (<= 16 KB + 8 KB) small enough for that occupancy; rank 64 takes 2 steps.
    * `exact` (MERGE_EXACT / UNMERGE_EXACT): 32 x long-side tiles on 8 warps. Measured by ptxas -v
      for sm_90a (tests/test_triton_merge_compile.py): the exact merge's integer code tiles next
      to the fp32 delta spilled 1.5 KB per thread at 64 x 128 on 4 warps, ~100 B on 8 warps,
      160 B at 64 x 64 on 4 warps; 32 x 128 on 8 warps does not spill. The grid still has
      thousands of programs on the suite's layers (4096 x 4096: 4096).
    The merge and the exact unmerge must use the same config (bit-identical deltas): it depends
    only on these arguments, and both exact modes pass exact=True.
    """
    long_side = 128 if elem_bytes <= 2 else 64
    if exact:
        block_n, block_k = (long_side, 32) if n_contiguous else (32, long_side)
        block_r = min(32, block_r_for(r))
        return MergeConfig(block_n, block_k, block_r, num_warps=8)
    block_n, block_k = (long_side, 64) if n_contiguous else (64, long_side)
    block_r = min(32, block_r_for(r))
    return MergeConfig(block_n, block_k, block_r, num_warps=4)


def _precision(lora_a: torch.Tensor, lora_b: torch.Tensor, device: torch.device) -> str:
    """tl.dot input precision on fp32-converted adapters (see the module docstring)."""
    if device.type != "cuda":
        return "ieee"  # the interpreter computes fp32 products exactly in any mode
    if lora_a.element_size() == 2 and lora_b.element_size() == 2:
        return "tf32"  # 16-bit values are exact in tf32: exact products, fp32 accumulation
    return "tf32x3"


def _launch(mode: int, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
            scale: float, fan_in_fan_out: bool, *, subtract: bool = False, gated: bool = False,
            status: Optional[torch.Tensor] = None, codes: Optional[torch.Tensor] = None,
            escape_index: Optional[torch.Tensor] = None, escape_value: Optional[torch.Tensor] = None,
            config: Optional[MergeConfig] = None) -> None:
    w = reference.logical_weight(weight, fan_in_fan_out)
    N, K = w.shape
    R = lora_a.shape[0]
    if N == 0 or K == 0:
        return
    if config is None:
        config = merge_config(N, K, R, w.element_size(), w.stride(0) < w.stride(1),
                              exact=mode in (MODE_MERGE_EXACT, MODE_UNMERGE_EXACT))
    c = reference.logical_weight(codes, fan_in_fan_out) if codes is not None else w
    dummy = w  # pointer for arguments a mode does not touch
    grid = (_cdiv(N, config.block_n) * _cdiv(K, config.block_k),)
    merge_kernel[grid](
        w, lora_a, lora_b, c, escape_index if escape_index is not None else dummy,
        escape_value if escape_value is not None else dummy, status if status is not None else dummy,
        N, K, R, float(scale), escape_index.numel() if escape_index is not None else 0,
        w.stride(0), w.stride(1), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        c.stride(0), c.stride(1),
        MODE=mode, SUBTRACT=subtract, GATED=gated, N_FASTEST=w.stride(0) < w.stride(1),
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, BLOCK_R=config.block_r,
        PRECISION=_precision(lora_a, lora_b, w.device), BITS=8 * w.element_size(),
        num_warps=config.num_warps, num_stages=1, enable_fp_fusion=False,
    )


def apply_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
           subtract: bool = False, fan_in_fan_out: bool = False, status: Optional[torch.Tensor] = None,
           gated: bool = False, config: Optional[MergeConfig] = None) -> None:
    """In place: weight = round(weight ± scale * lora_b @ lora_a) (skipped if gated and
    status[1] != 0). weight [N, K] ([K, N] if fan_in_fan_out), lora_a [R, K], lora_b [N, R]."""
    _launch(MODE_APPLY, weight, lora_a, lora_b, scale, fan_in_fan_out, subtract=subtract,
            gated=gated, status=status, config=config)


def count_nonfinite_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                     subtract: bool = False, fan_in_fan_out: bool = False, status: torch.Tensor,
                     config: Optional[MergeConfig] = None) -> None:
    """status[1] += number of non-finite round(weight ± delta) elements; weight is only read."""
    _launch(MODE_COUNT_NONFINITE, weight, lora_a, lora_b, scale, fan_in_fan_out, subtract=subtract,
            status=status, config=config)


def merge_exact_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                 fan_in_fan_out: bool = False, codes: torch.Tensor, escape_index: torch.Tensor,
                 escape_value: torch.Tensor, status: torch.Tensor, gated: bool = False,
                 config: Optional[MergeConfig] = None) -> None:
    """The kernel form of ``reference.merge_exact_`` (same arguments, same codes)."""
    _launch(MODE_MERGE_EXACT, weight, lora_a, lora_b, scale, fan_in_fan_out, gated=gated,
            status=status, codes=codes, escape_index=escape_index, escape_value=escape_value,
            config=config)


def unmerge_exact_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                   fan_in_fan_out: bool = False, codes: torch.Tensor, escape_index: torch.Tensor,
                   escape_value: torch.Tensor, num_escapes: int,
                   config: Optional[MergeConfig] = None) -> None:
    """The kernel form of ``reference.unmerge_exact_``: one pass over W and the codes, then the
    escape table's first num_escapes entries scattered into W."""
    _launch(MODE_UNMERGE_EXACT, weight, lora_a, lora_b, scale, fan_in_fan_out, codes=codes,
            config=config)
    reference.scatter_escapes_(weight, escape_index, escape_value, num_escapes, fan_in_fan_out)
