"""merge_ / unmerge_: the Triton kernel (interpreter here) and the torch backend against float64;
strided and transposed weights; several adapters; safe merge; exact unmerge; the registered ops.

bf16 runs in the interpreter too: the kernel forms B·A with fp32 dots (the interpreter's bf16
``tl.dot`` bug is not reached) and rounds fp32 -> bf16 with integer ops (the interpreter's own
conversion truncates), so its bf16 results are the GPU's.
"""
import math
import os

import pytest
import torch
from hypothesis import example, given, strategies as st

import lora_kernels
from lora_kernels import MergeResidual
from cases import MERGE_LAYOUTS, make_merge_inputs
from tolerances import assert_close, assert_rounded_once, rand, rel_error

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INTERPRETER = os.environ.get("TRITON_INTERPRET", "0") == "1"
CPU_BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not INTERPRETER, reason="CPU-lane Triton tests need TRITON_INTERPRET=1"))]
# The interpreter's numpy matmul warns on inf/NaN operands, which these tests feed it on purpose.
quiet_nonfinite = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                             "ignore:overflow encountered:RuntimeWarning")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns (bitwise comparison: NaN payloads and the sign of zero count)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise_equal(out, expected, what):
    diff = _bits(out) != _bits(expected)
    assert not diff.any(), f"{what}: {int(diff.sum())} element(s) differ bitwise"


def _assert_equal_up_to_nan_payload(out, expected, what):
    """Bitwise equal, except that two NaNs match whatever their payload bits: a merge's NaN result
    goes through float conversions, which need not keep payloads (the exact unmerge restores W0's
    own NaNs bit for bit from the escape table)."""
    diff = (_bits(out) != _bits(expected)) & ~(torch.isnan(out) & torch.isnan(expected))
    assert not diff.any(), f"{what}: {int(diff.sum())} element(s) differ bitwise"


def _merge(inp, backend, **kw):
    return lora_kernels.merge_(inp.weight, inp.lora_a, inp.lora_b, inp.scale,
                               fan_in_fan_out=inp.fan_in_fan_out, backend=backend, **kw)


def _unmerge(inp, backend="auto", **kw):
    return lora_kernels.unmerge_(inp.weight, inp.lora_a, inp.lora_b, inp.scale,
                                 fan_in_fan_out=inp.fan_in_fan_out, backend=backend, **kw)


def _check_merged(inp, w0_64, dtype, peft_out, what="merged weight"):
    r = inp.lora_a.shape[0]
    ref = w0_64 + inp.delta64()
    out = inp.logical64()
    assert_close(out, ref, dtype, torch_out=peft_out, what=what)
    assert_rounded_once(out, ref, dtype, r, w0_64.abs() + inp.delta_bound64(), what=what)


# ---------------------------------------------------------------------------------------------
# Plain merge / unmerge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", MERGE_LAYOUTS)
def test_merge_rounds_once_and_touches_only_the_weight(backend, dtype, layout):
    inp = make_merge_inputs(37, 70, 5, dtype, layout=layout)
    storage0, w0_64, peft_out = inp.storage.clone(), inp.logical64(), inp.peft_expression()
    assert _merge(inp, backend) is inp.weight
    _check_merged(inp, w0_64, dtype, peft_out)
    outside = inp.outside()  # the rest of a fused qkv buffer is never written
    _assert_bitwise_equal(inp.storage[outside], storage0[outside], "storage outside the weight")
    _unmerge(inp, backend)
    assert_close(inp.logical64(), w0_64, dtype, what="unmerged weight")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("N,K,r", [(1, 1, 1), (3, 130, 1), (130, 3, 2), (17, 33, 16), (20, 24, 33),
                                   (9, 70, 64), (24, 16, 128), (8, 40, 256)])
def test_odd_sizes_and_ranks_1_to_256(backend, N, K, r):
    inp = make_merge_inputs(N, K, r, torch.float16)
    w0_64, peft_out = inp.logical64(), inp.peft_expression()
    _merge(inp, backend)
    _check_merged(inp, w0_64, torch.float16, peft_out)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapters_over_16bit_weight(backend, dtype):
    inp = make_merge_inputs(33, 45, 6, dtype, adapter_dtype=torch.float32)
    w0_64, peft_out = inp.logical64(), inp.peft_expression()
    _merge(inp, backend)
    _check_merged(inp, w0_64, dtype, peft_out)


@pytest.mark.parametrize("layout", ["contiguous", "fan_in_fan_out", "col_slice"])
@pytest.mark.parametrize("block_n,block_k,block_r", [(16, 16, 16), (32, 16, 16), (16, 64, 32)])
def test_every_tile_of_a_multi_tile_grid(interpreter_device, layout, block_n, block_k, block_r):
    """Small tiles: many programs, partial edge tiles in both directions, several rank chunks.
    Each element must be updated exactly once (a skipped or doubled one misses by |delta|)."""
    from lora_kernels.triton.merge import MergeConfig, apply_
    inp = make_merge_inputs(45, 61, 40, torch.float32, layout=layout)
    w0_64 = inp.logical64()
    apply_(inp.weight, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=inp.fan_in_fan_out,
           config=MergeConfig(block_n, block_k, block_r, num_warps=4))
    ref = w0_64 + inp.delta64()
    assert_rounded_once(inp.logical64(), ref, torch.float32, 40, w0_64.abs() + inp.delta_bound64())


def test_one_rounding_is_more_accurate_than_peft_expression(interpreter_device):
    """bf16: the kernel's result is the correctly rounded float64 sum almost everywhere; PEFT's
    ``W += (B @ A) * s`` rounds three times and is not."""
    inp = make_merge_inputs(64, 96, 16, torch.bfloat16, delta_ratio=1.0)
    ref = (inp.logical64() + inp.delta64()).to(torch.bfloat16)
    peft_out = inp.peft_expression()
    _merge(inp, "triton")
    ours_exact = (inp.weight == ref).double().mean().item()
    peft_exact = (peft_out == ref).double().mean().item()
    assert ours_exact >= 0.999 and peft_exact < 0.95, (ours_exact, peft_exact)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_several_adapters_in_one_pass_equal_sequential_merges(backend, dtype):
    N, K = 40, 52
    inp = make_merge_inputs(N, K, 3, dtype)
    adapters = [(inp.lora_a, inp.lora_b, inp.scale),
                (rand(7, K), rand(N, 7, scale=0.01), -0.7),            # fp32 adapter, another rank
                (rand(1, K, dtype=dtype), rand(N, 1, dtype=dtype, scale=0.02), 2.0)]
    a_list, b_list, s_list = (list(x) for x in zip(*adapters))
    w0 = inp.weight.clone()
    multi = lora_kernels.merge_(inp.weight, a_list, b_list, s_list, backend=backend)
    sequential = w0.clone()
    for a, b, s in adapters:
        lora_kernels.merge_(sequential, a, b, s, backend=backend)
    ref = w0.double() + sum(s * b.double() @ a.double() for a, b, s in adapters)
    assert_close(multi, ref, dtype, what="one-pass merge of 3 adapters")
    assert_close(multi, sequential.double(), dtype, what="one pass vs 3 sequential merges")
    assert rel_error(multi, ref) <= max(2.0 * rel_error(sequential, ref), 1e-7)
    lora_kernels.unmerge_(multi, a_list, b_list, s_list, backend=backend)
    assert_close(multi, w0.double(), dtype, what="unmerged")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_weight_is_a_no_op(backend):
    w = torch.empty(0, 8)
    lora_kernels.merge_(w, torch.randn(2, 8), torch.randn(0, 2), 1.0, backend=backend)
    assert w.shape == (0, 8)


# ---------------------------------------------------------------------------------------------
# Safe merge
# ---------------------------------------------------------------------------------------------

def _poisoned(dtype, poison):
    inp = make_merge_inputs(20, 36, 4, dtype, adapter_dtype=torch.float32)
    if poison == "inf adapter":
        inp.lora_b[3, 1] = math.inf
    elif poison == "nan adapter":
        inp.lora_a[2, 7] = math.nan
    else:  # finite adapters whose product overflows the weight's dtype (or fp32's range)
        inp.lora_b[5] = 1e5 if dtype == torch.float16 else 1e38
        inp.lora_a[:, 4] = 10.0
    return inp


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["inf adapter", "nan adapter", "overflow"])
@pytest.mark.parametrize("exact", [False, True])
@quiet_nonfinite
def test_safe_merge_rejects_nonfinite_and_leaves_weight_untouched(backend, dtype, poison, exact):
    inp = _poisoned(dtype, poison)
    before = inp.weight.clone()
    residual = MergeResidual() if exact else None
    with pytest.raises(ValueError, match=r"merge_: the merged weight would have \d+ non-finite"):
        _merge(inp, backend, safe_merge=True, residual=residual)
    _assert_bitwise_equal(inp.weight, before, "weight after a rejected safe merge")
    assert residual is None or not residual.holds_merge
    _merge(inp, backend)  # without safe_merge the same adapter does write non-finite values
    assert not torch.isfinite(inp.weight).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_safe_merge_of_a_good_adapter_equals_the_plain_merge(backend, dtype):
    inp = make_merge_inputs(30, 41, 5, dtype, layout="col_slice")
    plain = inp.weight.clone()
    lora_kernels.merge_(plain, inp.lora_a, inp.lora_b, inp.scale, backend=backend)
    _merge(inp, backend, safe_merge=True)
    _assert_bitwise_equal(inp.weight, plain, "safe merge vs plain merge")


def test_safe_merge_rejects_a_weight_that_is_already_nonfinite():
    inp = make_merge_inputs(6, 8, 2)
    inp.weight[1, 1] = math.nan
    before = inp.weight.clone()
    with pytest.raises(ValueError, match="1 non-finite"):
        _merge(inp, "torch", safe_merge=True)
    _assert_bitwise_equal(inp.weight, before, "weight")


# ---------------------------------------------------------------------------------------------
# Exact unmerge
# ---------------------------------------------------------------------------------------------

def _cycles(inp, backend, n, residual=None):
    for _ in range(n):
        _merge(inp, backend, residual=residual)
        _unmerge(inp, backend if residual is None else "auto", residual=residual)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_unmerge_zero_drift_after_1000_cycles(backend, dtype):
    """1000 cycles on the torch backend and for bf16 in the interpreter; the interpreter costs
    ~25 ms a launch, so fp16/fp32 run 100 there (the GPU lane runs 1000 of every dtype)."""
    cycles = 1000 if backend == "torch" or dtype == torch.bfloat16 else 100
    inp = make_merge_inputs(12, 20, 4, dtype, delta_ratio=2.0)  # one tile: the interpreter's cost is per call
    w0, storage0 = inp.weight.clone(), inp.storage.clone()
    plain = make_merge_inputs(12, 20, 4, dtype, delta_ratio=2.0)
    plain.weight.copy_(w0), plain.lora_a.copy_(inp.lora_a), plain.lora_b.copy_(inp.lora_b)
    residual = MergeResidual()
    _cycles(inp, backend, cycles, residual)
    _assert_bitwise_equal(inp.weight, w0, f"weight after {cycles} exact merge/unmerge cycles")
    _assert_bitwise_equal(inp.storage, storage0, "storage")
    assert residual.codes.dtype == torch.int8 and residual.codes.shape == w0.shape
    if dtype != torch.float32:  # the yardstick: plain cycles drift (fp32 may be lucky on 12x20)
        _cycles(plain, backend, 50)
        assert not torch.equal(plain.weight, w0), "plain merge/unmerge cycles did not drift: weak test data"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", MERGE_LAYOUTS)
def test_exact_merge_writes_the_plain_merge_and_unmerge_restores_bits(backend, dtype, layout):
    inp = make_merge_inputs(29, 43, 6, dtype, layout=layout, delta_ratio=5.0)
    w0, storage0 = inp.weight.clone(), inp.storage.clone()
    plain = w0.clone()
    lora_kernels.merge_(plain, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=inp.fan_in_fan_out,
                        backend=backend)
    residual = MergeResidual()
    _merge(inp, backend, residual=residual)
    _assert_bitwise_equal(inp.weight, plain, "exact merge vs plain merge")
    assert residual.holds_merge and residual.num_escapes > 0  # delta_ratio 5 makes some escape
    _unmerge(inp, residual=residual)
    _assert_bitwise_equal(inp.storage, storage0, "storage after exact unmerge")
    assert not residual.holds_merge


def _special_weight(draw_values, n, dtype, gen):
    """n weights of every kind: normal over 12 decades, +-0, subnormal, huge, inf, NaN."""
    w = torch.randn(n, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-9, 3, (n,), generator=gen)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -3e-39, 6e4, -1e30, 1e-7],
                            dtype=torch.float64)
    picks = torch.tensor(draw_values, dtype=torch.long) % n
    w[picks] = specials[torch.arange(len(picks)) % len(specials)]
    return w.to(dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2 ** 31 - 1), delta_exp=st.integers(-12, 6),
       positions=st.lists(st.integers(0, 10 ** 6), min_size=0, max_size=12),
       fan_in_fan_out=st.booleans())
@quiet_nonfinite
@example(seed=0, delta_exp=0, positions=[0, 0, 0, 0, 72], fan_in_fan_out=True)  # a NaN payload case
def test_exact_unmerge_restores_any_weight_bit_for_bit(backend, dtype, seed, delta_exp, positions,
                                                       fan_in_fan_out):
    """Zeros, subnormals, infinities, NaNs, tiny weights under a large delta, overflowing sums:
    the merge is the plain merge and the unmerge restores every bit."""
    gen = torch.Generator().manual_seed(seed)
    N, K, r = 7, 11, 3
    w = _special_weight(positions, N * K, dtype, gen).reshape(K, N) if fan_in_fan_out else \
        _special_weight(positions, N * K, dtype, gen).reshape(N, K)
    a = torch.randn(r, K, generator=gen).to(dtype)
    b = (torch.randn(N, r, generator=gen) * 10.0 ** delta_exp).to(dtype)
    w0, plain = w.clone(), w.clone()
    lora_kernels.merge_(plain, a, b, 0.75, fan_in_fan_out=fan_in_fan_out, backend=backend)
    residual = MergeResidual(escape_capacity=4)  # small: exercises the grow-and-retry path too
    lora_kernels.merge_(w, a, b, 0.75, fan_in_fan_out=fan_in_fan_out, residual=residual, backend=backend)
    _assert_equal_up_to_nan_payload(w, plain, "exact merge vs plain merge")
    lora_kernels.unmerge_(w, a, b, 0.75, fan_in_fan_out=fan_in_fan_out, residual=residual)
    _assert_bitwise_equal(w, w0, "exact unmerge")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_unmerge_of_a_pruned_weight(backend, dtype):
    """Half the weights are +0 or -0 (pruning): their own codes, never the escape table."""
    inp = make_merge_inputs(20, 30, 4, dtype)
    pruned = torch.rand(inp.weight.shape) < 0.5
    inp.weight[pruned] = torch.where(torch.rand(inp.weight.shape) < 0.5, 0.0, -0.0)[pruned].to(dtype)
    w0, residual = inp.weight.clone(), MergeResidual(escape_capacity=2)
    _merge(inp, backend, residual=residual)
    assert residual.num_escapes < pruned.sum() // 10
    _unmerge(inp, residual=residual)
    _assert_bitwise_equal(inp.weight, w0, "pruned weight after an exact cycle")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_code_fits_whenever_the_merge_grows_a_weight_at_most_64_times(backend, dtype):
    """The documented bound: |W0 + delta| <= 64 |W0| never needs the escape table."""
    N, K = 96, 32
    w = (rand(N, K) * 10.0 ** torch.randint(-3, 2, (N, K))).to(dtype)
    target = w.double() * (torch.rand(N, K, dtype=torch.float64) * 126 - 63)  # W1 / W0 in [-63, 63]
    delta = (target - w.double()).float()
    residual = MergeResidual()
    lora_kernels.merge_(w, torch.eye(K), delta, 1.0, residual=residual, backend=backend)  # delta = delta @ I
    assert residual.num_escapes == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_escape_table_grows_when_full(backend):
    inp = make_merge_inputs(24, 40, 4, torch.bfloat16, delta_ratio=300.0)  # most elements escape
    w0 = inp.weight.clone()
    residual = MergeResidual(escape_capacity=3)
    _merge(inp, backend, residual=residual)
    assert residual.num_escapes > 3 and residual.escape_index.numel() >= residual.num_escapes
    assert residual.nbytes == w0.numel() + residual.escape_index.numel() * (8 + 2)
    _unmerge(inp, residual=residual)
    _assert_bitwise_equal(inp.weight, w0, "exact unmerge after the table grew")
    _cycles(inp, backend, 3, residual)  # the grown table is reused
    _assert_bitwise_equal(inp.weight, w0, "weight after 3 more cycles")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_exact_several_adapters(backend):
    w = rand(30, 22, dtype=torch.bfloat16, scale=0.05)
    a_list = [rand(2, 22, dtype=torch.bfloat16), rand(5, 22)]
    b_list = [rand(30, 2, dtype=torch.bfloat16, scale=0.1), rand(30, 5, scale=0.05)]
    s_list = [1.5, -0.25]
    w0, residual = w.clone(), MergeResidual()
    for _ in range(20):
        lora_kernels.merge_(w, a_list, b_list, s_list, residual=residual, backend=backend)
        lora_kernels.unmerge_(w, a_list, b_list, s_list, residual=residual)
    _assert_bitwise_equal(w, w0, "weight after 20 exact cycles of a 2-adapter merge")


def _misuse_cases():
    def modified_adapter(inp, res):
        inp.lora_b.mul_(2.0)
    def other_scale(inp, res):
        inp.scale = inp.scale * 2
    def other_weight(inp, res):
        inp.weight = inp.weight.clone()
    def modified_weight(inp, res):
        inp.weight.add_(1.0)
    def layout_flag(inp, res):
        inp.fan_in_fan_out = not inp.fan_in_fan_out
        inp.weight = inp.weight.t()
    return [
        ("adapter modified in place", modified_adapter, r"lora_b was modified in place"),
        ("other scale", other_scale, r"scale \[.*\] differs"),
        ("other weight tensor", other_weight, r"weight is not the tensor"),
        ("weight modified", modified_weight, r"weight was modified since merge_"),
        ("layout", layout_flag, r"weight is not the tensor"),
    ]


@pytest.mark.parametrize("change,match", [c[1:] for c in _misuse_cases()], ids=[c[0] for c in _misuse_cases()])
def test_exact_unmerge_refuses_when_the_merge_cannot_be_undone(change, match):
    inp = make_merge_inputs(8, 12, 2, torch.bfloat16)
    residual = MergeResidual()
    _merge(inp, "torch", residual=residual)
    change(inp, residual)
    before = inp.weight.clone()
    with pytest.raises(ValueError, match="unmerge_: " + match):
        _unmerge(inp, residual=residual)
    _assert_bitwise_equal(inp.weight, before, "weight after a refused exact unmerge")
    assert residual.holds_merge


def test_residual_life_cycle_errors(interpreter_device):
    inp = make_merge_inputs(8, 12, 2, torch.float16)
    residual = MergeResidual()
    with pytest.raises(ValueError, match="residual holds no merge"):
        _unmerge(inp, residual=residual)
    _merge(inp, "triton", residual=residual)
    with pytest.raises(ValueError, match="still holds a merge"):
        _merge(inp, "triton", residual=residual)
    with pytest.raises(ValueError, match="made by backend 'triton'"):
        _unmerge(inp, "torch", residual=residual)
    _unmerge(inp, residual=residual)
    with pytest.raises(ValueError, match="residual holds no merge"):
        _unmerge(inp, residual=residual)
    with pytest.raises(TypeError, match="supports float16, bfloat16 and float32"):
        lora_kernels.merge_(inp.weight.double(), inp.lora_a.double(), inp.lora_b.double(), 1.0,
                            residual=MergeResidual())
    with pytest.raises(TypeError, match="residual must be a lora_kernels.MergeResidual"):
        _merge(inp, "torch", residual=object())
    with pytest.raises(ValueError, match="escape_capacity"):
        MergeResidual(escape_capacity=-1)


# ---------------------------------------------------------------------------------------------
# FusedLoRALinear
# ---------------------------------------------------------------------------------------------

def _layer(dtype=torch.bfloat16, backend="auto"):
    layer = lora_kernels.FusedLoRALinear(24, 16, r=4, lora_alpha=8, dtype=dtype, backend=backend)
    with torch.no_grad():
        layer.lora_B.copy_(rand(16, 4, dtype=dtype, scale=0.5))
    return layer


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_layer_exact_unmerge(backend):
    layer = _layer(backend=backend)
    w0 = layer.weight.detach().clone()
    for _ in range(30):
        layer.merge(exact_unmerge=True)
        assert layer.merged
        layer.unmerge()
    _assert_bitwise_equal(layer.weight.detach(), w0, "layer weight after 30 exact cycles")
    layer.merge()  # the default is unchanged: no residual, a plain unmerge
    assert layer._merge_residual is None
    layer.unmerge()
    assert_close(layer.weight, w0.double(), torch.bfloat16)


def test_layer_exact_unmerge_after_the_adapter_changed():
    layer = _layer()
    layer.merge(exact_unmerge=True, safe_merge=True)
    with torch.no_grad():
        layer.lora_A.add_(0.1)
    with pytest.raises(RuntimeError, match=r"lora_a was modified in place.*unmerge\(exact=False\)"):
        layer.unmerge()
    assert layer.merged
    layer.unmerge(exact=False)
    assert not layer.merged and layer._merge_residual is None
    with pytest.raises(RuntimeError, match="exact=True needs merge"):
        layer.merge()
        layer.unmerge(exact=True)


def test_layer_safe_merge_rejects_broken_adapter():
    layer = _layer(torch.float16)
    with torch.no_grad():
        layer.lora_B[0, 0] = math.inf
    w0 = layer.weight.detach().clone()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged
    _assert_bitwise_equal(layer.weight.detach(), w0, "layer weight")


# ---------------------------------------------------------------------------------------------
# Registered ops
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck(backend):
    inp = make_merge_inputs(10, 14, 3, torch.float32)
    a, b = [inp.lora_a], [inp.lora_b]
    ops = torch.ops.lora_kernels
    status = torch.zeros(2, dtype=torch.int32)
    for op in (ops.merge_.default, ops.unmerge_.default):
        torch.library.opcheck(op, (inp.weight, a, b, [0.5], False, backend, None))
        torch.library.opcheck(op, (inp.weight, a, b, [0.5], False, backend, status))
    codes = torch.empty_like(inp.weight, dtype=torch.int8)
    index, value = torch.empty(16, dtype=torch.int64), torch.empty(16)
    torch.library.opcheck(ops.merge_exact_.default,
                          (inp.weight, a, b, [0.5], False, backend, codes, index, value, status, True))
    torch.library.opcheck(ops.unmerge_exact_.default,
                          (inp.weight, a, b, [0.5], False, backend, codes, index, value, 0))


# ---------------------------------------------------------------------------------------------
# GPU lane
# ---------------------------------------------------------------------------------------------

GPU_SHAPES = [(4096, 4096, 16), (4096, 4096, 64), (14336, 4096, 16), (1000, 1234, 7), (77, 65, 1),
              (512, 384, 256)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,r", GPU_SHAPES)
def test_gpu_merge_matches_float64(dtype, N, K, r):
    inp = make_merge_inputs(N, K, r, dtype, device="cuda")
    w0_64, peft_out = inp.logical64(), inp.peft_expression()
    _merge(inp, "triton")
    _check_merged(inp, w0_64, dtype, peft_out)
    assert lora_kernels.ops.merge.choose_backend("merge_", inp.weight) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", MERGE_LAYOUTS)
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_gpu_layouts_and_fp32_adapters(dtype, layout, adapter_dtype):
    inp = make_merge_inputs(768, 640, 16, dtype, device="cuda", layout=layout, adapter_dtype=adapter_dtype)
    storage0, w0_64, peft_out = inp.storage.clone(), inp.logical64(), inp.peft_expression()
    _merge(inp, "triton")
    _check_merged(inp, w0_64, dtype, peft_out)
    outside = inp.outside()
    _assert_bitwise_equal(inp.storage[outside], storage0[outside], "storage outside the weight")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_exact_unmerge_zero_drift_after_1000_cycles(dtype):
    inp = make_merge_inputs(1024, 768, 16, dtype, device="cuda", delta_ratio=0.5)
    w0 = inp.weight.clone()
    plain = inp.weight.clone()
    residual = MergeResidual()
    _cycles(inp, "triton", 1000, residual)
    _assert_bitwise_equal(inp.weight, w0, "weight after 1000 exact cycles on the GPU")
    exact_plain = w0.clone()
    lora_kernels.merge_(exact_plain, inp.lora_a, inp.lora_b, inp.scale)
    _merge(inp, "triton", residual=residual)
    _assert_bitwise_equal(inp.weight, exact_plain, "exact merge vs plain merge on the GPU")
    for _ in range(100):
        lora_kernels.merge_(plain, inp.lora_a, inp.lora_b, inp.scale)
        lora_kernels.unmerge_(plain, inp.lora_a, inp.lora_b, inp.scale)
    if dtype != torch.float32:
        assert not torch.equal(plain, w0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["inf adapter", "overflow"])
@quiet_nonfinite
def test_gpu_safe_merge(dtype, poison):
    inp = _poisoned(dtype, poison)
    inp.weight, inp.lora_a, inp.lora_b = (t.cuda() for t in (inp.weight, inp.lora_a, inp.lora_b))
    before = inp.weight.clone()
    with pytest.raises(ValueError, match="non-finite"):
        _merge(inp, "triton", safe_merge=True)
    _assert_bitwise_equal(inp.weight, before, "weight after a rejected safe merge on the GPU")


@pytest.mark.gpu
def test_gpu_exact_many_escapes_and_several_adapters():
    w = rand(2048, 1536, dtype=torch.bfloat16, device="cuda", scale=0.05)
    a_list = [rand(16, 1536, dtype=torch.bfloat16, device="cuda"), rand(8, 1536, device="cuda")]
    b_list = [rand(2048, 16, dtype=torch.bfloat16, device="cuda", scale=1.0), rand(2048, 8, device="cuda")]
    w0, residual = w.clone(), MergeResidual(escape_capacity=16)
    for _ in range(5):
        lora_kernels.merge_(w, a_list, b_list, [0.5, 2.0], residual=residual)
        lora_kernels.unmerge_(w, a_list, b_list, [0.5, 2.0], residual=residual)
    assert residual.num_escapes > 16
    _assert_bitwise_equal(w, w0, "weight after exact cycles with a grown escape table")
