"""The Triton fused forward kernel under the interpreter (CPU lane): fp32 and fp16."""
from dataclasses import replace

import pytest
import torch
from hypothesis import given, strategies as st

from cases import make_lora_inputs
from tolerances import assert_close, assert_close_to_magnitude, poison_

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

SHAPES = [  # (M, N, K, r): M = 1 (decode), odd sizes, rank 1, ranks up to 128, tall and wide
    (1, 33, 47, 1),
    (1, 64, 64, 16),
    (16, 64, 64, 16),
    (17, 70, 50, 7),
    (37, 8, 8, 3),
    (65, 130, 96, 16),
    (130, 300, 65, 64),
    (5, 17, 200, 128),
    (3, 1, 19, 2),
]


def _launch(inp, save_t=False, config=None):
    from lora_kernels.triton.lora_linear import lora_linear_fwd
    M, N, r = inp.x.shape[0], inp.weight.shape[0], inp.lora_a.shape[0]
    out = poison_(torch.empty(M, N, dtype=inp.x.dtype))
    t_out = poison_(torch.empty(M if save_t else 0, r, dtype=torch.float32))
    y, t = lora_linear_fwd(*inp.args(), save_t=save_t, config=config, out=out, t_out=t_out)
    assert y is out and t is t_out
    return y, t


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_forward_matches_float64(interpreter_device, dtype, M, N, K, r):
    inp = make_lora_inputs(M, N, K, r, dtype)
    y, _ = _launch(inp)
    assert_close(y, inp.reference64(), dtype, torch_out=inp.torch_expression())


@pytest.mark.parametrize("dtype", DTYPES)
def test_saved_t_is_x_times_a_in_fp32(interpreter_device, dtype):
    inp = make_lora_inputs(37, 50, 45, 9, dtype)
    y, t = _launch(inp, save_t=True)
    t_ref = inp.x.double() @ inp.lora_a.double().t()
    assert t.dtype == torch.float32
    assert_close(t, t_ref, torch.float32 if dtype == torch.float32 else dtype, what="t")
    assert_close(y, inp.reference64(), dtype)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("tiles,group_m", [(1, 1), (2, 2), (3, 3), (5, 1)])
def test_multi_tile_programs_and_grouping(interpreter_device, tiles, group_m, bias):
    """Programs that sweep several N tiles reuse t; every tile of every run must be right,
    including a last run shorter than TILES_PER_PROGRAM."""
    from lora_kernels.triton.lora_linear import ForwardConfig
    inp = make_lora_inputs(50, 150, 40, 5, torch.float32, bias=bias)
    cfg = ForwardConfig(block_m=16, block_n=32, block_k=16, block_r=16, tiles_per_program=tiles,
                        group_m=group_m, num_warps=4, num_stages=2)
    y, t = _launch(inp, save_t=True, config=cfg)
    assert_close(y, inp.reference64(), torch.float32)
    assert_close(t, inp.x.double() @ inp.lora_a.double().t(), torch.float32, what="t")


@pytest.mark.parametrize("x_layout", ["strided", "transposed"])
@pytest.mark.parametrize("weight_layout", ["contiguous", "transposed"])
def test_non_contiguous_inputs(interpreter_device, x_layout, weight_layout):
    inp = make_lora_inputs(21, 40, 36, 6, torch.float16, x_layout=x_layout, weight_layout=weight_layout)
    assert not inp.x.is_contiguous()
    inp.lora_a = inp.lora_a.t().contiguous().t()  # column-major adapters too
    inp.lora_b = inp.lora_b.t().contiguous().t()
    y, _ = _launch(inp)
    assert_close(y, inp.reference64(), torch.float16)


def test_fp32_adapters_over_fp16_base(interpreter_device):
    """PEFT's default: adapters stay fp32; the kernel splits A into hi+lo 16-bit halves."""
    inp = make_lora_inputs(33, 48, 40, 8, torch.float16, adapter_dtype=torch.float32, scale=2.0)
    y, t = _launch(inp, save_t=True)
    assert_close(y, inp.reference64(), torch.float16, torch_out=inp.torch_expression())
    # t keeps ~16 mantissa bits of A: far better than rounding A to fp16 (11 bits).
    t_ref = inp.x.double() @ inp.lora_a.double().t()
    assert_close(t, t_ref, torch.float32, what="t (split fp32 adapter)")


@pytest.mark.parametrize("dtype", DTYPES)
@given(M=st.integers(1, 70), N=st.integers(1, 90), K=st.integers(1, 90), r=st.integers(1, 40),
       bias=st.booleans(), save_t=st.booleans())
def test_forward_hypothesis_shapes(interpreter_device, dtype, M, N, K, r, bias, save_t):
    """Tiny random shapes can make a single dot product nearly cancel, where no precision meets a
    plain relative bound: errors are measured against the terms' magnitude instead."""
    inp = make_lora_inputs(M, N, K, r, dtype, bias=bias)
    y, t = _launch(inp, save_t=save_t)
    x, w, a, b = (v.double().abs() for v in (inp.x, inp.weight, inp.lora_a, inp.lora_b))
    t_magnitude = x @ a.t()
    y_magnitude = x @ w.t() + abs(inp.scale) * t_magnitude @ b.t()
    if bias:
        y_magnitude = y_magnitude + inp.bias.double().abs()
    assert_close_to_magnitude(y, inp.reference64(), y_magnitude, dtype)
    if save_t:
        assert_close_to_magnitude(t, inp.x.double() @ inp.lora_a.double().t(), t_magnitude,
                                  torch.float32 if dtype == torch.float32 else dtype, what="t")


def test_empty_batch(interpreter_device):
    inp = make_lora_inputs(0, 20, 16, 4, torch.float32)
    y, t = _launch(inp, save_t=True)
    assert y.shape == (0, 20) and t.shape == (0, 4)


def test_config_heuristic_covers_regimes():
    from lora_kernels.triton.lora_linear import forward_config
    decode = forward_config(1, 4096, 4096, 16, 2, 132)
    assert decode.block_m == 16 and decode.tiles_per_program == 1
    prefill = forward_config(4096, 4096, 4096, 16, 2, 132)
    assert prefill.block_m == 128 and prefill.block_r == 16
    # at least one program per SM, and the N tiles split evenly across a program's run
    runs = -(-4096 // prefill.block_n) // prefill.tiles_per_program
    assert (4096 // prefill.block_m) * runs >= 132
    assert (-(-4096 // prefill.block_n)) % prefill.tiles_per_program == 0
    big_rank = forward_config(4096, 4096, 4096, 128, 2, 132)
    assert big_rank.block_r == 128 and big_rank.block_n == 128


@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                 (torch.float16, torch.float16)])
@pytest.mark.parametrize("block_n,split_k,shrink_split,t_reduce", [
    (16, 3, 4, True),   # K-split partials of y and of t, each summed by a reduce launch
    (128, 1, 2, False),  # t's partials summed by the fused kernel as it loads them
    (16, 2, 1, False),  # K-split y, t in one shrink pass
    (16, 12, 12, True),  # one BLOCK_K tile per split
])
@pytest.mark.parametrize("save_t", [False, True])
def test_split_k_and_precomputed_t(interpreter_device, dtype, adapter_dtype, block_n, split_k, shrink_split,
                                   t_reduce, save_t):
    """t from the split-K shrink, y from K-split partials: every path of the launch plan writes
    every element of y (and t), fp32 adapters split once per call into 16-bit halves."""
    from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig, plan_forward
    M, N, K, r = 20, 70, 192, 6
    inp = make_lora_inputs(M, N, K, r, dtype, adapter_dtype=adapter_dtype, bias=True)
    cfg = ForwardConfig(16, block_n, 16, 16, 1, 2, 4, 2, split_k=split_k, precompute_t=True)
    sc = ShrinkConfig(16, 16, 16, 4, 2, split_k=shrink_split)
    plan = plan_forward(M, N, K, r, inp.x.element_size(), 4, config=cfg, shrink=sc)
    assert plan.fused_grid[1] == split_k and plan.shrink_grid[1] == shrink_split and plan.t_reduce == t_reduce
    from lora_kernels.triton.lora_linear import lora_linear_fwd
    out = poison_(torch.empty(M, N, dtype=dtype))
    t_out = poison_(torch.empty(M if save_t else 0, r, dtype=torch.float32))
    y, t = lora_linear_fwd(*inp.args(), save_t=save_t, config=cfg, shrink=sc, out=out, t_out=t_out)
    assert_close(y, inp.reference64(), dtype)
    if save_t:
        assert_close(t, inp.x.double() @ inp.lora_a.double().t(), torch.float32 if dtype == torch.float32 else dtype,
                     what="t")


def test_heuristic_splits_k_when_the_grid_is_short(interpreter_device):
    """The interpreter's 4 'SMs': a 1-row, 16-column problem has one tile, so the heuristic
    splits K (and computes t first); the result is still right."""
    from lora_kernels.triton.lora_linear import forward_config
    cfg = forward_config(1, 16, 512, 5, 4, 4)
    assert cfg.split_k >= 4 and cfg.precompute_t
    inp = make_lora_inputs(1, 16, 512, 5, torch.float32, bias=True)
    y, _ = _launch(inp)
    assert_close(y, inp.reference64(), torch.float32)


@pytest.mark.parametrize("M,N,K,r", [(45, 70, 96, 16), (20, 48, 64, 8)])
def test_warp_specialized_tma_variant(interpreter_device, monkeypatch, M, N, K, r):
    """The warp-specialized Hopper variant (t and B through descriptors, one t split) where it
    applies; it is refused for t partials, dropout, misaligned ranks and padded ranks past 16."""
    from lora_kernels.triton import lora_linear_tma as lt
    from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig, lora_linear_fwd
    inp = make_lora_inputs(M, N, K, r, torch.float16, bias=True)
    cfg = ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, split_k=1, precompute_t=True, persistent_tma=True,
                        warp_specialize=True)
    t1 = torch.empty(1, M, r, dtype=torch.float32)
    assert lt.ws_applies(cfg, t1, 1, inp.lora_b, dropout=False)
    assert not lt.ws_applies(cfg, t1, 2, inp.lora_b, dropout=False)
    assert not lt.ws_applies(cfg, t1, 1, inp.lora_b, dropout=True)
    assert not lt.ws_applies(replace(cfg, block_r=32), t1, 1, inp.lora_b, dropout=False)
    odd = make_lora_inputs(M, N, K, 5, torch.float16)
    assert not lt.ws_applies(cfg, torch.empty(1, M, 5), 1, odd.lora_b, dropout=False)
    taken = []
    real = lt.ws_applies
    monkeypatch.setattr(lt, "ws_applies", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    out = poison_(torch.empty(M, N, dtype=torch.float16))
    y, _ = lora_linear_fwd(*inp.args(), save_t=False, config=cfg, shrink=ShrinkConfig(16, 16, 16, 4, 2, 1), out=out)
    assert taken == [True]  # the warp-specialized variant ran
    assert_close(y, inp.reference64(), torch.float16)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("M,N,K,r", [(20, 48, 64, 5), (45, 70, 96, 16), (1, 33, 80, 3)])
def test_persistent_tma_variant(interpreter_device, M, N, K, r, bias):
    """The Hopper variant (persistent programs over tiles, TMA descriptor loads; 4 'SMs' in the
    interpreter, so programs walk several tiles, the M/N/K tails padded by the descriptors)."""
    from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig
    inp = make_lora_inputs(M, N, K, r, torch.float16, bias=bias)
    cfg = ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, split_k=1, precompute_t=True, persistent_tma=True)
    from lora_kernels.triton.lora_linear_tma import tma_layout
    assert tma_layout(inp.x, inp.weight, inp.x.new_empty(M, N)) is False  # the TMA path is taken
    from lora_kernels.triton.lora_linear import lora_linear_fwd
    out = poison_(torch.empty(M, N, dtype=torch.float16))
    y, _ = lora_linear_fwd(*inp.args(), save_t=False, config=cfg, shrink=ShrinkConfig(16, 16, 16, 4, 2, 2), out=out)
    assert_close(y, inp.reference64(), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows,cols,transposed", [(1, 16, False), (37, 5, True), (16, 300, False), (300, 130, True)])
def test_split_adapter_kernel_matches_its_torch_formula_bitwise(interpreter_device, dtype, rows, cols, transposed):
    """split_adapter's one launch (split_halves_kernel) gives the bits of its docstring's torch
    formula: hi = a rounded to nearest even, lo = (a - hi) rounded, over odd and strided shapes
    (several row and column tiles), every element written (the output is poisoned first)."""
    from lora_kernels.triton import lora_linear as ll
    a = torch.randn(cols, rows).t() if transposed else torch.randn(rows, cols)
    a = a * 3 + 2.0 ** -9 * torch.randn_like(a)  # a lo half in every element
    hi = a.to(dtype)
    expected = torch.stack((hi, (a - hi.float()).to(dtype)))
    got = ll.split_adapter(a, dtype, out=poison_(torch.empty(2, rows, cols, dtype=dtype)))
    assert torch.equal(got.view(torch.int16), expected.view(torch.int16))
