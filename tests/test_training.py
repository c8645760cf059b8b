"""Training with lora_linear (CPU lane): the fused backward, in-kernel dropout, the registered ops,
torch.compile, autocast, checkpointing and what autograd keeps for the backward."""
import pytest
import torch
import torch.nn as nn

import lora_kernels
from lora_kernels import FusedLoRALinear, reference
from lora_kernels.ops.lora_linear import draw_dropout_seed, dropout_mask
from cases import lora_linear_with_grads, make_lora_inputs, reference_with_grads
from tolerances import assert_close, rand

GRAD_NAMES = ("x", "lora_a", "lora_b", "bias")


def _triton(request):
    request.getfixturevalue("interpreter_device")


def _check_grads(grads, ref_grads, inp, dtype, names=GRAD_NAMES):
    for name in names:
        g = grads[name]
        assert g.dtype == getattr(inp, name).dtype, f"grad {name} dtype {g.dtype}"
        assert_close(g, ref_grads[name], dtype, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Dropout: Philox bits, the mask, reproducibility
# ---------------------------------------------------------------------------------------------

def test_philox_known_answers():
    """Random123's Philox4x32-10 known-answer vectors (kat_vectors)."""
    cases = [((0, 0, 0, 0), (0, 0), (0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8)),
             ((0xffffffff,) * 4, (0xffffffff,) * 2, (0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd)),
             ((0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344), (0xa4093822, 0x299f31d0),
              (0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1))]
    for ctr, key, expected in cases:
        out = reference.philox4x32(*(torch.tensor([c]) for c in ctr), *key)
        assert tuple(int(o) for o in out) == expected


@pytest.mark.parametrize("rows,cols,p", [(1, 1, 0.5), (5, 7, 0.3), (33, 130, 0.1), (17, 64, 0.9)])
def test_triton_mask_kernel_equals_reference_bits(interpreter_device, rows, cols, p):
    seed = draw_dropout_seed("cpu")
    triton_mask = dropout_mask(seed, (rows, cols), p, backend="triton")
    assert triton_mask.dtype == torch.bool
    assert torch.equal(triton_mask, reference.dropout_keep_mask(int(seed), rows, cols, p))


def test_mask_rate_and_seeds():
    seed_a, seed_b = torch.tensor([12345]), torch.tensor([2 ** 62 + 7])
    mask = dropout_mask(seed_a, (256, 300), 0.3, backend="torch")
    assert abs(mask.double().mean().item() - 0.7) < 0.01  # 76800 draws: 5 sigma is 0.008
    assert torch.equal(mask, dropout_mask(seed_a, (256, 300), 0.3, backend="torch"))
    assert (mask != dropout_mask(seed_b, (256, 300), 0.3, backend="torch")).double().mean() > 0.3
    # rows of a 3-D x are the rows of its [M, K] view
    assert torch.equal(dropout_mask(seed_a, (4, 64, 300), 0.3, backend="torch").reshape(256, 300), mask)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_manual_seed_reproduces_dropout_and_eval_has_none(backend, request):
    if backend == "triton":
        _triton(request)
    inp = make_lora_inputs(None, 20, 24, 4, lead=(2, 9))
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(lora_kernels.lora_linear(*inp.args(), dropout_p=0.4, training=True, backend=backend))
    assert torch.equal(runs[0], runs[1])
    assert not torch.allclose(runs[0], runs[2])
    y_eval = lora_kernels.lora_linear(*inp.args(), dropout_p=0.4, training=False, backend=backend)
    assert_close(y_eval, inp.reference64(), torch.float32)


def test_backends_draw_the_same_dropout_mask(interpreter_device):
    """Same torch seed -> same Philox key -> same mask in the torch and Triton backends."""
    inp = make_lora_inputs(None, 30, 40, 5, lead=(3, 7))
    dy = rand(3, 7, 30)
    y_t, g_t = lora_linear_with_grads(inp, dy, backend="torch", dropout_p=0.3, training=True, torch_seed=9)
    y_k, g_k = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.3, training=True, torch_seed=9)
    assert_close(y_k, y_t.double(), torch.float32)
    for name in GRAD_NAMES:
        assert_close(g_k[name], g_t[name].double(), torch.float32, what=f"grad {name}")


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.0, 0.35])
def test_gradcheck_registered_op_float64(dropout_p):
    """The registered op's autograd formula (torch backend), every input a leaf, fixed seed."""
    inp = make_lora_inputs(None, 6, 9, 3, torch.float64, lead=(2, 3))
    seed = torch.tensor([424242]) if dropout_p else None
    leaves = [t.detach().clone().requires_grad_(True)
              for t in (inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias)]

    def fn(x, w, a, b, bias):
        return torch.ops.lora_kernels.lora_linear_fwd(x, w, a, b, 0.6, bias, "torch", True, dropout_p, seed)[0]
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
@pytest.mark.parametrize("bias", [True, False])
def test_triton_gradients_match_float64(interpreter_device, dtype, dropout_p, bias):
    inp = make_lora_inputs(None, 37, 45, 7, dtype, lead=(3, 11), bias=bias)
    dy = rand(3, 11, 37, dtype=dtype)
    y, grads = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=dropout_p, training=True,
                                      torch_seed=11)
    mask = None
    if dropout_p:
        torch.manual_seed(11)  # the seed lora_linear drew, and the mask the kernels drew from it
        mask = dropout_mask(draw_dropout_seed("cpu"), inp.x.shape, dropout_p, backend="triton")
        assert 0.6 < mask.double().mean() < 0.9
    y_ref, ref = reference_with_grads(inp, dy, dropout_p=dropout_p, dropout_mask=mask)
    assert_close(y, y_ref, dtype)
    _check_grads(grads, ref, inp, dtype, GRAD_NAMES if bias else GRAD_NAMES[:3])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_trainable_weight_gets_dy_times_x_not_dropped_x(backend, request):
    if backend == "triton":
        _triton(request)
    inp = make_lora_inputs(21, 18, 26, 4)
    dy = rand(21, 18)
    _, grads = lora_linear_with_grads(inp, dy, backend=backend, dropout_p=0.5, training=True,
                                      torch_seed=3, train_weight=True)
    torch.manual_seed(3)
    mask = dropout_mask(draw_dropout_seed("cpu"), inp.x.shape, 0.5, backend="torch")
    _, ref = reference_with_grads(inp, dy, dropout_p=0.5, dropout_mask=mask)
    for name in ("weight",) + GRAD_NAMES:
        assert_close(grads[name], ref[name], torch.float32, what=f"grad {name}")


def test_fp32_adapters_over_fp16_base(interpreter_device):
    """PEFT's default: fp32 A/B over a 16-bit base. Each gradient comes back in its own dtype."""
    inp = make_lora_inputs(None, 40, 48, 8, torch.float16, adapter_dtype=torch.float32, lead=(2, 13))
    inp.bias = inp.bias.float()  # an fp32 bias is allowed too
    dy = rand(2, 13, 40, dtype=torch.float16)
    y, grads = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.2, training=True, torch_seed=1)
    torch.manual_seed(1)
    mask = dropout_mask(draw_dropout_seed("cpu"), inp.x.shape, 0.2, backend="triton")
    y_ref, ref = reference_with_grads(inp, dy, dropout_p=0.2, dropout_mask=mask)
    assert y.dtype == torch.float16
    assert_close(y, y_ref, torch.float16)
    _check_grads(grads, ref, inp, torch.float16)
    assert grads["lora_a"].dtype == grads["lora_b"].dtype == grads["bias"].dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("needs", [("x",), ("lora_a",), ("lora_b",), ("bias",), ("lora_a", "bias")])
def test_only_the_needed_gradients(backend, needs, request):
    """Every subset path of the backward (e.g. dA without dx runs the u = dy @ B shrink)."""
    if backend == "triton":
        _triton(request)
    inp = make_lora_inputs(None, 22, 30, 5, lead=(19,))
    tensors = {n: getattr(inp, n).detach().clone().requires_grad_(n in needs) for n in GRAD_NAMES}
    torch.manual_seed(4)
    y = lora_kernels.lora_linear(tensors["x"], inp.weight, tensors["lora_a"], tensors["lora_b"], inp.scale,
                                 tensors["bias"], dropout_p=0.3, training=True, backend=backend)
    dy = rand(19, 22)
    y.backward(dy)
    torch.manual_seed(4)
    mask = dropout_mask(draw_dropout_seed("cpu"), inp.x.shape, 0.3, backend="torch")
    _, ref = reference_with_grads(inp, dy, dropout_p=0.3, dropout_mask=mask)
    for name in GRAD_NAMES:
        if name in needs:
            assert_close(tensors[name].grad, ref[name], torch.float32, what=f"grad {name}")
        else:
            assert tensors[name].grad is None


def test_fast_path_and_registered_op_agree_bitwise(interpreter_device):
    """Eager calls skip the dispatcher; the registered op (what torch.compile calls) must give the
    same bits for the same inputs and seed."""
    inp = make_lora_inputs(None, 26, 34, 6, torch.float16, lead=(2, 9))
    dy = rand(2, 9, 26, dtype=torch.float16)
    for backend in ("torch", "triton"):
        y_fast, g_fast = lora_linear_with_grads(inp, dy, backend=backend, dropout_p=0.3, training=True,
                                                torch_seed=2)
        leaves = {n: getattr(inp, n).detach().clone().requires_grad_(True) for n in GRAD_NAMES}
        torch.manual_seed(2)
        y_op = torch.ops.lora_kernels.lora_linear_fwd(
            leaves["x"], inp.weight, leaves["lora_a"], leaves["lora_b"], inp.scale, leaves["bias"], backend,
            True, 0.3, draw_dropout_seed("cpu"))[0]
        y_op.backward(dy)
        assert torch.equal(y_fast, y_op)
        for name in GRAD_NAMES:
            assert torch.equal(g_fast[name], leaves[name].grad), f"{backend}: grad {name}"


def test_backward_is_deterministic(interpreter_device):
    inp = make_lora_inputs(70, 40, 36, 5, torch.float16)
    dy = rand(70, 40, dtype=torch.float16)
    a = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.1, training=True, torch_seed=8)[1]
    b = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.1, training=True, torch_seed=8)[1]
    for name in GRAD_NAMES:
        assert torch.equal(a[name], b[name])


# ---------------------------------------------------------------------------------------------
# What autograd keeps
# ---------------------------------------------------------------------------------------------

def _saved_by_forward(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, saved


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("path", ["eager", "registered op"])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32)])
def test_saved_for_backward_is_x_t_and_seed(backend, path, dtype, adapter_dtype, request):
    """x itself (not a copy, not an fp32 cast), t [M, r] fp32, the seed -- no mask, no M x K extra."""
    if backend == "triton":
        _triton(request)
    M, N, K, r = 24, 20, 32, 4
    layer = FusedLoRALinear(K, N, r, lora_dropout=0.3, dtype=dtype, adapter_dtype=adapter_dtype, backend=backend)
    x = rand(2, 12, K, dtype=dtype).requires_grad_(True)
    params = {id(p) for p in layer.parameters()}
    if path == "eager":
        y, saved = _saved_by_forward(lambda: layer(x))
    else:
        seed = draw_dropout_seed("cpu")
        y, saved = _saved_by_forward(lambda: torch.ops.lora_kernels.lora_linear_fwd(
            x, layer.weight, layer.lora_A, layer.lora_B, layer.scaling, layer.bias, backend, True, 0.3, seed)[0])
    extra = [t for t in saved if id(t) not in params and t is not x]
    assert any(t is x for t in saved), "x itself must be saved (not a copy)"
    assert sorted((tuple(t.shape), t.dtype) for t in extra) == [((1,), torch.int64), ((M, r), torch.float32)]
    assert sum(t.numel() * t.element_size() for t in extra) == M * r * 4 + 8
    y.sum().backward()
    assert x.grad is not None and layer.lora_A.grad is not None


def test_saved_under_autocast_is_the_casts_and_t():
    """Autocast casts x and W (as it does for F.linear); autograd keeps W's cast (the base layer
    keeps it too, transposed), x's cast (dA needs x: PEFT keeps the same cast for lora_A) and t --
    never an fp32 copy of x."""
    layer = FusedLoRALinear(32, 16, 4, backend="torch")
    x = rand(10, 32).requires_grad_(True)
    params = {id(p) for p in layer.parameters()}

    def kept(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, saved = _saved_by_forward(fn)
        return sorted((str(t.dtype), tuple(t.shape)) for t in saved if id(t) not in params and t is not x)
    assert kept(lambda: nn.functional.linear(x, layer.weight, layer.bias)) == [("torch.bfloat16", (32, 16))]
    assert kept(lambda: layer(x)) == [("torch.bfloat16", (10, 32)), ("torch.bfloat16", (16, 32)),
                                      ("torch.float32", (10, 4))]


# ---------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,dtype", [("torch", torch.bfloat16), ("triton", torch.float16)])
def test_autocast_casts_base_and_keeps_fp32_adapters(backend, dtype, request):
    if backend == "triton":
        _triton(request)
    layer = FusedLoRALinear(48, 40, 8, lora_dropout=0.2, backend=backend)  # everything fp32
    nn.init.normal_(layer.lora_B)
    x = rand(3, 7, 48).requires_grad_(True)
    torch.manual_seed(6)
    with torch.autocast("cpu", dtype=dtype):
        y = layer(x)
    assert y.dtype == dtype
    dy = rand(3, 7, 40, dtype=dtype)
    y.backward(dy)
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    # the documented rule: x and weight in the autocast dtype, fp32 adapters and bias stay fp32
    torch.manual_seed(6)
    mask = dropout_mask(draw_dropout_seed("cpu"), x.shape, 0.2, backend="torch")
    ref_inp = make_lora_inputs(None, 40, 48, 8, lead=(3, 7))
    ref_inp.x, ref_inp.weight = x.detach().to(dtype), layer.weight.detach().to(dtype)
    ref_inp.lora_a, ref_inp.lora_b, ref_inp.bias = layer.lora_A.detach(), layer.lora_B.detach(), layer.bias.detach()
    ref_inp.scale = layer.scaling
    y_ref, ref = reference_with_grads(ref_inp, dy, dropout_p=0.2, dropout_mask=mask)
    assert_close(y, y_ref, dtype)
    assert_close(x.grad, ref["x"], dtype, what="grad x")
    assert_close(layer.lora_A.grad, ref["lora_a"], dtype, what="grad lora_A")
    assert_close(layer.lora_B.grad, ref["lora_b"], dtype, what="grad lora_B")


def test_autocast_does_not_touch_float64():
    inp = make_lora_inputs(5, 6, 7, 2, torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_kernels.lora_linear(*inp.args())
    assert y.dtype == torch.float64
    assert_close(y, inp.reference64(), torch.float64)


# ---------------------------------------------------------------------------------------------
# Activation checkpointing
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_checkpointing_recomputes_the_same_dropout(backend, request):
    if backend == "triton":
        _triton(request)
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layers = nn.Sequential(FusedLoRALinear(24, 32, 4, lora_dropout=0.3, backend=backend),
                           nn.GELU(), FusedLoRALinear(32, 16, 4, lora_dropout=0.3, backend=backend))
    for m in layers:
        if isinstance(m, FusedLoRALinear):
            nn.init.normal_(m.lora_B)
    x = rand(9, 24)

    def grads(use_checkpoint):
        for p in layers.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(21)
        y = checkpoint(layers, xi, use_reentrant=False) if use_checkpoint else layers(xi)
        y.square().sum().backward()
        return [xi.grad] + [p.grad for p in layers.parameters() if p.requires_grad]

    plain, ckpt = grads(False), grads(True)
    assert len(plain) == 5
    for a, b in zip(plain, ckpt):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# Registered ops: opcheck, torch.compile
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck_every_op(backend, request):
    if backend == "triton":
        _triton(request)
    inp = make_lora_inputs(None, 10, 12, 3, lead=(2, 3))
    seed = torch.tensor([77])
    x, a, b, bias = (t.detach().clone().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b, inp.bias))
    for p, s in ((0.0, None), (0.4, seed)):
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default,
                              (x, inp.weight, a, b, inp.scale, bias, backend, True, p, s))
    M = 6
    dy, t = rand(2, 3, 10), rand(M, 3)
    for need_x, need_a, need_b, bias_dtype in ((True, True, True, torch.float32), (False, True, False, None),
                                                (True, False, False, None), (False, False, True, torch.float32)):
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear_bwd.default,
                              (dy, inp.x, inp.weight, inp.lora_a, inp.lora_b, t, inp.scale, 0.4, seed,
                               bias_dtype, backend, need_x, need_a, need_b))
    torch.library.opcheck(torch.ops.lora_kernels.dropout_keep_mask.default, (seed, 5, 9, 0.3, backend))


class _TwoLayer(nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.up = FusedLoRALinear(16, 24, 4, lora_dropout=0.25, backend=backend)
        self.down = FusedLoRALinear(24, 12, 4, lora_dropout=0.25, backend=backend)
        for m in (self.up, self.down):
            nn.init.normal_(m.lora_B)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _fwd_bwd(model, x, seed):
    for p in model.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    y.square().sum().backward()
    return [y, x.grad] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("training", [True, False])
def test_compile_fullgraph_model_equals_eager(backend, training, request):
    """A small model of FusedLoRALinear layers compiles with zero graph breaks (fullgraph=True
    would raise on one; explain() counts them) and gives eager's values and gradients."""
    if backend == "triton":
        _triton(request)
    torch._dynamo.reset()
    model = _TwoLayer(backend).train(training)
    x = rand(2, 5, 16)
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = _fwd_bwd(model, x, seed=13)
    compiled = _fwd_bwd(torch.compile(model, fullgraph=True, backend="aot_eager"), x, seed=13)
    assert len(eager) == 6  # y, dx and the four adapter gradients
    for a, b in zip(eager, compiled):
        assert_close(b, a.double(), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compile_dynamic_shapes(backend, request):
    """dynamic=True makes token counts and the layer's float hyper-parameters symbolic: still one
    graph, and eager's values for every token count."""
    if backend == "triton":
        _triton(request)
    torch._dynamo.reset()
    model = _TwoLayer(backend).train()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager", dynamic=True)
    for tokens in (3, 7, 12):
        x = rand(2, tokens, 16)
        for a, b in zip(_fwd_bwd(model, x, seed=tokens), _fwd_bwd(compiled, x, seed=tokens)):
            assert_close(b, a.double(), torch.float32)


def test_compile_under_autocast_equals_eager():
    """The wrapper's autocast casts trace into the graph: compiled under autocast == eager."""
    torch._dynamo.reset()
    model = _TwoLayer("torch").eval()
    x = rand(4, 16)

    def step(fn):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _fwd_bwd(fn, x, seed=0)
    eager, compiled = step(model), step(torch.compile(model, fullgraph=True, backend="aot_eager"))
    assert eager[0].dtype == compiled[0].dtype == torch.bfloat16
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_compile_inductor_equals_eager():
    """One small inductor compile of a layer, forward and backward (no dropout: inductor draws its
    own random numbers, so only the dropout-free graph is comparable with eager). One layer and
    no pointwise glue keep inductor from compiling C++ kernels: seconds on the CPU lane."""
    torch._dynamo.reset()
    layer = FusedLoRALinear(16, 12, 4, backend="torch")
    nn.init.normal_(layer.lora_B)
    x = rand(3, 16)

    def run(module):
        for p in layer.parameters():
            p.grad = None
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        y.backward(torch.ones_like(y))
        return y, xi.grad, layer.lora_A.grad, layer.lora_B.grad
    for a, b in zip(run(layer), run(torch.compile(layer, fullgraph=True))):
        assert_close(b, a.double(), torch.float32)


def test_cuda_backend_has_no_dropout_and_trains_through_triton(interpreter_device):
    """The CUDA C++ kernel is a forward without dropout: asking it for dropout says so, and its
    backward runs on Triton where Triton can run (else on the torch reference)."""
    from lora_kernels.ops.lora_linear import _input_reason, backward_backend
    inp = make_lora_inputs(4, 8, 8, 2, torch.float16)
    assert "no dropout" in _input_reason(inp.x, inp.lora_a, dropout=True)("cuda")
    assert backward_backend("cuda", inp.x, inp.lora_a) == "triton"
    assert backward_backend("cuda", inp.x.double(), inp.lora_a.double()) == "torch"
    assert backward_backend("torch", inp.x, inp.lora_a) == "torch"
    with pytest.raises(lora_kernels.BackendUnavailable, match="no dropout"):
        torch.ops.lora_kernels.lora_linear_fwd(*inp.args(), "cuda", False, 0.5, torch.tensor([1]))
