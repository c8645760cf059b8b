"""Triton fused LoRA linear: the fused GEMM kernel (the forward, and the backward's dx), the
shrink and dropout-mask kernels, and their launchers (the dA/dB kernel is in
lora_linear_backward.py).

One launch computes, per output tile,

    y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + scale * sum_j t[m, j] B[n, j],
    t[m, j] = sum_k x[m, k] A[j, k]                        (fp32, never rounded)

Each program owns one block of rows of x and a run of consecutive N tiles. For its first tile,
the K loop loads each x tile once and feeds both products (x.W^T into the tile accumulator,
x.A^T into t); t then stays in registers for the program's remaining tiles, whose K loops compute
only the base product. The epilogue adds ``scale * t @ B^T`` and the bias to the fp32 accumulator
and stores once. Rank r is padded to the tile (BLOCK_R, a power of two >= 16) inside the kernel
by masking; callers never pad.

Mixed precision: adapters may be fp32 over a 16-bit x (PEFT's default). The kernel splits each
fp32 A tile into a 16-bit high part and a 16-bit residual and runs two tensor-core dots, which
keeps about 16 mantissa bits of A (vs 8 for bf16) at the cost of one more rank-wide dot; the
``t @ B^T`` product runs on fp32 operands with ``LORA_PRECISION`` (tf32x3 on GPUs: fp32-accurate
on tensor cores at 3 MMAs of rank depth, negligible next to the K-deep base product).

Dropout (PEFT: on the LoRA input only, scaled by 1/(1-p)) never materialises a mask: kernels
regenerate it from a Philox key read from a device tensor (drawn from torch's generator by the
op), with the counter (k // 4, m) of element (m, k) -- the rule of ``reference.dropout_keep_mask``.
With dropout the forward runs ``lora_shrink_kernel`` first (t = drop(x) @ A^T / (1-p), each mask
bit drawn once) and the fused kernel then reads t instead of recomputing it per N-run, which would
redraw the mask once per run. The same fused kernel computes the backward's
``dx = dy @ W + s * ((dy @ B) @ A) * mask / (1-p)`` with W, A and B passed in the other layout
(``DROPOUT_OUT`` masks the LoRA term of the output tile); see lora_linear_backward.py.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference import dropout_threshold


@triton.jit
def _load_tile(ptr, offs_rows, offs_cols, n_rows, n_cols, stride_rows, stride_cols):
    """A [len(offs_rows), len(offs_cols)] tile, zero outside the matrix. int64 offsets."""
    ptrs = ptr + offs_rows[:, None].to(tl.int64) * stride_rows + offs_cols[None, :].to(tl.int64) * stride_cols
    mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _philox4x32(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (Salmon et al.; the rounds of reference.philox4x32)."""
    for _ in tl.static_range(10):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(prev_c2, 0xCD9E8D57) ^ c1 ^ k0
        c2 = tl.umulhi(prev_c0, 0xD2511F53) ^ c3 ^ k1
        c1 = prev_c2 * 0xCD9E8D57  # low words wrap mod 2**32, as uint32 arithmetic does
        c3 = prev_c0 * 0xD2511F53
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def _philox_key(seed_ptr):
    """The 63-bit seed (an int64 on the device) as the two 32-bit Philox key words."""
    seed = tl.load(seed_ptr)
    return seed.to(tl.uint32), (seed >> 32).to(tl.uint32)


@triton.jit
def _keep_mask(k0, k1, offs_m, col_start, threshold, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """bool [BLOCK_M, BLOCK_C]: keep[m, c] for columns col_start + arange(BLOCK_C), col_start a
    multiple of 4. One Philox call per 4 columns (counter (c // 4, m)); its four words are
    interleaved back into column order: word j belongs to column 4 * (c // 4) + j."""
    groups = col_start // 4 + tl.arange(0, BLOCK_C // 4)
    c0 = tl.zeros((BLOCK_M, BLOCK_C // 4), dtype=tl.uint32) + groups.to(tl.uint32)[None, :]
    c1 = tl.zeros((BLOCK_M, BLOCK_C // 4), dtype=tl.uint32) + offs_m.to(tl.uint32)[:, None]
    zero = tl.zeros((BLOCK_M, BLOCK_C // 4), dtype=tl.uint32)
    w0, w1, w2, w3 = _philox4x32(c0, c1, zero, zero, k0, k1)
    bits = tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3))
    return (bits >> 1).to(tl.int32, bitcast=True) >= threshold


@triton.jit
def _tf32_split(t):
    """t = hi + lo exactly, hi rounded to tf32 (its low 13 mantissa bits are zero, so a tf32 MMA
    reads it exactly) and |lo| <= 2^-11 |t|."""
    hi = ((t.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, t - hi


@triton.jit
def _lora_dot(t, b, acc, LORA_PRECISION: tl.constexpr):
    """acc += t @ b with t fp32 [BM, BR] kept fp32-accurate, b [BR, BN] in the adapter dtype.

    "tf32x2" (GPU, 16-bit b): a 16-bit b is exact in tf32, so only t needs splitting: t = hi + lo
    with hi rounded to tf32 (low 13 mantissa bits zero) and lo = t - hi exact in fp32, then two
    tf32 MMAs. t keeps ~21 bits (the lo term's own tf32 truncation is 2^-11 of 2^-11), b is exact,
    and it costs two tf32 MMAs and three staged fp32 operands instead of tf32x3's three MMAs and
    four (tf32x3 at rank 128 needs 256 KB of shared memory for a 128x128 tile -- over the 227 KB
    an H100/H200 block may use). Otherwise (fp32 b, or the interpreter): one tl.dot at
    LORA_PRECISION ("tf32x3" on GPUs, "ieee" in the interpreter)."""
    if LORA_PRECISION == "tf32x2":
        bf = b.to(tl.float32)
        hi, lo = _tf32_split(t)
        acc = tl.dot(hi, bf, acc, input_precision="tf32")
        acc = tl.dot(lo, bf, acc, input_precision="tf32")
    else:
        acc = tl.dot(t, b.to(tl.float32), acc, input_precision=LORA_PRECISION)
    return acc


@triton.jit
def _shrink_dot(x, a, t, SPLIT_A: tl.constexpr, BASE_PRECISION: tl.constexpr):
    """t += x @ a with x [BM, BK] (x dtype), a [BK, BR] (adapter dtype)."""
    if SPLIT_A:
        # fp32 adapter over 16-bit x: a = hi + lo, both exactly-rounded 16-bit, two native dots.
        a_hi = a.to(x.dtype)
        a_lo = (a - a_hi.to(tl.float32)).to(x.dtype)
        t = tl.dot(x, a_hi, t)
        t = tl.dot(x, a_lo, t)
    else:
        t = tl.dot(x, a.to(x.dtype), t, input_precision=BASE_PRECISION)
    return t


@triton.jit
def _base_and_shrink_tile(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, M, N, K, R,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, SPLIT_A: tl.constexpr, BASE_PRECISION: tl.constexpr):
    """(x @ W[offs_n].T, x @ A.T) for one row block, each x tile loaded once for both."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn)  # W^T tile [BK, BN]
        a = _load_tile(a_ptr, offs_k, offs_r, K, R, stride_ak, stride_ar)  # A^T tile [BK, BR]
        acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
        t = _shrink_dot(x, a, t, SPLIT_A, BASE_PRECISION)
    return acc, t


@triton.jit
def _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BASE_PRECISION: tl.constexpr):
    """x @ W[offs_n].T for one row block."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn)
        acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
    return acc


@triton.jit
def _lora_epilogue_store(acc, t, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n, offs_r, n_start,
                         M, N, R, scale, dropout_threshold, stride_bn, stride_br, stride_ym, stride_yn,
                         HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr,
                         LORA_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[offs_m, offs_n] = acc + scale * (t @ B[offs_n].T) [* keep] + bias, rounded once;
    offs_n = n_start + arange(BLOCK_N)."""
    b = _load_tile(b_ptr, offs_r, offs_n, R, N, stride_br, stride_bn)  # B^T tile [BR, BN]
    if DROPOUT_OUT:  # the backward's dx: the mask of x's element (m, n) drops its LoRA term
        lora = _lora_dot(t, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), LORA_PRECISION)
        k0, k1 = _philox_key(seed_ptr)
        keep = _keep_mask(k0, k1, offs_m, n_start, dropout_threshold, BLOCK_M, BLOCK_N)
        acc += scale * tl.where(keep, lora, 0.0)
    else:
        # Accumulate straight into acc: a separate [BLOCK_M, BLOCK_N] fp32 product tile doubles
        # the epilogue's registers (ptxas: 128x256 tiles spilled ~3 KB per thread with it).
        acc = _lora_dot(t * scale, b, acc, LORA_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def lora_linear_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, t_ptr, seed_ptr,
    M, N, K, R, scale, dropout_threshold,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, LOAD_T: tl.constexpr, DROPOUT_OUT: tl.constexpr,
    SPLIT_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr, GROUP_M: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """y = x @ W^T + bias + scale * t @ B^T [* keep] with t = x @ A^T (or read from t_ptr: LOAD_T).

    The forward runs it as is; the backward's dx runs it with x := dy, W := W0^T, A := B^T,
    B := A^T, t := dy @ B (stored for dA: STORE_T) and DROPOUT_OUT."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_n_runs = tl.cdiv(num_n_tiles, TILES_PER_PROGRAM)
    # Grouped order (Triton matmul tutorial): GROUP_M row blocks sweep the same N runs together,
    # so a W run is fetched from DRAM once per group and re-read from L2.
    pid = tl.program_id(0)
    programs_per_group = GROUP_M * num_n_runs
    first_m_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m_block, GROUP_M)
    m_block = first_m_block + (pid % programs_per_group) % group_rows
    n_run = (pid % programs_per_group) // group_rows

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    first_tile = n_run * TILES_PER_PROGRAM
    offs_n = first_tile * BLOCK_N + tl.arange(0, BLOCK_N)

    if LOAD_T:  # t precomputed (dropout: lora_shrink_kernel drew each mask bit once)
        acc = _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        t = _load_tile(t_ptr, offs_m, offs_r, M, R, stride_tm, stride_tr).to(tl.float32)
    else:
        acc, t = _base_and_shrink_tile(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, M, N, K, R,
                                       stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                                       BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, SPLIT_A, BASE_PRECISION)
        if STORE_T:  # saved for the backward pass; one run per row block writes it
            if n_run == 0:
                t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
                tl.store(t_ptrs, t, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    _lora_epilogue_store(acc, t, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n, offs_r,
                         first_tile * BLOCK_N, M, N, R, scale, dropout_threshold, stride_bn, stride_br,
                         stride_ym, stride_yn, HAS_BIAS, DROPOUT_OUT, LORA_PRECISION, BLOCK_M, BLOCK_N)

    last_tile = tl.minimum(first_tile + TILES_PER_PROGRAM, num_n_tiles)
    for tile in range(first_tile + 1, last_tile):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        _lora_epilogue_store(acc, t, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n, offs_r,
                             tile * BLOCK_N, M, N, R, scale, dropout_threshold, stride_bn, stride_br,
                             stride_ym, stride_yn, HAS_BIAS, DROPOUT_OUT, LORA_PRECISION, BLOCK_M, BLOCK_N)


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, seed_ptr,
    M, K, R, t_scale, dropout_threshold,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_tm, stride_tr,
    DROPOUT: tl.constexpr, SPLIT_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """t[m, :] = t_scale * (x[m] [* keep[m]]) @ A^T in fp32, one program per BLOCK_M rows.

    The forward's dropout pre-pass (t_scale = 1/(1-p)) and the backward's u = dy @ B when dx is
    not needed (A := B^T, no dropout)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    if DROPOUT:
        k0, k1 = _philox_key(seed_ptr)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        if DROPOUT:
            x = tl.where(_keep_mask(k0, k1, offs_m, k_start, dropout_threshold, BLOCK_M, BLOCK_K),
                         x, tl.zeros_like(x))
        a = _load_tile(a_ptr, offs_k, offs_r, K, R, stride_ak, stride_ar)  # A^T tile [BK, BR]
        t = _shrink_dot(x, a, t, SPLIT_A, PRECISION)
    t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
    tl.store(t_ptrs, t * t_scale, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))


@triton.jit
def dropout_mask_kernel(seed_ptr, mask_ptr, M, K, dropout_threshold, stride_mm, stride_mk,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """mask[m, k] = keep[m, k] (1 = keep) as the kernels above draw it: a test helper."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_start = tl.program_id(1) * BLOCK_K
    offs_k = k_start + tl.arange(0, BLOCK_K)
    k0, k1 = _philox_key(seed_ptr)
    keep = _keep_mask(k0, k1, offs_m, k_start, dropout_threshold, BLOCK_M, BLOCK_K)
    ptrs = mask_ptr + offs_m[:, None].to(tl.int64) * stride_mm + offs_k[None, :].to(tl.int64) * stride_mk
    tl.store(ptrs, keep.to(tl.uint8), mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ForwardConfig:
    block_m: int
    block_n: int
    block_k: int
    block_r: int
    tiles_per_program: int
    group_m: int
    num_warps: int
    num_stages: int


def block_r_for(r: int) -> int:
    """Rank padded to a power of two >= 16: tl.dot needs every dimension >= 16."""
    return max(16, triton.next_power_of_2(r))


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises multi-tile programs
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def forward_config(M: int, N: int, K: int, r: int, elem_bytes: int, num_sms: int,
                   mask_epilogue: bool = False, split_adapters: bool = False) -> ForwardConfig:
    """Tile shapes for the forward kernel, keyed on the problem shape.

    The reasons below are design reasoning about Hopper (H100/H200); the founding session had no
    GPU, so none of these is a measured optimum yet -- ``python -m bench --tune`` (issue 2 follow-up)
    is where they get measured.

    * Decode (M <= 16): the work is reading W once (bandwidth-bound). BLOCK_M = 16 is the smallest
      tl.dot tile; BLOCK_N shrinks to 32 when 64-wide tiles would give fewer than two programs per
      SM, so that enough loads are in flight; BLOCK_K = 128 (16-bit) makes each W row read a
      256-byte burst; one tile per program (no reuse to exploit).
    * Mid M (<= 64): 64x128 tiles, 4 warps.
    * Prefill/training (M > 64): 128x256x64 with 8 warps (two warpgroups) and 3 stages, the usual
      best Triton bf16 GEMM tile on Hopper (~144 KB of shared memory at 3 stages); BLOCK_N drops
      to 128 when the padded rank is >= 64, to keep the fp32 t and accumulator in registers.
    * TILES_PER_PROGRAM: the largest divisor of the N-tile count that still launches at least one
      program per SM. t = x.A^T is recomputed once per program, so its extra tensor-core work is
      BLOCK_R / (BLOCK_N * TILES_PER_PROGRAM) of the base product (16 / (256 * 2) = 3% at 4096^2).
    * Register pressure (ptxas -v for sm_90a, tests/test_triton_lora_linear_compile.py): 128x256
      tiles fit 255 registers with a 16-bit rank-16 adapter, but fp32 adapters (the split A in the
      K loop and a tf32x3 t @ B) spilled ~3.5 KB per thread there, so they take BLOCK_N = 128
      (split_adapters), as ranks >= 64 do.
    * mask_epilogue (the backward's dx with dropout): the epilogue draws Philox words for the whole
      [BLOCK_M, BLOCK_N] tile next to the fp32 accumulator; BLOCK_N <= 128 keeps those four
      [BLOCK_M, BLOCK_N / 4] uint32 blocks at <= 64 registers per thread (8 warps), not 128.
    """
    block_r = block_r_for(r)
    fp32 = elem_bytes >= 4
    if M <= 16:
        block_m, block_k, warps, stages = 16, (64 if fp32 else 128), 4, 4
        block_n = 64 if triton.cdiv(N, 64) >= 2 * num_sms else 32
        return ForwardConfig(block_m, block_n, block_k, block_r, 1, 1, warps, stages)
    if M <= 64:
        block_m, block_n, block_k, warps, stages = 64, 128, (32 if fp32 else 64), 4, 4
    else:
        wide = not (block_r >= 64 or fp32 or mask_epilogue or split_adapters)
        block_m, block_n, block_k, warps, stages = 128, (256 if wide else 128), (32 if fp32 else 64), 8, 3
    num_m_blocks = triton.cdiv(M, block_m)
    num_n_tiles = triton.cdiv(N, block_n)
    tiles = 1
    for d in range(num_n_tiles, 0, -1):
        if num_n_tiles % d == 0 and num_m_blocks * (num_n_tiles // d) >= num_sms:
            tiles = d
            break
    return ForwardConfig(block_m, block_n, block_k, block_r, tiles, 8, warps, stages)


def base_precision(x_dtype: torch.dtype, device: torch.device) -> str:
    """tl.dot input precision of the K-deep products: fp32 inputs follow torch (tf32 only if
    ``torch.backends.cuda.matmul.allow_tf32``); 16-bit operands ignore it; the interpreter is exact."""
    if device.type != "cuda":
        return "ieee"
    if x_dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def lora_precision_for(b_dtype: torch.dtype, device: torch.device) -> str:
    """How t @ B runs (see _lora_dot): exact fp32 in the interpreter; on GPUs "tf32x2" for a
    16-bit B (exact in tf32) and "tf32x3" for an fp32 B."""
    if device.type != "cuda":
        return "ieee"
    return "tf32x3" if b_dtype == torch.float32 else "tf32x2"


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def shrink_config(M: int, K: int, r: int, elem_bytes: int, num_sms: int) -> ShrinkConfig:
    """Tiles for ``lora_shrink_kernel`` (reasoning, not measured: no GPU in the session that wrote it).

    It streams x once (bandwidth-bound; the rank-deep dot is tiny), so the goal is enough programs
    in flight: BLOCK_M is the largest of 64/32/16 that still gives two programs per SM. BLOCK_K =
    128 (16-bit) / 64 (fp32) reads each row in 256-byte bursts, as the decode forward does."""
    block_m = 16
    for candidate in (64, 32):
        if triton.cdiv(M, candidate) >= 2 * num_sms:
            block_m = candidate
            break
    return ShrinkConfig(block_m, 64 if elem_bytes >= 4 else 128, block_r_for(r), 4, 3)


def _split_a(x: torch.Tensor, a: torch.Tensor) -> bool:
    return a.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)


def launch_fused(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 bias: Optional[torch.Tensor], y: torch.Tensor, t: Optional[torch.Tensor], *,
                 scale: float, store_t: bool = False, load_t: bool = False,
                 seed: Optional[torch.Tensor] = None, dropout_threshold: int = 0,
                 config: Optional[ForwardConfig] = None) -> None:
    """y = x @ w.T + bias + scale * t @ b.T [masked, if seed is given] with t = x @ a.T (stored
    into t if store_t) or read from t (load_t). x [M, D], w [C, D], a [R, D], b [C, R], y [M, C],
    t [M, R] fp32; any strides (the backward passes transposed views)."""
    M, D = x.shape
    C, R = w.shape[0], a.shape[0]
    if config is None:
        config = forward_config(M, C, D, R, x.element_size(), _num_sms(x.device), seed is not None,
                                b.dtype == torch.float32 and x.dtype != torch.float32)
    base_prec, lora_prec = base_precision(x.dtype, x.device), lora_precision_for(b.dtype, x.device)
    num_m_blocks = triton.cdiv(M, config.block_m)
    num_runs = triton.cdiv(triton.cdiv(C, config.block_n), config.tiles_per_program)
    uses_t = store_t or load_t
    lora_linear_fwd_kernel[(num_m_blocks * num_runs,)](
        x, w, a, b, bias if bias is not None else y, y, t if uses_t else y,
        seed if seed is not None else y,
        M, C, D, R, float(scale), dropout_threshold,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), a.stride(0), a.stride(1),
        b.stride(0), b.stride(1), y.stride(0), y.stride(1),
        t.stride(0) if uses_t else 0, t.stride(1) if uses_t else 0,
        HAS_BIAS=bias is not None, STORE_T=store_t, LOAD_T=load_t, DROPOUT_OUT=seed is not None,
        SPLIT_A=_split_a(x, a),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=config.block_r, TILES_PER_PROGRAM=config.tiles_per_program, GROUP_M=config.group_m,
        BASE_PRECISION=base_prec, LORA_PRECISION=lora_prec,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def launch_shrink(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, *, t_scale: float = 1.0,
                  seed: Optional[torch.Tensor] = None, dropout_threshold: int = 0,
                  config: Optional[ShrinkConfig] = None) -> None:
    """t = t_scale * (x [* keep]) @ a.T in fp32. x [M, D], a [R, D], t [M, R]; any strides."""
    M, D = x.shape
    R = a.shape[0]
    if M == 0:
        return
    if config is None:
        config = shrink_config(M, D, R, x.element_size(), _num_sms(x.device))
    precision = base_precision(x.dtype, x.device)
    lora_shrink_kernel[(triton.cdiv(M, config.block_m),)](
        x, a, t, seed if seed is not None else t,
        M, D, R, float(t_scale), dropout_threshold,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), t.stride(0), t.stride(1),
        DROPOUT=seed is not None, SPLIT_A=_split_a(x, a),
        BLOCK_M=config.block_m, BLOCK_K=config.block_k, BLOCK_R=config.block_r, PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """bool [rows, cols] (True = keep): the mask the kernels draw for this seed -- a test helper
    (the kernels themselves never materialise it). seed: int64 [1] on the device."""
    mask = torch.empty((rows, cols), dtype=torch.uint8, device=seed.device)
    if rows and cols:
        block_m, block_k = 16, 64  # any power-of-two tile (>= 4 columns) draws the same bits
        dropout_mask_kernel[(triton.cdiv(rows, block_m), triton.cdiv(cols, block_k))](
            seed, mask, rows, cols, dropout_threshold(p), mask.stride(0), mask.stride(1),
            BLOCK_M=block_m, BLOCK_K=block_k)
    return mask.view(torch.bool)


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor], save_t: bool,
                    config: Optional[ForwardConfig] = None, out: Optional[torch.Tensor] = None,
                    t_out: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
                    seed: Optional[torch.Tensor] = None,
                    shrink: Optional[ShrinkConfig] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward on validated inputs.

    x [M, K] (any strides), weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] | None.
    Returns (y [M, N] in x.dtype, t [M, r] fp32 = drop(x) @ lora_a.T if save_t else an empty
    [0, r]), where drop(x) = x * keep / (1 - dropout_p) with keep drawn from `seed` (int64 [1] on
    x's device; None = no dropout). `out` / `t_out` (tests poison them) receive y and t when given;
    `config` / `shrink` override the heuristics (tests use them to reach every code path at small
    sizes)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if t_out is not None:
        t = t_out
    else:
        t = torch.empty((M if save_t else 0, r), dtype=torch.float32, device=x.device)
    if M == 0 or N == 0:
        if save_t:
            t.zero_()
        return y, t
    if seed is None:
        launch_fused(x, weight, lora_a, lora_b, bias, y, t, scale=scale, store_t=save_t, config=config)
        return y, t
    # Dropout: draw each mask bit once in the shrink pre-pass, then the fused GEMM reads t.
    t_all = t if save_t else torch.empty((M, r), dtype=torch.float32, device=x.device)
    launch_shrink(x, lora_a, t_all, t_scale=1.0 / (1.0 - dropout_p), seed=seed,
                  dropout_threshold=dropout_threshold(dropout_p), config=shrink)
    launch_fused(x, weight, lora_a, lora_b, bias, y, t_all, scale=scale, load_t=True, config=config)
    return y, t
