"""The Triton forward launcher's host-side caches (issue 16 point 6: host work per eager call):
``launch_decisions`` memoises, per launch key, the plan and everything derived from it. Checked
on the CPU from the config functions alone (no kernel runs): the cached answers equal the
uncached ones over a grid of shapes, dtypes, flags and SM counts, and a change of the tuned
table through lora_kernels.configs' API (set_table, reset, record into the table in use) reaches
the next launch. No timing is asserted here (times belong in bench/overhead.py)."""
import itertools

import pytest
import torch

from lora_kernels import configs
from lora_kernels.triton import lora_linear as ll

NUM_SMS = 132
SHAPES = [(M, N, K, r) for M, N, K, r in itertools.product((1, 3, 16, 17, 64, 200, 1024, 4096),
                                                              (16, 70, 4096), (80, 4096, 14336), (1, 16, 64, 128))]
DTYPES = [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32), (torch.float32, torch.float32)]


@pytest.fixture(autouse=True)
def _no_table():
    configs.set_table(None)
    yield
    configs.reset()


def _fields(rec):
    return {k: getattr(rec, k) for k in ll._Launch.__slots__}


def _expected(M, N, K, r, x_dtype, b_dtype, device, num_sms, dropout, mask):
    """What the launcher derives from plan_forward, computed here from scratch."""
    plan = ll.plan_forward.__wrapped__(M, N, K, r, x_dtype.itemsize, num_sms, dropout=dropout, mask_epilogue=mask,
                                       split_adapters=b_dtype == torch.float32 and x_dtype != torch.float32)
    cfg = plan.fused
    return plan, {
        "k_tiles": plan.k_per_split // cfg.block_k,
        "shrink_k_tiles": plan.shrink_k_per_split // plan.shrink.block_k if plan.shrink else 0,
        "t_chunk": ll.t_chunk(cfg.block_r),
        "t_reduce_grid": (-(-M // ll.REDUCE_BLOCK[0]), -(-r // ll.REDUCE_BLOCK[1])),
        "out_reduce_grid": (-(-M // ll.REDUCE_BLOCK[0]), -(-N // ll.REDUCE_BLOCK[1])),
        "lora_prec": ll.lora_precision_for(b_dtype, device),
    }


@pytest.mark.parametrize("x_dtype,b_dtype", DTYPES)
@pytest.mark.parametrize("device", [torch.device("cpu"), torch.device("cuda", 0)])
def test_cached_decisions_equal_uncached_over_a_grid(x_dtype, b_dtype, device):
    """launch_decisions (torch.device('cuda', 0) only names the device: nothing runs on it)."""
    ll.clear_launch_cache()
    for (M, N, K, r), num_sms, dropout, mask in itertools.product(SHAPES, (4, NUM_SMS), (False, True),
                                                                 (False, True)):
        args = (M, N, K, r, x_dtype, b_dtype, device, num_sms)
        kw = {"dropout": dropout, "mask_epilogue": mask}
        first = ll.launch_decisions(*args, **kw)
        again = ll.launch_decisions(*args, **kw)
        fresh = ll.launch_decisions(*args, **kw, cached=False)
        assert again is first  # served from the cache
        assert _fields(fresh) == _fields(first)
        plan, derived = _expected(*args, dropout, mask)
        assert first.plan == plan
        assert {k: getattr(first, k) for k in derived} == derived
        # fp32 x on a GPU reads allow_tf32 per call (None here); every other precision is fixed
        per_call = device.type == "cuda" and x_dtype == torch.float32
        assert first.base_prec == (None if per_call else ll.base_precision(x_dtype, device))
        assert first.fused_kw["BLOCK_N"] == plan.fused.block_n and first.fused_kw["T_CHUNK"] == derived["t_chunk"]
        assert (first.shrink_kw is None) == (plan.shrink is None)


def test_explicit_configs_are_part_of_the_key():
    cfg = ll.ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, split_k=2, precompute_t=True)
    sc = ll.ShrinkConfig(16, 16, 16, 4, 2, split_k=3)
    args = (20, 70, 192, 6, torch.float32, torch.float32, torch.device("cpu"), 4)
    plain = ll.launch_decisions(*args)
    forced = ll.launch_decisions(*args, config=cfg, shrink=sc)
    assert forced.plan.fused == cfg and forced.plan.shrink == sc and forced.plan.fused_grid[1] == 2
    assert ll.launch_decisions(*args) is plain and ll.launch_decisions(*args, config=cfg, shrink=sc) is forced


def _tuned_table(M, N, K, r):
    table = configs.new_table("NVIDIA H200", NUM_SMS, "3.6.0")
    key = {"M": M, "N": N, "K": K, "r": r, "elem_bytes": 2, "mask_epilogue": False, "split_adapters": False}
    tuned = {"block_m": 64, "block_n": 256, "block_k": 64, "block_r": 16, "tiles_per_program": 1, "group_m": 4,
             "num_warps": 8, "num_stages": 4, "split_k": 1, "precompute_t": True}
    configs.record(table, "forward", key, tuned, 31.0)
    return table, key, tuned


def test_a_table_change_through_the_configs_api_reaches_the_next_launch():
    args = (1024, 4096, 4096, 16, torch.bfloat16, torch.bfloat16, torch.device("cuda", 0), NUM_SMS)
    heuristic = ll.launch_decisions(*args)
    table, key, tuned = _tuned_table(1024, 4096, 4096, 16)
    configs.set_table(table)  # clears the cache
    rec = ll.launch_decisions(*args)
    assert rec is not heuristic and rec.plan.fused.block_n == 256 and rec.fused_kw["BLOCK_N"] == 256
    configs.record(table, "forward", key, {**tuned, "block_n": 128, "num_stages": 3})  # the table in use
    rec = ll.launch_decisions(*args)
    assert rec.plan.fused.block_n == 128 and rec.fused_kw["num_stages"] == 3
    other = configs.new_table("NVIDIA H200", NUM_SMS, "3.6.0")
    configs.record(other, "forward", key, {**tuned, "block_n": 64})  # not in use: nothing changes
    assert ll.launch_decisions(*args) is rec
    configs.set_table(None)
    assert ll.launch_decisions(*args).plan == heuristic.plan
    configs.set_table(table)
    configs.reset()  # forgets the table (no CUDA here: none is loaded again)
    assert ll.launch_decisions(*args).plan == heuristic.plan


def test_the_cache_is_bounded(monkeypatch):
    monkeypatch.setattr(ll, "_LAUNCH_CACHE_MAX", 8)
    ll.clear_launch_cache()
    for M in range(1, 30):
        ll.launch_decisions(M, 64, 64, 8, torch.float32, torch.float32, torch.device("cpu"), 4)
        assert len(ll._LAUNCHES) <= 8


def test_the_eager_forward_skips_the_empty_t(interpreter_device):
    """want_t=False: the launcher returns t = None (the eager path drops it); the registered op
    still returns an empty [0, r] fp32 t, and y is the same either way."""
    from cases import make_lora_inputs
    inp = make_lora_inputs(3, 40, 48, 5, torch.float32)
    y1, t1 = ll.lora_linear_fwd(*inp.args(), save_t=False)
    y2, t2 = ll.lora_linear_fwd(*inp.args(), save_t=False, want_t=False)
    assert t1.shape == (0, 5) and t1.dtype == torch.float32 and t2 is None
    assert torch.equal(y1, y2)
    y3, t3 = ll.lora_linear_fwd(*inp.args(), save_t=True, want_t=False)  # save_t wins
    assert t3.shape == (3, 5) and torch.equal(y3, y1)
    y4, t4 = torch.ops.lora_kernels.lora_linear_fwd(*inp.args(), "triton", False)
    assert t4.shape == (0, 5) and t4.dtype == torch.float32 and torch.equal(y4, y1)


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_weight_grad_decisions_cached_equal_uncached_and_follow_the_config(x_dtype):
    """The backward's weight-gradient launch record (lora_linear_backward.weight_grad_decisions):
    served from the cache per key, equal to a fresh one, and derived from weight_grad_config as
    the launcher's splits and grid are defined (rows split into block_m multiples, one program per
    column tile of dA then of dB / dbias)."""
    from lora_kernels.triton import lora_linear_backward as lb
    ll.clear_launch_cache()
    device = torch.device("cuda", 0)
    for (M, N, K, r), need, num_sms in itertools.product(
            [(1, 4096, 4096, 16), (17, 70, 80, 5), (4096, 4096, 14336, 64), (20000, 1024, 512, 128)],
            [(True, True, True), (True, False, False), (False, True, False), (False, False, True)], (4, NUM_SMS)):
        args = (M, N, K, r, x_dtype, x_dtype, device, num_sms, *need, False)
        first = lb.weight_grad_decisions(*args)
        assert lb.weight_grad_decisions(*args) is first
        fresh = lb.weight_grad_decisions(*args, cached=False)
        assert {k: getattr(fresh, k) for k in lb._GradLaunch.__slots__} == \
            {k: getattr(first, k) for k in lb._GradLaunch.__slots__}
        # fp16 and fp32 halves: x / dy split in registers, their own column tiles
        split_x = first.kw["SPLIT_X"]
        assert split_x == (first.halves and x_dtype in (torch.float16, torch.float32))
        cfg = lb.weight_grad_config(M, N, K, r, x_dtype.itemsize, num_sms, need[0], need[1], split_x=split_x)
        rows = first.rows_per_split
        assert rows % cfg.block_m == 0 and first.split == -(-M // rows) <= max(1, cfg.split_m)
        a_tiles = -(-K // cfg.block_c) if need[0] else 0
        b_tiles = -(-N // cfg.block_c) if need[1] or need[2] else 0
        assert first.num_a_tiles == a_tiles and first.grid == (a_tiles + b_tiles, first.split)
        # on a GPU every x splits u and t into halves (bf16; tf32 for fp32 x) unless a program
        # walks one row step at a rank the fp32 path holds without spilling; that loop (one step:
        # nothing to pipeline) is exempt from the compile test's waits check
        one_step = M <= cfg.block_m and cfg.block_r <= lb.FP32_ONE_STEP_MAX_BLOCK_R
        assert first.halves == (not one_step)
        assert first.halves or (first.split, first.rows_per_split) == (1, cfg.block_m)
        assert first.halves_dtype == (torch.float32 if x_dtype == torch.float32 else torch.bfloat16)
        assert (first.split_launch is None) == (not first.halves)
        assert first.kw["BLOCK_C"] == cfg.block_c and first.kw["HAS_DA"] == need[0]
    cfg = lb.WeightGradConfig(16, 32, 16, 3, 4, 2, halves=False)
    forced = lb.weight_grad_decisions(200, 70, 80, 5, torch.bfloat16, torch.bfloat16, device, 4, True, True, False,
                                      False, cfg)
    assert forced.halves is False and forced.kw["BLOCK_M"] == 16 and forced.split == 3


@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
def test_backward_decisions_hold_the_records_of_both_launches(x_dtype):
    """lora_linear_bwd's one lookup (backward_decisions): served from the cache per key, and its
    two records are the ones launch_decisions (the dx launch: dy as x, lora_a's dtype as b's, the
    dropout mask on the output) and weight_grad_decisions give for the same inputs; an unneeded
    launch (or dx over an empty M or K) has none."""
    from lora_kernels.triton import lora_linear_backward as lb
    ll.clear_launch_cache()
    device = torch.device("cuda", 0)
    for (M, N, K, r), (need_x, need_a, need_b, need_bias), dropout in itertools.product(
            [(1, 4096, 4096, 16), (17, 70, 80, 5), (0, 70, 80, 5), (4096, 1024, 0, 64)],
            [(True, True, True, False), (True, False, False, False), (False, True, False, True),
             (False, False, False, False)], (False, True)):
        args = (M, N, K, r, x_dtype, x_dtype, torch.float32, device, NUM_SMS, need_x, need_a, need_b, need_bias,
                dropout)
        rec = lb.backward_decisions(*args)
        assert lb.backward_decisions(*args) is rec
        if need_x and M and K:
            assert rec.dx is ll.launch_decisions(M, K, N, r, x_dtype, torch.float32, device, NUM_SMS,
                                                 mask_epilogue=dropout)
        else:
            assert rec.dx is None
        if need_a or need_b or need_bias:
            assert rec.grads is lb.weight_grad_decisions(M, N, K, r, x_dtype, x_dtype, device, NUM_SMS, need_a,
                                                         need_b, need_bias, dropout)
        else:
            assert rec.grads is None


def test_fp16_weight_grads_keep_fp32_u_t_where_bf16_dots_are_wrong(monkeypatch):
    """SPLIT_X runs bf16 dots: under an interpreter whose bfloat16 dot is not fixed (CPU tensors),
    fp16 x keeps the fp32 u / t path; on a GPU, or once fixed, it splits."""
    from lora_kernels.triton import lora_linear_backward as lb
    args = (4096, 256, 256, 16, torch.float16, torch.float16)
    flags = (True, True, False, False)
    for fixed, device, split in ((False, "cpu", False), (True, "cpu", True), (False, "cuda", True)):
        monkeypatch.setattr(lb, "interpreter_bf16_fixed", lambda fixed=fixed: fixed)
        rec = lb.weight_grad_decisions(*args, torch.device(device), NUM_SMS, *flags, cached=False)
        assert rec.halves == split and rec.kw["SPLIT_X"] == split, (fixed, device)
