"""The public op lora_linear: backends, autograd, registration, dropout, torch.compile."""
import os

import pytest
import torch

import lora_kernels
from lora_kernels import BackendUnavailable, reference
from lora_kernels.ops.lora_linear import choose_backend, draw_dropout_seed, dropout_mask
from cases import make_lora_inputs
from tolerances import assert_close

ALL_DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("lead", [(7,), (2, 5), (2, 3, 4)])
def test_torch_backend_nd_inputs(dtype, lead):
    inp = make_lora_inputs(None, 24, 20, 4, dtype, lead=lead)
    y = lora_kernels.lora_linear(*inp.args(), backend="torch")
    assert y.shape == (*lead, 24) and y.dtype == dtype
    assert_close(y, inp.reference64(), dtype, torch_out=inp.torch_expression())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_layout", ["contiguous", "strided", "transposed"])
def test_triton_backend_3d_and_strided(interpreter_device, dtype, x_layout):
    inp = make_lora_inputs(None, 40, 24, 5, dtype, lead=(3, 7), x_layout=x_layout)
    y = lora_kernels.lora_linear(*inp.args(), backend="triton")
    assert y.shape == (3, 7, 40)
    assert_close(y, inp.reference64(), dtype, torch_out=inp.torch_expression())


def test_auto_picks_torch_on_cpu():
    inp = make_lora_inputs(4, 8, 8, 2)
    assert choose_backend(inp.x, inp.lora_a, "auto") == "torch"


def test_env_var_overrides_auto(monkeypatch, interpreter_device):
    inp = make_lora_inputs(4, 8, 8, 2)
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    assert choose_backend(inp.x, inp.lora_a, "auto") == "triton"
    assert choose_backend(inp.x, inp.lora_a, "torch") == "torch"  # an explicit choice wins
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        choose_backend(inp.x, inp.lora_a, "auto")


def test_unavailable_backends_say_why(monkeypatch):
    inp = make_lora_inputs(4, 8, 8, 2)
    with pytest.raises(BackendUnavailable, match="cuda: the CUDA C\\+\\+ kernels need CUDA tensors"):
        lora_kernels.lora_linear(*inp.args(), backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        lora_kernels.lora_linear(*inp.args(), backend="triton")
    inp64 = make_lora_inputs(4, 8, 8, 2, torch.float64)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(BackendUnavailable, match="float64 is not supported"):
        lora_kernels.lora_linear(*inp64.args(), backend="triton")
    big = make_lora_inputs(2, 8, 8, 129)
    with pytest.raises(BackendUnavailable, match="rank 129 exceeds"):
        lora_kernels.lora_linear(*big.args(), backend="triton")
    text = lora_kernels.explain("lora_linear", torch.device("cpu"))
    assert "auto -> torch" in text and "cuda:" in text


def _grads(inp, backend, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b, inp.bias)]
    x, a, b, bias = leaves
    y = lora_kernels.lora_linear(x, inp.weight, a, b, inp.scale, bias, backend=backend)
    y.backward(dy)
    return y, [t.grad for t in leaves]


def test_gradcheck_torch_backend_float64():
    inp = make_lora_inputs(None, 6, 5, 3, torch.float64, lead=(2, 3))
    x, w, a, b, bias = (t.detach().clone().requires_grad_(True)
                        for t in (inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias))
    fn = lambda x, w, a, b, bias: lora_kernels.lora_linear(x, w, a, b, 0.6, bias, backend="torch")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, a, b, bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gradients_match_float64(interpreter_device, dtype):
    inp = make_lora_inputs(None, 30, 26, 6, dtype, lead=(3, 5))
    dy = torch.randn(3, 5, 30, dtype=torch.float64).to(dtype)
    _, grads = _grads(inp, "triton", dy)
    ref_inp = make_lora_inputs(None, 30, 26, 6, torch.float64, lead=(3, 5))
    for name in ("x", "weight", "lora_a", "lora_b", "bias"):
        setattr(ref_inp, name, getattr(inp, name).double())
    _, ref_grads = _grads(ref_inp, "torch", dy.double())
    for name, g, g_ref in zip(("x", "lora_a", "lora_b", "bias"), grads, ref_grads):
        assert g.dtype == dtype
        assert_close(g, g_ref, dtype, what=f"grad {name}")


def test_weight_gradient_when_weight_requires_grad():
    inp = make_lora_inputs(9, 7, 5, 2, torch.float64)
    w = inp.weight.clone().requires_grad_(True)
    y = lora_kernels.lora_linear(inp.x, w, inp.lora_a, inp.lora_b, inp.scale, inp.bias)
    y.sum().backward()
    assert_close(w.grad, torch.ones(9, 7, dtype=torch.float64).t() @ inp.x, torch.float64)


def test_frozen_weight_gets_no_gradient_and_t_only_when_needed():
    inp = make_lora_inputs(9, 7, 5, 2, torch.float32)
    a = inp.lora_a.clone().requires_grad_(True)
    y = lora_kernels.lora_linear(inp.x, inp.weight, a, inp.lora_b, inp.scale, inp.bias)
    y.sum().backward()
    assert inp.weight.grad is None and a.grad is not None


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, interpreter_device):
    inp = make_lora_inputs(6, 10, 12, 3, torch.float32)
    for save_t in (False, True):
        args = (inp.x, inp.weight, inp.lora_a.requires_grad_(save_t), inp.lora_b.requires_grad_(save_t),
                inp.scale, inp.bias, backend, save_t)
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, args)


def test_dropout_only_on_lora_branch_and_only_in_training():
    inp = make_lora_inputs(64, 12, 40, 4, torch.float64)
    y_eval = lora_kernels.lora_linear(*inp.args(), dropout_p=0.5, training=False)
    assert_close(y_eval, inp.reference64(), torch.float64)
    torch.manual_seed(3)
    y_train = lora_kernels.lora_linear(*inp.args(), dropout_p=0.5, training=True)
    torch.manual_seed(3)  # the op draws its Philox seed from torch's generator: same seed, same mask
    mask = dropout_mask(draw_dropout_seed(inp.x.device), inp.x.shape, 0.5, backend="torch")
    assert 0.3 < mask.double().mean() < 0.7
    expected = reference.lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.scale, inp.bias,
                                     dropout_p=0.5, dropout_mask=mask)
    assert_close(y_train, expected, torch.float64)
    assert not torch.allclose(y_train, y_eval)


def test_torch_compile_fullgraph_no_graph_break():
    layer = lora_kernels.FusedLoRALinear(16, 12, r=4, dtype=torch.float32)
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 5, 16, requires_grad=True)
    eager = layer(x)
    eager.sum().backward()
    gx, ga = x.grad.clone(), layer.lora_A.grad.clone()
    x.grad = None
    layer.lora_A.grad = None
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    assert_close(out, eager.double(), torch.float32)
    assert_close(x.grad, gx.double(), torch.float32, what="grad x")
    assert_close(layer.lora_A.grad, ga.double(), torch.float32, what="grad lora_A")


@pytest.mark.parametrize("path", ["eager", "registered op"])
def test_float64_gradients_are_float64_exact(path):
    """float64 inputs keep t in float64 (torch backend): every gradient matches plain float64
    autograd to rounding level -- an fp32 t gave dB a relative error of 2e-8."""
    inp = make_lora_inputs(None, 20, 24, 5, torch.float64, lead=(3, 11))
    dy = torch.randn(3, 11, 20, dtype=torch.float64)
    leaves = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b)]
    x, a, b = leaves
    if path == "eager":
        y = lora_kernels.lora_linear(x, inp.weight, a, b, inp.scale, inp.bias, backend="torch")
    else:
        y = torch.ops.lora_kernels.lora_linear_fwd(x, inp.weight, a, b, inp.scale, inp.bias, "torch", True,
                                                   0.0, None)[0]
    y.backward(dy)
    exact = [t.detach().clone().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b)]
    xe, ae, be = exact
    (xe @ inp.weight.t() + inp.bias + inp.scale * (xe @ ae.t()) @ be.t()).backward(dy)
    for name, g, g_exact in zip(("x", "lora_a", "lora_b"), (l.grad for l in leaves), (e.grad for e in exact)):
        assert g.dtype == torch.float64
        assert_close(g, g_exact, torch.float64, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# The eager fast paths (host overhead, issue 16 point 6) decide exactly what the full paths do
# ---------------------------------------------------------------------------------------------

def _outcome(fn, *args):
    """fn's return value, or (exception type, message)."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- the outcome itself is compared
        return type(e), str(e)


def _validation_grid():
    """lora_linear inputs around the common call: every dtype combination, each shape and rank
    mismatch, meta and CPU tensors, 0-d/1-d/3-d x, bias forms, non-tensors and bad scales."""
    K, N, r = 6, 5, 3
    f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16

    def t(shape, dtype=f32, device="cpu"):
        return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)

    base = dict(x=t((2, K)), weight=t((N, K)), lora_a=t((r, K)), lora_b=t((N, r)), scale=0.5, bias=None)
    yield base
    dtypes = (f16, f32, f64, bf16, torch.int32)
    for dx in dtypes:
        for dw in (dx, f32, f16):
            for da in dtypes:
                for db in (da, f32, bf16):
                    yield dict(base, x=t((2, K), dx) if dx.is_floating_point else torch.ones(2, K, dtype=dx),
                               weight=t((N, K), dw),
                               lora_a=t((r, K), da) if da.is_floating_point else torch.ones(r, K, dtype=da),
                               lora_b=t((N, r), db))
    for bias in (t((N,)), t((N,), f16), t((N,), f64), t((N + 1,)), t((1, N)), t((N,), device="meta"), 3.0):
        yield dict(base, bias=bias)
        yield dict(base, x=t((2, K), f16), weight=t((N, K), f16), bias=bias)
    for x in (t(()), t((K,)), t((3, 2, K)), t((2, K + 1)), t((0, K)), t((2, 0)), "x", None):
        yield dict(base, x=x)
    for weight in (t((N, K + 1)), t((N,)), t((1, N, K)), t((0, K)), [[1.0]]):
        yield dict(base, weight=weight)
    for lora_a in (t((0, K)), t((r, K + 1)), t((r,)), t((1, r, K)), t((r + 1, K))):
        yield dict(base, lora_a=lora_a)
    for lora_b in (t((N, r + 1)), t((N + 1, r)), t((N, 0)), t((N,)), 1):
        yield dict(base, lora_b=lora_b)
    for name in ("x", "weight", "lora_a", "lora_b"):
        yield dict(base, **{name: base[name].to("meta")})
    yield {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in base.items()}
    for scale in (float("inf"), float("nan"), 1, True, torch.tensor(2.0), "2", 1e308 * 10, -0.0):
        yield dict(base, scale=scale)


def test_fast_validation_decides_as_the_full_checks():
    """_validate's one-pass check of the common call accepts only what _validate_all accepts, so
    every input -- good or bad -- gets the full checks' answer: the same scale or the same error."""
    import importlib
    ops = importlib.import_module("lora_kernels.ops.lora_linear")
    fast_accepted = 0
    for case in _validation_grid():
        args = (case["x"], case["weight"], case["lora_a"], case["lora_b"], case["scale"], case["bias"])
        full = _outcome(ops._validate_all, *args)
        outcome = _outcome(ops._validate, *args)
        if isinstance(full, float):  # accepted: the scale, and the facts the backend cache reads
            assert outcome == (full, ops._facts(case["x"], case["lora_a"])), case
        else:
            assert outcome == full, case
        scale = case["scale"]
        if type(scale) is float and scale - scale == 0.0 and ops._fast_valid(*args[:4], args[5]) is not None:
            fast_accepted += 1
            assert isinstance(full, float), (case, full)
    assert fast_accepted >= 20  # the grid reaches the fast path, not only the fallback


def test_getenv_reads_what_os_environ_reads(monkeypatch):
    """backends.getenv (the backend cache's key, read per call) is os.environ.get, never stale."""
    from unittest import mock
    from lora_kernels.backends import getenv
    name = "LORA_KERNELS_TEST_GETENV"
    monkeypatch.delenv(name, raising=False)
    assert getenv(name) is None and getenv("PATH") == os.environ.get("PATH")
    for value in ("triton", "", "é ü", "torch"):
        monkeypatch.setenv(name, value)
        assert getenv(name) == os.environ.get(name) == value
    os.environ[name] = "cuda"
    assert getenv(name) == "cuda"
    del os.environ[name]
    assert getenv(name) is None
    with mock.patch.dict(os.environ, {name: "auto"}):
        assert getenv(name) == "auto"
    assert getenv(name) is None
    monkeypatch.setattr(os, "environ", {name: "replaced"})  # not os._Environ: read with .get
    assert getenv(name) == "replaced"


def test_choice_state_follows_both_variables_and_the_interpreter_fix(monkeypatch):
    """backends.choice_state (the backend caches' key part read from the process) changes exactly
    when LORA_KERNELS_BACKEND, TRITON_INTERPRET or -- under TRITON_INTERPRET -- the interpreter's
    bfloat16 fix changes, also when os.environ is replaced by a plain mapping."""
    from lora_kernels import backends
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(backends, "interpreter_bf16_fixed", lambda: True)
    unset = backends.choice_state()
    assert unset == backends.choice_state() and unset[2] is False  # the fix is not read unset
    states = {unset}
    for var, value in ((backends.ENV_VAR, "triton"), (backends.ENV_VAR, "torch"), ("TRITON_INTERPRET", "1"),
                       ("TRITON_INTERPRET", "0")):
        monkeypatch.setenv(var, value)
        state = backends.choice_state()
        assert state not in states and state == backends.choice_state()
        states.add(state)
        monkeypatch.delenv(var)
        assert backends.choice_state() == unset
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    fixed = backends.choice_state()
    monkeypatch.setattr(backends, "interpreter_bf16_fixed", lambda: False)
    assert backends.choice_state() != fixed
    monkeypatch.setattr(os, "environ", {"TRITON_INTERPRET": "1", backends.ENV_VAR: "torch"})
    assert backends.choice_state() == ("torch", "1", False)


def test_backend_cache_follows_the_environment(monkeypatch, interpreter_device):
    """choose_backend's memoised answer is re-derived when LORA_KERNELS_BACKEND changes."""
    inp = make_lora_inputs(4, 8, 8, 2)
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    assert choose_backend(inp.x, inp.lora_a, "auto") == "torch"
    os.environ["LORA_KERNELS_BACKEND"] = "triton"
    try:
        assert choose_backend(inp.x, inp.lora_a, "auto") == "triton"
    finally:
        del os.environ["LORA_KERNELS_BACKEND"]
    assert choose_backend(inp.x, inp.lora_a, "auto") == "torch"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eager_paths_match_the_registered_op(dtype):
    """The eager no-grad path (no empty t, no dispatcher) gives the op's y bit for bit, and the op
    still returns its empty t in the accumulation dtype when t is not saved."""
    inp = make_lora_inputs(3, 12, 10, 4, dtype)
    with torch.no_grad():
        y = lora_kernels.lora_linear(*inp.args(), backend="torch")
    y_op, t = torch.ops.lora_kernels.lora_linear_fwd(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.scale,
                                                     inp.bias, "torch", False)
    assert torch.equal(y, y_op)
    assert t.shape == (0, 4) and t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    _, t_saved = torch.ops.lora_kernels.lora_linear_fwd(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.scale,
                                                        inp.bias, "torch", True)
    assert t_saved.shape == (3, 4) and t_saved.dtype == t.dtype
