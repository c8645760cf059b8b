"""The public op lora_linear: backends, autograd, registration, dropout, torch.compile."""
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
