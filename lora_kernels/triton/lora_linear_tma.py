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

from .lora_linear import _cdiv, _grouped_tile, _lora_dot, _lora_epilogue_store

# Warp specialization on sm_90 (triton 3.8, and 3.6 -- the GPU machines' -- the same; found by
# compiling for sm_90a on a CPU, and from triton's own sources): sm_90 runs the Hopper pass
# `add_hopper_warpspec` (backends/nvidia/compiler.py, make_ttgir; tl.range's docstring still
# says "only supported on Blackwell"). It
# turns a `tl.range(..., warp_specialize=True)` loop into `ttg.warp_specialize` (one 4-warp TMA
# producer, `setmaxnreg`-balanced, and two 4-warp consumers that split BLOCK_M between them:
# 12 warps for a 128-row tile) only when
#   * the kernel is launched with num_warps=4 (at 8 it is silently not specialized),
#   * the loop is not flattened (flatten=True: silently not specialized),
#   * every 2-D load in the loop is a tensor-descriptor (TMA) load: a pointer tl.load feeding
#     the epilogue's t @ B dot fails the pass ("unsupported load type for producer commit"),
#   * no nested loop besides the K loop and no op its data partitioner does not know: a loop
#     summing the shrink's t partials, or the dropout mask's tl.interleave, abort it at 128-row
#     tiles (WSDataPartition.cpp "Unexpected op").
# So the warp-specialized variant reads one t (the shrink's partials summed first: t_splits == 1)
# and B through descriptors, and has no dropout epilogue. The pass multi-buffers the epilogue's
# t and B chunks too: shared memory per block at 128x128x64, 3 stages, was 168 KB at padded
# rank 16, 238 KB at 32 and 460 KB at 128 (over the 227 KB a block may use). launch_tma takes
# the warp-specialized variant only where all of this holds (ws_applies), else the plain one.
WS_NUM_WARPS = 4  # per consumer warp group; the pass adds the producer (12 warps at 128 rows)
WS_MAX_BLOCK_R = 16
# Not measured on a GPU: the tuner (bench/tune.py) decides whether it wins.


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
    if WARP_SPECIALIZE:
        tl.static_assert(not DROPOUT_OUT, "the warp-specialized variant has no dropout epilogue")
        # t [M, R] (one split) and B [N, R], unit rank stride; zero past M, N and R
        t_desc = tl.make_tensor_descriptor(t_ptr, shape=[M, R], strides=[stride_tm, 1],
                                           block_shape=[BLOCK_M, T_CHUNK])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, R], strides=[stride_bn, 1],
                                           block_shape=[BLOCK_N, T_CHUNK])
    for tile in tl.range(tl.program_id(0), num_tiles, num_programs, flatten=not WARP_SPECIALIZE,
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
        if WARP_SPECIALIZE:
            for r0 in tl.static_range(0, BLOCK_R, T_CHUNK):
                tc = t_desc.load([m_block * BLOCK_M, r0])
                b = b_desc.load([n_tile * BLOCK_N, r0]).T  # B^T chunk [T_CHUNK, BN], zero past R
                acc = _lora_dot(tc * scale, b, acc, LORA_PRECISION)
            if HAS_BIAS:
                bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
                acc += bias.to(tl.float32)[None, :]
            y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
            tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))
        else:
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


def ws_applies(cfg, t_src, t_splits: int, b, dropout: bool) -> bool:
    """Whether the warp-specialized variant can run this launch (see WS_NUM_WARPS above): one t
    split, no dropout epilogue, padded rank <= WS_MAX_BLOCK_R, and t [M, R] fp32 and B [N, R]
    16-bit readable by TMA (unit rank stride, 16-byte aligned rows and bases)."""
    if t_splits != 1 or dropout or cfg.block_r > WS_MAX_BLOCK_R or b.element_size() != 2:
        return False
    t = t_src[0]
    return (t.stride(1) == 1 and b.stride(1) == 1 and t.stride(0) * 4 % 16 == 0 and b.stride(0) * 2 % 16 == 0
            and t.data_ptr() % 16 == 0 and b.data_ptr() % 16 == 0)


def launch_tma(x, w, b, bias, y, t_src, t_splits, *, scale, seed, dropout_threshold, cfg, num_sms,
               w_kn, base_prec, lora_prec, t_chunk, warp_specialize=False):
    """One persistent launch: min(num_sms, tiles) programs. t_src [splits, M, R] fp32.
    `warp_specialize` is honoured where ws_applies, else the plain persistent variant runs."""
    M, K = x.shape
    C = w.shape[0]
    warp_specialize = warp_specialize and ws_applies(cfg, t_src, t_splits, b, seed is not None)
    tiles = _cdiv(M, cfg.block_m) * _cdiv(C, cfg.block_n)
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
        num_warps=WS_NUM_WARPS if warp_specialize else cfg.num_warps, num_stages=cfg.num_stages,
    )
