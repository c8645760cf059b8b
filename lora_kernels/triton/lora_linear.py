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
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..reference import dropout_threshold
from . import launch_templates as templates


@triton.jit
def _load_tile(ptr, offs_rows, offs_cols, n_rows, n_cols, stride_rows, stride_cols):
    """A [len(offs_rows), len(offs_cols)] tile, zero outside the matrix. int64 offsets."""
    ptrs = ptr + offs_rows[:, None].to(tl.int64) * stride_rows + offs_cols[None, :].to(tl.int64) * stride_cols
    mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _grouped_tile(pid, num_m_blocks, num_col_groups, GROUP_M: tl.constexpr):
    """(m_block, col_group) of program (or tile) `pid` in the grouped order of the Triton matmul
    tutorial: GROUP_M row blocks sweep the same column groups (N runs or N tiles) together, so a
    run of W is fetched from DRAM once per group and re-read from L2."""
    programs_per_group = GROUP_M * num_col_groups
    first_m_block = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(num_m_blocks - first_m_block, GROUP_M)
    m_block = first_m_block + (pid % programs_per_group) % group_rows
    col_group = (pid % programs_per_group) // group_rows
    return m_block, col_group


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
def _tf32_halves(t):
    """(hi, lo), both exact tf32 operands, with t = hi + lo up to 2^-22 |t|: _tf32_split's hi, and
    its lo rounded to tf32 again."""
    hi, lo = _tf32_split(t)
    return hi, _tf32_split(lo)[0]


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
def _a_operand(a_ptr, offs_k, K, R, stride_ah, stride_ar, stride_ak, BLOCK_R: tl.constexpr,
               A_HALVES: tl.constexpr):
    """A^T tile [BK, BLOCK_R], or (A_HALVES) [BK, 2 * BLOCK_R]: the hi half's columns then the lo
    half's. An fp32 adapter is split once per call into two x-dtype halves (hi at a_ptr, lo at
    a_ptr + stride_ah; see split_adapter) and both feed ONE rank-2r dot per K step, copied straight
    to shared memory: no conversion, no shared-memory store and no wait for a first dot inside the
    K loop (an in-loop split, or two chained dots, made the compiler wait for all MMAs each step)."""
    if A_HALVES:
        j = tl.arange(0, 2 * BLOCK_R)
        col = j % BLOCK_R
        ptrs = (a_ptr + (j // BLOCK_R)[None, :].to(tl.int64) * stride_ah + col[None, :].to(tl.int64) * stride_ar
                + offs_k[:, None].to(tl.int64) * stride_ak)
        tile = tl.load(ptrs, mask=(offs_k[:, None] < K) & (col[None, :] < R), other=0.0)
    else:
        tile = _load_tile(a_ptr, offs_k, tl.arange(0, BLOCK_R), K, R, stride_ak, stride_ar)
    return tile


@triton.jit
def _fold_halves(t, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, A_HALVES: tl.constexpr):
    """t [BM, BLOCK_R] from the rank-2r accumulator of A_HALVES (hi part + lo part), else t."""
    if A_HALVES:
        t = tl.sum(tl.reshape(t, (BLOCK_M, 2, BLOCK_R)), axis=1)
    return t


@triton.jit
def _base_and_shrink_tile(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, M, N, K, R, k_begin, k_end,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ah, stride_ar, stride_ak,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, A_HALVES: tl.constexpr, BASE_PRECISION: tl.constexpr):
    """(x @ W[offs_n].T, x @ A.T) for one row block, each x tile loaded once for both."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R * (2 if A_HALVES else 1)), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn)  # W^T tile [BK, BN]
        acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
        a = _a_operand(a_ptr, offs_k, K, R, stride_ah, stride_ar, stride_ak, BLOCK_R, A_HALVES)
        t = tl.dot(x, a.to(x.dtype), t, input_precision=BASE_PRECISION)
    return acc, _fold_halves(t, BLOCK_M, BLOCK_R, A_HALVES)


@triton.jit
def _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, k_begin, k_end, stride_xm, stride_xk, stride_wn,
               stride_wk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BASE_PRECISION: tl.constexpr):
    """x[:, k_begin:k_end] @ W[offs_n, k_begin:k_end].T for one row block."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn)
        acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
    return acc


@triton.jit
def _load_t_sum(t_ptr, offs_m, offs_r, M, R, t_splits, stride_ts, stride_tm, stride_tr,
                BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    """sum_s t[s, offs_m, offs_r] over the shrink's t_splits K-split partials, in order s = 0, 1,
    ... (a fixed order: bitwise reproducible)."""
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for _ in range(0, t_splits):
        t += _load_tile(t_ptr, offs_m, offs_r, M, R, stride_tm, stride_tr).to(tl.float32)
        t_ptr += stride_ts
    return t


@triton.jit
def _lora_epilogue_store(acc, t, t_ptr, t_store_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n,
                         n_start, M, N, R, scale, dropout_threshold, add_terms, store_t, t_splits,
                         stride_ts, stride_tm, stride_tr, stride_sm, stride_sr, stride_bn, stride_br,
                         stride_ym, stride_yn, HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr,
                         LOAD_T: tl.constexpr, LORA_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, T_CHUNK: tl.constexpr):
    """y[offs_m, offs_n] = acc [+ scale * (t @ B[offs_n].T) [* keep] + bias, if add_terms],
    rounded once; offs_n = n_start + arange(BLOCK_N). Split-K partials other than the first pass
    add_terms = False: the LoRA term and the bias are added exactly once.

    t: fp32 [BLOCK_M, BLOCK_R] in registers, or (LOAD_T) read from t_ptr in rank chunks of T_CHUNK
    (summing the shrink's t_splits partials; stored to t_store_ptr when store_t): a rank-128 t
    never sits whole in registers next to the accumulator (ptxas: 128x128 tiles holding the whole
    fp32 t and its tf32 split spilled ~600 B per thread)."""
    if add_terms:
        lora = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)  # used by DROPOUT_OUT only
        if LOAD_T:
            for r0 in tl.static_range(0, BLOCK_R, T_CHUNK):
                offs_r = r0 + tl.arange(0, T_CHUNK)
                tc = _load_t_sum(t_ptr, offs_m, offs_r, M, R, t_splits, stride_ts, stride_tm, stride_tr,
                                 BLOCK_M, T_CHUNK)
                if store_t:
                    t_ptrs = (t_store_ptr + offs_m[:, None].to(tl.int64) * stride_sm
                              + offs_r[None, :] * stride_sr)
                    tl.store(t_ptrs, tc, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
                b = _load_tile(b_ptr, offs_r, offs_n, R, N, stride_br, stride_bn)  # B^T chunk [TC, BN]
                if DROPOUT_OUT:
                    lora = _lora_dot(tc, b, lora, LORA_PRECISION)
                else:
                    acc = _lora_dot(tc * scale, b, acc, LORA_PRECISION)
        else:
            b = _load_tile(b_ptr, tl.arange(0, BLOCK_R), offs_n, R, N, stride_br, stride_bn)  # B^T [BR, BN]
            if DROPOUT_OUT:
                lora = _lora_dot(t, b, lora, LORA_PRECISION)
            else:
                # Accumulate straight into acc: a separate [BLOCK_M, BLOCK_N] fp32 product tile
                # doubles the epilogue's registers (ptxas: 128x256 tiles spilled ~3 KB per thread).
                acc = _lora_dot(t * scale, b, acc, LORA_PRECISION)
        if DROPOUT_OUT:
            k0, k1 = _philox_key(seed_ptr)
            keep = _keep_mask(k0, k1, offs_m, n_start, dropout_threshold, BLOCK_M, BLOCK_N)
            acc += scale * tl.where(keep, lora, 0.0)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# Runtime ints that vary per call are never specialised (no "== 1" constant, no divisibility
# variant): one compiled kernel per layer configuration, whatever M is (issue 16, point 6).
_PER_CALL_INTS = ["M", "tiles_per_program", "k_tiles_per_split", "t_splits"]


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def lora_linear_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, t_ptr, t_store_ptr, seed_ptr,
    M, N, K, R, scale, dropout_threshold, tiles_per_program, k_tiles_per_split, t_splits,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ah, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ys, stride_ym, stride_yn, stride_ts, stride_tm, stride_tr, stride_sm, stride_sr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, LOAD_T: tl.constexpr, DROPOUT_OUT: tl.constexpr,
    A_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    T_CHUNK: tl.constexpr, GROUP_M: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """y = x @ W^T + bias + scale * t @ B^T [* keep] with t = x @ A^T (or read from t_ptr: LOAD_T).

    Program (p, s): row block / run of N tiles p, K range [s * k_per_split, (s + 1) * k_per_split)
    with k_per_split = k_tiles_per_split * BLOCK_K (whole tiles: every K offset stays a known
    multiple of BLOCK_K, which the compiler needs to vectorise the loads into pipelined cp.async
    copies). With one K split (grid axis 1 of size 1, k_per_split >= K) it writes y; with several,
    y_ptr is an fp32 workspace [splits, M, N] (split stride stride_ys), split 0 adds the LoRA term
    and the bias, and ``splitk_reduce_kernel`` sums the partials in a fixed order. Several K splits need
    LOAD_T (t over the whole K). LOAD_T reads t as the sum of t_splits partials (stride_ts apart,
    the split-K shrink's output); STORE_T stores the program's t into t_store_ptr (strides
    stride_sm, stride_sr) from the programs of the first N run and K split.

    The forward runs it as is; the backward's dx runs it with x := dy, W := W0^T, A := B^T,
    B := A^T, t := dy @ B (stored for dA: STORE_T) and DROPOUT_OUT."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_n_runs = tl.cdiv(num_n_tiles, tiles_per_program)
    m_block, n_run = _grouped_tile(tl.program_id(0), num_m_blocks, num_n_runs, GROUP_M)
    k_split = tl.program_id(1)
    k_begin = k_split * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + k_tiles_per_split * BLOCK_K)
    y_ptr += k_split.to(tl.int64) * stride_ys
    first_split = k_split == 0

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    first_tile = n_run * tiles_per_program
    offs_n = first_tile * BLOCK_N + tl.arange(0, BLOCK_N)

    if LOAD_T:  # t precomputed by the (split-K) shrink: A is read once per call, not per N run
        acc = _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, k_begin, k_end, stride_xm, stride_xk,
                         stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        t = 0.0  # read in rank chunks by the epilogue
        store_t = STORE_T & (n_run == 0) & first_split  # the summed partials, once per row block
    else:
        acc, t = _base_and_shrink_tile(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, M, N, K, R,
                                       k_begin, k_end, stride_xm, stride_xk, stride_wn, stride_wk,
                                       stride_ah, stride_ar, stride_ak, BLOCK_M, BLOCK_N, BLOCK_K,
                                       BLOCK_R, A_HALVES, BASE_PRECISION)
        store_t = False
        if STORE_T:  # saved for the backward pass; one program per row block writes it
            if (n_run == 0) & first_split:
                t_ptrs = t_store_ptr + offs_m[:, None].to(tl.int64) * stride_sm + offs_r[None, :] * stride_sr
                tl.store(t_ptrs, t, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    _lora_epilogue_store(acc, t, t_ptr, t_store_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n,
                         first_tile * BLOCK_N, M, N, R, scale, dropout_threshold, first_split, store_t,
                         t_splits, stride_ts, stride_tm, stride_tr, stride_sm, stride_sr, stride_bn,
                         stride_br, stride_ym, stride_yn, HAS_BIAS, DROPOUT_OUT, LOAD_T, LORA_PRECISION,
                         BLOCK_M, BLOCK_N, BLOCK_R, T_CHUNK)

    last_tile = tl.minimum(first_tile + tiles_per_program, num_n_tiles)
    for tile in range(first_tile + 1, last_tile):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, k_begin, k_end, stride_xm, stride_xk,
                         stride_wn, stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        _lora_epilogue_store(acc, t, t_ptr, t_store_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n,
                             tile * BLOCK_N, M, N, R, scale, dropout_threshold, first_split, False,
                             t_splits, stride_ts, stride_tm, stride_tr, stride_sm, stride_sr, stride_bn,
                             stride_br, stride_ym, stride_yn, HAS_BIAS, DROPOUT_OUT, LOAD_T, LORA_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_R, T_CHUNK)


@triton.jit(do_not_specialize=["M", "splits"])
def splitk_reduce_kernel(ws_ptr, y_ptr, M, N, splits, stride_ws, stride_wm, stride_wn, stride_ym, stride_yn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[tile] = sum_s ws[s, tile] in the order s = 0, 1, ... (fp32, rounded once to y's dtype):
    the fixed-order reduction of the fused kernel's K-split partials. No atomics: every run of the
    same launch gives the same bits."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for _ in range(0, splits):  # the pointer advances: no int32 product split * stride_ws
        acc += _load_tile(ws_ptr, offs_m, offs_n, M, N, stride_wm, stride_wn)
        ws_ptr += stride_ws
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit(do_not_specialize=["M", "k_tiles_per_split"])
def lora_shrink_kernel(
    x_ptr, a_ptr, t_ptr, seed_ptr,
    M, K, R, t_scale, dropout_threshold, k_tiles_per_split,
    stride_xm, stride_xk, stride_ah, stride_ar, stride_ak, stride_ts, stride_tm, stride_tr,
    DROPOUT: tl.constexpr, A_HALVES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """t[s, m, :] = t_scale * (x[m, ks] [* keep[m, ks]]) @ A[:, ks]^T in fp32 for the K range
    ks = [s * k_per_split, (s + 1) * k_per_split), k_per_split = k_tiles_per_split * BLOCK_K, of
    program (row block, s): one partial per K
    split (the fused kernel's LOAD_T sums them in order). One split (k_per_split >= K) is t itself.

    The forward's t pre-pass (decode, and wherever the fused kernel would recompute t per N run;
    with dropout t_scale = 1/(1-p), each mask bit drawn once) and the backward's u = dy @ B when
    dx is not needed (A := B^T, no dropout)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    k_split = tl.program_id(1)
    offs_r = tl.arange(0, BLOCK_R)
    k_begin = k_split * k_tiles_per_split * BLOCK_K
    k_end = tl.minimum(K, k_begin + k_tiles_per_split * BLOCK_K)
    if DROPOUT:
        k0, k1 = _philox_key(seed_ptr)
    t = tl.zeros((BLOCK_M, BLOCK_R * (2 if A_HALVES else 1)), dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, offs_m, offs_k, M, K, stride_xm, stride_xk)
        if DROPOUT:
            x = tl.where(_keep_mask(k0, k1, offs_m, k_start, dropout_threshold, BLOCK_M, BLOCK_K),
                         x, tl.zeros_like(x))
        a = _a_operand(a_ptr, offs_k, K, R, stride_ah, stride_ar, stride_ak, BLOCK_R, A_HALVES)
        t = tl.dot(x, a.to(x.dtype), t, input_precision=PRECISION)
    t = _fold_halves(t, BLOCK_M, BLOCK_R, A_HALVES)
    t_ptrs = (t_ptr + k_split.to(tl.int64) * stride_ts + offs_m[:, None].to(tl.int64) * stride_tm
              + offs_r[None, :] * stride_tr)
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


@triton.jit(do_not_specialize=["rows"])  # rows: M for u and t (per call); cols: r or K (per layer)
def split_halves_kernel(src_ptr, out_ptr, rows, cols, stride_sr, stride_sc, stride_oh, stride_or, stride_oc,
                        BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    """out[0] = hi = src rounded to out's dtype; out[1] = lo = (src - hi) rounded: split_adapter's
    two halves of an fp32 src [rows, cols] (any strides), in one pass. An fp32 out holds tf32
    halves (_tf32_halves): both exact tf32 operands."""
    offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    offs_c = tl.program_id(1) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
    mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
    v = tl.load(src_ptr + offs_r[:, None].to(tl.int64) * stride_sr + offs_c[None, :].to(tl.int64) * stride_sc,
                mask=mask, other=0.0)
    if out_ptr.dtype.element_ty == tl.float32:
        hi, lo = _tf32_halves(v)
    else:
        hi = v.to(out_ptr.dtype.element_ty)
        lo = (v - hi.to(tl.float32)).to(out_ptr.dtype.element_ty)
    out = out_ptr + offs_r[:, None].to(tl.int64) * stride_or + offs_c[None, :].to(tl.int64) * stride_oc
    tl.store(out, hi, mask=mask)
    tl.store(out + stride_oh, lo, mask=mask)


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
    split_k: int = 1  # K splits of the fused kernel (fp32 partials, fixed-order reduction)
    precompute_t: bool = False  # t by the split-K shrink first; the fused kernel reads it (LOAD_T)
    # Hopper variant (lora_linear_tma.py): persistent, TMA descriptors, optional warp
    # specialization; used where it applies (t precomputed, no K split, 16-bit, TMA-able strides)
    persistent_tma: bool = False
    warp_specialize: bool = False


@dataclass(frozen=True)
class ShrinkConfig:
    block_m: int
    block_k: int
    block_r: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # K splits: fp32 partials of t, summed in a fixed order


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) for host ints. Not triton.cdiv: called from Python, that is a @triton.jit
    function and goes through the JIT's call path (~1-2 us per call on this CPU; the launchers
    call it several times per launch)."""
    return -(-a // b)


def block_r_for(r: int) -> int:
    """Rank padded to a power of two >= 16: tl.dot needs every dimension >= 16. Plain Python, not
    triton.next_power_of_2 (a constexpr function under triton 3.8: its call path costs ~1-2 us
    from host code, and the launchers ask several times per call)."""
    return 16 if r <= 16 else 1 << (r - 1).bit_length()


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small number exercises multi-tile programs and split-K
    if device.index is None:  # "cuda": whichever device is current now
        return _sm_count(torch.cuda.current_device())
    n = _SMS_BY_DEVICE.get(device)
    if n is None:
        n = _SMS_BY_DEVICE[device] = _sm_count(device.index)
    return n


_SMS_BY_DEVICE: dict = {}  # torch.device("cuda", i) -> SM count (a dict hit, not an lru_cache call)


def t_chunk(block_r: int) -> int:
    """Rank chunk of the LOAD_T epilogue: 32 columns of fp32 t ([128, 32] = 16 registers per thread
    at 8 warps, 32 with its tf32 split). Reason: ptxas -v for sm_90a, the rank-128 forward at
    128x128 spilled ~600 B per thread holding the whole t; a chunk of 32 does not spill (checked by
    tests/test_triton_lora_linear_compile.py). Smaller chunks only add loop steps."""
    return min(block_r, 32)


def k_split_plan(K: int, block_k: int, want: int) -> Tuple[int, int]:
    """(splits, k_per_split): K cut into runs of whole BLOCK_K tiles, at least `want` of them when
    K has that many tiles (the last run may be shorter). One split: k_per_split >= K."""
    k_tiles = _cdiv(max(K, 1), block_k)
    per = max(1, k_tiles // max(1, want))
    return _cdiv(k_tiles, per), per * block_k


def fused_programs(M: int, N: int, cfg: ForwardConfig, K: int) -> int:
    """Programs of one fused launch: row blocks x N runs x K splits."""
    runs = _cdiv(_cdiv(N, cfg.block_n), cfg.tiles_per_program)
    return _cdiv(M, cfg.block_m) * runs * k_split_plan(K, cfg.block_k, cfg.split_k)[0]


def _tile_candidates(M: int, block_r: int, fp32: bool, narrow: bool):
    """(block_m, block_n, block_k, warps, stages) in order of preference for the regime of M.

    Reasoning about Hopper, not measured yet (the tuner measures: bench/tune.py):
    * Decode (M <= 16): reading W once is the whole cost. BLOCK_M = 16 is the smallest tl.dot
      tile; BLOCK_K = 128 (16-bit) makes each W row read a 256-byte burst; 4 stages keep ~16-64 KB
      of loads in flight per program. BLOCK_N 64, then 32, then 16: narrower tiles give more
      programs, so that the grid covers every SM before K is split.
    * Mid M (<= 64): 64x128, then 64x64; 4 warps.
    * M > 64: 128x128x64 with 8 warps (two warpgroups) and 3 stages, then 64x128 and 64x64 (4
      warps), each giving twice the programs of the one before. Not 128x256, the usual best
      Triton bf16 GEMM tile on Hopper: ptxas -v for sm_90a spills its 128-register fp32
      accumulator next to the LoRA epilogue (16-20 B per thread at rank 16 with the tf32 split of
      t, KBs at rank >= 64 or with the Philox words of the dropout epilogue;
      tests/test_triton_lora_linear_compile.py). It stays a tuner candidate (bench/tune.py).
    * fp32 x (`fp32`): BLOCK_K halves (the same bytes per tile), and no 128-column tile: with fp32
      operands 128x128 (8 warps) and 64x128 (4 warps) spilled 8-204 B per thread next to the LoRA
      epilogue (ptxas -v, sm_90a, triton 3.8: M = 4096 at r = 16 and 128, M = 1024 at r = 64,
      dropout, the dx epilogue), and 64x64 with 4 warps 8 B in the dx epilogue at r = 128 with
      dropout. 128x64 and 64x64 with 8 warps spill nothing there
      (tests/test_triton_lora_linear_compile.py).
    * `narrow` is kept for the tuner's candidate grid (it no longer changes these defaults)."""
    bk = 64 if fp32 else 128
    if M <= 16:
        return [(16, bn, bk, 4, 4) for bn in (64, 32, 16)]
    if fp32:
        return [(64, 64, 32, 8, 4)] if M <= 64 else [(128, 64, 32, 8, 3), (64, 64, 32, 8, 4)]
    if M <= 64:
        return [(64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]
    return [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def forward_config(M: int, N: int, K: int, r: int, elem_bytes: int, num_sms: int,
                   mask_epilogue: bool = False, split_adapters: bool = False) -> ForwardConfig:
    """The fused kernel's launch for a problem shape: tiles, K splits and where t comes from.

    Tuned table first (lora_kernels/configs/<card>.json, written by ``python -m bench --suite
    tune``: the nearest measured bucket), else this heuristic:

    * Fill the machine: the first tile of ``_tile_candidates`` whose grid has at least one
      program per SM (one full wave). When none has, the tile with the most programs, and K is
      split into ceil(num_sms / programs) runs: each split writes an fp32 partial of its tile,
      and ``splitk_reduce_kernel`` sums them in a fixed order (no atomics: bitwise reproducible).
      The partials cost 2 x splits x M x N x 4 bytes of traffic, small next to W at the M where
      the grid is short (M <= 128 for the suite's layers).
    * One tile per program: t never has to be reused across a program's tiles, because
    * t comes from the split-K shrink (precompute_t) whenever the fused kernel would otherwise
      recompute it in more than one program per row block (several N tiles, or several K
      splits): A is then streamed once per row block, as W is, and its traffic stays at its floor
      r/N of W's. At decode this removes 0.5x (r = 16) to 4x (r = 128) of W's bytes. The cost is
      one more launch and one more read of x (small next to W at M <= 1024; about one W's worth at
      M = N: the tuner measures whether the fused t wins there).
    """
    from .. import configs
    tuned = configs.lookup("forward", M=M, N=N, K=K, r=r, elem_bytes=elem_bytes, num_sms=num_sms,
                           mask_epilogue=mask_epilogue, split_adapters=split_adapters)
    if tuned is not None:  # measured on a nearby shape: its rank tile follows this r
        return replace(ForwardConfig(**tuned), block_r=block_r_for(r))
    block_r = block_r_for(r)
    narrow = block_r >= 64 or elem_bytes >= 4 or mask_epilogue or split_adapters
    cands = _tile_candidates(M, block_r, elem_bytes >= 4, narrow)
    if mask_epilogue and (block_r >= 64 or split_adapters) and M > 16:
        # ptxas -v, sm_90a: the dx epilogue's separate fp32 LoRA tile, the Philox words and a
        # tf32x3 (fp32 B) or rank-128 product spilled ~520 B per thread at 128x128; 64 columns fit
        cands = [(bm, min(bn, 64), *rest) for bm, bn, *rest in cands]
        cands = [c for i, c in enumerate(cands) if c not in cands[:i]]
    programs = [_cdiv(M, bm) * _cdiv(N, bn) for bm, bn, *_ in cands]
    full = [i for i, p in enumerate(programs) if p >= num_sms]
    choice = full[0] if full else max(range(len(cands)), key=lambda i: (programs[i], -i))
    bm, bn, bk, warps, stages = cands[choice]
    want = 1 if full else _cdiv(num_sms, programs[choice])
    split_k = k_split_plan(K, bk, want)[0]
    precompute_t = split_k > 1 or _cdiv(N, bn) > 1
    return ForwardConfig(bm, bn, bk, block_r, 1, 8, warps, stages, split_k, precompute_t)


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


# The shrink's t partials are summed by the fused kernel as it loads t when they add at most
# this fraction of the W bytes each fused program streams; otherwise one small reduce launch sums
# them first. Reasoning (a launch costs ~2-4 us of GPU time at decode, partial re-reads from L2
# are cheap), not measured yet: the tuner measures it.
T_PARTIALS_MAX_W_FRACTION = 1 / 32


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def shrink_config(M: int, K: int, r: int, elem_bytes: int, num_sms: int) -> ShrinkConfig:
    """Tiles of ``lora_shrink_kernel`` (reasoning about Hopper, not measured yet; the tuner
    measures). Tuned table first, else:

    * BLOCK_M = the fused kernel's row block for this M (16 / 64 / 128): A is then read once per
      row block of the fused kernel (A's floor; issue 16 point 2; a 16-row pre-pass re-read A
      M/16 times); 8 warps at 128 rows keep the fp32 t [128, <= 128] at <= 64 registers.
    * BLOCK_K = 128 (16-bit) / 64 (fp32) at <= 64 rows (256-byte bursts of each row), 64 / 32 at
      128 rows (x and A tiles <= 16 KB each per stage).
    * K splits: enough for one program per SM (the partials are tiny: splits x M x r x 4 bytes)."""
    from .. import configs
    tuned = configs.lookup("shrink", M=M, K=K, r=r, elem_bytes=elem_bytes, num_sms=num_sms)
    if tuned is not None:
        return replace(ShrinkConfig(**tuned), block_r=block_r_for(r))
    fp32 = elem_bytes >= 4
    if M <= 16:
        block_m, block_k, warps, stages = 16, (64 if fp32 else 128), 4, 4
    elif M <= 64:
        block_m, block_k, warps, stages = 64, (64 if fp32 else 128), 4, 3
    else:
        block_m, block_k, warps, stages = 128, (32 if fp32 else 64), 8, 3
    m_blocks = _cdiv(M, block_m)
    split = k_split_plan(K, block_k, _cdiv(num_sms, m_blocks))[0]
    return ShrinkConfig(block_m, block_k, block_r_for(r), warps, stages, split)


# split_halves_kernel's tile: 4096 elements (16 KB of fp32 read per program), BLOCK_COLS the
# padded width up to 128. Not measured (a pass over r x K or M x r, tiny next to the GEMMs).
SPLIT_BLOCK_ELEMENTS = 4096
SPLIT_MAX_BLOCK_COLS = 128


def split_launch(rows: int, cols: int) -> Tuple[Tuple[int, int], dict]:
    """(grid, constexprs) of split_halves_kernel over an [rows, cols] input."""
    block_cols = min(SPLIT_MAX_BLOCK_COLS, block_r_for(cols))
    block_rows = SPLIT_BLOCK_ELEMENTS // block_cols
    return (_cdiv(rows, block_rows), _cdiv(cols, block_cols)), {"BLOCK_ROWS": block_rows, "BLOCK_COLS": block_cols}


def split_adapter(a: torch.Tensor, dtype: torch.dtype, out: Optional[torch.Tensor] = None,
                  launch: Optional[Tuple[Tuple[int, int], dict]] = None, transposed: bool = False) -> torch.Tensor:
    """[2, *a.shape] in `dtype`: a = hi + lo, once per call (~16 mantissa bits of an fp32 adapter,
    or of u / t, in two 16-bit tensor-core operands; the kernels' A_HALVES / HALVES). a: fp32
    [rows, cols], any strides. In plain torch (bit for bit: both round to nearest even)::

        hi = a.to(dtype); lo = (a - hi.float()).to(dtype); return torch.stack((hi, lo))

    With dtype float32 the halves are tf32 (fp32 x's HALVES: ~22 bits in two exact tf32
    operands): hi = a rounded to 10 mantissa bits (ties away from zero, _tf32_split), lo = a - hi
    rounded the same way.

    One launch of split_halves_kernel (those torch ops are five launches and two temporaries:
    ~12 us of host time per split at M = 1, CPU machine). `out` (tests poison it): [2, rows, cols]
    of `dtype` receiving the halves. `launch`: split_launch(rows, cols), when the caller keeps it
    in a launch record. `transposed`: the halves of a.T, read through reversed strides (no view)."""
    rows, cols = a.shape
    stride_r, stride_c = a.stride()
    if transposed:
        rows, cols, stride_r, stride_c = cols, rows, stride_c, stride_r
    if out is None:
        out = templates.empty((2, rows, cols), dtype, a.device)
    if rows and cols:
        grid, kw = launch or split_launch(rows, cols)
        templates.launch(split_halves_kernel, grid, (a, out, rows, cols, stride_r, stride_c, *out.stride()), kw)
    return out


def _adapter_operand(x: torch.Tensor, a: torch.Tensor, transposed: bool = False):
    """(tensor, stride between halves, A_HALVES, its [R, D] strides) as the kernels take A: an fp32
    A over 16-bit x split into halves [2, R, D] (the kernels take the first half's pointer, so no
    view of it is made). `transposed`: `a` is A's transpose as stored ([D, R]; the backward's dx
    passes lora_b itself), read through reversed strides -- no view made (~1 us each, CPU machine)."""
    if a.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16):
        halves = split_adapter(a, x.dtype, transposed=transposed)
        st = halves.stride()
        return halves, st[0], True, st[1:]
    st = a.stride()
    return a, 0, False, (st[1], st[0]) if transposed else st


# t computed inside the fused kernel stays in registers next to the accumulator through the K loop
# and the epilogue; from padded rank 64 on that spills (ptxas -v, sm_90a: ~600 B per thread at
# 128x128, rank 128), so such configs always take t from the shrink (read in rank chunks).
FUSED_T_MAX_BLOCK_R = 64


@dataclass(frozen=True)
class Plan:
    """Everything one fused call launches (host-side arithmetic only): the CPU-lane tests read it
    to check the grid fill and A's traffic over the benchmark suite without a GPU."""
    fused: ForwardConfig
    fused_grid: Tuple[int, int]
    k_per_split: int
    shrink: Optional[ShrinkConfig]
    shrink_grid: Optional[Tuple[int, int]]
    shrink_k_per_split: int
    t_reduce: bool  # the shrink's partials are summed by a reduce launch (else by the fused loads)


@functools.lru_cache(maxsize=4096)  # pure function of ints, bools and frozen configs: once per shape
def plan_forward(M: int, N: int, K: int, r: int, elem_bytes: int, num_sms: int, *,
                 dropout: bool = False, mask_epilogue: bool = False, split_adapters: bool = False,
                 config: Optional[ForwardConfig] = None, shrink: Optional[ShrinkConfig] = None) -> Plan:
    cfg = config or forward_config(M, N, K, r, elem_bytes, num_sms, mask_epilogue, split_adapters)
    if cfg.block_r >= FUSED_T_MAX_BLOCK_R and not cfg.precompute_t:
        cfg = replace(cfg, precompute_t=True)
    splits, k_per_split = k_split_plan(K, cfg.block_k, cfg.split_k)
    runs = _cdiv(_cdiv(N, cfg.block_n), cfg.tiles_per_program)
    fused_grid = (_cdiv(M, cfg.block_m) * runs, splits)
    if not (cfg.precompute_t or dropout or splits > 1):
        return Plan(cfg, fused_grid, k_per_split, None, None, 0, False)
    sc = shrink or shrink_config(M, K, r, elem_bytes, num_sms)
    s_splits, s_per = k_split_plan(K, sc.block_k, sc.split_k)
    w_bytes = cfg.block_n * min(k_per_split, K) * elem_bytes
    # rows past M are masked off, not read: at decode (M = 1 in a 16-row block) a partial is one row
    partial_bytes = (s_splits - 1) * min(M, cfg.block_m) * cfg.block_r * 4
    t_reduce = s_splits > 1 and partial_bytes > T_PARTIALS_MAX_W_FRACTION * w_bytes
    return Plan(cfg, fused_grid, k_per_split, sc, (_cdiv(M, sc.block_m), s_splits), s_per, t_reduce)


REDUCE_BLOCK = (32, 128)  # splitk_reduce_kernel tile: 16 KB of fp32 per partial, coalesced rows


def _reduce_grid(M: int, N: int) -> Tuple[int, int]:
    return _cdiv(M, REDUCE_BLOCK[0]), _cdiv(N, REDUCE_BLOCK[1])


_REDUCE_KW = {"BLOCK_M": REDUCE_BLOCK[0], "BLOCK_N": REDUCE_BLOCK[1], "num_warps": 4}


def _launch_reduce(ws, out, grid, S, M, N, ws_strides, out_strides) -> None:
    """out = sum_s ws[s] in a fixed order (splitk_reduce_kernel): ws [S, M, N] fp32 with
    `ws_strides`, out [M, N] with `out_strides`. out may be ws[0] itself (the strides of that
    view, the pointer of ws): each program reads all partials of its tile before it stores it."""
    templates.launch(splitk_reduce_kernel, grid, (ws, out, M, N, S, *ws_strides, *out_strides), _REDUCE_KW)


def _reduce(ws: torch.Tensor, out: torch.Tensor) -> None:
    """out = ws.sum(0) in a fixed order (splitk_reduce_kernel). ws [S, M, N] fp32."""
    S, M, N = ws.shape
    _launch_reduce(ws, out, _reduce_grid(M, N), S, M, N, ws.stride(), out.stride())


def _strides3(t: torch.Tensor) -> Tuple[int, int, int]:
    """The strides of t.unsqueeze(0) for a 2-D t, without making the view (a view costs ~2 us
    of host time, CPU machine): the kernels take a split stride they never step with one split."""
    s0, s1 = t.stride()
    return t.shape[0] * s0, s0, s1


def _shrink_kw(config: ShrinkConfig) -> dict:
    """lora_shrink_kernel's constexprs and launch options that follow from its config."""
    return {"BLOCK_M": config.block_m, "BLOCK_K": config.block_k, "BLOCK_R": config.block_r,
            "num_warps": config.num_warps, "num_stages": config.num_stages}


def _shrink_flags_kw(config_kw: dict, dropout: bool, a_halves: bool, precision: str) -> dict:
    """All of lora_shrink_kernel's constexprs and launch options: config_kw (_shrink_kw of its
    config) with the per-call flags."""
    return dict(config_kw, DROPOUT=dropout, A_HALVES=a_halves, PRECISION=precision)


def _launch_shrink_kernel(x, a_op, t, t_strides, grid, k_tiles, M, D, R, t_scale,
                          seed, dropout_threshold, kw: dict) -> None:
    """lora_shrink_kernel over grid (row blocks, K splits) into t (strides `t_strides`, 3-D);
    a_op: _adapter_operand's A; kw: _shrink_flags_kw of its config, seed and a_op."""
    a_arg, stride_ah, _, a_strides = a_op
    templates.launch(lora_shrink_kernel, grid, (
        x, a_arg, t, seed if seed is not None else t,
        M, D, R, float(t_scale), dropout_threshold, k_tiles,
        *x.stride(), stride_ah, *a_strides, *t_strides), kw)


def launch_shrink(x: torch.Tensor, a: torch.Tensor, t: torch.Tensor, *, t_scale: float = 1.0,
                  seed: Optional[torch.Tensor] = None, dropout_threshold: int = 0,
                  config: Optional[ShrinkConfig] = None, transposed: bool = False) -> int:
    """t = t_scale * (x [* keep]) @ a.T in fp32. x [M, D], a [R, D]; any strides. t [M, R]: the
    K-split partials (when the config splits K) go to a workspace that one reduce launch sums into
    t in a fixed order; or t [splits, M, R]: the partials themselves (the fused kernel sums them
    as it loads t). Returns the number of partials written to t. `transposed`: a is given as A's
    transpose [D, R] (see _adapter_operand)."""
    M, D = x.shape
    R = a.shape[1] if transposed else a.shape[0]
    if M == 0:
        return 1
    if config is None:
        config = shrink_config(M, D, R, x.element_size(), _num_sms(x.device))
    splits, k_per_split = k_split_plan(D, config.block_k, config.split_k)
    if t.dim() == 2 and splits > 1:
        out = t
        t = templates.empty((splits, M, R), torch.float32, x.device)
        t_strides = t.stride()
    elif t.dim() == 2:
        out, t_strides = None, _strides3(t)
    else:
        out, t_strides = None, t.stride()
    a_op = _adapter_operand(x, a, transposed)
    if base_precision_per_call(x.dtype, x.device):
        templates.not_replayable()  # fp32 x on a GPU: the precision follows a global flag
    _launch_shrink_kernel(x, a_op, t, t_strides, (_cdiv(M, config.block_m), splits),
                          k_per_split // config.block_k, M, D, R, t_scale, seed, dropout_threshold,
                          _shrink_flags_kw(_shrink_kw(config), seed is not None, a_op[2],
                                           base_precision(x.dtype, x.device)))
    if out is not None:
        _reduce(t, out)
        return 1
    return splits


class _Launch:
    """The host-side decisions of one launch_fused key (plan_forward's plan and the ints and
    strings derived from it), computed once per key: a decode step repeats the same few keys
    hundreds of times (issue 16 point 6)."""
    __slots__ = ("plan", "k_tiles", "shrink_k_tiles", "t_chunk", "t_reduce_grid", "out_reduce_grid",
                 "base_prec", "lora_prec", "fused_kw", "shrink_kw", "by_flags")

    def __init__(self, plan: Plan, M: int, C: int, R: int, base_prec: Optional[str], lora_prec: str):
        cfg = plan.fused
        self.plan = plan
        self.k_tiles = plan.k_per_split // cfg.block_k
        self.shrink_k_tiles = plan.shrink_k_per_split // plan.shrink.block_k if plan.shrink is not None else 0
        self.t_chunk = t_chunk(cfg.block_r)
        self.t_reduce_grid = _reduce_grid(M, R)
        self.out_reduce_grid = _reduce_grid(M, C)
        self.base_prec = base_prec  # None: read per call (fp32 x on a GPU follows allow_tf32)
        self.lora_prec = lora_prec
        # the fused kernel's constexprs and launch options that follow from the config
        self.fused_kw = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                         "BLOCK_R": cfg.block_r, "T_CHUNK": self.t_chunk, "GROUP_M": cfg.group_m,
                         "LORA_PRECISION": lora_prec, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
        self.shrink_kw = _shrink_kw(plan.shrink) if plan.shrink is not None else None
        # flags -> a launch's whole kwargs (merged once: ~0.6 us per launch, CPU machine); the
        # flags of one key are a handful of tuples (FUSED_FLAGS / _shrink_flags_kw)
        self.by_flags = {}

    def fused_kwargs(self, flags: tuple) -> dict:
        """lora_linear_fwd_kernel's kwargs: fused_kw with the flags (FUSED_FLAGS' values)."""
        kw = self.by_flags.get(flags)
        if kw is None:
            kw = self.by_flags[flags] = dict(self.fused_kw, **dict(zip(FUSED_FLAGS, flags)))
        return kw

    def shrink_kwargs(self, dropout: bool, a_halves: bool, precision: str) -> dict:
        """lora_shrink_kernel's kwargs: shrink_kw with the flags (_shrink_flags_kw)."""
        flags = ("shrink", dropout, a_halves, precision)
        kw = self.by_flags.get(flags)
        if kw is None:
            kw = self.by_flags[flags] = _shrink_flags_kw(self.shrink_kw, dropout, a_halves, precision)
        return kw


# lora_linear_fwd_kernel's per-call constexprs, in the order of _Launch.fused_kwargs' flags
FUSED_FLAGS = ("HAS_BIAS", "STORE_T", "LOAD_T", "DROPOUT_OUT", "A_HALVES", "BASE_PRECISION")


# The launchers' decisions per launch key. Here (M, C, D, R, x dtype, b dtype, device type, SMs,
# dropout, mask epilogue, config, shrink) -> _Launch (the dtypes give plan_forward's elem_bytes
# and split_adapters); the multi-adapter launchers (multi_lora.py) keep theirs under keys that
# begin with their kind ("shrink", "expand", "linear"). Cleared with the config functions' caches
# when the tuned table changes (configs.set_table / reset / record into the table in use:
# _clear_config_caches), and when it grows past _LAUNCH_CACHE_MAX keys (a bound, not a measured
# size: a model has a few dozen layer shapes).
_LAUNCHES: dict = {}
_LAUNCH_CACHE_MAX = 4096


def clear_launch_cache() -> None:
    _LAUNCHES.clear()


def remember_launch(key, rec):
    """_LAUNCHES[key] = rec (the cache emptied first when full); returns rec."""
    if len(_LAUNCHES) >= _LAUNCH_CACHE_MAX:
        _LAUNCHES.clear()
    _LAUNCHES[key] = rec
    return rec


def base_precision_per_call(x_dtype: torch.dtype, device: torch.device) -> bool:
    """Whether base_precision must be read at each call, not kept in a launch record: fp32 x on a
    GPU follows torch.backends.cuda.matmul.allow_tf32."""
    return device.type == "cuda" and x_dtype == torch.float32


def launch_decisions(M: int, C: int, D: int, R: int, x_dtype: torch.dtype, b_dtype: torch.dtype,
                     device: torch.device, num_sms: int, *, dropout: bool = False, mask_epilogue: bool = False,
                     config: Optional[ForwardConfig] = None, shrink: Optional[ShrinkConfig] = None,
                     cached: bool = True) -> _Launch:
    """The _Launch of a launch_fused call (cached per key unless `cached` is False: the tests
    compare both)."""
    split_adapters = b_dtype == torch.float32 and x_dtype != torch.float32
    elem_bytes = x_dtype.itemsize
    key = (M, C, D, R, x_dtype, b_dtype, device.type, num_sms, dropout, mask_epilogue, config, shrink)
    hit = _LAUNCHES.get(key) if cached else None
    if hit is not None:
        return hit
    plan = plan_forward(M, C, D, R, elem_bytes, num_sms, dropout=dropout, mask_epilogue=mask_epilogue,
                        split_adapters=split_adapters, config=config, shrink=shrink)
    per_call = base_precision_per_call(x_dtype, device)
    rec = _Launch(plan, M, C, R, None if per_call else base_precision(x_dtype, device),
                  lora_precision_for(b_dtype, device))
    return remember_launch(key, rec) if cached else rec


def launch_fused(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 bias: Optional[torch.Tensor], y: torch.Tensor, t: Optional[torch.Tensor], *,
                 scale: float, store_t: bool = False, load_t: bool = False,
                 seed: Optional[torch.Tensor] = None, dropout_threshold: int = 0,
                 config: Optional[ForwardConfig] = None, shrink: Optional[ShrinkConfig] = None,
                 t_scale: float = 1.0, shrink_seed: Optional[torch.Tensor] = None,
                 shrink_threshold: int = 0, transposed: bool = False, decisions: Optional[_Launch] = None) -> None:
    """y = x @ w.T + bias + scale * t @ b.T [masked, if seed is given] with t = x @ a.T (stored
    into t if store_t) or read from t (load_t). x [M, D], w [C, D], a [R, D], b [C, R], y [M, C],
    t [M, R] fp32; any strides. `transposed`: w, a and b are given as their transposes as stored
    (w [D, C], a [D, R], b [R, C]: the backward's dx passes weight, lora_b and lora_a themselves),
    read through reversed strides -- no views made.

    When the plan says so (plan_forward), t is first computed by the split-K shrink
    (t_scale * drop(x) @ a.T with shrink_seed's mask: the forward's dropout), and the fused kernel
    reads it; with several K splits the kernel writes fp32 partials that one reduce launch sums.

    `decisions`: launch_decisions' record of these arguments, when the caller keeps it (the
    backward's record holds its dx launch's): the key is then not built again.

    Host work per call (issue 16 point 6): the decisions come from launch_decisions' cache; one
    fp32 workspace at most per K-split stage (the shrink's partials are summed in place into
    their split 0 when t is not stored); no tensor views (3-D strides are passed as ints)."""
    M, D = x.shape
    C, R = (w.shape[1], a.shape[1]) if transposed else (w.shape[0], a.shape[0])
    if M == 0 or C == 0:
        return
    dev = x.device
    dropout, mask_epilogue = shrink_seed is not None, seed is not None
    rec = decisions
    if rec is None:
        x_dtype, b_dtype, num_sms = x.dtype, b.dtype, _num_sms(dev)
        rec = _LAUNCHES.get((M, C, D, R, x_dtype, b_dtype, dev.type, num_sms, dropout, mask_epilogue, config, shrink))
        if rec is None:
            rec = launch_decisions(M, C, D, R, x_dtype, b_dtype, dev, num_sms, dropout=dropout,
                                   mask_epilogue=mask_epilogue, config=config, shrink=shrink)
    plan = rec.plan
    cfg = plan.fused
    base_prec = rec.base_prec
    if base_prec is None:  # fp32 x on a GPU: the precision follows a global flag
        base_prec = base_precision(x.dtype, dev)
        templates.not_replayable()
    t_src, t_splits = t, 1
    t_strides = _strides3(t) if t is not None and load_t else None
    if plan.shrink is not None and not load_t:
        s_splits = plan.shrink_grid[1]
        a_op = _adapter_operand(x, a, transposed)
        shrink_args = (rec.shrink_k_tiles, M, D, R, t_scale, shrink_seed, shrink_threshold,
                       rec.shrink_kwargs(dropout, a_op[2], base_prec))
        if s_splits == 1:  # the shrink writes t itself
            t_src = t if store_t else templates.empty((M, R), torch.float32, dev)
            t_strides = _strides3(t_src)
            _launch_shrink_kernel(x, a_op, t_src, t_strides, plan.shrink_grid, *shrink_args)
            store_t = False  # t_src is t itself
        elif plan.t_reduce:  # partials, summed by one reduce launch into t (or into partial 0)
            ws = templates.empty((s_splits, M, R), torch.float32, dev)
            ws_strides = ws.stride()
            _launch_shrink_kernel(x, a_op, ws, ws_strides, plan.shrink_grid, *shrink_args)
            if store_t:
                t_src, t_strides = t, _strides3(t)
                _launch_reduce(ws, t, rec.t_reduce_grid, s_splits, M, R, ws_strides, t.stride())
                store_t = False  # t_src is t itself
            else:
                t_src, t_strides = ws, ws_strides  # t = ws[0]: the kernel reads one split
                _launch_reduce(ws, ws, rec.t_reduce_grid, s_splits, M, R, ws_strides, ws_strides[1:])
        else:  # partials, summed by the fused kernel as it loads t
            t_src = templates.empty((s_splits, M, R), torch.float32, dev)
            t_strides = t_src.stride()
            _launch_shrink_kernel(x, a_op, t_src, t_strides, plan.shrink_grid, *shrink_args)
            t_splits = s_splits
        load_t = True
    splits = plan.fused_grid[1]
    if splits > 1 and not load_t:
        raise ValueError("launch_fused: a K-split config needs t precomputed (precompute_t)")
    if cfg.persistent_tma and load_t and not store_t and splits == 1:
        from .lora_linear_tma import launch_tma, tma_layout
        templates.not_replayable()  # views, and a choice read off the data pointers' alignment
        if transposed:  # the TMA launcher takes w and b as views (a large-M path: a view is cheap there)
            w, b, transposed = w.t(), b.t(), False
            a = a.t()
        w_kn = tma_layout(x, w, y)
        if w_kn is not None:
            t3 = t_src.unsqueeze(0) if t_src.dim() == 2 else t_src[:t_splits]
            launch_tma(x, w, b, bias, y, t3, t_splits, scale=scale, seed=seed,
                       dropout_threshold=dropout_threshold, cfg=cfg, num_sms=_num_sms(dev), w_kn=w_kn,
                       base_prec=base_prec, lora_prec=rec.lora_prec, t_chunk=rec.t_chunk,
                       warp_specialize=cfg.warp_specialize)
            return
    if splits == 1:
        out, out_strides = y, _strides3(y)
    else:
        out = templates.empty((splits, M, C), torch.float32, dev)
        out_strides = out.stride()
    a_arg, stride_ah, a_halves, a_strides = _adapter_operand(x, a, transposed) if not load_t else (
        a, 0, False, a.stride()[::-1] if transposed else a.stride())
    w_strides, b_strides = (w.stride()[::-1], b.stride()[::-1]) if transposed else (w.stride(), b.stride())
    ts, ts_strides = (t_src, t_strides) if load_t else (out, out_strides)
    st, st_strides = (t, t.stride()) if store_t else (out, out_strides[1:])
    templates.launch(lora_linear_fwd_kernel, plan.fused_grid, (
        x, w, a_arg, b, bias if bias is not None else y, out, ts, st, seed if seed is not None else y,
        M, C, D, R, float(scale), dropout_threshold, cfg.tiles_per_program, rec.k_tiles, t_splits,
        *x.stride(), *w_strides, stride_ah, *a_strides, *b_strides, *out_strides, *ts_strides,
        *st_strides), rec.fused_kwargs((bias is not None, store_t, load_t, mask_epilogue, a_halves, base_prec)))
    if splits > 1:
        _launch_reduce(out, y, rec.out_reduce_grid, splits, M, C, out_strides, y.stride())


def dropout_mask(seed: torch.Tensor, rows: int, cols: int, p: float) -> torch.Tensor:
    """bool [rows, cols] (True = keep): the mask the kernels draw for this seed -- a test helper
    (the kernels themselves never materialise it). seed: int64 [1] on the device."""
    mask = torch.empty((rows, cols), dtype=torch.uint8, device=seed.device)
    if rows and cols:
        block_m, block_k = 16, 64  # any power-of-two tile (>= 4 columns) draws the same bits
        dropout_mask_kernel[(_cdiv(rows, block_m), _cdiv(cols, block_k))](
            seed, mask, rows, cols, dropout_threshold(p), mask.stride(0), mask.stride(1),
            BLOCK_M=block_m, BLOCK_K=block_k)
    return mask.view(torch.bool)


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor], save_t: bool,
                    config: Optional[ForwardConfig] = None, out: Optional[torch.Tensor] = None,
                    t_out: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
                    seed: Optional[torch.Tensor] = None,
                    shrink: Optional[ShrinkConfig] = None,
                    want_t: bool = True) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the fused forward on validated inputs.

    x [M, K] (any strides), weight [N, K] in x's dtype, lora_a [r, K], lora_b [N, r] in lora_a's
    dtype, bias [N] | None. Returns (y [M, N] in x.dtype, t [M, r] fp32 = drop(x) @ lora_a.T if
    save_t else an empty [0, r]), where drop(x) = x * keep / (1 - dropout_p) with keep drawn from
    `seed` (int64 [1] on x's device; None = no dropout). `out` / `t_out` (tests poison them)
    receive y and t when given; `config` / `shrink` override the heuristics (tests use them to
    reach every code path at small sizes). Dropout always computes t in the shrink first (each
    mask bit drawn once). `want_t` False (with save_t False and no t_out): t comes back as None
    instead of an empty tensor (the eager path drops it: one allocation less per call).

    Host work per call (issue 16 point 6): a call whose signature was seen replays that call's
    launch template (launch_templates.py): the key below is everything _forward_launches decides
    from -- the tensors' shapes, strides, dtypes and device, the scalars and flags (weight's dtype
    and lora_b's shape follow from the validation)."""
    if out is not None or t_out is not None or not templates.ENABLED:
        return _forward_launches(x, weight, lora_a, lora_b, scale, bias, save_t, config, out, t_out, dropout_p,
                                 seed, shrink, want_t)
    key = ("fwd template", x.shape, x.stride(), weight.shape, weight.stride(), lora_a.shape, lora_a.stride(),
           lora_b.stride(), x.dtype, lora_a.dtype, x.device, bias is None, scale, save_t, want_t, dropout_p,
           seed is None, config, shrink)
    inputs = (x, weight, lora_a, lora_b, bias, seed)
    tpl = _LAUNCHES.get(key)
    if tpl is not None:
        return tpl.replay(inputs)
    result, tpl = templates.record(inputs, _forward_launches, x, weight, lora_a, lora_b, scale, bias,
                                          save_t, config, out, t_out, dropout_p, seed, shrink, want_t)
    if tpl is not None:
        remember_launch(key, tpl)
    return result


def _forward_launches(x, weight, lora_a, lora_b, scale, bias, save_t, config, out, t_out, dropout_p, seed, shrink,
                      want_t) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """lora_linear_fwd's allocations and launches (what its templates record)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    y = templates.empty((M, N), x.dtype, x.device) if out is None else out
    if t_out is not None:
        t = t_out
    elif save_t or want_t:
        t = templates.empty((M if save_t else 0, r), torch.float32, x.device)
    else:
        t = None
    if M == 0 or N == 0:
        if save_t:
            templates.not_replayable()
            t.zero_()
        return y, t
    dropout = seed is not None
    launch_fused(x, weight, lora_a, lora_b, bias, y, t if save_t else None, scale=scale, store_t=save_t,
                 config=config, shrink=shrink, t_scale=1.0 / (1.0 - dropout_p) if dropout else 1.0,
                 shrink_seed=seed, shrink_threshold=dropout_threshold(dropout_p) if dropout else 0)
    return y, t
