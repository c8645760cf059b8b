"""Triton multi-adapter (segmented) LoRA kernels and their launchers.

Every token m of a batch uses adapter slot i = token_adapter[m] (or none). Adapters live in
stacks ``A [L, r_max, K]``, ``B [L, N, r_max]`` with per-slot ``scales [L]`` and ``ranks [L]``.
Kernels:

* ``lora_shrink_kernel``:  t[s, m, :] = scales[i] * x[m] @ A_s[i, :rank_i].T   (fp32, 0 past
  rank_i, 0 for tokens with no adapter). Grid: (work-list piece, rank chunk, slice s): up to
  MAX_SLICES stacks (q/k/v, gate/up) in one launch, picked by program id.
* ``lora_expand_kernel``:  y[m, col_s:col_s + N_s] += t[s, m, :rank_i] @ B_s[i, :, :rank_i].T
  for tokens with an adapter; other rows and columns are never stored to. Grid: (work-list
  piece, N tile of the widest slice, slice s). Ranks past RANK_CHUNK (128) are walked in
  EXPAND_RANK_CHUNK-row chunks.
* ``multi_lora_linear_kernel``: y = x @ W.T + bias + each token's adapter, in one pass over x
  and W. Grid: (row block of the sorted token order, run of N tiles). Where t is not computed
  in it (see ``linear_config``), ``multi_lora_linear_chunked_kernel`` streams t from the
  segmented shrink in rank chunks.

``scales`` may be absent (HAS_SCALES=False: the runtime float ``scale`` for every slot).

Work is organised by the ``AdapterIndex`` (serving.py), built on the device with no host sync:
tokens sorted by slot, and a fixed-length work list of pieces "(slot, first sorted position,
length <= T)". Consequences, by design:

* The grids are sized by M (work-list length, or cdiv(M, BLOCK_M) row blocks), never by the
  number of slots L: inactive slots cost nothing, and no host read is needed to size a grid.
* A piece holds tokens of one adapter, so the shrink and expand are plain tiles of tensor-core
  dots with that adapter's A/B tile. The shrink of decode-sized batches uses 16-row pieces (the
  smallest tl.dot tile), and the expand walks its 64-row pieces in 16-row sub-tiles only as far
  as the piece's length, so a 1-token segment occupies 15 masked rows of one 16-row tile --
  masked rows load and store nothing -- never a 64- or 128-row tile; long prefill segments reuse
  each B tile (and, for very large batches, each A tile) over 64 tokens.
* Each adapter's real rank (``ranks``) bounds every load of A, B and t (masked loads fetch no
  bytes past the rank), so entries past the rank are never read and cost no bandwidth; a whole
  rank chunk past the rank is skipped. Within a chunk the tensor-core tile is padded to BLOCK_R
  (>= 16); that padding only costs MMA issue slots, which these bandwidth-bound kernels have to
  spare (see the arithmetic in ``segment_config``).
* The shrink intermediate t stays fp32 end to end; ``t @ B`` keeps it fp32-accurate on tensor
  cores ("tf32x2" for 16-bit B, tf32x3 for fp32 B: see ``_lora_dot``), but for the chunked
  epilogue on wgmma tiles with bf16 B: t as bf16 hi + lo halves, ~16 bits (``_split16_dot``).
  There with fp32 B the shrink stores t split into tf32 hi/lo columns (t4, 4x t's bytes; with
  fp16 B t2, 2x) and the epilogue's dots are transposed (``_rank_chunks_dot_split``).
* The fused kernel's rows are the sorted token order, so a row block touches one adapter
  (prefill) or a few (decode): t is computed in the base GEMM's K loop when the block holds one
  segment, by one masked K loop per segment otherwise, or beforehand by the segmented shrink
  when blocks are expected to hold many, at padded ranks >= 64 and for fp32 adapters
  (``linear_config``); the expand is one rank-deep dot per segment in the epilogue (t from
  registers), or per segment and T_CHUNK-wide rank chunk (t from memory), before the single
  rounding store.
* Every loop with a tensor-core dot is software-pipelined on sm_90a (cp.async copies of every
  dot operand, no wait for all copies or all MMAs, no register -> shared-memory store; compiled
  TTGIR, checked in the CPU lane by tests/test_triton_multi_compile.py, no exemption).
* Deterministic: every output element is written by exactly one program, with a fixed order of
  accumulation; no atomics anywhere (no split-K).

Every tile size and threshold below is design reasoning for Hopper (H100/H200); none was measured
(the session that wrote this had no GPU). The only hardware facts used are from compiling for
sm_90a on a CPU (ptxas -v: registers, spills, shared memory; tests/test_triton_multi_compile.py).
``bench/multi.py`` is where the choices get measured, and each launcher takes a ``config``
override for that.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ..serving import AdapterIndex
from . import launch_templates as templates
from .lora_linear import (_LAUNCHES, ForwardConfig, _cdiv, _grouped_tile, _load_tile, _lora_dot, _num_sms,
                          _shrink_dot, _strides3, _tf32_halves, _tf32_split, _tile_candidates, base_precision,
                          base_precision_per_call, block_r_for, lora_precision_for, remember_launch)


# ----------------------------------------------------------------------------------------------
# Shared device helpers
# ----------------------------------------------------------------------------------------------

@triton.jit
def _gather_rows(ptr, rows, row_ok, offs_cols, n_cols, stride_rows, stride_cols):
    """A [len(rows), len(offs_cols)] tile of rows `rows` (token ids), zero where masked."""
    ptrs = ptr + rows[:, None].to(tl.int64) * stride_rows + offs_cols[None, :].to(tl.int64) * stride_cols
    return tl.load(ptrs, mask=row_ok[:, None] & (offs_cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_rows(ptr, value, rows, row_ok, offs_cols, n_cols, stride_rows, stride_cols):
    ptrs = ptr + rows[:, None].to(tl.int64) * stride_rows + offs_cols[None, :].to(tl.int64) * stride_cols
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_cols[None, :] < n_cols))


@triton.jit
def _rank_of(ranks_ptr, slot, R, HAS_RANKS: tl.constexpr):
    """The rank used for `slot`: ranks[slot] clamped to [0, R] (R = r_max), 0 for slot < 0.

    The clamp is what keeps a bad ranks entry from reading past the stack (the op also reports
    it with an async assert)."""
    if HAS_RANKS:
        rank = tl.load(ranks_ptr + tl.maximum(slot, 0)).to(tl.int32)
        rank = tl.minimum(tl.maximum(rank, 0), R)
    else:
        rank = R
    return tl.where(slot >= 0, rank, 0)


@triton.jit
def _work_item(work_ptr, item):
    """(slot, first sorted position, length) of one work-list piece."""
    slot = tl.load(work_ptr + item * 3)
    start = tl.load(work_ptr + item * 3 + 1)
    length = tl.load(work_ptr + item * 3 + 2)
    return slot, start, length


@triton.jit
def _rank_chunks_dot(acc, t_ptr, b_ptr, tok, rows_ok, offs_r, offs_n, rank, N,
                     stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R: tl.constexpr,
                     PRECISION: tl.constexpr, SEPARATE_B: tl.constexpr, SPLIT16_T: tl.constexpr):
    """acc += t[tok, :rank] @ B[:, :rank].T (B^T chunks [BLOCK_R, BN] at b_ptr), walked in BLOCK_R
    rank chunks, t's rows gathered through tok (rows_ok: rows to read; others read as zeros).

    The loop covers the rank rounded down to 8 entries, its loads masked at that bound: B's rank
    is its contiguous dimension, and a mask that varies entry by entry makes 16-bit loads
    2 bytes wide, too narrow for cp.async (the compiler then loaded B synchronously and
    converted it through shared memory in every iteration; TTGIR, sm_90a, triton 3.8). The
    rank % 8 entries left (none at the usual ranks) take one exactly-masked chunk after it.
    SEPARATE_B: see _epilogue_dot (True for mma.sync tiles, BLOCK_M < 64 rows). SPLIT16_T (wgmma
    tiles, BLOCK_M >= 64): with "tf32x2" and a bf16 B, each chunk's dot is _split16_dot's."""
    SPLIT16: tl.constexpr = SPLIT16_T and PRECISION == "tf32x2" and b_ptr.dtype.element_ty == tl.bfloat16
    acc_lo = tl.zeros_like(acc)  # _split16_dot's t_lo products (not used otherwise)
    rank8 = rank // 8 * 8
    for r0 in range(0, rank8, BLOCK_R):
        offs_rc = r0 + offs_r
        ts = _gather_rows(t_ptr, tok, rows_ok, offs_rc, rank8, stride_tm, stride_tr).to(tl.float32)
        b = _load_tile(b_ptr, offs_rc, offs_n, rank8, N, stride_br, stride_bn)
        acc, acc_lo = _chunk_dot(ts, b, acc, acc_lo, PRECISION, SEPARATE_B, SPLIT16)
    if rank8 < rank:
        offs_rc = rank8 + offs_r
        ts = _gather_rows(t_ptr, tok, rows_ok, offs_rc, rank, stride_tm, stride_tr).to(tl.float32)
        b = _load_tile(b_ptr, offs_rc, offs_n, rank, N, stride_br, stride_bn)
        acc, acc_lo = _chunk_dot(ts, b, acc, acc_lo, PRECISION, SEPARATE_B, SPLIT16)
    if SPLIT16:
        acc += acc_lo
    return acc


@triton.jit
def _chunk_dot(t, b, acc, acc_lo, PRECISION: tl.constexpr, SEPARATE_B: tl.constexpr, SPLIT16: tl.constexpr):
    """(acc, acc_lo) after one rank chunk of _rank_chunks_dot: _split16_dot's two products into
    acc and acc_lo with SPLIT16, else acc += t @ b by _epilogue_dot (acc_lo unchanged)."""
    if SPLIT16:
        acc, acc_lo = _split16_dot(t, b, acc, acc_lo)
    else:
        acc = _epilogue_dot(t, b, acc, PRECISION, SEPARATE_B)
    return acc, acc_lo


@triton.jit
def _split16_dot(t, b, acc, acc_lo):
    """(acc + t_hi @ b, acc_lo + t_lo @ b) for fp32 t [BM, BR] and a bf16 b [BR, BN]: two native
    bf16 dots with fp32 accumulation, t = t_hi + t_lo + e with t_hi = bf16(t),
    t_lo = bf16(t - t_hi), |e| <= 2^-16 |t| (cuda/lora_linear.py split16's split), b exact.
    On wgmma tiles the bf16 b is the shared-memory operand as the pipeline's cp.async copy left
    it and the split t the register operand, so the rank-chunk loop neither converts b nor
    stores to shared memory (tf32x2 needed b as fp32 in shared memory: one store and a wait per
    dot; TTGIR, sm_90a, triton 3.8). The two products go to separate accumulators: chained into
    one, the second dot waited for the first (warp_group_dot_wait {pendings = 0} in every
    iteration; same compile). Not for fp16 b: fp16 halves overflow where |t| > 65504 and t_lo
    keeps no bits in fp16's subnormal range, so fp16 b on wgmma tiles takes t split in tf32
    instead, as does fp32 b (_rank_chunks_dot_split)."""
    t_hi = t.to(tl.bfloat16)
    t_lo = (t - t_hi.to(tl.float32)).to(tl.bfloat16)
    acc = tl.dot(t_hi, b, acc)
    acc_lo = tl.dot(t_lo, b, acc_lo)
    return acc, acc_lo


@triton.jit
def _rank_chunks_dot_split(acc_t, ts_ptr, b_ptr, tok, rows_ok, offs_n, rank, N, R,
                           stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R: tl.constexpr,
                           T_SPLIT: tl.constexpr):
    """acc_t [BN, BM] += (t[tok, :rank] @ B[:, :rank].T)^T with t given split by the shrink
    (_store_split: ts_ptr [rows, T_SPLIT R], R = r_max) and B [N, rank] at b_ptr, on wgmma tiles:
    T_SPLIT = 4 ("tf32x3", fp32 B; t4) or 2 ("tf32x2", fp16 B; t2).

    Transposed, so that B is the dot's register operand and the split t the shared-memory one,
    as its cp.async copy left it: each chunk is one tf32 dot of K = T_SPLIT BLOCK_R,
    x [BN, T_SPLIT BLOCK_R] @ ts^T [T_SPLIT BLOCK_R, BM], x holding B at the columns that meet
    t's halves.

    * T_SPLIT = 4: x holds B's tf32 hi and lo (_tf32_split, lo rounded to tf32 again) at the
      columns that meet t's hi, lo, hi, lo: x t4^T sums b_hi t_hi + b_lo t_hi + b_hi t_lo +
      b_lo t_lo, every operand exact in tf32, so the error is fp32 accumulation plus ~2^-22
      |t||b| (tl.dot's tf32x3 keeps the first three). x's even and odd columns are two loads of
      B, each masked to its columns (every rank entry appears at four columns: a 4-byte copy
      each), and x their elementwise hi + lo: a selection by a column-index select (tl.where) or
      a concatenation of B's halves made the compiler store x to shared memory in every
      iteration, and a K over 16 split the dot and stored too; three separate dots into one
      accumulator waited for each other (warp_group_dot_wait {pendings = 0}; TTGIR, sm_90a,
      triton 3.8, a model of this loop). The untransposed products (tl.dot's tf32x3 or
      _epilogue_dot's) needed B's halves in shared memory: two stores and three waits per
      iteration. Costs, not measured on a GPU: t4 is 4x t's bytes (written once by the shrink,
      read per N tile), and the dot's K is 4 r where tf32x3 issued 3 r.
    * T_SPLIT = 2: an fp16 B is exact in tf32, so x is B itself (converted to fp32 in registers)
      at the columns that meet t_hi and again at those that meet t_lo: x t2^T sums b t_hi +
      b t_lo, the error of _lora_dot's tf32x2 (t keeps ~21 bits, b exact). t2 holds t_hi in its
      first R columns and t_lo in the next R, so each chunk's [hi | lo] columns are two runs and
      x is one load of B's chunk, read twice along its contiguous rank: 16-byte copies the
      pipeline makes asynchronous. (Each entry at two neighbouring columns, as t4 does it, is a
      2-byte copy for a 16-bit B: on the transposed mma.sync tiles (BLOCK_N < 64) the compiler
      then loaded B synchronously and stored it to shared memory in every iteration; TTGIR,
      sm_90a, triton 3.8.) The untransposed tf32x2 (_epilogue_dot) needed B converted to fp32
      in shared memory: one store and two waits per rank chunk (same compile); fp16 halves of t
      instead (B read as stored) would overflow past 65504. Costs, not measured: t2 is 2x t's
      bytes; the dot's K is 2 r, as tf32x2's two dots.

    One loop to the rank, masked there."""
    offs_j = tl.arange(0, T_SPLIT * BLOCK_R)
    odd = (offs_j % 2 == 1)[None, :]
    n_ok = (offs_n < N)[:, None]
    if T_SPLIT == 4:
        for r0 in range(0, rank, BLOCK_R):
            acc_t = _split_chunk_dot(acc_t, ts_ptr, b_ptr, tok, rows_ok, offs_n, offs_j, odd, n_ok, r0, rank, R,
                                     stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R, T_SPLIT)
    else:
        rank8 = rank // 8 * 8
        for r0 in range(0, rank8, BLOCK_R):
            acc_t = _split_chunk_dot(acc_t, ts_ptr, b_ptr, tok, rows_ok, offs_n, offs_j, odd, n_ok, r0, rank8, R,
                                     stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R, T_SPLIT)
        if rank8 < rank:
            acc_t = _split_chunk_dot(acc_t, ts_ptr, b_ptr, tok, rows_ok, offs_n, offs_j, odd, n_ok, rank8, rank, R,
                                     stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R, T_SPLIT)
    return acc_t


@triton.jit
def _split_chunk_dot(acc_t, ts_ptr, b_ptr, tok, rows_ok, offs_n, offs_j, odd, n_ok, r0, bound, R,
                     stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R: tl.constexpr, T_SPLIT: tl.constexpr):
    """One rank chunk [r0, r0 + BLOCK_R) of _rank_chunks_dot_split, entries past `bound` zero."""
    if T_SPLIT == 4:
        ts = _gather_rows(ts_ptr, tok, rows_ok, 4 * r0 + offs_j, 4 * bound, stride_tm, stride_tr)
        rr = r0 + offs_j // 4
    else:
        rr = r0 + offs_j % BLOCK_R
        cols = (offs_j // BLOCK_R) * R + rr  # t_hi's columns, then t_lo's
        t_ptrs = ts_ptr + tok[:, None].to(tl.int64) * stride_tm + cols[None, :].to(tl.int64) * stride_tr
        ts = tl.load(t_ptrs, mask=rows_ok[:, None] & (rr[None, :] < bound), other=0.0)
    ptrs = b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + rr[None, :].to(tl.int64) * stride_br
    ok = n_ok & (rr[None, :] < bound)
    if T_SPLIT == 4:
        b_even = tl.load(ptrs, mask=ok & ~odd, other=0.0)
        b_odd = tl.load(ptrs, mask=ok & odd, other=0.0)
        x = _tf32_split(b_even)[0] + _tf32_halves(b_odd)[1]
    else:
        x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
    return tl.dot(x, tl.trans(ts), acc_t, input_precision="tf32")


# ----------------------------------------------------------------------------------------------
# Segmented shrink and expand (several output slices per launch: grid axis 2 is the slice)
# ----------------------------------------------------------------------------------------------

@triton.jit
def _slice_pick(s, v0, v1, v2, v3):
    """v_s for slice s in 0..3 of a launch (scalar selects, no branch: ints of any width, or
    pointers of one type)."""
    v = tl.where(s == 1, v1, v0)
    v = tl.where(s == 2, v2, v)
    return tl.where(s == 3, v3, v)


@triton.jit
def _scale_of(scales_ptr, slot, scale, HAS_SCALES: tl.constexpr):
    if HAS_SCALES:
        return tl.load(scales_ptr + tl.maximum(slot, 0)).to(tl.float32)
    return scale


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr0, a_ptr1, a_ptr2, a_ptr3, scales_ptr, ranks_ptr, work_ptr, tok_ptr, t_ptr,
    K, R, scale,
    stride_xm, stride_xk, stride_al, stride_ar, stride_ak, stride_ts, stride_tm, stride_tr,
    HAS_SCALES: tl.constexpr, HAS_RANKS: tl.constexpr, SPLIT_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
    T_SPLIT: tl.constexpr = 1,
):
    """t[s, tok, r0:r0+BLOCK_R] for the tokens of one work-list piece, one rank chunk and one
    slice s (stack a_ptr_s; the slices of a launch share the stacks' strides). T_SPLIT 2 or 4:
    t is stored split instead, _store_split's [.., T_SPLIT r_max] columns (t2 / t4)."""
    slot, start, length = _work_item(work_ptr, tl.program_id(0))
    r0 = tl.program_id(1) * BLOCK_R
    s = tl.program_id(2)
    if (length > 0) & (r0 < R):
        offs_i = tl.arange(0, BLOCK_M)
        row_ok = offs_i < length
        tok = tl.load(tok_ptr + start + offs_i, mask=row_ok, other=0)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        rank = _rank_of(ranks_ptr, slot, R, HAS_RANKS)
        t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if r0 < rank:  # chunks wholly past the rank (and the no-adapter group) only store zeros
            a_base = (_slice_pick(s, a_ptr0, a_ptr1, a_ptr2, a_ptr3)
                      + tl.maximum(slot, 0).to(tl.int64) * stride_al)
            if SPLIT_A and BLOCK_M >= 64:
                # t^T = A_hi @ x^T + A_lo @ x^T: the split A is the dot's left operand, which
                # wgmma reads from registers, so the hi/lo halves never go to shared memory and
                # the K loop stays pipelined. As x @ A_half^T (A the right operand, read from
                # shared memory) each half was stored to shared memory mid-iteration and the loop
                # waited for every MMA twice (TTGIR, sm_90a, triton 3.8). The halves accumulate
                # apart: a dot accumulating onto the other's result of the same iteration waited
                # for it (warp_group_dot_wait {pendings = 0}). 16-row pieces (mma.sync, operands
                # in registers either way) keep the plain orientation: t^T spilled 88 B there.
                t_hi = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
                t_lo = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    x = _gather_rows(x_ptr, tok, row_ok, offs_k, K, stride_xm, stride_xk)
                    a = _load_tile(a_base, offs_r, offs_k, rank, K, stride_ar, stride_ak)  # A [BR, BK]
                    a_hi = a.to(x.dtype)
                    a_lo = (a - a_hi.to(tl.float32)).to(x.dtype)
                    x_t = tl.trans(x)
                    t_hi = tl.dot(a_hi, x_t, t_hi)
                    t_lo = tl.dot(a_lo, x_t, t_lo)
                t = tl.trans(t_hi + t_lo)
            else:
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    x = _gather_rows(x_ptr, tok, row_ok, offs_k, K, stride_xm, stride_xk)
                    a = _load_tile(a_base, offs_k, offs_r, K, rank, stride_ak, stride_ar)  # A^T [BK, BR]
                    t = _shrink_dot(x, a, t, SPLIT_A, PRECISION)
            # where, not a product: a non-finite x must not turn the zero columns into NaN
            t = tl.where(offs_r[None, :] < rank, t * _scale_of(scales_ptr, slot, scale, HAS_SCALES), 0.0)
        if T_SPLIT > 1:
            _store_split(t_ptr + s.to(tl.int64) * stride_ts, t, tok, row_ok, r0, R, stride_tm, stride_tr, T_SPLIT)
        else:
            _store_rows(t_ptr + s.to(tl.int64) * stride_ts, t, tok, row_ok, offs_r, R, stride_tm, stride_tr)


@triton.jit
def _store_split(ptr, t, rows, row_ok, r0, R, stride_rows, stride_cols, T_SPLIT: tl.constexpr):
    """Rows `rows` of the [.., T_SPLIT R] split t for t = columns r0.. of t, t_hi = tf32(t) and
    t_lo = tf32(t - t_hi) (_tf32_halves), both exact tf32 operands, t = t_hi + t_lo up to
    2^-22 |t|: T_SPLIT = 4 (t4) puts t_hi at columns 4r, 4r+1 and t_lo at 4r+2, 4r+3, T_SPLIT = 2
    (t2) t_hi at column r and t_lo at R + r. The operand _rank_chunks_dot_split reads as the
    shared-memory side of its dot."""
    t_hi, t_lo = _tf32_halves(t)
    offs_r = r0 + tl.arange(0, t.shape[1])
    base = ptr + rows[:, None].to(tl.int64) * stride_rows
    cols = T_SPLIT * offs_r[None, :].to(tl.int64)
    mask = row_ok[:, None] & (offs_r[None, :] < R)
    if T_SPLIT == 4:
        tl.store(base + cols * stride_cols, t_hi, mask=mask)
        tl.store(base + (cols + 1) * stride_cols, t_hi, mask=mask)
        tl.store(base + (cols + 2) * stride_cols, t_lo, mask=mask)
        tl.store(base + (cols + 3) * stride_cols, t_lo, mask=mask)
    else:
        tl.store(base + offs_r[None, :].to(tl.int64) * stride_cols, t_hi, mask=mask)
        tl.store(base + (R + offs_r[None, :].to(tl.int64)) * stride_cols, t_lo, mask=mask)


@triton.jit
def lora_expand_kernel(
    y_ptr, t_ptr, b_ptr0, b_ptr1, b_ptr2, b_ptr3, ranks_ptr, work_ptr, tok_ptr,
    R, n0, n1, n2, n3, col0, col1, col2, col3, sbl0, sbl1, sbl2, sbl3,
    stride_ym, stride_yn, stride_ts, stride_tm, stride_tr, stride_bn, stride_br,
    HAS_RANKS: tl.constexpr,
    ITEM_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
    RANK_CHUNKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """y[tok, col_s + n-tile] += t[s, tok, :rank] @ B_s[slot, n-tile, :rank].T for one piece, one
    N tile and one slice s (N_s columns starting at col_s; stack b_ptr_s with slot stride sbl_s).

    Ranks up to BLOCK_R: the B tile is loaded once and reused over the piece's rows, which are
    visited in BLOCK_M-row sub-tiles only as far as the piece's length (a 64-token piece of a
    long segment reuses B over 64 rows, a 1-token piece costs one 16-row sub-tile). Larger ranks
    (RANK_CHUNKED): each sub-tile walks the rank in BLOCK_R chunks, re-reading B's chunks from
    L1/L2 per sub-tile, so no tile grows past [16, BLOCK_R] x [BLOCK_R, BLOCK_N]."""
    slot, start, length = _work_item(work_ptr, tl.program_id(0))
    rank = _rank_of(ranks_ptr, slot, R, HAS_RANKS)
    s = tl.program_id(2)
    N = _slice_pick(s, n0, n1, n2, n3)
    n_start = tl.program_id(1) * BLOCK_N
    if (length > 0) & (rank > 0) & (n_start < N):  # no-adapter and rank-0 rows are never stored to
        offs_n = n_start + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        y_base = y_ptr + _slice_pick(s, col0, col1, col2, col3).to(tl.int64) * stride_yn
        t_base = t_ptr + s.to(tl.int64) * stride_ts
        b_base = (_slice_pick(s, b_ptr0, b_ptr1, b_ptr2, b_ptr3)
                  + slot.to(tl.int64) * _slice_pick(s, sbl0, sbl1, sbl2, sbl3).to(tl.int64))
        if RANK_CHUNKED:
            for i0 in range(0, tl.minimum(length, ITEM_M), BLOCK_M):
                offs_i = i0 + tl.arange(0, BLOCK_M)
                row_ok = offs_i < length
                tok = tl.load(tok_ptr + start + offs_i, mask=row_ok, other=0)
                y = _gather_rows(y_base, tok, row_ok, offs_n, N, stride_ym, stride_yn).to(tl.float32)
                y = _rank_chunks_dot(y, t_base, b_base, tok, row_ok, offs_r, offs_n, rank, N,
                                     stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R, PRECISION, BLOCK_M < 64,
                                     False)
                _store_rows(y_base, y, tok, row_ok, offs_n, N, stride_ym, stride_yn)
        else:
            b = _load_tile(b_base, offs_r, offs_n, rank, N, stride_br, stride_bn)  # B^T tile [BR, BN]
            for i0 in range(0, tl.minimum(length, ITEM_M), BLOCK_M):
                offs_i = i0 + tl.arange(0, BLOCK_M)
                row_ok = offs_i < length
                tok = tl.load(tok_ptr + start + offs_i, mask=row_ok, other=0)
                t = _gather_rows(t_base, tok, row_ok, offs_r, rank, stride_tm, stride_tr).to(tl.float32)
                y = _gather_rows(y_base, tok, row_ok, offs_n, N, stride_ym, stride_yn).to(tl.float32)
                y = _epilogue_dot(t, b, y, PRECISION, False)  # b: loaded once, before the loop
                _store_rows(y_base, y, tok, row_ok, offs_n, N, stride_ym, stride_yn)


# ----------------------------------------------------------------------------------------------
# Fused base GEMM + per-token adapters
# ----------------------------------------------------------------------------------------------

@triton.jit
def _segment_bounds(sorted_slot_ptr, slot_start_ptr, p, p_end, L):
    """(slot, end) of the segment holding sorted position p, clipped to the row block.

    The end is at least p + 1, so a loop over segments always makes progress."""
    slot = tl.load(sorted_slot_ptr + p)
    end = tl.load(slot_start_ptr + tl.where(slot >= 0, slot, L) + 1)
    return slot, tl.maximum(tl.minimum(end, p_end), p + 1)


@triton.jit
def _base_rows(x_ptr, w_ptr, tok, row_ok, offs_n, N, K, stride_xm, stride_xk, stride_wn, stride_wk,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               BASE_PRECISION: tl.constexpr):
    """x[tok] @ W[offs_n].T for one block of (sorted) rows."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _gather_rows(x_ptr, tok, row_ok, offs_k, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn)  # W^T tile [BK, BN]
        acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
    return acc


@triton.jit
def _base_and_shrink_rows(x_ptr, w_ptr, a_ptr, tok, row_ok, offs_n, offs_r, N, K, rank,
                          stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_R: tl.constexpr, SPLIT_A: tl.constexpr, BASE_PRECISION: tl.constexpr):
    """(x @ W.T, x @ A.T) for a row block of one adapter: each x tile is loaded once for both."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _gather_rows(x_ptr, tok, row_ok, offs_k, K, stride_xm, stride_xk)
        w = _load_tile(w_ptr, offs_k, offs_n, K, N, stride_wk, stride_wn)
        a = _load_tile(a_ptr, offs_k, offs_r, K, rank, stride_ak, stride_ar)
        acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
        t = _shrink_dot(x, a, t, SPLIT_A, BASE_PRECISION)
    return acc, t


@triton.jit
def _segments_shrink(x_ptr, a_ptr, scales_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr,
                     tok, offs_p, offs_r, p0, p_end, K, R, L, scale,
                     stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
                     HAS_SCALES: tl.constexpr, HAS_RANKS: tl.constexpr, SPLIT_A: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """t for a row block holding several segments: one K loop per segment, over that segment's
    rows only (masked rows fetch nothing; the x rows come back from L2 after the base loop)."""
    t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    p = p0
    while p < p_end:
        slot, seg_end = _segment_bounds(sorted_slot_ptr, slot_start_ptr, p, p_end, L)
        rank = _rank_of(ranks_ptr, slot, R, HAS_RANKS)
        if rank > 0:
            in_seg = (offs_p >= p) & (offs_p < seg_end)
            a_base = a_ptr + slot.to(tl.int64) * stride_al
            ts = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                x = _gather_rows(x_ptr, tok, in_seg, offs_k, K, stride_xm, stride_xk)
                a = _load_tile(a_base, offs_k, offs_r, K, rank, stride_ak, stride_ar)
                ts = _shrink_dot(x, a, ts, SPLIT_A, PRECISION)
            t += tl.where(in_seg[:, None] & (offs_r[None, :] < rank),
                          ts * _scale_of(scales_ptr, slot, scale, HAS_SCALES), 0.0)
        p = seg_end
    return t


@triton.jit
def _segments_expand_store(acc, t, b_ptr, bias_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr, y_ptr,
                           tok, row_ok, offs_p, offs_n, offs_r, p0, p_end, N, R, L,
                           stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                           HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """y[tok, offs_n] = acc + sum over the block's segments of t_seg @ B[slot].T + bias, stored once.

    One rank-deep dot per segment in the block: one for a prefill block inside a long segment,
    a few for decode blocks (the launcher avoids blocks likely to hold many)."""
    p = p0
    while p < p_end:
        slot, seg_end = _segment_bounds(sorted_slot_ptr, slot_start_ptr, p, p_end, L)
        rank = _rank_of(ranks_ptr, slot, R, HAS_RANKS)
        if rank > 0:
            in_seg = (offs_p >= p) & (offs_p < seg_end)
            ts = tl.where(in_seg[:, None] & (offs_r[None, :] < rank), t, 0.0)
            b = _load_tile(b_ptr + slot.to(tl.int64) * stride_bl, offs_r, offs_n, rank, N,
                           stride_br, stride_bn)  # B^T tile [BR, BN]
            acc = _lora_dot(ts, b, acc, LORA_PRECISION)
        p = seg_end
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    _store_rows(y_ptr, acc, tok, row_ok, offs_n, N, stride_ym, stride_yn)


# Runtime ints that vary per call are never specialised (no "== 1" constant, no divisibility
# variant; issue 16, point 6; the single-adapter forward does the same, lora_linear.py): both
# linear kernels compile once per layer configuration whatever M and the tiles per program are.
# The fused kernel's loop over a program's further N tiles counts from 1 (see there): written as
# range(first_tile + 1, min(first_tile + tiles_per_program, num_n_tiles)) with a runtime bound,
# ptxas spilled its 16x64 decode tile at padded rank 32 (96 registers, 12 B; bounded at 255
# registers the rank-16 tile spilled 52 B instead, 32-56 B at 128/168), which is why it once
# kept TILES_PER_PROGRAM a constexpr; counted from 1 it spills nothing at any suite config
# (ptxas -v, sm_90a, triton 3.6 and 3.8; tests/test_triton_multi_compile.py). The configs that
# had TILES_PER_PROGRAM = 1 (no loop) now carry the loop: up to +54 registers (64x64: 118 -> 168,
# 128x128 rank 16: 163 -> 217; triton 3.8), but no config's blocks per SM change, as shared
# memory (or, at 128x128, the registers already) limited them. Not timed on a GPU.
_PER_CALL_INTS = ["M", "tiles_per_program"]


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def multi_lora_linear_kernel(
    x_ptr, w_ptr, bias_ptr, a_ptr, b_ptr, scales_ptr, ranks_ptr, y_ptr,
    tok_ptr, sorted_slot_ptr, slot_start_ptr,
    M, N, K, R, L, tiles_per_program, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_al, stride_ar, stride_ak,
    stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_SCALES: tl.constexpr, HAS_RANKS: tl.constexpr, SPLIT_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """t computed here, held in registers over the program's tiles_per_program N tiles (t from
    the segmented shrink takes multi_lora_linear_chunked_kernel)."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_n_runs = tl.cdiv(num_n_tiles, tiles_per_program)
    # Grouped order (as lora_linear.py): GROUP_M row blocks sweep the same W run together.
    m_block, n_run = _grouped_tile(tl.program_id(0), num_m_blocks, num_n_runs, GROUP_M)

    # Rows are sorted positions: tokens grouped by adapter, so a block touches few adapters.
    p0 = m_block * BLOCK_M
    p_end = tl.minimum(p0 + BLOCK_M, M)
    offs_p = p0 + tl.arange(0, BLOCK_M)
    row_ok = offs_p < M
    tok = tl.load(tok_ptr + offs_p, mask=row_ok, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    first_tile = n_run * tiles_per_program
    offs_n = first_tile * BLOCK_N + tl.arange(0, BLOCK_N)

    first_slot = tl.load(sorted_slot_ptr + p0)
    last_slot = tl.load(sorted_slot_ptr + p_end - 1)
    if first_slot == last_slot:
        # One segment (the common prefill block): the shrink rides on the base K loop.
        rank = _rank_of(ranks_ptr, first_slot, R, HAS_RANKS)
        if rank > 0:
            a_base = a_ptr + first_slot.to(tl.int64) * stride_al
            acc, t = _base_and_shrink_rows(x_ptr, w_ptr, a_base, tok, row_ok, offs_n, offs_r, N, K, rank,
                                           stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                                           BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, SPLIT_A, BASE_PRECISION)
            t = tl.where(offs_r[None, :] < rank, t * _scale_of(scales_ptr, first_slot, scale, HAS_SCALES), 0.0)
        else:  # a block of no-adapter (or rank-0) tokens: the base GEMM alone
            acc = _base_rows(x_ptr, w_ptr, tok, row_ok, offs_n, N, K, stride_xm, stride_xk, stride_wn,
                             stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    else:
        acc = _base_rows(x_ptr, w_ptr, tok, row_ok, offs_n, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        t = _segments_shrink(x_ptr, a_ptr, scales_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr,
                             tok, offs_p, offs_r, p0, p_end, K, R, L, scale,
                             stride_xm, stride_xk, stride_al, stride_ar, stride_ak,
                             HAS_SCALES, HAS_RANKS, SPLIT_A, BLOCK_M, BLOCK_K, BLOCK_R, BASE_PRECISION)
    _segments_expand_store(acc, t, b_ptr, bias_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr, y_ptr,
                           tok, row_ok, offs_p, offs_n, offs_r, p0, p_end, N, R, L,
                           stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                           HAS_BIAS, HAS_RANKS, LORA_PRECISION)

    # The program's remaining N tiles reuse t from registers: only the base K loop runs again.
    # Counted from 1, not as range(first_tile + 1, last_tile): with the runtime tiles_per_program
    # that form made ptxas spill 12 B at 16x64, padded rank 32 (see _PER_CALL_INTS); this one
    # spills nothing. Compile facts, not understood beyond that.
    for i in range(1, tl.minimum(tiles_per_program, num_n_tiles - first_tile)):
        tile = first_tile + i
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _base_rows(x_ptr, w_ptr, tok, row_ok, offs_n, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        _segments_expand_store(acc, t, b_ptr, bias_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr, y_ptr,
                               tok, row_ok, offs_p, offs_n, offs_r, p0, p_end, N, R, L,
                               stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                               HAS_BIAS, HAS_RANKS, LORA_PRECISION)


@triton.jit
def _epilogue_dot(t, b, acc, LORA_PRECISION: tl.constexpr, SEPARATE_B: tl.constexpr):
    """acc += t @ b (_lora_dot), with fp32 b ("tf32x3") as three tf32 dots chained into acc: t and b
    split into tf32 hi + exact lo (_tf32_split), the hi x hi, lo x hi and hi x lo products. The
    same ~2^-22 relative error as tl.dot's tf32x3, without the separate accumulator tile tl.dot
    sums its small products in (ptxas -v, sm_90a, triton 3.8: 20-64 B spilled per thread at
    128x128 with t chunks of 16-32 columns; none chained).

    Inside a loop the compiler makes each mma.sync dot's register operand straight from the
    shared-memory copy the pipeline filled, except for a value that already fed an earlier dot,
    or an earlier dot's operand, as an operand of its own: that one went through a register ->
    shared-memory store in every iteration (TTGIR, sm_90a, triton 3.8). So the second use of
    t_hi is a second, equal value (_tf32_hi_again), and with SEPARATE_B (b loaded in the loop,
    mma.sync tiles: BLOCK_M < 64) so is b_hi's, and tf32x2's second dot reads b + 0.0 (b, up to
    the sign of a zero). Without it b's operands are shared: a loop-invariant b's are made once
    before the loop, and wgmma reads b from shared memory, where a second copy would only add a
    store."""
    if LORA_PRECISION == "tf32x3":
        bf = b.to(tl.float32)
        t_hi, t_lo = _tf32_split(t)
        b_hi, b_lo = _tf32_split(bf)
        acc = tl.dot(t_hi, b_hi, acc, input_precision="tf32")
        acc = tl.dot(t_lo, _tf32_hi_again(bf) if SEPARATE_B else b_hi, acc, input_precision="tf32")
        acc = tl.dot(_tf32_hi_again(t), b_lo, acc, input_precision="tf32")
    elif LORA_PRECISION == "tf32x2":
        bf = b.to(tl.float32)
        hi, lo = _tf32_split(t)
        acc = tl.dot(hi, bf, acc, input_precision="tf32")
        acc = tl.dot(lo, bf + 0.0 if SEPARATE_B else bf, acc, input_precision="tf32")
    else:
        acc = _lora_dot(t, b, acc, LORA_PRECISION)
    return acc


@triton.jit
def _tf32_hi_again(t):
    """_tf32_split(t)[0] by other ops (shifts for the mask), so the compiler keeps it apart."""
    return (((t.to(tl.uint32, bitcast=True) + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)


@triton.jit
def _segments_expand_store_chunked(acc, t_ptr, b_ptr, bias_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr, y_ptr,
                                   tok, row_ok, offs_p, offs_n, offs_r, p0, p_end, N, R, L,
                                   stride_tm, stride_tr, stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                                   HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr, BLOCK_M: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, LORA_PRECISION: tl.constexpr,
                                   T_SPLIT: tl.constexpr):
    """_segments_expand_store with t [rows, rank] read from memory (the segmented shrink's
    output) in BLOCK_R chunks: one rank-chunk dot per segment and chunk, then the single
    rounding store. T_SPLIT 2 or 4: t_ptr is the split t (_store_split) and the products are
    _rank_chunks_dot_split's, summed transposed over the row block's segments and added to acc once."""
    acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # T_SPLIT's (not used otherwise)
    p = p0
    while p < p_end:
        slot, seg_end = _segment_bounds(sorted_slot_ptr, slot_start_ptr, p, p_end, L)
        rank = _rank_of(ranks_ptr, slot, R, HAS_RANKS)
        if rank > 0:
            in_seg = row_ok & (offs_p >= p) & (offs_p < seg_end)
            b_base = b_ptr + slot.to(tl.int64) * stride_bl
            if T_SPLIT > 1:
                acc_t = _rank_chunks_dot_split(acc_t, t_ptr, b_base, tok, in_seg, offs_n, rank, N, R,
                                               stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R, T_SPLIT)
            else:
                acc = _rank_chunks_dot(acc, t_ptr, b_base, tok, in_seg, offs_r, offs_n, rank, N,
                                       stride_tm, stride_tr, stride_br, stride_bn, BLOCK_R, LORA_PRECISION,
                                       BLOCK_M < 64, BLOCK_M >= 64)
        p = seg_end
    if T_SPLIT > 1:
        acc += tl.trans(acc_t)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    _store_rows(y_ptr, acc, tok, row_ok, offs_n, N, stride_ym, stride_yn)


@triton.jit(do_not_specialize=_PER_CALL_INTS)
def multi_lora_linear_chunked_kernel(
    x_ptr, w_ptr, bias_ptr, b_ptr, ranks_ptr, t_ptr, y_ptr,
    tok_ptr, sorted_slot_ptr, slot_start_ptr,
    M, N, K, R, L, tiles_per_program,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_bl, stride_bn, stride_br, stride_tm, stride_tr, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, HAS_RANKS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr, T_SPLIT: tl.constexpr = 1,
):
    """multi_lora_linear_kernel with t [M, r_max] fp32 from the segmented shrink, left in memory:
    each N tile's epilogue streams it in BLOCK_R-wide rank chunks (T_CHUNK;
    _segments_expand_store_chunked), so no rank-wide tile is ever held in registers. Taken for
    every rank where the launch config does not fuse the shrink (ranks past
    FUSED_SHRINK_MAX_BLOCK_R, fp32 adapters, blocks expected to hold many adapters). Same grid
    and row order as the fused kernel. T_SPLIT 2 or 4 (fp16 / fp32 B on wgmma tiles: t_split_for):
    t is given as the shrink's split t [M, T_SPLIT r_max] and BLOCK_R is _rank_chunks_dot_split's
    chunk."""
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_n_runs = tl.cdiv(num_n_tiles, tiles_per_program)
    m_block, n_run = _grouped_tile(tl.program_id(0), num_m_blocks, num_n_runs, GROUP_M)
    p0 = m_block * BLOCK_M
    p_end = tl.minimum(p0 + BLOCK_M, M)
    offs_p = p0 + tl.arange(0, BLOCK_M)
    row_ok = offs_p < M
    tok = tl.load(tok_ptr + offs_p, mask=row_ok, other=0)
    offs_r = tl.arange(0, BLOCK_R)
    first_tile = n_run * tiles_per_program
    last_tile = tl.minimum(first_tile + tiles_per_program, num_n_tiles)
    for tile in range(first_tile, last_tile):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _base_rows(x_ptr, w_ptr, tok, row_ok, offs_n, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        _segments_expand_store_chunked(acc, t_ptr, b_ptr, bias_ptr, ranks_ptr, sorted_slot_ptr, slot_start_ptr,
                                       y_ptr, tok, row_ok, offs_p, offs_n, offs_r, p0, p_end, N, R, L,
                                       stride_tm, stride_tr, stride_bl, stride_bn, stride_br, stride_ym, stride_yn,
                                       HAS_BIAS, HAS_RANKS, BLOCK_M, BLOCK_N, BLOCK_R, LORA_PRECISION, T_SPLIT)


# ----------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SegmentConfig:
    """Tiles of the segmented shrink/expand. item_m: the shrink's work-list piece size (16 or 64),
    also its BLOCK_M; shrink_block_r: the rank chunk of one shrink program; expand_item_m: the
    expand's piece size (it walks a piece in 16-row sub-tiles)."""
    item_m: int
    shrink_block_k: int
    shrink_block_r: int
    expand_block_n: int
    num_warps: int
    num_stages: int
    expand_item_m: int = 64
    expand_num_warps: int = 4


# Below this many tokens the batch is treated as decode-like (16-row pieces). Reasoning, not a
# measurement: with 64-row pieces the shrink has about M / 64 programs (one per piece, the rank
# in one chunk), each streaming 64 rows of x plus one adapter's A; under ~2 waves of the SMs
# (M < 64 * 2 * 132 ~ 16K on an H100/H200) that leaves SMs idle, and a single SM streams well
# under its share of DRAM bandwidth. 16-row pieces give 4x the programs (and rank chunks of 16
# give up to 8x more at rank 128) at the price of re-reading A from L2 once per 16 rows. So 64-row
# pieces are used only when there are enough of them to fill the GPU on their own.
PREFILL_PIECES_PER_SM = 2
EXPAND_BLOCK_M = 16  # the expand's row sub-tile: the smallest tl.dot M


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def segment_config(M: int, K: int, R: int, elem_bytes: int, num_sms: int,
                   split_adapters: bool = False) -> SegmentConfig:
    """Tiles for lora_shrink / lora_expand_ (design reasoning for Hopper; not measured).

    * item_m: 64 when cdiv(M, 64) >= PREFILL_PIECES_PER_SM * num_sms, else 16 (see above).
    * Shrink rank chunk: 16 with 16-row pieces (more programs for the few-token decode batches,
      each reading only its 16 rows of A), the whole padded rank with 64-row pieces (x read once).
      MMA padding is harmless here: a 16-row piece at K = 4096, BLOCK_R = 16 issues 1M MACs while
      it streams 128 KB of A -- ~0.3 us of one SM's tensor cores against >= 1 us of its share of
      DRAM bandwidth.
    * Shrink BLOCK_K: 256 (16-bit) / 128 (fp32 x, or an fp32 A split in the loop) for 16-row
      pieces: each A tile is then 8 KB, and 4 stages keep ~32 KB of loads in flight per program
      (Little's law for one SM at ~1 us latency). (An fp32 A at 256 spilled 36-56 B per thread
      over fp16 x, at 255 registers: its fp32 tile and both halves; ptxas -v, sm_90a, triton
      3.8.) 64 for 64-row pieces (x tile 8 KB, A tile up to 16 KB), 32 when an fp32 A is split
      in the loop (`split_adapters`: its fp32 tile and both 16-bit halves sit in registers;
      ptxas -v, sm_90a, triton 3.8: 8 B spilled per thread at rank 128 with 64, none with 32 --
      measured before the split shrink computed t^T; not re-measured since).
    * Expand: 64-token pieces always, walked in 16-row sub-tiles (EXPAND_BLOCK_M) up to the
      piece's length. Its parallelism comes from the N tiles (BLOCK_N = 128: 32 programs per
      piece at N = 4096), so it never needs small pieces to fill the GPU; a piece of c <= 16
      tokens is one piece in either list, so decode batches launch the same programs, while a
      long segment reuses each B tile [128, r] (<= 32 KB at r = 128) over 64 tokens, not 16.
    """
    fp32 = elem_bytes >= 4
    expand_warps = EXPAND_WIDE_NUM_WARPS if block_r_for(R) == RANK_CHUNK else 4
    if _cdiv(M, 64) >= PREFILL_PIECES_PER_SM * num_sms:
        return SegmentConfig(64, 32 if fp32 or split_adapters else 64, block_r_for(R), 128, 4, 4, 64, expand_warps)
    return SegmentConfig(16, 128 if fp32 or split_adapters else 256, 16, 128, 4, 4, 64, expand_warps)


# Fused kernel: where t comes from. In the kernel, each program computes t for its row block once
# and keeps it for its tiles_per_program N tiles; that re-streams each of the block's adapters' A
# (r x K, from L2) once per program, and a block holding several segments runs one masked K loop
# per segment. Per program that is about segments * BLOCK_R extra columns next to the
# BLOCK_N * tiles_per_program columns of W it streams. Otherwise the segmented shrink computes t
# first: one extra read of x and one more launch, but A read once per piece. Reasoning, not a
# measurement: fuse when a block is expected to hold at most 2 segments AND the extra A columns
# stay within half the W columns -- e.g. prefill blocks inside long segments at any rank, and
# single-adapter decode at rank 16 (BLOCK_N 32, 1 tile: 16 <= 16), but not decode at rank 64
# (64 extra columns per 32 of W) or batches spread over many adapters.
FUSED_SHRINK_MAX_SEGMENTS = 2.0
FUSED_SHRINK_MAX_A_FRACTION = 0.5
# The fused shrink holds t [BLOCK_M, BLOCK_R] fp32 in registers beside the accumulator, and its
# tf32x2 split doubles that in the epilogue. Compile facts (ptxas -v, sm_90a, triton 3.8, on a
# CPU; tests/test_triton_multi_compile.py): at padded rank 128 (128x64 tiles, 8 warps) it spilled
# 672 B per thread, at rank 64 4 B on the decode tile (16x64, 2 tiles per program), with fp32
# adapters (the in-loop hi/lo split of A) 4 B at rank 16 and 784 B at rank 64; 16-bit adapters
# at ranks 16 and 32 do not spill. So padded ranks >= 64 (as the single-adapter forward's
# FUSED_T_MAX_BLOCK_R) and fp32 adapters take t from the segmented shrink (0 B: the chunked
# epilogue streams it in T_CHUNK columns).
FUSED_SHRINK_MAX_BLOCK_R = 32


def expected_segments_per_block(M: int, L: int, block_m: int) -> float:
    """Segments in a sorted row block when M tokens spread evenly over min(L, M) adapters: n rows
    of a block cross about n * adapters / M segment boundaries, and hold at most min(n, adapters)."""
    rows, adapters = min(block_m, M), min(L, M)
    return min(1.0 + rows * adapters / max(M, 1), float(min(rows, adapters)))


@dataclass(frozen=True)
class LinearConfig:
    tiles: ForwardConfig
    fused_shrink: bool
    segment: SegmentConfig


def linear_tiles(M: int, N: int, K: int, R: int, elem_bytes: int, num_sms: int) -> ForwardConfig:
    """Tiles of the fused kernel: fill one wave of SMs where its tiles allow (it has no K split).

    The single-adapter forward's tile candidates (lora_linear._tile_candidates: its reasoning
    holds, this kernel is a base GEMM with a rank-deep side product), plus 64x32 and 64x16 at
    mid M, where 64x64 still leaves SMs idle (M = 64, N = 4096: 64 programs on 132 SMs). The first
    candidate with at least one program per SM wins, else the one with the most programs. Then
    tiles_per_program: the largest divisor of the N-tile count that still launches one program
    per SM (t, computed once per program, is reused over its tiles).

    No rank-dependent tile: at padded ranks past FUSED_SHRINK_MAX_BLOCK_R, t comes from the
    segmented shrink and is streamed in T_CHUNK-column chunks, so nothing rank-wide is held
    beside the accumulator (it was BLOCK_N <= 64 at rank 128 while t sat in registers: ~1.5 KB
    spilled per thread at 128x128). Not measured on a GPU yet: bench/multi.py measures it."""
    block_r = block_r_for(R)
    fp32 = elem_bytes >= 4
    cands = list(_tile_candidates(M, block_r, fp32, block_r >= 64 or fp32))
    if 16 < M <= 64:
        cands += [(64, 32) + cands[-1][2:], (64, 16) + cands[-1][2:]]
    programs = [_cdiv(M, bm) * _cdiv(N, bn) for bm, bn, *_ in cands]
    full = [i for i, p in enumerate(programs) if p >= num_sms]
    choice = full[0] if full else max(range(len(cands)), key=lambda i: (programs[i], -i))
    bm, bn, bk, warps, stages = cands[choice]
    num_m_blocks, num_n_tiles = _cdiv(M, bm), _cdiv(N, bn)
    tiles = 1
    for d in range(num_n_tiles, 0, -1):
        if num_n_tiles % d == 0 and num_m_blocks * (num_n_tiles // d) >= num_sms:
            tiles = d
            break
    return ForwardConfig(bm, bn, bk, block_r, tiles, 8, warps, stages)


@functools.lru_cache(maxsize=4096)  # pure function of ints, called on every launch
def linear_config(M: int, N: int, K: int, R: int, L: int, elem_bytes: int, num_sms: int,
                  split_adapters: bool = False) -> LinearConfig:
    """Tiles of the fused kernel, and whether t is computed inside it (see
    FUSED_SHRINK_MAX_SEGMENTS, FUSED_SHRINK_MAX_BLOCK_R) or by the segmented shrink first.
    `split_adapters`: fp32 adapters over 16-bit x (never fused: see FUSED_SHRINK_MAX_BLOCK_R)."""
    tiles = linear_tiles(M, N, K, R, elem_bytes, num_sms)
    segments = expected_segments_per_block(M, L, tiles.block_m)
    a_fraction = segments * tiles.block_r / (tiles.block_n * tiles.tiles_per_program)
    fused = (segments <= FUSED_SHRINK_MAX_SEGMENTS and a_fraction <= FUSED_SHRINK_MAX_A_FRACTION
             and tiles.block_r <= FUSED_SHRINK_MAX_BLOCK_R and not split_adapters)
    return LinearConfig(tiles, fused, segment_config(M, K, R, elem_bytes, num_sms, split_adapters))


# ----------------------------------------------------------------------------------------------
# Launchers (validated inputs; the ops in lora_kernels/ops/multi_lora.py call these)
# ----------------------------------------------------------------------------------------------

# The widest rank tile a kernel holds whole: the shrink's rank chunk, and the expand's B tile
# (loaded once per piece) up to this rank; past it the expand walks EXPAND_RANK_CHUNK-row
# chunks. Compile facts for sm_90a (ptxas -v on a CPU, triton 3.8,
# tests/test_triton_multi_compile.py): the shrink at 128 uses 168 registers (255 splitting an
# fp32 A: t^T in two accumulators), the whole-rank expand at 128 184-255 (8 warps), neither
# spills. Not measured on a GPU: bench/multi.py is where the chunk widths get measured.
RANK_CHUNK = 128
# The shrink's rank chunk when it stores t split (T_SPLIT, _store_split): at 128 the split and
# t4's four stores beside the 64 x 128 t (fp32 A split on wgmma tiles, 255 registers already)
# spilled 148 B per thread (ptxas -v, sm_90a, triton 3.8; as one joined store 640 B); at 64 none
# (172 registers). The cost: x read once per 64 ranks at padded rank 128. Not measured on a GPU.
T4_SHRINK_MAX_BLOCK_R = 64
# Rank chunk of the fused kernels' t-from-memory epilogue (multi_lora_linear_chunked_kernel):
# a [BM, chunk] fp32 slice of t, its tf32 split and a [chunk, BN] slice of B sit beside the
# accumulator. Compile facts (ptxas -v, sm_90a, triton 3.8; tests/test_triton_multi_compile.py):
# 128-column chunks spilled 40-44 B per thread (16-bit adapters) and 608-1324 B (fp32 adapters)
# at 128x64 and 64x64; 32 columns spill nothing with 16-bit B, while fp32 B (three tf32 dots)
# still spilled 28 B at 64x128 with 32 and nothing with 16. Narrower chunks only add loop steps.
# A bf16 B on wgmma tiles (BLOCK_M >= 64) adds _split16_dot's second accumulator: with 64 or more
# accumulator registers per thread (128x128 at 8 warps, 64x128 at 4) 32 columns used all 255
# registers and spilled 4 B at 128x128 (one tile per program); 16 spill nothing (same compile).
# t split on wgmma tiles (t_split_for: _rank_chunks_dot_split) takes T_SPLIT_DOT_K / T_SPLIT rank
# entries per chunk, a dot of K = T_SPLIT_DOT_K: with fp32 B (t4) and K = 32 the compiler split
# the dot in two and stored its register operand to shared memory in every iteration (TTGIR,
# sm_90a, triton 3.8, a model of the loop). T_CHUNK_FP32_B is fp32 B's chunk elsewhere (mma.sync
# tiles).
T_CHUNK = 32
T_CHUNK_FP32_B = 16
T_SPLIT_DOT_K = 16
T_CHUNK_SPLIT16_WIDE = 16
SPLIT16_WIDE_ACC_REGS = 64


# The split-t paths on (t_split_for). Chosen for their compile facts (no store, no wait; see
# _rank_chunks_dot_split), not by a measurement yet: bench/multi.py's
# ours_linear_triton_fp32ab_untransposed switches them off to time the untransposed tf32x3
# epilogue beside t4 (ours_linear_triton_fp32ab).
SPLIT_T_ENABLED = True


def t_split_for(b_dtype: torch.dtype, lora_precision: str, block_m: int) -> int:
    """T_SPLIT of multi_lora_linear_chunked_kernel and its shrink: t's columns per rank entry
    (_store_split, _rank_chunks_dot_split). On wgmma tiles (BLOCK_M >= 64) with the GPUs'
    precisions, unless SPLIT_T_ENABLED is off: 4 (t4) for fp32 B with "tf32x3", 2 (t2) for fp16 B
    with "tf32x2". Otherwise 1: t as computed (bf16 B on wgmma tiles: _split16_dot)."""
    if not SPLIT_T_ENABLED or block_m < 64:
        return 1
    if b_dtype == torch.float32 and lora_precision == "tf32x3":
        return 4
    return 2 if b_dtype == torch.float16 and lora_precision == "tf32x2" else 1


# Warps of t4 launches with BLOCK_N >= T4_WIDE_BLOCK_N: each thread holds two [BLOCK_N,
# 4 chunk] B loads, their split and the transposed accumulator beside acc; at 64x128 with 4
# warps that spilled 264 B per thread, with 8 none (239 registers; ptxas -v, sm_90a, triton 3.8).
# 128x128 already has 8. Not measured on a GPU.
T4_WIDE_BLOCK_N = 128
T4_WIDE_NUM_WARPS = 8


def chunked_num_warps(num_warps: int, block_n: int, t_split: int) -> int:
    """Warps of a multi_lora_linear_chunked_kernel launch on tiles of `num_warps` (see T4_WIDE_NUM_WARPS)."""
    return max(num_warps, T4_WIDE_NUM_WARPS) if t_split > 1 and block_n >= T4_WIDE_BLOCK_N else num_warps


def t_chunk_for(R: int, b_dtype: torch.dtype, block_m: int, block_n: int, num_warps: int,
                t_split: int = 1) -> int:
    """The chunked epilogue's rank chunk for stacks of rank R (padded), B's dtype and the tile
    (t_split: t_split_for's)."""
    if t_split > 1:
        return T_SPLIT_DOT_K // t_split
    if b_dtype == torch.float32:
        chunk = T_CHUNK_FP32_B
    elif (b_dtype == torch.bfloat16 and block_m >= 64
          and block_m * block_n // (32 * num_warps) >= SPLIT16_WIDE_ACC_REGS):
        chunk = T_CHUNK_SPLIT16_WIDE
    else:
        chunk = T_CHUNK
    return min(block_r_for(R), chunk)


# maxnreg of multi_lora_linear_chunked_kernel's launches: the whole register file a thread may
# use. Without a bound ptxas picks its own occupancy target from the registers alone (it cannot
# see the dynamic shared memory, 36-115 KB per block here, that already limits the kernel to 1-6
# blocks per SM) and spilled long-lived values to reach it: 4-24 B per thread at 48-72
# registers on the decode tiles (BLOCK_M 16); with the bound it uses 54-120 and spills nothing
# (ptxas -v, sm_90a, triton 3.8). Not for multi_lora_linear_kernel: bounded at 255 (or 128, 168)
# ptxas schedules its decode tiles up to the bound and then spills (4-88 B), unbounded it
# spills nothing (measured with its earlier tile-loop form and TILES_PER_PROGRAM a constexpr; not
# re-measured since the loop counts from 1, see _PER_CALL_INTS).
MAX_REGISTERS = 255


# The expand's rank chunk past RANK_CHUNK: each 16-row sub-tile walks B in [EXPAND_RANK_CHUNK,
# BLOCK_N] chunks, converted to fp32 in registers for the tf32 dot. Compile facts (ptxas -v,
# sm_90a, triton 3.8): 128-row chunks spilled 220 B per thread (16-bit B) and 764 B (fp32 B,
# tf32x3) at rank 512; EXPAND_RANK_CHUNK rows spill nothing.
EXPAND_RANK_CHUNK = 32
# The expand's software pipeline: its row loop gathers each 16-row sub-tile's token ids, then t's
# rows through them (two levels of loads), and the compiler spreads num_stages - 2 stages over
# the levels: from 5 on each level gets two, so the t copy for the next sub-tile is in flight
# while one is computed (the loop waits for "all but the newest" copies, never for all; with
# 3-4 it waited for every copy each iteration; TTGIR, sm_90a, triton 3.8). The chunked expand's
# rank loop is pipelined the same way. Compile facts (ptxas -v, sm_90a, triton 3.8): no spill at
# any suite config with 4 warps, except the whole-rank tile at padded rank 128 (16 B with bf16
# B, 4 B with fp32 B), which takes EXPAND_WIDE_NUM_WARPS (none). Not measured on a GPU.
EXPAND_NUM_STAGES = 5
EXPAND_WIDE_NUM_WARPS = 8


def expand_block_r(R: int) -> Tuple[int, bool]:
    """(BLOCK_R, RANK_CHUNKED) of lora_expand_kernel for stacks of rank R: the whole padded rank
    up to RANK_CHUNK (B's tile loaded once per piece), else EXPAND_RANK_CHUNK-row chunks."""
    if block_r_for(R) <= RANK_CHUNK:
        return block_r_for(R), False
    return EXPAND_RANK_CHUNK, True


MAX_SLICES = 4  # slices per launch (q/k/v, gate/up, SGLang's qkvz): the kernels select by program id


def _slice_groups(stacks: List[torch.Tensor], uniform_strides) -> List[Tuple[int, int]]:
    """[start, end) runs of at most MAX_SLICES stacks with equal `uniform_strides(stack)`: one
    launch each (the kernels take one set of strides). Stacks that differ (rare: views with
    other strides) get launches of their own."""
    groups, start = [], 0
    while start < len(stacks):
        end = start + 1
        while (end < len(stacks) and end - start < MAX_SLICES
               and uniform_strides(stacks[end]) == uniform_strides(stacks[start])):
            end += 1
        groups.append((start, end))
        start = end
    return groups


def _pointers4(group: List[torch.Tensor]) -> List[torch.Tensor]:
    """The group's stacks padded to MAX_SLICES pointer arguments (unused ones repeat the first)."""
    return list(group) + [group[0]] * (MAX_SLICES - len(group))


def _slices_of(t: torch.Tensor, start: int, end: int) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """(t[start:end], its strides) for t [S, M, R], or for t [M, R] as one slice (start 0, end 1)
    with the strides of t.unsqueeze(0): a view is made only for a part of t (a view costs ~2 us
    of host time on the CPU machine; one group of slices, the usual call, needs none)."""
    if t.dim() == 2:
        return t, _strides3(t)
    if start == 0 and end == t.shape[0]:
        return t, t.stride()
    templates.not_replayable()  # a view of t
    part = t[start:end]
    return part, part.stride()


def _pad4(values: List[int]) -> List[int]:
    return list(values) + [0] * (MAX_SLICES - len(values))


# The host-side decisions of one launch (configs, tiles, grid axes, the kernel's constexprs and
# launch options), kept in lora_linear's launch cache (_LAUNCHES, remember_launch) per launch key:
# a decode step repeats the same few keys hundreds of times, and deriving them cost ~3-5 us per
# launch (issue 16 point 6; CPU machine). The keys begin with the launcher's kind and hold what the
# decisions read: shapes, dtypes, device type, SM count, which optional vectors are given, and an
# explicit config (tests).


def _shrink_launch(key, M: int, K: int, R: int, x_dtype: torch.dtype, a_dtype: torch.dtype, device: torch.device,
                   num_sms: int, has_scales: bool, has_ranks: bool, config: Optional[SegmentConfig],
                   t_split: int):
    """(work piece size, rank tiles, the kernel's keyword arguments: PRECISION left out when it is
    read per call) of shrink_slices for `key`, remembered (key None: not remembered)."""
    split_a = a_dtype == torch.float32 and x_dtype != torch.float32
    cfg = config or segment_config(M, K, R, x_dtype.itemsize, num_sms, split_a)
    block_r = min(cfg.shrink_block_r, T4_SHRINK_MAX_BLOCK_R if t_split > 1 else RANK_CHUNK)
    kw = dict(HAS_SCALES=has_scales, HAS_RANKS=has_ranks, SPLIT_A=split_a, BLOCK_M=cfg.item_m,
              BLOCK_K=cfg.shrink_block_k, BLOCK_R=block_r, T_SPLIT=t_split, num_warps=cfg.num_warps,
              num_stages=cfg.num_stages)
    if not base_precision_per_call(x_dtype, device):
        kw["PRECISION"] = base_precision(x_dtype, device)
    rec = (cfg.item_m, _cdiv(R, block_r), kw)
    return rec if key is None else remember_launch(key, rec)


# Launch templates (launch_templates.py) of the three entry points the ops call (shrink_slices,
# expand_slices_, multi_lora_linear): a decode step calls each with the same signature in every
# layer of a shape. A key holds everything the launcher decides from: the tensors' shapes,
# strides, dtypes and device, which optional tensors are given, the scalars and configs, the
# index's layout (capacity and slots: the work lists' sizes, the grids) and multi_lora_linear's
# SPLIT_T_ENABLED (bench/multi.py switches it). Not the lora precision, a function of the
# adapters' dtype and the device type: tests that patch lora_precision_for clear the launch cache
# (the launch records, read on a miss, still key on it). A template's meta is the work-list size
# (item_m) whose views a replay passes. Empty calls (M = 0) launch nothing and skip them.


def _index_inputs(index: AdapterIndex, item_m: int) -> tuple:
    """index.data, then index.launch_views(item_m): the index tensors a launch may take."""
    return (index.data, *index.launch_views(item_m))


def _stacks_signature(stacks: List[torch.Tensor]) -> tuple:
    """The stacks' shapes and strides (what the launches read of them; one dtype)."""
    if len(stacks) == 1:
        return stacks[0].shape, stacks[0].stride()
    return tuple([(s.shape, s.stride()) for s in stacks])


def _record(key, inputs: tuple, index: AdapterIndex, item_m: int, launches, *args):
    """launches(*args) recorded, whose inputs are `inputs` then _index_inputs(index, item_m); its
    template remembered under key (meta: item_m). Returns the result's first tensor."""
    result, tpl = templates.record((*inputs, *_index_inputs(index, item_m)), launches, *args)
    if tpl is not None:
        tpl.meta = item_m
        remember_launch(key, tpl)
    return result[0]


def shrink_slices(x: torch.Tensor, a_stacks: List[torch.Tensor], index: AdapterIndex, scales: Optional[torch.Tensor],
                  scale: float, ranks: Optional[torch.Tensor], out: torch.Tensor,
                  config: Optional[SegmentConfig] = None, t_split: int = 1) -> torch.Tensor:
    """out[s] = shrink of x with a_stacks[s] (see reference.lora_shrink), all slices in one launch
    (grid axis 2). x [M, K], a_stacks S x [L, r_max, K] (one dtype and shape), scales [L] fp32 or
    None (then the float `scale` for every slot), ranks [L] int | None, out [S, M, r_max] fp32
    (any strides; [M, r_max] for one slice). Every element of out[:, rows covered by the index] is
    written. t_split 2 or 4: out is [S, M, t_split r_max] (or [M, t_split r_max]), t in
    _store_split's columns (multi_lora_linear's t2 / t4)."""
    if not templates.ENABLED or x.shape[0] == 0:
        return _shrink_slices_launches(x, a_stacks, index, scales, scale, ranks, out, config, t_split)[0]
    a0 = a_stacks[0]
    key = ("shrink template", x.shape, x.stride(), _stacks_signature(a_stacks), x.dtype, a0.dtype, x.device,
           scales is None, ranks is None, out.shape, out.stride(), scale, config, t_split, index.capacity,
           index.num_adapters)
    inputs = (x, scales, ranks, out, *a_stacks)
    tpl = _LAUNCHES.get(key)
    if tpl is not None:
        return tpl.replay((*inputs, index.data, *index.launch_views(tpl.meta)))[0]
    item_m = _shrink_record(x, a0, scales is not None, ranks is not None, config, t_split)[0]
    return _record(key, inputs, index, item_m, _shrink_slices_launches, x, a_stacks, index, scales, scale, ranks,
                   out, config, t_split)


def _shrink_slices_launches(x, a_stacks, index, scales, scale, ranks, out, config, t_split) -> tuple:
    """shrink_slices' launches, as (out,) (what its templates record)."""
    if x.shape[0] == 0:
        return out,
    rec = _shrink_record(x, a_stacks[0], scales is not None, ranks is not None, config, t_split)
    return _launch_shrinks(rec, x, a_stacks, index, scales, scale, ranks, out),


def _shrink_record(x: torch.Tensor, a0: torch.Tensor, has_scales: bool, has_ranks: bool,
                   config: Optional[SegmentConfig], t_split: int):
    """shrink_slices' launch record (_shrink_launch) for x [M, K] and stacks like a0, from the cache."""
    M, K = x.shape
    dev, x_dtype = x.device, x.dtype
    num_sms = _num_sms(dev)
    key = ("shrink", M, K, a0.shape[1], x_dtype, a0.dtype, dev.type, num_sms, has_scales, has_ranks, config, t_split)
    rec = _LAUNCHES.get(key)
    if rec is None:
        rec = _shrink_launch(key, M, K, a0.shape[1], x_dtype, a0.dtype, dev, num_sms, has_scales, has_ranks, config,
                             t_split)
    return rec


def _launch_shrinks(rec, x: torch.Tensor, a_stacks: List[torch.Tensor], index: AdapterIndex,
                    scales: Optional[torch.Tensor], scale: float, ranks: Optional[torch.Tensor],
                    out: torch.Tensor) -> torch.Tensor:
    """shrink_slices' launches, given its launch record (_shrink_launch) for these inputs."""
    K, R = x.shape[1], a_stacks[0].shape[1]
    item_m, r_tiles, kw = rec
    if "PRECISION" not in kw:  # fp32 x on a GPU: the precision follows a global flag
        kw = dict(kw, PRECISION=base_precision(x.dtype, x.device))
        templates.not_replayable()
    has_scales, has_ranks = scales is not None, ranks is not None
    work, sorted_tokens, _, _ = index.launch_views(item_m)
    ranks_t = ranks if has_ranks else work
    scales_t = scales if has_scales else work
    groups = ((0, 1),) if len(a_stacks) == 1 else _slice_groups(a_stacks, lambda a: a.stride())
    for start, end in groups:
        group, t, t_strides = a_stacks[start:end], *_slices_of(out, start, end)
        templates.launch(lora_shrink_kernel, (work.shape[0], r_tiles, end - start), (
            x, *_pointers4(group), scales_t, ranks_t, work, sorted_tokens, t,
            K, R, float(scale),
            *x.stride(), *group[0].stride(), *t_strides), kw)
    return out


def _expand_launch(key, M: int, widths: Tuple[int, ...], strides: Tuple[Tuple[int, ...], ...], offset: int, R: int,
                   y_dtype: torch.dtype, lora_precision: str, num_sms: int, has_ranks: bool,
                   config: Optional[SegmentConfig]):
    """(work piece size, the kernel's keyword arguments, the launches) of expand_slices_ for `key`,
    remembered. One launch per group of slices (_slice_groups): (start, end, N tiles, the ints
    before y's strides -- widths, first columns and B's slot strides, padded to MAX_SLICES --
    and B's N and rank strides, after t's)."""
    if max(widths) == 0:  # nothing to add: no launch
        return remember_launch(key, (0, None, ()))
    cfg = config or segment_config(M, max(widths), R, y_dtype.itemsize, num_sms)
    block_r, rank_chunked = expand_block_r(R)
    kw = dict(HAS_RANKS=has_ranks, ITEM_M=cfg.expand_item_m, BLOCK_M=min(EXPAND_BLOCK_M, cfg.expand_item_m),
              BLOCK_N=cfg.expand_block_n, BLOCK_R=block_r, RANK_CHUNKED=rank_chunked,
              PRECISION=lora_precision, num_warps=cfg.expand_num_warps,
              num_stages=EXPAND_NUM_STAGES)
    cols = [offset + sum(widths[:i]) for i in range(len(widths))]
    launches = []
    for start, end in _slice_groups(list(range(len(widths))), lambda s: strides[s][1:]):
        group_widths = widths[start:end]
        launches.append((start, end, _cdiv(max(group_widths), cfg.expand_block_n),
                         (*_pad4(group_widths), *_pad4(cols[start:end]), *_pad4([st[0] for st in strides[start:end]])),
                         strides[start][1:]))
    return remember_launch(key, (cfg.expand_item_m, kw, tuple(launches)))


def expand_slices_(y: torch.Tensor, t: torch.Tensor, b_stacks: List[torch.Tensor], index: AdapterIndex,
                   ranks: Optional[torch.Tensor], offset: int = 0,
                   config: Optional[SegmentConfig] = None) -> torch.Tensor:
    """In place y[m, col_s + n] += B_s[i, n, :rank_i] @ t[s, m, :rank_i] for tokens with an
    adapter (see reference.lora_expand_), col_s = offset + N_0 + ... + N_{s-1}; all slices in one
    launch (grid axis 2, N tiles up to the widest slice). y [M, N_y] any strides, t [S, M, r_max]
    fp32 ([M, r_max] for one slice), b_stacks S x [L, N_s, r_max] (one dtype; the N dimension's and rank's strides equal).
    The launch record's key holds the stacks' widths and strides, so a call derives no column or
    group from them."""
    if not templates.ENABLED or y.shape[0] == 0:
        return _expand_slices_launches(y, t, b_stacks, index, ranks, offset, config)[0]
    b0 = b_stacks[0]
    key = ("expand template", y.shape, y.stride(), t.shape, t.stride(), _stacks_signature(b_stacks), y.dtype,
           b0.dtype, y.device, ranks is None, offset, config,
           index.capacity, index.num_adapters)
    inputs = (y, t, ranks, *b_stacks)
    tpl = _LAUNCHES.get(key)
    if tpl is not None:
        return tpl.replay((*inputs, index.data, *index.launch_views(tpl.meta)))[0]
    item_m = _expand_record(y, t, b_stacks, ranks is not None, offset, config)[0]
    return _record(key, inputs, index, item_m, _expand_slices_launches, y, t, b_stacks, index, ranks, offset, config)


def _expand_slices_launches(y, t, b_stacks, index, ranks, offset, config) -> tuple:
    """expand_slices_' launches, as (y,) (what its templates record)."""
    if y.shape[0] == 0:
        return y,
    rec = _expand_record(y, t, b_stacks, ranks is not None, offset, config)
    return _launch_expands(rec, y, t, b_stacks, index, ranks),


def _expand_record(y: torch.Tensor, t: torch.Tensor, b_stacks: List[torch.Tensor], has_ranks: bool, offset: int,
                   config: Optional[SegmentConfig]):
    """expand_slices_' launch record (_expand_launch) for these tensors, from the cache."""
    R = t.shape[-1]
    widths = tuple([b.shape[1] for b in b_stacks])
    strides = tuple([b.stride() for b in b_stacks])
    dev = y.device
    num_sms = _num_sms(dev)
    lora_precision = lora_precision_for(b_stacks[0].dtype, dev)  # read per call, not kept: tests patch it
    key = ("expand", y.shape[0], widths, strides, offset, R, y.dtype, lora_precision, num_sms, has_ranks, config)
    rec = _LAUNCHES.get(key)
    if rec is None:
        rec = _expand_launch(key, y.shape[0], widths, strides, offset, R, y.dtype, lora_precision, num_sms, has_ranks,
                             config)
    return rec


def _launch_expands(rec, y: torch.Tensor, t: torch.Tensor, b_stacks: List[torch.Tensor], index: AdapterIndex,
                    ranks: Optional[torch.Tensor]) -> torch.Tensor:
    """expand_slices_' launches, given its launch record (_expand_launch) for these inputs."""
    item_m, kw, launches = rec
    if not launches:  # every slice is 0 wide
        return y
    R = t.shape[-1]
    has_ranks = ranks is not None
    work, sorted_tokens, _, _ = index.launch_views(item_m)
    ranks_t = ranks if has_ranks else work
    for start, end, n_tiles, slice_ints, b_strides in launches:
        ts, ts_strides = _slices_of(t, start, end)
        templates.launch(lora_expand_kernel, (work.shape[0], n_tiles, end - start), (
            y, ts, *_pointers4(b_stacks[start:end]), ranks_t, work, sorted_tokens,
            R, *slice_ints, *y.stride(), *ts_strides, *b_strides), kw)
    return y


def lora_shrink(x: torch.Tensor, lora_a_stack: torch.Tensor, index: AdapterIndex, scales: Optional[torch.Tensor],
                ranks: Optional[torch.Tensor], config: Optional[SegmentConfig] = None,
                out: Optional[torch.Tensor] = None, scale: float = 1.0) -> torch.Tensor:
    """One stack: t [M, r_max] fp32 (shrink_slices with S = 1; `out` any strides)."""
    M, R = x.shape[0], lora_a_stack.shape[1]
    t = torch.empty((M, R), dtype=torch.float32, device=x.device) if out is None else out
    return shrink_slices(x, [lora_a_stack], index, scales, scale, ranks, t, config)


def lora_expand_(y: torch.Tensor, t: torch.Tensor, lora_b_stack: torch.Tensor, index: AdapterIndex,
                 ranks: Optional[torch.Tensor], config: Optional[SegmentConfig] = None, offset: int = 0) -> torch.Tensor:
    """One stack: y [M, N] += per-token t [M, r_max] @ B^T (expand_slices_ with S = 1)."""
    return expand_slices_(y, t, [lora_b_stack], index, ranks, offset, config)


class _LinearLaunch:
    """The host-side decisions of one multi_lora_linear key (see _LAUNCHES)."""
    __slots__ = ("cfg", "shrink", "chunked", "t_split", "t_width", "grid", "tiles_per_program", "kw")

    def __init__(self, M: int, N: int, K: int, R: int, L: int, x_dtype: torch.dtype, a_dtype: torch.dtype,
                 b_dtype: torch.dtype, device: torch.device, lora_precision: str, num_sms: int, has_bias: bool,
                 has_scales: bool, has_ranks: bool, config: Optional[LinearConfig]):
        split_a = a_dtype == torch.float32 and x_dtype != torch.float32
        cfg = config or linear_config(M, N, K, R, L, x_dtype.itemsize, num_sms, split_adapters=split_a)
        tiles = cfg.tiles
        chunked = block_r_for(R) > RANK_CHUNK
        if not chunked and cfg.fused_shrink and tiles.block_r < block_r_for(R):
            raise ValueError(f"multi_lora_linear: config block_r {tiles.block_r} < padded rank {block_r_for(R)}")
        t_split = t_split_for(b_dtype, lora_precision, tiles.block_m)
        self.cfg, self.t_split = cfg, t_split
        self.chunked = chunked or not cfg.fused_shrink  # t from the segmented shrink, read in chunks
        self.t_width = t_split * R  # t2 / t4: t split for _rank_chunks_dot_split
        self.grid = (_cdiv(M, tiles.block_m) * _cdiv(_cdiv(N, tiles.block_n), tiles.tiles_per_program),)
        self.tiles_per_program = tiles.tiles_per_program
        kw = dict(HAS_BIAS=has_bias, HAS_RANKS=has_ranks, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                  BLOCK_K=tiles.block_k, GROUP_M=tiles.group_m, LORA_PRECISION=lora_precision,
                  num_warps=tiles.num_warps, num_stages=tiles.num_stages)
        if self.chunked:
            kw.update(T_SPLIT=t_split, maxnreg=MAX_REGISTERS,
                      BLOCK_R=t_chunk_for(R, b_dtype, tiles.block_m, tiles.block_n, tiles.num_warps, t_split),
                      num_warps=chunked_num_warps(tiles.num_warps, tiles.block_n, t_split))
        else:
            kw.update(HAS_SCALES=has_scales, SPLIT_A=split_a, BLOCK_R=tiles.block_r)
        if not base_precision_per_call(x_dtype, device):
            kw["BASE_PRECISION"] = base_precision(x_dtype, device)
        self.kw = kw
        # the segmented shrink's launch record (shrink_slices' decisions, made here once)
        self.shrink = _shrink_launch(None, M, K, R, x_dtype, a_dtype, device, num_sms, has_scales, has_ranks,
                                     cfg.segment, t_split) if self.chunked else None


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a_stack: torch.Tensor,
                      lora_b_stack: torch.Tensor, index: AdapterIndex, scales: Optional[torch.Tensor],
                      bias: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                      config: Optional[LinearConfig] = None, out: Optional[torch.Tensor] = None,
                      scale: float = 1.0) -> torch.Tensor:
    """y [M, N] = x @ weight.T + bias + each token's adapter (see reference.multi_lora_linear).

    x [M, K], weight [N, K], lora_a_stack [L, r_max, K], lora_b_stack [L, N, r_max], scales [L]
    fp32 or None (the float `scale` for every slot), bias [N] | None, ranks [L] int | None.
    `config` overrides the heuristic (tests use it to reach both the fused-shrink and the
    precomputed-t paths at small sizes). Without the fused shrink (always at r_max > RANK_CHUNK)
    the segmented shrink runs first and the chunked-epilogue kernel reads its t (fp32 B on GPU
    wgmma tiles: t split, an [M, 4 r_max] fp32 buffer, and with fp16 B [M, 2 r_max]; t_split_for)."""
    if not templates.ENABLED or x.shape[0] == 0 or weight.shape[0] == 0:
        return _linear_launches(x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks, config, out,
                                scale)[0]
    key = ("linear template", x.shape, x.stride(), weight.shape, weight.stride(), lora_a_stack.shape,
           lora_a_stack.stride(), lora_b_stack.stride(), x.dtype, lora_a_stack.dtype, lora_b_stack.dtype, x.device,
           SPLIT_T_ENABLED, bias is None, scales is None, ranks is None,
           None if out is None else out.stride(), scale, config, index.capacity, index.num_adapters)
    inputs = (x, weight, lora_a_stack, lora_b_stack, scales, bias, ranks, out)
    tpl = _LAUNCHES.get(key)
    if tpl is not None:
        return tpl.replay((*inputs, index.data, *index.launch_views(tpl.meta)))[0]
    item_m = _linear_item_m(_linear_record(x, weight, lora_a_stack, lora_b_stack, scales, bias, ranks, config,
                                           lora_precision_for(lora_b_stack.dtype, x.device)))
    return _record(key, inputs, index, item_m, _linear_launches, x, weight, lora_a_stack, lora_b_stack, index, scales,
                   bias, ranks, config, out, scale)


def _linear_record(x, weight, lora_a_stack, lora_b_stack, scales, bias, ranks, config, lora_precision) -> "_LinearLaunch":
    """multi_lora_linear's launch record for these inputs, from the cache."""
    M, K = x.shape
    N = weight.shape[0]
    L, R, _ = lora_a_stack.shape
    dev, x_dtype, b_dtype = x.device, x.dtype, lora_b_stack.dtype
    num_sms = _num_sms(dev)
    has_bias, has_scales, has_ranks = bias is not None, scales is not None, ranks is not None
    key = ("linear", M, N, K, R, L, x_dtype, lora_a_stack.dtype, b_dtype, dev.type, lora_precision, SPLIT_T_ENABLED,
           num_sms, has_bias, has_scales, has_ranks, config)
    rec = _LAUNCHES.get(key)
    if rec is None:
        rec = remember_launch(key, _LinearLaunch(M, N, K, R, L, x_dtype, lora_a_stack.dtype, b_dtype, dev,
                                                 lora_precision, num_sms, has_bias, has_scales, has_ranks, config))
    return rec


def _linear_item_m(rec: "_LinearLaunch") -> int:
    """The work-list size whose index views the launch takes (0: none, the fused-shrink kernel)."""
    return rec.shrink[0] if rec.chunked else 0


def _linear_launches(x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks, config, out, scale) -> tuple:
    """multi_lora_linear's allocations and launches, as (y,) (what its templates record)."""
    M, K = x.shape
    N = weight.shape[0]
    L, R, _ = lora_a_stack.shape
    dev, x_dtype = x.device, x.dtype
    y = templates.empty((M, N), x_dtype, dev) if out is None else out
    if M == 0 or N == 0:
        return y,
    has_bias, has_scales, has_ranks = bias is not None, scales is not None, ranks is not None
    # read per call, not kept in the record: tests patch lora_precision_for, bench/multi.py switches the split off
    lora_precision = lora_precision_for(lora_b_stack.dtype, dev)
    rec = _linear_record(x, weight, lora_a_stack, lora_b_stack, scales, bias, ranks, config, lora_precision)
    kw = rec.kw
    if "BASE_PRECISION" not in kw:  # fp32 x on a GPU: the precision follows a global flag
        kw = dict(kw, BASE_PRECISION=base_precision(x_dtype, dev))
        templates.not_replayable()
    data = index.data
    ranks_t = ranks if has_ranks else data
    bias_arg = bias if has_bias else y
    _, sorted_tokens, sorted_adapter, slot_start = index.launch_views(_linear_item_m(rec))
    if rec.chunked:
        # rows past the index's work lists (a padded_to view) must read as zeros
        alloc = templates.zeros if index.capacity != M else templates.empty
        t = _launch_shrinks(rec.shrink, x, [lora_a_stack], index, scales, scale, ranks,
                            alloc((M, rec.t_width), torch.float32, dev))
        templates.launch(multi_lora_linear_chunked_kernel, rec.grid, (
            x, weight, bias_arg, lora_b_stack, ranks_t, t, y,
            sorted_tokens, sorted_adapter, slot_start, M, N, K, R, L, rec.tiles_per_program,
            *x.stride(), *weight.stride(), *lora_b_stack.stride(), *t.stride(), *y.stride()), kw)
        return y,
    templates.launch(multi_lora_linear_kernel, rec.grid, (
        x, weight, bias_arg, lora_a_stack, lora_b_stack, scales if has_scales else data, ranks_t, y,
        sorted_tokens, sorted_adapter, slot_start, M, N, K, R, L, rec.tiles_per_program, float(scale),
        *x.stride(), *weight.stride(), *lora_a_stack.stride(), *lora_b_stack.stride(), *y.stride()), kw)
    return y,
