"""The Triton single-adapter launch plans over the whole benchmark suite (shared/DESIGN.md section
7), checked on the CPU from the config functions alone (no kernel runs, no GPU):

* every launch of the forward, the backward's dx and u, and dA/dB fills at least one wave on an
  H100/H200's 132 SMs (or splits K into fixed-order partials to get there);
* A is streamed about once per row block of the output (<= 1.25x), the reuse W gets, so A's
  traffic stays at its floor r/N of W's (at decode: once per call);
* the configurations over M = 1..16384 for one layer shape are a small bounded set (each is one
  compiled kernel: per-call values are runtime ints, never specialised -- that part is checked
  by compiling, in tests/test_triton_lora_linear_compile.py).
"""
import itertools

import pytest

from bench import suites

NUM_SMS = 132  # H100 SXM / H200
RANKS = sorted(set(suites.RANKS) | {8, 128})  # the suite's ranks and the sweep's
SHAPES = [(name, K, N, r, M) for (name, K, N), r, M in itertools.product(suites.LAYERS, RANKS, suites.TOKENS)]
A_TRAFFIC_MAX = 1.25


def _plans(K, N, r, M, elem_bytes=2, fp32_adapters=False):
    """(what, plan, depth of its K loop) of every fused launch one training step of this layer makes."""
    from lora_kernels.triton.lora_linear import plan_forward
    yield "forward", plan_forward(M, N, K, r, elem_bytes, NUM_SMS, split_adapters=fp32_adapters), K
    yield "forward with dropout", plan_forward(M, N, K, r, elem_bytes, NUM_SMS, dropout=True,
                                               split_adapters=fp32_adapters), K
    # the backward's dx = dy @ W + s * (dy @ B) @ A: the same kernel with K and N swapped
    yield "dx", plan_forward(M, K, N, r, elem_bytes, NUM_SMS, split_adapters=fp32_adapters), N
    yield "dx with dropout", plan_forward(M, K, N, r, elem_bytes, NUM_SMS, mask_epilogue=True,
                                          split_adapters=fp32_adapters), N


def _ids(shapes):
    return [f"{n} K={K} N={N} r={r} M={M}" for n, K, N, r, M in shapes]


@pytest.mark.parametrize("fp32_adapters", [False, True])
@pytest.mark.parametrize("name,K,N,r,M", SHAPES, ids=_ids(SHAPES))
def test_every_launch_fills_a_wave(name, K, N, r, M, fp32_adapters):
    for what, plan, depth in _plans(K, N, r, M, fp32_adapters=fp32_adapters):
        fused = plan.fused_grid[0] * plan.fused_grid[1]
        assert fused >= NUM_SMS, f"{what}: {fused} programs ({plan.fused})"
        if plan.fused_grid[1] > 1:
            assert plan.shrink is not None, f"{what}: K split without a precomputed t"
        if plan.shrink is not None:
            _assert_shrink_fills(plan.shrink, plan.shrink_grid, depth, what)


def _assert_shrink_fills(sc, grid, K, what):
    """The shrink fills a wave, or (decode: its whole work is reading A, r x K) is already split
    into single BLOCK_K tiles: one load round trip per program, as short as it can be."""
    import triton
    programs = grid[0] * grid[1]
    assert programs >= NUM_SMS or grid[1] == triton.cdiv(K, sc.block_k), f"{what}: shrink {grid} {sc}"


@pytest.mark.parametrize("name,K,N,r,M", SHAPES, ids=_ids(SHAPES))
def test_weight_grads_and_u_fill_a_wave(name, K, N, r, M):
    import triton
    from lora_kernels.triton.lora_linear import shrink_config
    from lora_kernels.triton.lora_linear_backward import weight_grad_config
    wc = weight_grad_config(M, N, K, r, 2, NUM_SMS)
    tiles = triton.cdiv(K, wc.block_c) + triton.cdiv(N, wc.block_c)
    split = max(1, min(wc.split_m, triton.cdiv(M, wc.block_m)))  # as lora_linear_bwd
    assert tiles * split >= NUM_SMS, wc
    # u = dy @ B when dx is not needed: the shrink over dy [M, N]
    sc = shrink_config(M, N, r, 2, NUM_SMS)
    from lora_kernels.triton.lora_linear import k_split_plan
    _assert_shrink_fills(sc, (triton.cdiv(M, sc.block_m), k_split_plan(N, sc.block_k, sc.split_k)[0]), N, "u")


def a_traffic(plan, M):
    """A's bytes streamed by a call / (A's bytes x row blocks of the output). With t precomputed,
    each shrink row block reads all of A once (its K splits read disjoint slices); otherwise every
    fused program reads all of A for its row block."""
    import triton
    row_blocks = triton.cdiv(M, plan.fused.block_m)
    if plan.shrink is not None:
        return plan.shrink_grid[0] / row_blocks
    return plan.fused_grid[0] / row_blocks


@pytest.mark.parametrize("name,K,N,r,M", SHAPES, ids=_ids(SHAPES))
def test_a_is_read_about_once(name, K, N, r, M):
    for what, plan, _ in _plans(K, N, r, M):
        assert a_traffic(plan, M) <= A_TRAFFIC_MAX, f"{what}: {plan}"


def test_a_traffic_model_sees_recomputed_t():
    """The model can fail: a fused plan that recomputes t per N tile reads A once per tile."""
    from lora_kernels.triton.lora_linear import ForwardConfig, plan_forward
    cfg = ForwardConfig(16, 64, 128, 16, 1, 8, 4, 4)  # decode tiles, t in the fused kernel
    plan = plan_forward(1, 4096, 4096, 16, 2, NUM_SMS, config=cfg)
    assert plan.shrink is None and a_traffic(plan, 1) == 64


@pytest.mark.parametrize("name,K,N", suites.LAYERS)
@pytest.mark.parametrize("r", [16, 128])
def test_bounded_compiled_variants_over_m(name, K, N, r):
    """Each distinct (config) is one compiled fused kernel (M, tiles per program and the K run are
    runtime ints that are not specialised): M = 1..16384 must not build more than a handful."""
    from lora_kernels.triton.lora_linear import forward_config
    # every M up to 1024, then every 16th: the configs change only where cdiv(M, 64 or 128) does,
    # and each of those intervals holds a sample
    ms = list(range(1, 1025)) + list(range(1024, 16385, 16))
    variants = {forward_config(M, N, K, r, 2, NUM_SMS) for M in ms}
    # the kernel's constexprs: tiles, warps, stages and the path (LOAD_T); split_k is a runtime int
    compiled = {(c.block_m, c.block_n, c.block_k, c.block_r, c.group_m, c.num_warps, c.num_stages, c.precompute_t)
                for c in variants}
    assert len(compiled) <= 8, sorted(compiled)



MULTI_SHAPES = [(name, K, N, M, L) for (name, K, N), M, L in
                itertools.product(suites.MULTI_LAYERS, suites.MULTI_TOKENS, suites.MULTI_ADAPTERS)]


@pytest.mark.parametrize("r", [16, 64, 128])
@pytest.mark.parametrize("name,K,N,M,L", MULTI_SHAPES, ids=[f"{s[0]} M={s[3]} L={s[4]}" for s in MULTI_SHAPES])
def test_multi_adapter_fused_linear_fills_a_wave(name, K, N, M, L, r):
    """The multi-adapter fused kernel (no K split) over the multi-adapter suite's layers."""
    import triton
    from lora_kernels.triton import multi_lora as ml
    tiles = ml.linear_config(M, N, K, r, L, 2, NUM_SMS).tiles
    runs = triton.cdiv(triton.cdiv(N, tiles.block_n), tiles.tiles_per_program)
    assert triton.cdiv(M, tiles.block_m) * runs >= NUM_SMS, tiles


def test_rank_64_and_up_never_keep_t_in_the_fused_kernel():
    """A config asking for t inside the fused kernel at padded rank >= 64 (which spills) is
    planned with t from the shrink instead."""
    from lora_kernels.triton.lora_linear import ForwardConfig, plan_forward
    cfg = ForwardConfig(128, 128, 64, 64, 1, 8, 8, 3)
    assert plan_forward(4096, 4096, 4096, 64, 2, NUM_SMS, config=cfg).shrink is not None
    assert plan_forward(4096, 4096, 4096, 16, 2, NUM_SMS, config=ForwardConfig(128, 128, 64, 16, 1, 8, 8, 3)).shrink is None
