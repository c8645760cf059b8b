"""Hopper variant of the fused forward / dx kernel: persistent, TMA tensor descriptors, optional
warp specialization. Selected by ``ForwardConfig.persistent_tma`` (default off: the tuner
measures whether it wins, bench/tune.py; nothing here is measured on a GPU yet).

Same semantics as ``lora_linear_fwd_kernel`` on its LOAD_T path without K splits:

    y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + scale * (t @ B^T)[m, n] [* keep[m, n]]

with t read from the split-K shrink's partials. One program per SM walks output tiles
tile = pid, pid + P, pid + 2P, ... (grouped order, as the non-persistent kernel), so the grid is
exactly one wave and each program's next tile starts while the last one's epilogue drains. The K
loop reads x and W through ``tl.make_tensor_descriptor`` (TMA bulk copies into shared memory);
W_KN: W is stored [K, N] row-major (the backward's dx passes W0^T), else [N, K].
"""
from __future__ import annotations

import triton
import triton.language as tl

from .lora_linear import _grouped_tile, _lora_epilogue_store


@triton.jit(do_not_specialize=["M", "t_splits", "num_programs"])
def lora_linear_fwd_tma_kernel(
    x_ptr, w_ptr, b_ptr, bias_ptr, y_ptr, t_ptr, seed_ptr,
    M, N, K, R, scale, dropout_threshold, t_splits, num_programs,
    stride_xm, stride_w, stride_bn, stride_br, stride_ym, stride_ts, stride_tm, stride_tr,
    HAS_BIAS: tl.constexpr, DROPOUT_OUT: tl.constexpr, W_KN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    T_CHUNK: tl.constexpr, GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, BASE_PRECISION: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1], block_shape=[BLOCK_M, BLOCK_K])
    if W_KN:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[K, N], strides=[stride_w, 1],
                                           block_shape=[BLOCK_K, BLOCK_N])
    else:
        w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_w, 1],
                                           block_shape=[BLOCK_N, BLOCK_K])
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_tiles = tl.cdiv(N, BLOCK_N)
    num_tiles = num_m_blocks * num_n_tiles
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=True,
                         warp_specialize=WARP_SPECIALIZE):
        m_block, n_tile = _grouped_tile(tile, num_m_blocks, num_n_tiles, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for ki in range(k_tiles):
            x = x_desc.load([m_block * BLOCK_M, ki * BLOCK_K])
            if W_KN:
                w = w_desc.load([ki * BLOCK_K, n_tile * BLOCK_N])
            else:
                w = w_desc.load([n_tile * BLOCK_N, ki * BLOCK_K]).T
            acc = tl.dot(x, w, acc, input_precision=BASE_PRECISION)
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = n_tile * BLOCK_N + tl.arange(0, BLOCK_N)
        _lora_epilogue_store(acc, 0.0, t_ptr, t_ptr, b_ptr, bias_ptr, y_ptr, seed_ptr, offs_m, offs_n,
                             n_tile * BLOCK_N, M, N, R, scale, dropout_threshold, True, False, t_splits,
                             stride_ts, stride_tm, stride_tr, 0, 0, stride_bn, stride_br, stride_ym, 1,
                             HAS_BIAS, DROPOUT_OUT, True, LORA_PRECISION, BLOCK_M, BLOCK_N, BLOCK_R, T_CHUNK)


_ALLOCATOR_SET = False


def _ensure_allocator() -> None:
    """Device-side tensor descriptors need scratch memory from a global allocator (set once)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        import torch
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
        _ALLOCATOR_SET = True


def tma_layout(x, w, y):
    """W_KN (bool) when x, w, y can be read/written through TMA descriptors (16-bit, unit last
    stride, 16-byte aligned rows and bases), else None: the caller falls back to the pointer kernel."""
    import torch
    if x.dtype not in (torch.float16, torch.bfloat16) or y.dtype != x.dtype:
        return None
    if x.stride(1) != 1 or y.stride(1) != 1:
        return None
    if w.stride(1) == 1:
        w_kn, ld = False, w.stride(0)
    elif w.stride(0) == 1:
        w_kn, ld = True, w.stride(1)
    else:
        return None
    elem = x.element_size()
    aligned = all(v * elem % 16 == 0 for v in (x.stride(0), ld)) and all(
        p % 16 == 0 for p in (x.data_ptr(), w.data_ptr()))
    return w_kn if aligned else None


def launch_tma(x, w, b, bias, y, t_src, t_splits, *, scale, seed, dropout_threshold, cfg, num_sms,
               w_kn, base_prec, lora_prec, t_chunk, warp_specialize=False):
    """One persistent launch: min(num_sms, tiles) programs. t_src [splits, M, R] fp32."""
    M, K = x.shape
    C = w.shape[0]
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(C, cfg.block_n)
    programs = max(1, min(num_sms, tiles))
    if x.device.type == "cuda":
        _ensure_allocator()
    lora_linear_fwd_tma_kernel[(programs,)](
        x, w, b, bias if bias is not None else y, y, t_src, seed if seed is not None else y,
        M, C, K, b.shape[1], float(scale), dropout_threshold, t_splits, programs,
        x.stride(0), w.stride(1) if w_kn else w.stride(0), *b.stride(), y.stride(0), *t_src.stride(),
        HAS_BIAS=bias is not None, DROPOUT_OUT=seed is not None, W_KN=w_kn,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_R=cfg.block_r,
        T_CHUNK=t_chunk, GROUP_M=cfg.group_m, WARP_SPECIALIZE=warp_specialize,
        BASE_PRECISION=base_prec, LORA_PRECISION=lora_prec,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
