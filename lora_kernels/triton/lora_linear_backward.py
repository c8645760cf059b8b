"""Triton fused LoRA linear backward: kernels and launcher.

For y = x @ W^T + bias + s * (drop(x) @ A^T) @ B^T, with t = drop(x) @ A^T saved by the forward
(fp32 [M, r]) and drop(x) = x * keep / (1 - p) regenerated from the Philox seed, the backward is

    u     = dy @ B                                    fp32 [M, r], computed once
    dx    = dy @ W + s * (u @ A) * keep / (1 - p)     one fused pass: the forward kernel with W, A, B
                                                      in the other layout (it also stores u)
    dA    = s * u^T @ drop(x)                         } one launch, lora_weight_grads_kernel:
    dB    = s * dy^T @ t                              } programs own a column tile of dA or of dB
    dbias = sum_m dy                                  } (dbias beside dB, from the same dy tiles)

dA and dB reduce over M. Each program owns its output tile and walks its rows in order, so the
result is deterministic (no atomics). When the output tiles are too few to fill the GPU, the rows
are split into SPLIT_M ranges written to an fp32 workspace and summed by torch in a fixed order:
still deterministic. W's gradient (only when W requires grad) is a plain cuBLAS GEMM in the op.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..backends import interpreter_bf16_fixed
from ..reference import dropout_threshold
from . import launch_templates as templates
from .lora_linear import (ForwardConfig, ShrinkConfig, _a_operand, _cdiv, _fold_halves, _keep_mask, _load_tile,
                          _Launch, _LAUNCHES, _num_sms, _philox_key, _strides3, _tf32_halves, block_r_for,
                          launch_decisions, launch_fused, launch_shrink, lora_precision_for, remember_launch,
                          split_adapter, split_launch)
from .multi_lora import _split16_dot


@triton.jit
def _store_tile(ptr, value, offs_rows, offs_cols, n_rows, n_cols, stride_rows, stride_cols):
    ptrs = ptr + offs_rows[:, None].to(tl.int64) * stride_rows + offs_cols[None, :].to(tl.int64) * stride_cols
    tl.store(ptrs, value.to(ptr.dtype.element_ty), mask=(offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols))


@triton.jit
def _split_x(v, TF32: tl.constexpr):
    """(hi, lo) with v = hi + lo for SPLIT_X's fp32 v (x or dy as loaded, converted): bf16 hi and
    lo, exact for fp16 values (11 significant bits in 8 + 8, fp16's range inside bf16's), or with
    TF32 (fp32 x) tf32 hi and lo (_tf32_halves: both exact tf32 operands, v = hi + lo up to
    2^-22 |v|)."""
    if TF32:
        hi, lo = _tf32_halves(v)
    else:
        hi = v.to(tl.bfloat16)
        lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
    return hi, lo


@triton.jit
def _halves_dot(a, b, acc, TF32: tl.constexpr):
    """acc += a @ b on halves: native bf16, or tf32 (TF32: fp32 operands exact in tf32)."""
    if TF32:
        acc = tl.dot(a, b, acc, input_precision="tf32")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _split_x_dot(v, b, acc, acc_lo, TF32: tl.constexpr):
    """(acc + hi @ b, acc_lo + lo @ b) for v = hi + lo (_split_x) and b one operand of halves:
    _split16_dot's two accumulators (a dot chained onto the other's result waited for it), with
    the split v as the register operand (wgmma tiles), b as its copy left it."""
    if TF32:
        hi, lo = _split_x(v, True)
        acc, acc_lo = _halves_dot(hi, b, acc, True), _halves_dot(lo, b, acc_lo, True)
    else:
        acc, acc_lo = _split16_dot(v, b, acc, acc_lo)
    return acc, acc_lo


@triton.jit
def _da_tile(x_ptr, u_ptr, seed_ptr, da_ptr, col_start, m_begin, m_end, K, R, dropout_threshold, da_scale,
             stride_xm, stride_xk, stride_uh, stride_um, stride_ur, stride_dar, stride_dak,
             DROPOUT: tl.constexpr, HALVES: tl.constexpr, SPLIT_X: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """da[:, cols] = da_scale * sum_m u[m, :]^T (x[m, cols] [* keep])  over rows [m_begin, m_end).

    HALVES (16-bit x): u arrives split once per call into two bf16 halves (split_adapter) and
    the product runs as dA^T = x^T @ [u_hi | u_lo]: for bf16 x one native dot per row step on x as
    loaded, operands copied straight to shared memory; for fp16 x (SPLIT_X) x^T splits exactly
    into bf16 hi + lo in registers (fp16's 11 significant bits in 8 + 8, its range inside bf16's)
    and two bf16 dots take it as the register operand, each into its own accumulator (_split16_dot:
    fp16 halves of u could overflow); with DROPOUT, whose masked tile reaches the dot through
    shared memory, hi and lo sit side by side as one [BC, 2 BM] operand against u's rows read twice
    (one store and one dot per step: two stores otherwise; TTGIR, sm_90a). fp32 x on GPUs (HALVES
    and SPLIT_X with an fp32 x_ptr): the same with tf32 halves of u (split_adapter into fp32) and
    of x (_split_x), tf32 dots: the four products x_hi u_hi + x_hi u_lo + x_lo u_hi + x_lo u_lo,
    every operand exact in tf32 (tl.dot's tf32x3 drops the last and split both operands in the
    loop: x's halves stored to shared memory and the loop waiting for its MMAs). Otherwise x and u
    in fp32 at PRECISION (x converted in registers: the interpreter's fp32 x, and one-row-step
    calls)."""
    TF32: tl.constexpr = x_ptr.dtype.element_ty == tl.float32
    offs_c = col_start + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    if DROPOUT:
        k0, k1 = _philox_key(seed_ptr)
    if HALVES:
        acc = tl.zeros((BLOCK_C, 2 * BLOCK_R), dtype=tl.float32)
        if SPLIT_X:
            acc_lo = tl.zeros((BLOCK_C, 2 * BLOCK_R), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_R, BLOCK_C), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        if HALVES:
            x_t = _load_tile(x_ptr, offs_c, offs_m, K, m_end, stride_xk, stride_xm)  # x^T tile [BC, BM]
            if DROPOUT:
                keep = _keep_mask(k0, k1, offs_m, col_start, dropout_threshold, BLOCK_M, BLOCK_C)
                x_t = tl.where(tl.trans(keep), x_t, tl.zeros_like(x_t))
            if SPLIT_X and DROPOUT:
                hi, lo = _split_x(x_t.to(tl.float32), TF32)
                x2 = tl.reshape(tl.join(hi, lo), (BLOCK_C, 2 * BLOCK_M))
                offs_m2 = m0 + tl.arange(0, 2 * BLOCK_M) // 2
                u2 = _a_operand(u_ptr, offs_m2, m_end, R, stride_uh, stride_ur, stride_um, BLOCK_R, True)
                acc = _halves_dot(x2, u2, acc, TF32)
            else:
                u2 = _a_operand(u_ptr, offs_m, m_end, R, stride_uh, stride_ur, stride_um, BLOCK_R, True)
                if SPLIT_X:
                    acc, acc_lo = _split_x_dot(x_t.to(tl.float32), u2, acc, acc_lo, TF32)
                else:
                    acc = tl.dot(x_t, u2, acc)
        else:
            u_t = _load_tile(u_ptr, offs_r, offs_m, R, m_end, stride_ur, stride_um)  # u^T tile [BR, BM]
            x = _load_tile(x_ptr, offs_m, offs_c, m_end, K, stride_xm, stride_xk).to(tl.float32)
            if DROPOUT:
                x = tl.where(_keep_mask(k0, k1, offs_m, col_start, dropout_threshold, BLOCK_M, BLOCK_C), x, 0.0)
            acc = tl.dot(u_t, x, acc, input_precision=PRECISION)
    if HALVES:
        if SPLIT_X:
            acc += acc_lo
        _store_tile(da_ptr, _fold_halves(acc, BLOCK_C, BLOCK_R, True) * da_scale, offs_c, offs_r, K, R,
                    stride_dak, stride_dar)
    else:
        _store_tile(da_ptr, acc * da_scale, offs_r, offs_c, R, K, stride_dar, stride_dak)


@triton.jit
def _db_tile(dy_ptr, t_ptr, db_ptr, dbias_ptr, col_start, m_begin, m_end, N, R, db_scale,
             stride_dym, stride_dyn, stride_th, stride_tm, stride_tr, stride_dbn, stride_dbr,
             HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr, HALVES: tl.constexpr, SPLIT_X: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr):
    """db[cols, :] = db_scale * sum_m dy[m, cols]^T t[m, :];  dbias[cols] = sum_m dy[m, cols].
    HALVES: t split once per call into two bf16 halves, one native dot on bf16 dy as loaded, or
    (SPLIT_X, fp16 dy) two on dy's exact bf16 hi + lo (as _da_tile), or (SPLIT_X, fp32 dy) two
    tf32 dots on dy's tf32 hi + lo against t's tf32 halves."""
    TF32: tl.constexpr = dy_ptr.dtype.element_ty == tl.float32
    offs_c = col_start + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C, BLOCK_R * (2 if HALVES else 1)), dtype=tl.float32)
    if SPLIT_X:
        acc_lo = tl.zeros((BLOCK_C, 2 * BLOCK_R), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for m0 in range(m_begin, m_end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        dy_t = _load_tile(dy_ptr, offs_c, offs_m, N, m_end, stride_dyn, stride_dym)  # [BC, BM]
        if HAS_DB:
            if HALVES:
                t2 = _a_operand(t_ptr, offs_m, m_end, R, stride_th, stride_tr, stride_tm, BLOCK_R, True)
                if SPLIT_X:
                    acc, acc_lo = _split_x_dot(dy_t.to(tl.float32), t2, acc, acc_lo, TF32)
                else:
                    acc = tl.dot(dy_t, t2, acc)
            else:
                t = _load_tile(t_ptr, offs_m, offs_r, m_end, R, stride_tm, stride_tr)  # [BM, BR]
                acc = tl.dot(dy_t.to(tl.float32), t, acc, input_precision=PRECISION)
        if HAS_DBIAS:
            bias_acc += tl.sum(dy_t.to(tl.float32), axis=1)
    if HAS_DB:
        if SPLIT_X:
            acc += acc_lo
        _store_tile(db_ptr, _fold_halves(acc, BLOCK_C, BLOCK_R, HALVES) * db_scale, offs_c, offs_r, N, R,
                    stride_dbn, stride_dbr)
    if HAS_DBIAS:
        tl.store(dbias_ptr + offs_c, bias_acc.to(dbias_ptr.dtype.element_ty), mask=offs_c < N)


@triton.jit
def lora_weight_grads_kernel(
    x_ptr, u_ptr, dy_ptr, t_ptr, seed_ptr, da_ptr, db_ptr, dbias_ptr,
    M, N, K, R, rows_per_split, num_a_tiles, dropout_threshold, da_scale, db_scale,
    stride_xm, stride_xk, stride_uh, stride_um, stride_ur, stride_dym, stride_dyn, stride_th, stride_tm,
    stride_tr, stride_das, stride_dar, stride_dak, stride_dbs, stride_dbn, stride_dbr, stride_dbias_s,
    HAS_DA: tl.constexpr, HAS_DB: tl.constexpr, HAS_DBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    HALVES: tl.constexpr, SPLIT_X: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
):
    """Program (c, s): column tile c of dA (c < num_a_tiles) or else of dB/dbias, over the rows
    [s * rows_per_split, (s + 1) * rows_per_split). Writes slice s of da/db/dbias (a workspace,
    or the gradient itself when there is one split: stride 0)."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    m_begin = split * rows_per_split
    m_end = tl.minimum(M, m_begin + rows_per_split)
    db_col_start = (pid - num_a_tiles) * BLOCK_C
    if HAS_DA:
        if pid < num_a_tiles:
            _da_tile(x_ptr, u_ptr, seed_ptr, da_ptr + split * stride_das, pid * BLOCK_C, m_begin, m_end,
                     K, R, dropout_threshold, da_scale, stride_xm, stride_xk, stride_uh, stride_um, stride_ur,
                     stride_dar, stride_dak, DROPOUT, HALVES, SPLIT_X, BLOCK_M, BLOCK_C, BLOCK_R, PRECISION)
        else:
            _db_tile(dy_ptr, t_ptr, db_ptr + split * stride_dbs, dbias_ptr + split * stride_dbias_s,
                     db_col_start, m_begin, m_end, N, R, db_scale, stride_dym, stride_dyn, stride_th,
                     stride_tm, stride_tr, stride_dbn, stride_dbr, HAS_DB, HAS_DBIAS, HALVES, SPLIT_X,
                     BLOCK_M, BLOCK_C, BLOCK_R, PRECISION)
    else:
        _db_tile(dy_ptr, t_ptr, db_ptr + split * stride_dbs, dbias_ptr + split * stride_dbias_s,
                 db_col_start, m_begin, m_end, N, R, db_scale, stride_dym, stride_dyn, stride_th,
                 stride_tm, stride_tr, stride_dbn, stride_dbr, HAS_DB, HAS_DBIAS, HALVES, SPLIT_X,
                 BLOCK_M, BLOCK_C, BLOCK_R, PRECISION)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WeightGradConfig:
    block_m: int
    block_c: int
    block_r: int
    split_m: int
    num_warps: int
    num_stages: int
    halves: Optional[bool] = None  # u and t as halves, bf16 or tf32 (None: as _GradLaunch decides; see _da_tile)


@functools.lru_cache(maxsize=4096)  # pure function of ints and bools, called on every backward
def weight_grad_config(M: int, N: int, K: int, r: int, elem_bytes: int, num_sms: int,
                       has_da: bool = True, has_db: bool = True, split_x: bool = False) -> WeightGradConfig:
    """Tiles for ``lora_weight_grads_kernel`` (design reasoning; not yet measured on a GPU: the
    tuner measures).

    The kernel streams x (for dA) and dy (for dB) once; the rank-deep dots are tiny, so it is
    bandwidth-bound. BLOCK_C = 64 columns keeps the fp32 accumulator [BLOCK_R, 64] at <= 64
    registers per thread (4 warps, r <= 128); BLOCK_M = 64 rows per step (32 for fp32 inputs) keeps
    one x/dy tile at 8 KB. SPLIT_M: enough programs for two per SM, but never fewer than 512 rows
    per split, so the fp32 partials (SPLIT_M * (r*K + N*r) * 4 bytes) stay small next to x and dy.
    When that still leaves fewer programs than SMs (few rows: nothing to split), BLOCK_C halves
    to 32, doubling the column tiles, so that the launch fills one wave. `split_x` (fp16 or fp32
    x and dy, SPLIT_X): the column tiles SPLIT_X_BLOCK_C allows at this rank."""
    block_m = 32 if elem_bytes >= 4 else 64
    max_split = max(1, M // 512)
    block_r = block_r_for(r)
    for block_c in SPLIT_X_BLOCK_C[block_r] if split_x else (64, 32):
        tiles = (_cdiv(K, block_c) if has_da else 0) + _cdiv(N, block_c)
        split = max(1, min(_cdiv(2 * num_sms, max(tiles, 1)), max_split))
        if tiles * split >= num_sms:
            break
    return WeightGradConfig(block_m, block_c, block_r, split, 4, 3)


# SPLIT_X's BLOCK_C candidates (weight_grad_config's order) per padded rank: the x / dy tile's
# bf16 hi and lo sit in registers beside one fp32 [BLOCK_C, 2 BLOCK_R] accumulator (two without
# dropout). ptxas -v, sm_90a, BLOCK_M 64, 4 warps, dropout on and off, triton 3.6 and 3.8: spill-free
# at 64 and 32 up to rank 32; at rank 64, 64 (232-244 registers) and 16, while 32 spilled 24 B with
# dropout (3.8); at rank 128 only 16 (143-168 registers; 32 spilled 64-112 B, 64 2-4 KB). fp32 x
# (tf32 hi and lo, BLOCK_M 32; triton 3.8): spill-free at every one of these, 95-244 registers
# (rank 128 at 64 spilled 2-4 KB there too).
SPLIT_X_BLOCK_C = {16: (64, 32), 32: (64, 32), 64: (64, 16), 128: (16,)}


# The fp32 u / t path converts x in registers beside an fp32 [BLOCK_R, BLOCK_C] accumulator: at
# padded rank 128 it spills 484 B (ptxas -v, sm_90a, triton 3.6, M = 16, BLOCK_C 32 or 64), at 64
# and below 0 B (190-229 registers); so 16-bit x takes it only up to rank 64 (_GradLaunch).
FP32_ONE_STEP_MAX_BLOCK_R = 64


class _GradLaunch:
    """The host-side decisions of one lora_weight_grads_kernel launch key (issue 16 point 6: a
    training step repeats a few keys per layer shape), computed once per key: the row splits, the
    grid, and the kernel's constexprs and launch options."""
    __slots__ = ("split", "rows_per_split", "grid", "num_a_tiles", "halves", "halves_dtype", "split_launch", "kw")

    def __init__(self, M: int, N: int, K: int, r: int, x_dtype: torch.dtype, dy_dtype: torch.dtype,
                 device: torch.device, num_sms: int, need_a: bool, need_b: bool, need_bias: bool, dropout: bool,
                 config: Optional[WeightGradConfig]):
        cfg = config or weight_grad_config(M, N, K, r, x_dtype.itemsize, num_sms, need_a, need_b)
        # halves (16-bit x: u and t split into two bf16 halves, one or two native dots per row
        # step on x and dy as loaded; fp16's exactly in registers: SPLIT_X, _da_tile; fp32 x on
        # GPUs: tf32 halves, x and dy split in registers, tf32 dots) pay two
        # split_halves launches and two [2, M, r] buffers to replace each row step's tf32x3 dot. At
        # M <= BLOCK_M every program walks one row step, one tile's worth of MMAs: the fp32 path
        # is taken there up to FP32_ONE_STEP_MAX_BLOCK_R (two launches and allocations fewer:
        # ~3 us of host time at M = 1 beyond the allocations and launches themselves, the overhead
        # suite's backward row, CPU machine). Design reasoning, not measured on a GPU: the
        # training suite's M = 1 and 16 rows will show it; a config's `halves` overrides it.
        one_step_fp32 = M <= cfg.block_m and cfg.block_r <= FP32_ONE_STEP_MAX_BLOCK_R
        halves = cfg.halves if cfg.halves is not None else not one_step_fp32
        precision = lora_precision_for(torch.float32, device)
        # fp16 x needs bf16 dots (SPLIT_X), which the unfixed interpreter computes wrongly (backends)
        bf16_dots = device.type == "cuda" or x_dtype == torch.bfloat16 or interpreter_bf16_fixed()
        sixteen = x_dtype in (torch.float16, torch.bfloat16) and bf16_dots
        # fp32 x on GPUs (tf32x3): tf32 halves of u and t, x and dy split in registers (_da_tile);
        # the interpreter's exact fp32 dots keep the fp32 path
        tf32 = x_dtype == torch.float32 and precision == "tf32x3"
        self.halves = halves and dy_dtype == x_dtype and (sixteen or tf32)
        self.halves_dtype = torch.float32 if tf32 else torch.bfloat16
        split_x = self.halves and x_dtype in (torch.float16, torch.float32)
        if split_x and config is None:  # the same rows and rank, SPLIT_X's column tiles
            cfg = weight_grad_config(M, N, K, r, x_dtype.itemsize, num_sms, need_a, need_b, split_x=True)
        split = max(1, min(cfg.split_m, _cdiv(M, cfg.block_m)))
        self.rows_per_split = max(1, _cdiv(_cdiv(M, split), cfg.block_m)) * cfg.block_m
        self.split = split = max(1, _cdiv(M, self.rows_per_split))
        self.num_a_tiles = _cdiv(K, cfg.block_c) if need_a else 0
        num_b_tiles = _cdiv(N, cfg.block_c) if (need_b or need_bias) else 0
        self.grid = (self.num_a_tiles + num_b_tiles, split)
        # u and t [M, r] split into halves (split_adapter's launch, decided here once)
        self.split_launch = split_launch(M, r) if self.halves else None
        self.kw = dict(HAS_DA=need_a, HAS_DB=need_b, HAS_DBIAS=need_bias, DROPOUT=dropout, HALVES=self.halves,
                       SPLIT_X=split_x,
                       BLOCK_M=cfg.block_m, BLOCK_C=cfg.block_c, BLOCK_R=cfg.block_r,
                       PRECISION=precision,
                       num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def weight_grad_decisions(M: int, N: int, K: int, r: int, x_dtype: torch.dtype, dy_dtype: torch.dtype,
                          device: torch.device, num_sms: int, need_a: bool, need_b: bool, need_bias: bool,
                          dropout: bool, config: Optional[WeightGradConfig] = None, cached: bool = True) -> _GradLaunch:
    """The _GradLaunch of these inputs, kept in lora_linear's launch cache (_LAUNCHES: cleared with
    it, bounded with it) unless `cached` is False (the tests compare both)."""
    key = ("grads", M, N, K, r, x_dtype, dy_dtype, device.type, num_sms, need_a, need_b, need_bias, dropout, config)
    hit = _LAUNCHES.get(key) if cached else None
    if hit is not None:
        return hit
    rec = _GradLaunch(M, N, K, r, x_dtype, dy_dtype, device, num_sms, need_a, need_b, need_bias, dropout, config)
    return remember_launch(key, rec) if cached else rec


class _BackwardLaunch:
    """One backward key's records, found with one lookup per call (issue 16 point 6): `dx`, the dx
    launch's _Launch (launch_decisions of launch_fused's arguments there; None without dx), and
    `grads`, the weight-gradient launch's _GradLaunch (None without dA, dB and dbias)."""
    __slots__ = ("dx", "grads")

    def __init__(self, dx: Optional[_Launch], grads: Optional[_GradLaunch]):
        self.dx, self.grads = dx, grads


def backward_decisions(M: int, N: int, K: int, r: int, x_dtype: torch.dtype, dy_dtype: torch.dtype,
                       adapter_dtype: torch.dtype, device: torch.device, num_sms: int, need_x: bool, need_a: bool,
                       need_b: bool, need_bias: bool, dropout: bool, dx_config: Optional[ForwardConfig] = None,
                       u_config: Optional[ShrinkConfig] = None,
                       grad_config: Optional[WeightGradConfig] = None) -> _BackwardLaunch:
    """The _BackwardLaunch of lora_linear_bwd's inputs, kept in lora_linear's launch cache; its two
    records are the ones launch_decisions and weight_grad_decisions give for the same inputs."""
    key = ("bwd", M, N, K, r, x_dtype, dy_dtype, adapter_dtype, device.type, num_sms, need_x, need_a, need_b,
           need_bias, dropout, dx_config, u_config, grad_config)
    hit = _LAUNCHES.get(key)
    if hit is not None:
        return hit
    # dx: the forward kernel over (dy, W^T, B^T, A^T): x dtype dy's, b dtype lora_a's, the mask on
    # its output (mask_epilogue), no dropout on its own input
    dx = launch_decisions(M, K, N, r, dy_dtype, adapter_dtype, device, num_sms, dropout=False, mask_epilogue=dropout,
                          config=dx_config, shrink=u_config) if need_x and M and K else None
    grads = weight_grad_decisions(M, N, K, r, x_dtype, dy_dtype, device, num_sms, need_a, need_b, need_bias, dropout,
                                  grad_config) if need_a or need_b or need_bias else None
    return remember_launch(key, _BackwardLaunch(dx, grads))


def _gradient_buffer(needed: bool, split: int, shape: Tuple[int, ...], dtype: torch.dtype, dy: torch.Tensor,
                     device: torch.device):
    """(gradient or None, kernel buffer, its 3-D strides [split, rows, cols]) of one gradient: with
    one split the gradient itself (the kernel's view of it: out.unsqueeze(0)), with several an
    fp32 workspace of partials; an unneeded one passes dy as a pointer it never touches (strides
    of an empty [1, 0, 0]). Both are fresh contiguous tensors, so the strides follow from the
    shape (a 1-D [N] as an [N, 1]) and are not read back."""
    if not needed:
        return None, dy, (1, 1, 1)
    rows, cols = shape if len(shape) == 2 else (shape[0], 1)
    strides = (rows * cols, cols, 1)
    if split == 1:
        out = templates.empty(shape, dtype, device)
        return out, out, strides
    return None, templates.empty((split, *shape), torch.float32, device), strides


def _rank_operand(v: torch.Tensor, rec: _GradLaunch, fresh: bool = False):
    """(u or t as lora_weight_grads_kernel takes it, its 3-D strides [half, rows, cols]). `fresh`:
    v is the launcher's own contiguous u, whose strides need no read either."""
    rows, cols = v.shape
    if rec.halves:  # split_adapter's fresh contiguous [2, M, r]
        return split_adapter(v, rec.halves_dtype, launch=rec.split_launch), (rows * cols, cols, 1)
    return v, (rows * cols, cols, 1) if fresh else _strides3(v)


def lora_linear_bwd(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                    lora_b: torch.Tensor, t: Optional[torch.Tensor], scale: float, dropout_p: float,
                    seed: Optional[torch.Tensor], bias_dtype: Optional[torch.dtype], need_x: bool,
                    need_a: bool, need_b: bool, *, dx_config: Optional[ForwardConfig] = None,
                    u_config: Optional[ShrinkConfig] = None,
                    grad_config: Optional[WeightGradConfig] = None, u: Optional[torch.Tensor] = None
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dA, dB, dbias) on validated 2-D inputs: dy [M, N], x [M, K], t [M, r] fp32 (needed
    for dB), seed int64 [1] or None. A gradient that is not needed comes back as an empty [0]
    tensor; dbias is needed iff bias_dtype is not None. Grads in x's / lora_a's / lora_b's /
    bias_dtype. The configs override the heuristics (tests reach every path at small sizes).
    `u`: dy @ lora_b fp32 [M, r] when the caller has it (the sm90 dx computes it; with need_x
    False): the shrink that would recompute it is skipped.

    Host work per call (issue 16 point 6): a call whose signature was seen replays that call's
    launch template (launch_templates.py; the key: everything _backward_launches decides from --
    the tensors' shapes, strides, dtypes and device, the scalars, flags and configs; dy's shape,
    weight's dtype and lora_b's shape follow from the validation). Recording one, both launches'
    decisions come from one lookup (backward_decisions); an empty [0] stands in only for a
    gradient that is not needed, and neither transposes nor 3-D views (a split axis of one) are
    made: their strides are passed (a view costs ~1-2 us, CPU machine)."""
    args = (dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, bias_dtype, need_x, need_a, need_b,
            dx_config, u_config, grad_config, u)
    if not templates.ENABLED:
        return _backward_launches(*args)
    key = ("bwd template", dy.stride(), x.shape, x.stride(), weight.shape, weight.stride(), lora_a.shape,
           lora_a.stride(), lora_b.stride(), None if t is None else t.stride(), None if u is None else u.stride(),
           dy.dtype, x.dtype, lora_a.dtype, x.device, scale, dropout_p, seed is None, bias_dtype, need_x, need_a,
           need_b, dx_config, u_config, grad_config)
    inputs = (dy, x, weight, lora_a, lora_b, t, seed, u)
    tpl = _LAUNCHES.get(key)
    if tpl is not None:
        return tpl.replay(inputs)
    result, tpl = templates.record(inputs, _backward_launches, *args)
    if tpl is not None:
        remember_launch(key, tpl)
    return result


def _backward_launches(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, seed, bias_dtype, need_x, need_a, need_b,
                       dx_config, u_config, grad_config, u):
    """lora_linear_bwd's allocations and launches (what its templates record)."""
    M, K = x.shape
    N, r = weight.shape[0], lora_a.shape[0]
    dev = x.device
    need_bias = bias_dtype is not None
    dropout = seed is not None
    threshold = dropout_threshold(dropout_p) if dropout else 0
    keep_scale = 1.0 / (1.0 - dropout_p) if dropout else 1.0
    dx = da = db = dbias = None
    u_given = u is not None and need_a and not need_x
    records = backward_decisions(M, N, K, r, x.dtype, dy.dtype, lora_a.dtype, dev, _num_sms(dev), need_x, need_a,
                                 need_b, need_bias, dropout, dx_config, u_config, grad_config)
    if not u_given:
        u = templates.empty((M if need_a else 0, r), torch.float32, dev)
    if need_x:
        dx = templates.empty((M, K), x.dtype, dev)
        if M and K:
            # the forward kernel over W, B, A in the other layout, read through reversed strides
            launch_fused(dy, weight, lora_b, lora_a, None, dx, u, scale=scale * keep_scale,
                         store_t=need_a, seed=seed, dropout_threshold=threshold, config=dx_config,
                         shrink=u_config, transposed=True, decisions=records.dx)
    elif need_a and not u_given:
        launch_shrink(dy, lora_b, u, config=u_config, transposed=True)

    if need_a or need_b or need_bias:
        rec = records.grads
        split = rec.split
        # one split writes the gradients themselves (split stride 0); several write fp32 partials
        # that torch sums in a fixed order below
        da, da_buf, da_st = _gradient_buffer(need_a, split, (r, K), lora_a.dtype, dy, dev)
        db, db_buf, db_st = _gradient_buffer(need_b, split, (N, r), lora_b.dtype, dy, dev)
        dbias, dbias_buf, dbias_st = _gradient_buffer(need_bias, split, (N,), bias_dtype, dy, dev)
        if M == 0:
            templates.not_replayable()
            for needed, buf in ((need_a, da_buf), (need_b, db_buf), (need_bias, dbias_buf)):
                if needed:
                    buf.zero_()
        elif rec.grid[0]:
            # u and t fp32 [M, r]; with halves split into two halves each, bf16 or tf32 (split_adapter:
            # [2, M, r], the kernel taking the first half's pointer); dy (never read) when unneeded
            u_arg, u_st = _rank_operand(u, rec, not u_given) if need_a else (dy, _strides3(dy))
            t_arg, t_st = _rank_operand(t, rec) if need_b else (dy, _strides3(dy))
            templates.launch(lora_weight_grads_kernel, rec.grid, (
                x, u_arg, dy, t_arg, seed if dropout else dy, da_buf, db_buf, dbias_buf,
                M, N, K, r, rec.rows_per_split, rec.num_a_tiles, threshold, scale * keep_scale, scale,
                *x.stride(), *u_st, *dy.stride(), *t_st, *da_st, *db_st, dbias_st[0]), rec.kw)
        if split > 1:
            templates.not_replayable()
            da = da_buf.sum(0).to(lora_a.dtype) if need_a else None
            db = db_buf.sum(0).to(lora_b.dtype) if need_b else None
            dbias = dbias_buf.sum(0).to(bias_dtype) if need_bias else None
    return (dx if dx is not None else templates.empty((0,), x.dtype, dev),
            da if da is not None else templates.empty((0,), lora_a.dtype, dev),
            db if db is not None else templates.empty((0,), lora_b.dtype, dev),
            dbias if dbias is not None else templates.empty((0,), bias_dtype or x.dtype, dev))
