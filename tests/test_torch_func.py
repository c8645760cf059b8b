"""lora_linear and FusedLoRALinear under torch.func (grad, vmap(grad) per-sample gradients, jvp,
jacrev, hessian) and forward-mode AD: true derivatives, never a silent zero tangent. The oracle is
the float64 plain-torch expression differentiated by torch itself."""
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap

import lora_kernels
import sys
lora_linear_op = sys.modules["lora_kernels.ops.lora_linear"]  # the module (ops.lora_linear is the function)
from cases import make_lora_inputs
from tolerances import assert_close


def _plain(x, weight, lora_a, lora_b, scale, bias):
    return x @ weight.T + bias + scale * (x @ lora_a.T) @ lora_b.T


def _inputs(dtype=torch.float64, lead=(4, 3)):
    return make_lora_inputs(None, 7, 6, 3, dtype, lead=lead)


BACKENDS = ["torch", "triton"]


def _backend(request, backend):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    return backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_matches_autograd_for_every_argument(backend, request):
    backend = _backend(request, backend)
    inp = _inputs(torch.float32)
    args = inp.args()

    def loss(x, w, a, b, bias, fn):
        return (fn(x, w, a, b, inp.scale, bias) ** 2).sum()

    ours = grad(lambda *t: loss(*t, lambda *u: lora_kernels.lora_linear(*u, backend=backend)),
                argnums=(0, 1, 2, 3, 4))(args[0], args[1], args[2], args[3], args[5])
    d = [t.double() for t in (args[0], args[1], args[2], args[3], args[5])]
    want = grad(lambda *t: loss(*t, _plain), argnums=(0, 1, 2, 3, 4))(*d)
    for g, w in zip(ours, want):
        assert g.dtype == torch.float32
        assert_close(g, w, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_sample_gradients_vmap_grad(backend, request):
    """Opacus-style: one gradient of the adapter per sample, equal to a loop of single-sample grads."""
    backend = _backend(request, backend)
    inp = _inputs(torch.float32, lead=(5, 2))
    target = torch.randn(5, 2, 7)

    def loss(a, b, x, y):
        out = lora_kernels.lora_linear(x, inp.weight, a, b, inp.scale, inp.bias, backend=backend)
        return ((out - y) ** 2).mean()

    ga, gb = vmap(grad(loss, argnums=(0, 1)), in_dims=(None, None, 0, 0))(inp.lora_a, inp.lora_b, inp.x, target)
    assert ga.shape == (5, 3, 6) and gb.shape == (5, 7, 3)
    for i in range(5):
        a = inp.lora_a.double().requires_grad_(True)
        b = inp.lora_b.double().requires_grad_(True)
        out = _plain(inp.x[i].double(), inp.weight.double(), a, b, inp.scale, inp.bias.double())
        wa, wb = torch.autograd.grad(((out - target[i].double()) ** 2).mean(), (a, b))
        assert_close(ga[i], wa, torch.float32)
        assert_close(gb[i], wb, torch.float32)


def test_per_sample_gradients_through_a_fused_model():
    """vmap(grad(functional_call(model))) over a model with an injected adapter."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    lora_kernels.inject(model, ["0", "2"], r=2, lora_alpha=4)
    for m in model.modules():
        if isinstance(m, lora_kernels.FusedLoRALinear):
            torch.nn.init.normal_(m.lora_B)
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    def loss(p, xi, yi):
        return ((functional_call(model, p, (xi[None],)) - yi[None]) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    l0, l2 = model[0], model[2]

    def plain_loss(p, xi, yi):  # the same model in plain float64 torch
        h = torch.tanh(_plain(xi[None], l0.weight, p["0.lora_A"], p["0.lora_B"], l0.scaling, l0.bias))
        out = _plain(h, l2.weight, p["2.lora_A"], p["2.lora_B"], l2.scaling, l2.bias)
        return ((out - yi[None]) ** 2).sum()

    for i in range(3):
        want = grad(plain_loss)(params, x[i], y[i])
        for k in params:
            assert_close(per_sample[k][i], want[k], torch.float64)


@pytest.mark.parametrize("backend", BACKENDS)
def test_jvp_is_the_true_tangent(backend, request):
    backend = _backend(request, backend)
    inp = _inputs(torch.float32)
    prim = (inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias)
    tang = tuple(torch.randn_like(t) for t in prim)
    _, ours = jvp(lambda x, w, a, b, c: lora_kernels.lora_linear(x, w, a, b, inp.scale, c, backend=backend),
                  prim, tang)
    _, want = jvp(lambda x, w, a, b, c: _plain(x, w, a, b, inp.scale, c),
                  tuple(t.double() for t in prim), tuple(t.double() for t in tang))
    assert ours.abs().sum() > 0
    assert_close(ours, want, torch.float32)
    # one tangent at a time (the others None inside the formula)
    for i in range(5):
        only = lambda v, i=i: lora_kernels.lora_linear(*[v if j == i else p for j, p in enumerate(prim[:4])],
                                                       inp.scale, v if i == 4 else inp.bias, backend=backend)
        _, got = jvp(only, (prim[i],), (tang[i],))
        d = [p.double() for p in prim]
        ref = lambda v, i=i: _plain(*[v if j == i else p for j, p in enumerate(d[:4])], inp.scale,
                                    v if i == 4 else d[4])
        _, exp = jvp(ref, (d[i],), (tang[i].double(),))
        assert_close(got, exp, torch.float32)


def test_forward_ad_dual_tensors():
    inp = _inputs(torch.float64)
    ta = torch.randn_like(inp.lora_a)
    with fwAD.dual_level():
        a = fwAD.make_dual(inp.lora_a, ta)
        tangent = fwAD.unpack_dual(lora_kernels.lora_linear(inp.x, inp.weight, a, inp.lora_b, inp.scale,
                                                            inp.bias)).tangent
    assert tangent is not None
    assert_close(tangent, inp.scale * (inp.x @ ta.T) @ inp.lora_b.T, torch.float64)


def test_jacrev_and_hessian():
    inp = make_lora_inputs(3, 4, 5, 2, torch.float64)

    def f(a):
        return lora_kernels.lora_linear(inp.x, inp.weight, a, inp.lora_b, inp.scale, inp.bias)

    def g(a):
        return _plain(inp.x, inp.weight, a, inp.lora_b, inp.scale, inp.bias)

    assert_close(jacrev(f)(inp.lora_a), jacrev(g)(inp.lora_a), torch.float64)
    h = lambda fn: hessian(lambda a: (fn(a) ** 3).sum())(inp.lora_a)  # noqa: E731
    assert_close(h(f), h(g), torch.float64)


def test_grad_with_dropout_matches_the_mask():
    """torch.func.grad in training with dropout: the gradient of the mask the op drew."""
    inp = make_lora_inputs(6, 5, 8, 2, torch.float64)
    torch.manual_seed(3)
    seed = lora_linear_op.draw_dropout_seed(inp.x.device)
    keep = lora_linear_op.dropout_mask(seed, inp.x.shape, 0.5, backend="torch")

    def f(a):
        return lora_kernels.lora_linear(inp.x, inp.weight, a, inp.lora_b, inp.scale, inp.bias,
                                        dropout_p=0.5, training=True).sum()

    torch.manual_seed(3)
    ours = grad(f)(inp.lora_a)
    a = inp.lora_a.clone().requires_grad_(True)
    _plain(inp.x * keep / 0.5, inp.weight, a, inp.lora_b, inp.scale, inp.bias).sum().backward()
    assert_close(ours, a.grad, torch.float64)


def test_vmap_forward_over_weights_too():
    """vmap over the adapters (an ensemble of adapters): batched adapters run the reference."""
    inp = make_lora_inputs(4, 5, 6, 2, torch.float64)
    a = torch.randn(3, 2, 6, dtype=torch.float64)
    out = vmap(lambda a: lora_kernels.lora_linear(inp.x, inp.weight, a, inp.lora_b, inp.scale, inp.bias))(a)
    for i in range(3):
        assert_close(out[i], _plain(inp.x, inp.weight, a[i], inp.lora_b, inp.scale, inp.bias), torch.float64)


def test_per_sample_gradients_through_a_peft_fused_model():
    """vmap(grad) over a PEFT model after lora_kernels.peft.fuse equals PEFT's own (unfused)."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights=False))
    params = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    x, y = torch.randn(3, 6, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    def loss(p, xi, yi):
        return ((functional_call(model, p, (xi[None],)) - yi[None]) ** 2).sum()

    want = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    lora_kernels.peft.fuse(model)
    got = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    assert len(params) == 4
    for k in params:
        assert_close(got[k], want[k], torch.float64)
