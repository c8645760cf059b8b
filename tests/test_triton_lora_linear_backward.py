"""The Triton backward launcher and kernels under the interpreter (CPU lane): every code path
(dx with and without storing u, u by the shrink kernel, split-M partial sums, multi-tile dx
programs with the dropout epilogue, dropout pre-pass forward), odd sizes, strides, fp32/fp16."""
import copy

import pytest
import torch
from hypothesis import given, strategies as st

from lora_kernels import reference
from cases import make_lora_inputs
from tolerances import assert_close, assert_close_to_magnitude, poison_, rand

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEED = 0x5DEECE66D1234


def _seed(p):
    return torch.tensor([SEED]) if p else None


def _forward(inp, p, **kw):
    from lora_kernels.triton.lora_linear import lora_linear_fwd
    return lora_linear_fwd(*inp.args(), True, dropout_p=p, seed=_seed(p), **kw)


def _backward(inp, dy, t, p, need=("x", "a", "b", "bias"), **configs):
    from lora_kernels.triton.lora_linear_backward import lora_linear_bwd
    bias_dtype = inp.bias.dtype if ("bias" in need and inp.bias is not None) else None
    return lora_linear_bwd(dy, inp.x, inp.weight, inp.lora_a, inp.lora_b, t, inp.scale, p, _seed(p),
                           bias_dtype, "x" in need, "a" in need, "b" in need, **configs)


def _reference(inp, dy, p):
    """float64 (y, t, dx, dA, dB, dbias) with the kernels' mask."""
    M, K = inp.x.shape
    keep = reference.dropout_keep_mask(SEED, M, K, p) if p else None
    d = lambda v: None if v is None else v.double()  # noqa: E731
    y, t = reference.lora_linear_forward(d(inp.x), d(inp.weight), d(inp.lora_a), d(inp.lora_b), inp.scale,
                                         d(inp.bias), keep, p)
    grads = reference.lora_linear_backward(dy.double(), d(inp.x), d(inp.weight), d(inp.lora_a), d(inp.lora_b),
                                           t, inp.scale, keep, p, bias_dtype=torch.float64)
    return (y, t) + tuple(grads)


def _check(got, ref, dtype, names):
    for name, g, r in zip(names, got, ref):
        assert_close(g, r, dtype, what=name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("M,N,K,r", [(1, 33, 47, 1), (17, 70, 50, 7), (130, 40, 96, 16), (5, 17, 200, 128),
                                     (64, 8, 8, 3)])
def test_backward_matches_float64(interpreter_device, dtype, p, M, N, K, r):
    inp = make_lora_inputs(M, N, K, r, dtype)
    dy = rand(M, N, dtype=dtype)
    y, t = _forward(inp, p)
    ref = _reference(inp, dy, p)
    _check((y, t), ref[:2], dtype, ("y", "t"))
    grads = _backward(inp, dy, t, p)
    assert [g.dtype for g in grads] == [dtype] * 4
    _check(grads, ref[2:], dtype, ("dx", "dA", "dB", "dbias"))


@pytest.mark.parametrize("split", [1, 2, 3, 5])
@pytest.mark.parametrize("p", [0.0, 0.4])
def test_split_m_partial_sums_and_multi_tile_dx(interpreter_device, split, p):
    """Row splits (fp32 workspace summed by torch), several column tiles per gradient, dx programs
    that sweep several tiles (the dropout epilogue must use each tile's own columns)."""
    from lora_kernels.triton.lora_linear import ForwardConfig
    from lora_kernels.triton.lora_linear_backward import WeightGradConfig
    inp = make_lora_inputs(75, 50, 70, 5, torch.float32)
    dy = rand(75, 50)
    y, t = _forward(inp, p)
    grads = _backward(inp, dy, t, p,
                      dx_config=ForwardConfig(16, 16, 16, 16, tiles_per_program=3, group_m=2, num_warps=4,
                                              num_stages=2),
                      grad_config=WeightGradConfig(block_m=16, block_c=16, block_r=16, split_m=split,
                                                   num_warps=4, num_stages=2))
    _check(grads, _reference(inp, dy, p)[2:], torch.float32, ("dx", "dA", "dB", "dbias"))


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("need", [("a",), ("b",), ("bias",), ("x",), ("a", "b"), ("x", "bias")])
def test_subsets_of_gradients(interpreter_device, p, need):
    """dA without dx takes u from the shrink kernel; gradients not needed come back empty."""
    inp = make_lora_inputs(29, 31, 37, 6, torch.float16)
    dy = rand(29, 31, dtype=torch.float16)
    _, t = _forward(inp, p)
    got = _backward(inp, dy, t if "b" in need else None, p, need)
    ref = _reference(inp, dy, p)[2:]
    for key, name, g, r in zip(("x", "a", "b", "bias"), ("dx", "dA", "dB", "dbias"), got, ref):
        if key in need:
            assert_close(g, r, torch.float16, what=name)
        else:
            assert g.numel() == 0


def test_fp32_adapters_over_fp16_base(interpreter_device):
    inp = make_lora_inputs(40, 36, 44, 8, torch.float16, adapter_dtype=torch.float32, scale=2.0)
    inp.bias = inp.bias.float()
    dy = rand(40, 36, dtype=torch.float16)
    y, t = _forward(inp, 0.2)
    ref = _reference(inp, dy, 0.2)
    _check((y,), ref[:1], torch.float16, ("y",))
    assert_close(t, ref[1], torch.float32, what="t (split fp32 adapter, dropout pre-pass)")
    grads = _backward(inp, dy, t, 0.2)
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32, torch.float32]
    _check(grads, ref[2:], torch.float16, ("dx", "dA", "dB", "dbias"))


@pytest.mark.parametrize("x_layout", ["strided", "transposed"])
def test_non_contiguous_x_dy_and_weights(interpreter_device, x_layout):
    inp = make_lora_inputs(23, 30, 34, 5, torch.float32, x_layout=x_layout, weight_layout="transposed")
    inp.lora_a = inp.lora_a.t().contiguous().t()
    inp.lora_b = inp.lora_b.t().contiguous().t()
    dy = rand(30, 23).t()  # column-major dy
    assert not (inp.x.is_contiguous() or dy.is_contiguous())
    y, t = _forward(inp, 0.25)
    _check(_backward(inp, dy, t, 0.25), _reference(inp, dy, 0.25)[2:], torch.float32, ("dx", "dA", "dB", "dbias"))


def test_broadcast_dy_from_a_sum(interpreter_device):
    """y.sum().backward() hands the op an expanded dy (stride 0)."""
    inp = make_lora_inputs(9, 12, 16, 3, torch.float32)
    dy = torch.ones(()).expand(9, 12)
    _, t = _forward(inp, 0.0)
    _check(_backward(inp, dy, t, 0.0), _reference(inp, dy.contiguous(), 0.0)[2:], torch.float32,
           ("dx", "dA", "dB", "dbias"))


def test_empty_batch(interpreter_device):
    inp = make_lora_inputs(0, 12, 10, 3, torch.float32)
    dy = torch.empty(0, 12)
    _, t = _forward(inp, 0.5)
    dx, da, db, dbias = _backward(inp, dy, t, 0.5)
    assert dx.shape == (0, 10)
    for g, shape in ((da, (3, 10)), (db, (12, 3)), (dbias, (12,))):
        assert g.shape == shape and torch.equal(g, torch.zeros(shape))


def test_dropout_forward_writes_every_element(interpreter_device):
    """Poisoned outputs: the dropout pre-pass + t-reading fused kernel write all of y and t."""
    from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig
    inp = make_lora_inputs(45, 70, 33, 9, torch.float16)
    out, t_out = poison_(torch.empty(45, 70, dtype=torch.float16)), poison_(torch.empty(45, 9))
    cfg = ForwardConfig(16, 32, 16, 16, tiles_per_program=2, group_m=2, num_warps=4, num_stages=2)
    y, t = _forward(inp, 0.3, config=cfg, out=out, t_out=t_out, shrink=ShrinkConfig(16, 16, 16, 4, 2))
    ref = _reference(inp, rand(45, 70), 0.3)
    _check((y, t), ref[:2], torch.float16, ("y", "t"))


@pytest.mark.parametrize("dtype", DTYPES)
@given(M=st.integers(1, 60), N=st.integers(1, 60), K=st.integers(1, 60), r=st.integers(1, 20),
       p=st.sampled_from([0.0, 0.5]), bias=st.booleans())
def test_backward_hypothesis_shapes(interpreter_device, dtype, M, N, K, r, p, bias):
    inp = make_lora_inputs(M, N, K, r, dtype, bias=bias)
    dy = rand(M, N, dtype=dtype)
    _, t = _forward(inp, p)
    need = ("x", "a", "b", "bias") if bias else ("x", "a", "b")
    got = _backward(inp, dy, t, p, need)
    # Tiny random shapes can make a gradient a single nearly cancelling sum, where no precision
    # meets a plain relative bound: measure errors against the same sums over absolute values.
    magnitude_inp = copy.copy(inp)
    for name in ("x", "weight", "lora_a", "lora_b", "bias"):
        if getattr(inp, name) is not None:
            setattr(magnitude_inp, name, getattr(inp, name).abs())
    magnitude_inp.scale = abs(inp.scale)
    magnitudes = _reference(magnitude_inp, dy.abs(), p)[2:]
    for name, g, r, m in zip(("dx", "dA", "dB", "dbias")[:len(need)], got, _reference(inp, dy, p)[2:], magnitudes):
        assert_close_to_magnitude(g, r, m, dtype, what=name)


def test_weight_grad_config_heuristic():
    from lora_kernels.triton.lora_linear_backward import weight_grad_config
    big = weight_grad_config(16384, 4096, 4096, 16, 2, 132)
    assert big.split_m >= 2 and 16384 // big.split_m >= 512  # fill 132 SMs; >= 512 rows per split
    small = weight_grad_config(128, 4096, 4096, 16, 2, 132)
    assert small.split_m == 1  # too few rows to be worth a workspace
    assert weight_grad_config(4096, 4096, 4096, 128, 2, 132).block_r == 128


@pytest.mark.parametrize("p", [0.0, 0.4])
@pytest.mark.parametrize("adapter_dtype", [torch.float16, torch.float32])
def test_dx_with_k_split_and_precomputed_u(interpreter_device, p, adapter_dtype):
    """dx from K-split partials with u = dy @ B from the split-K shrink (stored for dA); the dropout
    epilogue's mask lands only on the first split's LoRA term."""
    from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig, plan_forward
    inp = make_lora_inputs(33, 96, 40, 6, torch.float16, adapter_dtype=adapter_dtype)
    dy = rand(33, 96, dtype=torch.float16)
    y, t = _forward(inp, p)
    dx_cfg = ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, split_k=3, precompute_t=True)
    u_cfg = ShrinkConfig(16, 16, 16, 4, 2, split_k=2)
    plan = plan_forward(33, 40, 96, 6, 2, 4, config=dx_cfg, shrink=u_cfg, mask_epilogue=p > 0)
    assert plan.fused_grid[1] == 3 and plan.shrink_grid[1] == 2
    grads = _backward(inp, dy, t, p, dx_config=dx_cfg, u_config=u_cfg)
    _check(grads, _reference(inp, dy, p)[2:], torch.float16, ("dx", "dA", "dB", "dbias"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("need", [("a", "b", "bias"), ("a",), ("b",)])
def test_weight_grads_from_16_bit_halves(interpreter_device, dtype, p, split, need):
    """dA/dB with u and t split once per call into bf16 halves (the 16-bit default on GPUs once a
    program walks several row steps, forced here at 16-row steps): for bf16 one native dot per
    row step on x / dy as loaded; for fp16 (SPLIT_X) x / dy split exactly into bf16 hi + lo in
    registers -- two dots into two accumulators, or with dropout one dot over the hi / lo columns
    side by side. The halves keep ~16 bits of u and t, inside the 16-bit dtype's tolerance."""
    from lora_kernels.triton import lora_linear_backward as lb
    inp = make_lora_inputs(70, 45, 52, 7, dtype)
    dy = rand(70, 45, dtype=dtype)
    _, t = _forward(inp, p)
    cfg = lb.WeightGradConfig(block_m=16, block_c=16, block_r=16, split_m=split, num_warps=4, num_stages=2,
                              halves=True)
    rec = lb.weight_grad_decisions(70, 45, 52, 7, dtype, dtype, interpreter_device, lb._num_sms(interpreter_device),
                                   "a" in need, "b" in need, "bias" in need, p > 0, cfg, cached=False)
    assert rec.halves and rec.kw["SPLIT_X"] == (dtype == torch.float16)  # the path named above runs
    got = _backward(inp, dy, t, p, need, grad_config=cfg)
    ref = _reference(inp, dy, p)[2:]
    for key, name, g, r in zip(("x", "a", "b", "bias"), ("dx", "dA", "dB", "dbias"), got, ref):
        if key in need:
            assert_close(g, r, dtype, what=name)


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_fp16_split_x_keeps_16_bits(interpreter_device, p):
    """SPLIT_X loses nothing of fp16 x and dy (bf16 hi + lo holds them exactly) and ~16 bits of u
    and t (their bf16 halves): with fp32 adapters (fp32 gradients, no fp16 rounding of the
    output) dA and dB stay within 2^-14 of |u|^T |drop(x)| and |dy|^T |t|, float64 -- 32x inside
    what a lost lo half of x or dy (2^-9) would leave, which fp16's tolerance alone would not see."""
    from lora_kernels.triton import lora_linear_backward as lb
    M, N, K, r = 70, 45, 52, 7
    inp = make_lora_inputs(M, N, K, r, torch.float16, adapter_dtype=torch.float32)
    dy = rand(M, N, dtype=torch.float16)
    _, t = _forward(inp, p)
    cfg = lb.WeightGradConfig(block_m=16, block_c=16, block_r=16, split_m=1, num_warps=4, num_stages=2, halves=True)
    _, da, db, _ = _backward(inp, dy, t, p, ("a", "b"), grad_config=cfg)
    keep = reference.dropout_keep_mask(SEED, M, K, p).double() / (1 - p) if p else 1.0
    xd, dy64, t64 = inp.x.double() * keep, dy.double(), t.double()
    u64 = dy64 @ inp.lora_b.double()
    da_ref, db_ref = inp.scale * u64.t() @ xd, inp.scale * dy64.t() @ t64
    da_mag = inp.scale * (dy64.abs() @ inp.lora_b.double().abs()).t() @ xd.abs()
    db_mag = inp.scale * dy64.t().abs() @ t64.abs()
    assert da.dtype == db.dtype == torch.float32
    assert ((da.double() - da_ref).abs() <= 2 ** -14 * da_mag).all()
    assert ((db.double() - db_ref).abs() <= 2 ** -14 * db_mag).all()


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("split", [1, 3])
def test_fp32_weight_grads_take_tf32_halves_on_gpus(interpreter_device, monkeypatch, p, split):
    """fp32 x's GPU path for dA and dB (forced here by the GPU's precision choice, "tf32x3"): u
    and t split once per call into tf32 halves (split_adapter into fp32), x and dy into tf32 hi +
    lo in registers (_split_x), two tf32 dots per row step into two accumulators, or with dropout
    one over the hi / lo columns side by side. The interpreter's tf32 dots are fp32-exact, so this
    checks the algebra: every operand is exact in tf32, so dA and dB stay within 2^-19 of
    |u|^T |drop(x)| and |dy|^T |t| (float64), where a lost lo half of x, dy, u or t leaves ~2^-11."""
    from lora_kernels.triton import lora_linear as ll, lora_linear_backward as lb
    monkeypatch.setattr(lb, "lora_precision_for", lambda dt, dev: "tf32x3" if dt == torch.float32 else "tf32x2")
    ll.clear_launch_cache()  # the records hold the precision the launcher read
    try:
        M, N, K, r = 70, 45, 52, 7
        inp = make_lora_inputs(M, N, K, r, torch.float32)
        dy = rand(M, N)
        _, t = _forward(inp, p)
        cfg = lb.WeightGradConfig(block_m=16, block_c=16, block_r=16, split_m=split, num_warps=4, num_stages=2,
                                  halves=True)
        rec = lb.weight_grad_decisions(M, N, K, r, torch.float32, torch.float32, interpreter_device,
                                       lb._num_sms(interpreter_device), True, True, False, p > 0, cfg, cached=False)
        assert rec.halves and rec.halves_dtype == torch.float32 and rec.kw["SPLIT_X"]
        _, da, db, _ = _backward(inp, dy, t, p, ("a", "b"), grad_config=cfg)
    finally:
        ll.clear_launch_cache()
    keep = reference.dropout_keep_mask(SEED, M, K, p).double() / (1 - p) if p else 1.0
    xd, dy64, t64, b64 = inp.x.double() * keep, dy.double(), t.double(), inp.lora_b.double()
    da_ref, db_ref = inp.scale * (dy64 @ b64).t() @ xd, inp.scale * dy64.t() @ t64
    da_mag = inp.scale * (dy64.abs() @ b64.abs()).t() @ xd.abs()
    db_mag = inp.scale * dy64.t().abs() @ t64.abs()
    assert ((da.double() - da_ref).abs() <= 2 ** -19 * da_mag).all()
    assert ((db.double() - db_ref).abs() <= 2 ** -19 * db_mag).all()


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_dx_through_the_persistent_tma_variant(interpreter_device, p):
    """dx with W^T read through a [K, N] descriptor (W_KN) and the dropout epilogue."""
    from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig
    from lora_kernels.triton.lora_linear_tma import tma_layout
    inp = make_lora_inputs(40, 64, 48, 6, torch.float16)
    dy = rand(40, 64, dtype=torch.float16)
    y, t = _forward(inp, p)
    assert tma_layout(dy, inp.weight.t(), inp.x.new_empty(40, 48)) is True
    dx_cfg = ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, split_k=1, precompute_t=True, persistent_tma=True)
    grads = _backward(inp, dy, t, p, dx_config=dx_cfg, u_config=ShrinkConfig(16, 16, 16, 4, 2, 1))
    _check(grads, _reference(inp, dy, p)[2:], torch.float16, ("dx", "dA", "dB", "dbias"))
