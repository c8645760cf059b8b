"""Triton fused LoRA linear forward: kernel and launcher.

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
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


@triton.jit
def _load_tile(ptr, offs_rows, offs_cols, n_rows, n_cols, stride_rows, stride_cols):
    """A [len(offs_rows), len(offs_cols)] tile, zero outside the matrix. int64 offsets."""
    ptrs = ptr + offs_rows[:, None].to(tl.int64) * stride_rows + offs_cols[None, :].to(tl.int64) * stride_cols
    mask = (offs_rows[:, None] < n_rows) & (offs_cols[None, :] < n_cols)
    return tl.load(ptrs, mask=mask, other=0.0)


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
def _lora_epilogue_store(acc, t, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale,
                         stride_bn, stride_br, stride_ym, stride_yn,
                         HAS_BIAS: tl.constexpr, LORA_PRECISION: tl.constexpr):
    """y[offs_m, offs_n] = acc + scale * t @ B[offs_n].T + bias, rounded once."""
    b = _load_tile(b_ptr, offs_r, offs_n, R, N, stride_br, stride_bn)  # B^T tile [BR, BN]
    acc += scale * tl.dot(t, b.to(tl.float32), input_precision=LORA_PRECISION)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :].to(tl.int64) * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def lora_linear_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, t_ptr,
    M, N, K, R, scale,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    stride_ym, stride_yn, stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, STORE_T: tl.constexpr, SPLIT_A: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    TILES_PER_PROGRAM: tl.constexpr, GROUP_M: tl.constexpr,
    BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
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

    acc, t = _base_and_shrink_tile(x_ptr, w_ptr, a_ptr, offs_m, offs_n, offs_r, M, N, K, R,
                                   stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
                                   BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_R, SPLIT_A, BASE_PRECISION)
    if STORE_T:  # saved for the backward pass; one run per row block writes it
        if n_run == 0:
            t_ptrs = t_ptr + offs_m[:, None].to(tl.int64) * stride_tm + offs_r[None, :] * stride_tr
            tl.store(t_ptrs, t, mask=(offs_m[:, None] < M) & (offs_r[None, :] < R))
    _lora_epilogue_store(acc, t, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale,
                         stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, LORA_PRECISION)

    last_tile = tl.minimum(first_tile + TILES_PER_PROGRAM, num_n_tiles)
    for tile in range(first_tile + 1, last_tile):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = _base_tile(x_ptr, w_ptr, offs_m, offs_n, M, N, K, stride_xm, stride_xk, stride_wn,
                         stride_wk, BLOCK_M, BLOCK_N, BLOCK_K, BASE_PRECISION)
        _lora_epilogue_store(acc, t, b_ptr, bias_ptr, y_ptr, offs_m, offs_n, offs_r, M, N, R, scale,
                             stride_bn, stride_br, stride_ym, stride_yn, HAS_BIAS, LORA_PRECISION)


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


def forward_config(M: int, N: int, K: int, r: int, elem_bytes: int, num_sms: int) -> ForwardConfig:
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
        block_m, block_n, block_k, warps, stages = 128, (128 if block_r >= 64 or fp32 else 256), \
            (32 if fp32 else 64), 8, 3
    num_m_blocks = triton.cdiv(M, block_m)
    num_n_tiles = triton.cdiv(N, block_n)
    tiles = 1
    for d in range(num_n_tiles, 0, -1):
        if num_n_tiles % d == 0 and num_m_blocks * (num_n_tiles // d) >= num_sms:
            tiles = d
            break
    return ForwardConfig(block_m, block_n, block_k, block_r, tiles, 8, warps, stages)


def _precisions(x_dtype: torch.dtype, device: torch.device) -> Tuple[str, str]:
    """(base product, t @ B^T) input precisions for tl.dot.

    fp32 inputs follow torch: tf32 only if ``torch.backends.cuda.matmul.allow_tf32``. The rank-deep
    t @ B^T is tf32x3 on GPUs (fp32-accurate, on tensor cores); the interpreter computes exactly."""
    if device.type != "cuda":
        return "ieee", "ieee"
    base = "tf32" if (x_dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32) else "ieee"
    if x_dtype != torch.float32:
        base = "tf32"  # unused for 16-bit operands; Triton ignores it there
    return base, "tf32x3"


def lora_linear_fwd(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                    scale: float, bias: Optional[torch.Tensor], save_t: bool,
                    config: Optional[ForwardConfig] = None, out: Optional[torch.Tensor] = None,
                    t_out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused forward on validated inputs.

    x [M, K] (any strides), weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] | None.
    Returns (y [M, N] in x.dtype, t [M, r] fp32 = x @ lora_a.T if save_t else an empty [0, r]).
    `out` / `t_out` (tests poison them) receive y and t when given; `config` overrides the
    heuristic (tests use it to reach every code path at small sizes)."""
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
    if config is None:
        config = forward_config(M, N, K, r, x.element_size(), _num_sms(x.device))
    base_precision, lora_precision = _precisions(x.dtype, x.device)
    split_a = lora_a.dtype == torch.float32 and x.dtype in (torch.float16, torch.bfloat16)
    num_m_blocks = triton.cdiv(M, config.block_m)
    num_runs = triton.cdiv(triton.cdiv(N, config.block_n), config.tiles_per_program)
    grid = (num_m_blocks * num_runs,)
    lora_linear_fwd_kernel[grid](
        x, weight, lora_a, lora_b, bias if bias is not None else y, y, t,
        M, N, K, r, float(scale),
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_b.stride(0), lora_b.stride(1),
        y.stride(0), y.stride(1), t.stride(0) if save_t else 0, t.stride(1) if save_t else 0,
        HAS_BIAS=bias is not None, STORE_T=save_t, SPLIT_A=split_a,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=config.block_r, TILES_PER_PROGRAM=config.tiles_per_program, GROUP_M=config.group_m,
        BASE_PRECISION=base_precision, LORA_PRECISION=lora_precision,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return y, t
