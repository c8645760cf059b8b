"""Hardening (issue 11): bad input anywhere in the public API -- ops on every CPU-lane backend,
the CUDA launchers' Python-side checks, the layers, inject / save_adapter / load_adapter with
broken files -- raises an error that names the argument (or the file and field), and leaves every
input bit for bit as it was: tensors, module parameters and their requires_grad, adapters already
loaded, the adapter files themselves (tests/unchanged.py).

Each case list below is collected by ``test_at_least_200_distinct_bad_inputs``."""
import json
import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import FusedLoRALinear, MergeResidual  # noqa: E402
from cases import make_lora_inputs  # noqa: E402
from unchanged import assert_unchanged, snapshot  # noqa: E402

BIG = 10 ** 400  # an int no float can hold


def _raises(call, exc, arg, match=None, watched=()):
    """call() raises exc whose message names `arg` (and matches `match`); `watched` unchanged."""
    snaps = [snapshot(w) for w in watched]
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    if os.environ.get("SHOW_BAD_INPUT_ERRORS"):
        print(f"\n[{type(info.value).__name__}] {message}")
    assert arg in message, f"the error does not name {arg!r}: {message}"
    if match is not None:
        import re
        assert re.search(match, message), f"{match!r} not in {message!r}"
    for w, s in zip(watched, snaps):
        assert_unchanged(w, s)
    return message


# ---------------------------------------------------------------------------------------------
# lora_linear: arguments beyond tests/test_bad_input.py's shapes and dtypes
# ---------------------------------------------------------------------------------------------

def _ll_inputs():
    inp = make_lora_inputs(5, 12, 10, 3, torch.float32, lead=(5,))
    return dict(x=inp.x, weight=inp.weight, lora_a=inp.lora_a, lora_b=inp.lora_b, scale=inp.scale, bias=inp.bias)


LORA_LINEAR = [
    # (case id, changes to the arguments, exception, argument named)
    ("scale 10**400", dict(scale=BIG), ValueError, "scale"),
    ("scale -inf", dict(scale=-math.inf), ValueError, "scale"),
    ("scale None", dict(scale=None), TypeError, "scale"),
    ("scale bool", dict(scale=True), TypeError, "scale"),
    ("scale complex", dict(scale=1j), TypeError, "scale"),
    ("scale meta 0-d tensor", dict(scale=lambda a: torch.tensor(1.0, device="meta")), TypeError, "scale"),
    ("scale nan 0-d tensor", dict(scale=lambda a: torch.tensor(math.nan)), ValueError, "scale"),
    ("scale bool tensor", dict(scale=lambda a: torch.tensor(True)), TypeError, "scale"),
    ("scale complex tensor", dict(scale=lambda a: torch.tensor(1 + 1j)), TypeError, "scale"),
    ("scale list", dict(scale=[1.0]), TypeError, "scale"),
    ("dropout_p 10**400", dict(dropout_p=BIG, training=True), ValueError, "dropout_p"),
    ("dropout_p nan", dict(dropout_p=math.nan, training=True), ValueError, "dropout_p"),
    ("dropout_p str", dict(dropout_p="0.1", training=True), TypeError, "dropout_p"),
    ("dropout_p bool", dict(dropout_p=True, training=True), TypeError, "dropout_p"),
    ("dropout_p inf", dict(dropout_p=math.inf), ValueError, "dropout_p"),
    ("backend list", dict(backend=["torch"]), ValueError, "backend"),
    ("backend None", dict(backend=None), ValueError, "backend"),
    ("backend int", dict(backend=1), ValueError, "backend"),
    ("backend 'gpu'", dict(backend="gpu"), ValueError, "backend"),
    ("backend upper case", dict(backend="TORCH"), ValueError, "backend"),
    ("bias int", dict(bias=lambda a: torch.ones(12, dtype=torch.int32)), TypeError, "bias"),
    ("bias 0-D", dict(bias=lambda a: torch.tensor(1.0)), ValueError, "bias"),
    ("bias list", dict(bias=[0.0] * 12), TypeError, "bias"),
    ("bias float64 over float32", dict(bias=lambda a: a["bias"].double()), TypeError, "bias"),
    ("lora_a 1-D", dict(lora_a=lambda a: a["lora_a"][0]), ValueError, "lora_a"),
    ("lora_b 3-D", dict(lora_b=lambda a: a["lora_b"][None]), ValueError, "lora_b"),
    ("lora_b not a tensor", dict(lora_b="B"), TypeError, "lora_b"),
    ("weight not a tensor", dict(weight=None), TypeError, "weight"),
    ("weight transposed shape", dict(weight=lambda a: a["weight"].t()), ValueError, "weight"),
    ("x bool", dict(x=lambda a: a["x"] > 0), TypeError, "x"),
    ("x complex", dict(x=lambda a: a["x"].to(torch.complex64)), TypeError, "x"),
    ("lora_a int", dict(lora_a=lambda a: a["lora_a"].int()), TypeError, "lora_a"),
    ("lora_a on meta", dict(lora_a=lambda a: a["lora_a"].to("meta")), ValueError, "lora_a"),
    ("bias on meta", dict(bias=lambda a: a["bias"].to("meta")), ValueError, "bias"),
    ("weight on meta", dict(weight=lambda a: a["weight"].to("meta")), ValueError, "weight"),
    ("lora_b rank N swapped", dict(lora_b=lambda a: a["lora_b"].t()), ValueError, "lora_b"),
    ("lora_b half over float32 A", dict(lora_b=lambda a: a["lora_b"].half()), TypeError, "lora_b"),
    ("x 3-D with wrong K", dict(x=lambda a: torch.randn(2, 3, 9)), ValueError, "weight"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("changes,exc,arg", [c[1:] for c in LORA_LINEAR], ids=[c[0] for c in LORA_LINEAR])
def test_lora_linear_bad_arguments(changes, exc, arg, backend):
    args = _ll_inputs()
    kwargs = {"backend": backend}
    for k, v in changes.items():
        (args if k in args else kwargs)[k] = v(args) if callable(v) else v
    tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
    msg = _raises(lambda: lora_kernels.lora_linear(**args, **kwargs), exc, arg, watched=tensors)
    assert msg.startswith("lora_linear: ")


@pytest.mark.parametrize("lead,K,N", [((2, 3), 0, 5), ((2, 3), 4, 0), ((2, 0), 4, 5), ((4,), 0, 5)],
                         ids=["3-D K=0", "3-D N=0", "3-D M=0", "2-D K=0"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_empty_dimensions_work(lead, K, N, backend):
    """Not bad input, but 3-D K = 0 crashed: empty sums give y = bias and zero gradients."""
    x = torch.randn(*lead, K, requires_grad=True)
    w, a = torch.randn(N, K, requires_grad=True), torch.randn(2, K, requires_grad=True)
    b, bias = torch.randn(N, 2, requires_grad=True), torch.randn(N, requires_grad=True)
    y = lora_kernels.lora_linear(x, w, a, b, 0.5, bias, backend=backend)
    assert y.shape == (*lead, N)
    assert torch.allclose(y, x.detach() @ w.detach().T + bias.detach())
    y.sum().backward()
    assert x.grad.shape == x.shape and a.grad.shape == a.shape and w.grad.shape == w.shape
    if K == 0:
        assert torch.equal(b.grad, torch.zeros(N, 2))
    assert torch.equal(bias.grad, torch.full((N,), float(math.prod(lead))))


# ---------------------------------------------------------------------------------------------
# merge_ / unmerge_ / MergeResidual
# ---------------------------------------------------------------------------------------------

def _merge_inputs():
    inp = make_lora_inputs(5, 12, 10, 3, torch.float32)
    return inp.weight.clone(), inp.lora_a, inp.lora_b


MERGE = [
    # (case id, make(w, a, b) -> (args, kwargs), exception, argument named)
    ("scale 10**400", lambda w, a, b: ((w, a, b, BIG), {}), ValueError, "scale"),
    ("scale meta tensor", lambda w, a, b: ((w, a, b, torch.tensor(1.0, device="meta")), {}), TypeError, "scale"),
    ("scale None", lambda w, a, b: ((w, a, b, None), {}), TypeError, "scale"),
    ("scale list entry 10**400", lambda w, a, b: ((w, [a], [b], [BIG]), {}), ValueError, "scale[0]"),
    ("backend list", lambda w, a, b: ((w, a, b, 1.0), {"backend": ["torch"]}), ValueError, "backend"),
    ("backend 'gpu'", lambda w, a, b: ((w, a, b, 1.0), {"backend": "gpu"}), ValueError, "backend"),
    ("lora_b aliases weight", lambda w, a, b: ((w, a, w[:, :3], 1.0), {}), ValueError, "lora_b"),
    ("lora_a is a view of weight", lambda w, a, b: ((w, w[:3, :], b, 1.0), {}), ValueError, "lora_a"),
    ("list lora_b[1] aliases weight", lambda w, a, b: ((w, [a, a], [b, w[:, 5:8]], [1.0, 1.0]), {}), ValueError,
     "lora_b[1]"),
    ("weight with a zero column stride", lambda w, a, b: ((w[:, :1].expand(12, 10), a, b, 1.0), {}), ValueError,
     "weight"),
    ("weight interleaved view", lambda w, a, b: ((torch.randn(130).as_strided((12, 10), (10, 2)), a, b, 1.0), {}),
     ValueError, "weight"),
    ("lora_a not a tensor", lambda w, a, b: ((w, "A", b, 1.0), {}), TypeError, "lora_a"),
    ("lora_b 1-D", lambda w, a, b: ((w, a, b[:, 0], 1.0), {}), ValueError, "lora_b"),
    ("weight not a tensor", lambda w, a, b: ((w.tolist(), a, b, 1.0), {}), TypeError, "weight"),
    ("empty lists", lambda w, a, b: ((w, [], [], []), {}), ValueError, "lora_a, lora_b and scale"),
    ("scale tuple too long", lambda w, a, b: ((w, [a], [b], (1.0, 2.0)), {}), ValueError, "scale"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
@pytest.mark.parametrize("make,exc,arg", [c[1:] for c in MERGE], ids=[c[0] for c in MERGE])
def test_merge_bad_arguments(make, exc, arg, op, backend):
    w, a, b = _merge_inputs()
    args, kwargs = make(w, a, b)
    kwargs.setdefault("backend", backend)
    watched = [t for t in (w, a, b, *[x for x in args if isinstance(x, torch.Tensor)]) if isinstance(t, torch.Tensor)]
    msg = _raises(lambda: getattr(lora_kernels, op)(*args, **kwargs), exc, arg, watched=watched)
    assert msg.startswith(op + ": ")


RESIDUAL = [
    # (case id, run(w, a, b) that must raise, exception, argument named)
    ("escape_capacity 2**62", lambda w, a, b: MergeResidual(2 ** 62), ValueError, "escape_capacity"),
    ("escape_capacity -1", lambda w, a, b: MergeResidual(-1), ValueError, "escape_capacity"),
    ("escape_capacity str", lambda w, a, b: MergeResidual("8"), TypeError, "escape_capacity"),
    ("escape_capacity bool", lambda w, a, b: MergeResidual(True), TypeError, "escape_capacity"),
    ("escape_capacity float", lambda w, a, b: MergeResidual(8.0), TypeError, "escape_capacity"),
    ("residual not a MergeResidual", lambda w, a, b: lora_kernels.merge_(w, a, b, 1.0, residual={}), TypeError,
     "residual"),
    ("residual on a float64 weight", lambda w, a, b: lora_kernels.merge_(w.double(), a.double(), b.double(), 1.0,
                                                                         residual=MergeResidual()), TypeError,
     "residual"),
    ("unmerge_ with an empty residual", lambda w, a, b: lora_kernels.unmerge_(w, a, b, 1.0, residual=MergeResidual()),
     ValueError, "residual"),
    ("unmerge_ residual of another scale", lambda w, a, b: _unmerge_after(w, a, b, 2.0), ValueError, "scale"),
    ("unmerge_ residual of another weight", lambda w, a, b: _unmerge_after(w, a, b, 1.0, other_weight=True),
     ValueError, "weight"),
    ("unmerge_ residual of another lora_b", lambda w, a, b: _unmerge_after(w, a, b, 1.0, other_b=True), ValueError,
     "lora_b"),
    ("unmerge_ residual of another backend", lambda w, a, b: _unmerge_after(w, a, b, 1.0, backend="triton"),
     ValueError, "backend"),
    ("merge_ into a full residual", lambda w, a, b: _merge_twice(w, a, b), ValueError, "residual"),
]


def _unmerge_after(w, a, b, scale, other_weight=False, other_b=False, backend="auto"):
    """merge_ a copy of w with a residual (torch backend), then unmerge_ with mismatching
    arguments; the weight given to unmerge_ (the merged copy, or w itself) must stay unchanged."""
    merged = w.clone()
    res = MergeResidual()
    lora_kernels.merge_(merged, a, b, 1.0, residual=res, backend="torch")
    target = w if other_weight else merged
    snap = snapshot(target)
    try:
        lora_kernels.unmerge_(target, a, b.clone() if other_b else b, scale, residual=res, backend=backend)
    finally:
        assert_unchanged(target, snap)


def _merge_twice(w, a, b):
    res = MergeResidual()
    other = w.clone()
    lora_kernels.merge_(other, a, b, 1.0, residual=res)
    lora_kernels.merge_(w, a, b, 1.0, residual=res)


@pytest.mark.parametrize("run,exc,arg", [c[1:] for c in RESIDUAL], ids=[c[0] for c in RESIDUAL])
def test_merge_residual_bad_use(run, exc, arg):
    w, a, b = _merge_inputs()
    _raises(lambda: run(w, a, b), exc, arg, watched=[w, a, b])


# ---------------------------------------------------------------------------------------------
# FusedLoRALinear and from_linear: validated at construction, naming the argument
# ---------------------------------------------------------------------------------------------

LAYER = [
    # (case id, keyword arguments, exception, argument named)
    ("r 0", dict(r=0), ValueError, "r"),
    ("r -1", dict(r=-1), ValueError, "r"),
    ("r 2.5", dict(r=2.5), ValueError, "r"),
    ("r str", dict(r="4"), ValueError, "r"),
    ("r bool", dict(r=True), ValueError, "r"),
    ("r 2**62", dict(r=2 ** 62), ValueError, "r=4611686018427387904"),
    ("lora_alpha nan", dict(lora_alpha=math.nan), ValueError, "lora_alpha"),
    ("lora_alpha inf", dict(lora_alpha=math.inf), ValueError, "lora_alpha"),
    ("lora_alpha str", dict(lora_alpha="16"), TypeError, "lora_alpha"),
    ("lora_alpha None", dict(lora_alpha=None), TypeError, "lora_alpha"),
    ("lora_alpha bool", dict(lora_alpha=True), TypeError, "lora_alpha"),
    ("lora_alpha 10**400", dict(lora_alpha=BIG), ValueError, "lora_alpha"),
    ("lora_alpha list", dict(lora_alpha=[16]), TypeError, "lora_alpha"),
    ("lora_dropout 1.0", dict(lora_dropout=1.0), ValueError, "lora_dropout"),
    ("lora_dropout 1.5", dict(lora_dropout=1.5), ValueError, "lora_dropout"),
    ("lora_dropout -0.1", dict(lora_dropout=-0.1), ValueError, "lora_dropout"),
    ("lora_dropout nan", dict(lora_dropout=math.nan), ValueError, "lora_dropout"),
    ("lora_dropout str", dict(lora_dropout="0.1"), TypeError, "lora_dropout"),
    ("lora_dropout 10**400", dict(lora_dropout=BIG), ValueError, "lora_dropout"),
    ("use_rslora str", dict(use_rslora="yes"), TypeError, "use_rslora"),
    ("use_rslora int", dict(use_rslora=1), TypeError, "use_rslora"),
    ("backend 'gpu'", dict(backend="gpu"), ValueError, "backend"),
    ("backend list", dict(backend=["torch"]), ValueError, "backend"),
    ("backend None", dict(backend=None), ValueError, "backend"),
    ("adapter_dtype int32", dict(adapter_dtype=torch.int32), TypeError, "adapter_dtype"),
    ("adapter_dtype str", dict(adapter_dtype="float32"), TypeError, "adapter_dtype"),
]

CONSTRUCTOR_ONLY = [
    ("in_features -1", dict(in_features=-1), ValueError, "in_features"),
    ("in_features str", dict(in_features="8"), TypeError, "in_features"),
    ("in_features float", dict(in_features=8.0), TypeError, "in_features"),
    ("out_features -2", dict(out_features=-2), ValueError, "out_features"),
    ("out_features None", dict(out_features=None), TypeError, "out_features"),
]


@pytest.mark.parametrize("kwargs,exc,arg", [c[1:] for c in LAYER + CONSTRUCTOR_ONLY],
                         ids=[c[0] for c in LAYER + CONSTRUCTOR_ONLY])
def test_fused_lora_linear_validates_at_construction(kwargs, exc, arg):
    full = dict(in_features=8, out_features=6, r=2)
    full.update(kwargs)
    msg = _raises(lambda: FusedLoRALinear(**full), exc, arg)
    assert msg.startswith("FusedLoRALinear: ")


@pytest.mark.parametrize("kwargs,exc,arg", [c[1:] for c in LAYER], ids=[c[0] for c in LAYER])
def test_from_linear_validates_and_leaves_the_linear_unchanged(kwargs, exc, arg):
    linear = nn.Linear(8, 6)
    full = dict(r=2)
    full.update(kwargs)
    _raises(lambda: FusedLoRALinear.from_linear(linear, **full), exc, arg, watched=[linear])
    assert linear.weight.requires_grad and linear.bias.requires_grad


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------

class Tiny(nn.Module):
    """q / v / o projections, an embedding and an output head (get_output_embeddings)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, 6)
        self.q_proj, self.v_proj, self.o_proj = nn.Linear(6, 5), nn.Linear(6, 5), nn.Linear(5, 6)
        self.lm_head = nn.Linear(6, 4, bias=False)

    def get_output_embeddings(self):
        return self.lm_head


INJECT = [
    # (case id, inject keyword arguments, exception, argument named)
    ("target_modules bad regex", dict(target_modules="q_proj("), ValueError, "target_modules"),
    ("target_modules empty list", dict(target_modules=[]), TypeError, "target_modules"),
    ("target_modules list of ints", dict(target_modules=[1]), TypeError, "target_modules"),
    ("target_modules int", dict(target_modules=5), TypeError, "target_modules"),
    ("target_modules None", dict(target_modules=None), TypeError, "target_modules"),
    ("target_modules dict", dict(target_modules={"q_proj": 1}), TypeError, "target_modules"),
    ("target_modules bytes", dict(target_modules=b"q_proj"), TypeError, "target_modules"),
    ("target_modules matches nothing", dict(target_modules=["k_proj"]), ValueError, "target_modules"),
    ("target_modules hits an Embedding", dict(target_modules=["q_proj", "embed"]), ValueError, "'embed'"),
    ("r 0", dict(target_modules=["q_proj", "v_proj"], r=0), ValueError, "r"),
    ("r 2**62", dict(r=2 ** 62), ValueError, "r="),
    ("lora_alpha nan", dict(lora_alpha=math.nan), ValueError, "lora_alpha"),
    ("lora_alpha str", dict(lora_alpha="8"), TypeError, "lora_alpha"),
    ("lora_dropout 1.5", dict(lora_dropout=1.5), ValueError, "lora_dropout"),
    ("use_rslora str", dict(use_rslora="no"), TypeError, "use_rslora"),
    ("backend 'gpu'", dict(backend="gpu"), ValueError, "backend"),
    ("adapter_dtype int64", dict(adapter_dtype=torch.int64), TypeError, "adapter_dtype"),
    ("module already fused", dict(target_modules=["v_proj", "fused"]), ValueError, "already holds a LoRA adapter"),
]


def _tiny_with_one_fused():
    model = Tiny()
    model.fused = FusedLoRALinear(6, 5, r=2)
    nn.init.normal_(model.fused.lora_B)
    return model


@pytest.mark.parametrize("kwargs,exc,arg", [c[1:] for c in INJECT], ids=[c[0] for c in INJECT])
def test_inject_bad_arguments_change_nothing(kwargs, exc, arg):
    model = _tiny_with_one_fused()
    full = dict(target_modules=["q_proj", "v_proj"], r=2)
    full.update(kwargs)
    msg = _raises(lambda: lora_kernels.inject(model, **full), exc, arg, watched=[model])
    assert msg.startswith("inject: ")
    assert model.q_proj.weight.requires_grad  # planning froze nothing


@pytest.mark.parametrize("entry", ["inject", "load_adapter"])
def test_a_failure_while_building_layers_restores_requires_grad(entry, monkeypatch, tmp_path):
    """Checks pass, then building the second layer fails (an allocation, say): the first layer's
    shared weight, frozen by its construction, gets requires_grad back; no module is replaced."""
    path = _write_adapter(tmp_path / "a", tensor_changes=lambda t: t.update(  # q_proj, v_proj and o_proj
        {"base_model.model.o_proj.lora_A.weight": torch.randn(2, 5),
         "base_model.model.o_proj.lora_B.weight": torch.randn(6, 2)}))
    model = _adapter_model()
    built = []
    real = FusedLoRALinear.reset_lora_parameters

    def flaky(self):
        built.append(self)
        if len(built) == 2:
            raise RuntimeError("out of memory (injected)")
        real(self)

    monkeypatch.setattr(FusedLoRALinear, "reset_lora_parameters", flaky)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="injected"):
        if entry == "inject":
            lora_kernels.inject(model, ["q_proj", "o_proj"], r=2)
        else:
            lora_kernels.load_adapter(model, path)
    assert len(built) == 2
    assert_unchanged(model, before)
    assert model.q_proj.weight.requires_grad and model.o_proj.weight.requires_grad


def test_inject_rejects_a_model_that_is_not_a_module():
    _raises(lambda: lora_kernels.inject("model", ["q_proj"], r=2), TypeError, "model")


def test_inject_all_linear_is_peft_rule():
    """PEFT's "all-linear": every nn.Linear but the output head."""
    model = lora_kernels.inject(Tiny(), "all-linear", r=2)
    fused = {n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)}
    assert fused == {"q_proj", "v_proj", "o_proj"}
    model = lora_kernels.inject(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), "ALL-LINEAR", r=1)
    assert {n for n, m in model.named_modules() if isinstance(m, FusedLoRALinear)} == {"0", "2"}


# ---------------------------------------------------------------------------------------------
# save_adapter / load_adapter: bad paths, bad files, bad configs
# ---------------------------------------------------------------------------------------------

def _adapter_model():
    """What load_adapter is given: v_proj already holds an adapter (random B), q_proj is plain and
    trainable (requires_grad must survive a failed load), o_proj plain."""
    torch.manual_seed(1)
    model = Tiny()
    lora_kernels.inject(model, ["v_proj"], r=2)
    nn.init.normal_(model.v_proj.lora_B)
    for p in model.parameters():
        p.requires_grad_(True)  # a model mid-fine-tuning: everything trainable
    return model


def _write_adapter(path, config_changes=None, tensor_changes=None):
    """An adapter for q_proj and v_proj (r=2) in PEFT's format, then edited."""
    torch.manual_seed(2)
    src = Tiny()
    lora_kernels.inject(src, ["q_proj", "v_proj"], r=2, lora_alpha=4)
    for m in src.modules():
        if isinstance(m, FusedLoRALinear):
            nn.init.normal_(m.lora_B)
    lora_kernels.save_adapter(src, str(path))
    if config_changes is not None:
        cfg_path = os.path.join(path, "adapter_config.json")
        with open(cfg_path) as f:
            config = json.load(f)
        config_changes(config) if callable(config_changes) else config.update(config_changes)
        with open(cfg_path, "w") as f:
            json.dump(config, f)
    if tensor_changes is not None:
        from safetensors.torch import load_file, save_file
        w_path = os.path.join(path, "adapter_model.safetensors")
        tensors = load_file(w_path)
        tensor_changes(tensors)
        save_file(tensors, w_path)
    return path


def _raw(name, content):
    def edit(path):
        with open(os.path.join(path, name), "wb") as f:
            f.write(content)
    return edit


def _truncate_weights(path):
    p = os.path.join(path, "adapter_model.safetensors")
    with open(p, "rb") as f:
        data = f.read()
    with open(p, "wb") as f:
        f.write(data[: len(data) // 2])


QA = "base_model.model.q_proj.lora_A.weight"
QB = "base_model.model.q_proj.lora_B.weight"
VB = "base_model.model.v_proj.lora_B.weight"

LOAD = [
    # (case id, dict(config=..., tensors=..., files=...), exception, named in the message)
    ("config is not JSON", dict(files=_raw("adapter_config.json", b"{not json")), ValueError, "adapter_config.json"),
    ("config is a list", dict(files=_raw("adapter_config.json", b"[1, 2]")), ValueError, "adapter_config.json"),
    ("config is a string", dict(files=_raw("adapter_config.json", b'"LORA"')), ValueError, "adapter_config.json"),
    ("config not UTF-8", dict(files=_raw("adapter_config.json", b"\xff\xfe\x00")), ValueError, "adapter_config.json"),
    ("weights truncated", dict(files=_truncate_weights), ValueError, "adapter_model.safetensors"),
    ("weights garbage", dict(files=_raw("adapter_model.safetensors", b"garbage" * 10)), ValueError,
     "adapter_model.safetensors"),
    ("weights empty file", dict(files=_raw("adapter_model.safetensors", b"")), ValueError, "adapter_model.safetensors"),
    ("peft_type missing", dict(config=lambda c: c.pop("peft_type")), ValueError, "peft_type"),
    ("peft_type IA3", dict(config={"peft_type": "IA3"}), ValueError, "peft_type"),
    ("use_dora", dict(config={"use_dora": True}), ValueError, "use_dora"),
    ("bias all", dict(config={"bias": "all"}), ValueError, "bias"),
    ("modules_to_save", dict(config={"modules_to_save": ["lm_head"]}), ValueError, "modules_to_save"),
    ("r null", dict(config={"r": None}), ValueError, "r"),
    ("r str", dict(config={"r": "2"}), ValueError, "r"),
    ("r 0", dict(config={"r": 0}), ValueError, "r"),
    ("r float", dict(config={"r": 2.0}), ValueError, "r"),
    ("lora_alpha null", dict(config={"lora_alpha": None}), TypeError, "lora_alpha"),
    ("lora_alpha NaN", dict(config={"lora_alpha": math.nan}), ValueError, "lora_alpha"),
    ("lora_alpha Infinity", dict(config={"lora_alpha": math.inf}), ValueError, "lora_alpha"),
    ("lora_alpha str", dict(config={"lora_alpha": "16"}), TypeError, "lora_alpha"),
    ("lora_alpha bool", dict(config={"lora_alpha": True}), TypeError, "lora_alpha"),
    ("lora_alpha huge int", dict(config={"lora_alpha": BIG}), ValueError, "lora_alpha"),
    ("lora_dropout 1.5", dict(config={"lora_dropout": 1.5}), ValueError, "lora_dropout"),
    ("lora_dropout -1", dict(config={"lora_dropout": -1}), ValueError, "lora_dropout"),
    ("lora_dropout str", dict(config={"lora_dropout": "0.1"}), TypeError, "lora_dropout"),
    ("lora_dropout null", dict(config={"lora_dropout": None}), TypeError, "lora_dropout"),
    ("use_rslora str", dict(config={"use_rslora": "true"}), ValueError, "use_rslora"),
    ("rank_pattern a list", dict(config={"rank_pattern": ["q_proj"]}), ValueError, "rank_pattern"),
    ("rank_pattern bad regex", dict(config={"rank_pattern": {"q_proj(": 2}}), ValueError, "rank_pattern"),
    ("rank_pattern value 0", dict(config={"rank_pattern": {"q_proj": 0}}), ValueError, "rank_pattern"),
    ("rank_pattern value str", dict(config={"rank_pattern": {"q_proj": "2"}}), ValueError, "rank_pattern"),
    ("rank_pattern disagrees with the file", dict(config={"rank_pattern": {"v_proj": 4}}), ValueError, "v_proj"),
    ("alpha_pattern value null (after v_proj)", dict(config={"alpha_pattern": {"q_proj": None}}), TypeError,
     "alpha_pattern"),
    ("alpha_pattern value NaN", dict(config={"alpha_pattern": {"v_proj": math.nan}}), ValueError, "alpha_pattern"),
    ("alpha_pattern value str", dict(config={"alpha_pattern": {"q_proj": "4"}}), TypeError, "alpha_pattern"),
    ("alpha_pattern bad regex", dict(config={"alpha_pattern": {"[q": 4}}), ValueError, "alpha_pattern"),
    ("alpha_pattern a string", dict(config={"alpha_pattern": "q_proj"}), ValueError, "alpha_pattern"),
    ("key not a LoRA weight", dict(tensors=lambda t: t.update({"base_model.model.q_proj.weight": t[QA].clone()})),
     ValueError, "base_model.model.q_proj.weight"),
    ("lora_B missing", dict(tensors=lambda t: t.pop(QB)), ValueError, "q_proj"),
    ("int lora_A", dict(tensors=lambda t: t.update({QA: t[QA].int()})), TypeError, QA),
    ("lora_A 1-D", dict(tensors=lambda t: t.update({QA: t[QA][0]})), ValueError, "q_proj"),
    ("lora_B of another rank", dict(tensors=lambda t: t.update({QB: torch.randn(5, 3)})), ValueError, "q_proj"),
    ("lora_A of another in_features", dict(tensors=lambda t: t.update({QA: torch.randn(2, 7)})), ValueError,
     "q_proj"),
    ("module the model lacks", dict(tensors=lambda t: t.update({"base_model.model.k_proj.lora_A.weight": t[QA].clone(),
                                                                "base_model.model.k_proj.lora_B.weight": t[QB].clone()})),
     ValueError, "k_proj"),
    ("module is an Embedding", dict(tensors=lambda t: t.update({"base_model.model.embed.lora_A.weight": torch.randn(2, 4),
                                                                "base_model.model.embed.lora_B.weight": torch.randn(6, 2)})),
     ValueError, "embed"),
    ("no weights at all", dict(tensors=lambda t: t.clear()), ValueError, "adapter_model.safetensors"),
    ("v_proj of another rank in the file", dict(config={"rank_pattern": {"v_proj": 3}},
                                                tensors=lambda t: t.update({VB: torch.randn(5, 3),
                                                                            VB.replace("B", "A"): torch.randn(3, 6)})),
     ValueError, "v_proj"),
]


@pytest.mark.parametrize("edits,exc,named", [c[1:] for c in LOAD], ids=[c[0] for c in LOAD])
def test_load_adapter_bad_files_change_nothing(edits, exc, named, tmp_path):
    path = _write_adapter(tmp_path / "adapter", edits.get("config"), edits.get("tensors"))
    if "files" in edits:
        edits["files"](path)
    model = _adapter_model()
    msg = _raises(lambda: lora_kernels.load_adapter(model, path), exc, named, watched=[model, str(path)])
    assert msg.startswith("load_adapter: ")


LOAD_ARGS = [
    # (case id, make(model, good adapter path) -> call, exception, named)
    ("path None", lambda m, p: lambda: lora_kernels.load_adapter(m, None), TypeError, "path"),
    ("path int", lambda m, p: lambda: lora_kernels.load_adapter(m, 3), TypeError, "path"),
    ("path bytes", lambda m, p: lambda: lora_kernels.load_adapter(m, os.fsencode(p)), TypeError, "path"),
    ("path missing", lambda m, p: lambda: lora_kernels.load_adapter(m, str(p) + "-missing"), FileNotFoundError,
     "adapter_config.json"),
    ("path is a file", lambda m, p: lambda: lora_kernels.load_adapter(m, os.path.join(p, "adapter_config.json")),
     FileNotFoundError, "not found"),
    ("model not a module", lambda m, p: lambda: lora_kernels.load_adapter({"q_proj": 1}, p), TypeError, "model"),
    ("backend 'gpu'", lambda m, p: lambda: lora_kernels.load_adapter(m, p, backend="gpu"), ValueError, "backend"),
    ("merged target layer", lambda m, p: (m.v_proj.merge(), lambda: lora_kernels.load_adapter(m, p))[1],
     ValueError, "merged"),
    ("save_adapter path None", lambda m, p: lambda: lora_kernels.save_adapter(m, None), TypeError, "path"),
    ("save_adapter model without adapters", lambda m, p: lambda: lora_kernels.save_adapter(Tiny(), str(p) + "-new"),
     ValueError, "FusedLoRALinear"),
]


@pytest.mark.parametrize("make,exc,named", [c[1:] for c in LOAD_ARGS], ids=[c[0] for c in LOAD_ARGS])
def test_adapter_io_bad_arguments_change_nothing(make, exc, named, tmp_path):
    path = _write_adapter(tmp_path / "adapter")
    model = _adapter_model()
    call = make(model, str(path))
    _raises(call, exc, named, watched=[model, str(path)])
    assert not os.path.exists(str(path) + "-new")


def test_failed_load_keeps_earlier_layers_adapters(tmp_path):
    """The issue's case: a bad alpha_pattern value for a later module used to overwrite the
    earlier modules' adapters (and freeze base weights) before failing."""
    path = _write_adapter(tmp_path / "a", {"alpha_pattern": {"v_proj": "x"}})
    model = _adapter_model()
    before = snapshot(model)
    with pytest.raises(TypeError, match=r"alpha_pattern\['v_proj'\]"):
        lora_kernels.load_adapter(model, path)
    assert_unchanged(model, before)
    assert model.q_proj.weight.requires_grad and model.v_proj.weight.requires_grad


PEFT_FUSE = [
    ("fuse backend list", lambda m: lora_kernels.peft.fuse(m, backend=["torch"]), ValueError, "backend"),
    ("fuse backend 'gpu'", lambda m: lora_kernels.peft.fuse(m, backend="gpu"), ValueError, "backend"),
    ("fuse model a string", lambda m: lora_kernels.peft.fuse("model"), TypeError, "model"),
    ("unfuse model None", lambda m: lora_kernels.peft.unfuse(None), TypeError, "model"),
    ("fuse_report of an unfused model", lambda m: lora_kernels.peft.fuse_report(m), ValueError, "fuse"),
    ("fuse_report model a dict", lambda m: lora_kernels.peft.fuse_report({}), TypeError, "model"),
]


@pytest.mark.parametrize("call,exc,arg", [c[1:] for c in PEFT_FUSE], ids=[c[0] for c in PEFT_FUSE])
def test_peft_fuse_bad_arguments_change_nothing(call, exc, arg):
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(nn.Sequential(nn.Linear(6, 5)), LoraConfig(r=2, target_modules=["0"]))
    classes = [type(m) for m in model.modules()]
    _raises(lambda: call(model), exc, arg, watched=[model])
    assert [type(m) for m in model.modules()] == classes


# ---------------------------------------------------------------------------------------------
# explain, the CUDA launchers' checks (run before the extension loads), torch.func
# ---------------------------------------------------------------------------------------------

EXPLAIN = [
    ("device 'gpu'", dict(device="gpu"), ValueError, "device"),
    ("device None", dict(device=None), TypeError, "device"),
    ("device list", dict(device=["cpu"]), TypeError, "device"),
    ("op not a str", dict(op=None), TypeError, "op"),
]


@pytest.mark.parametrize("kwargs,exc,arg", [c[1:] for c in EXPLAIN], ids=[c[0] for c in EXPLAIN])
def test_explain_bad_arguments(kwargs, exc, arg):
    full = dict(op="lora_linear", device="cpu")
    full.update(kwargs)
    _raises(lambda: lora_kernels.explain(full["op"], full["device"]), exc, arg)


def test_explain_takes_device_strings():
    text = lora_kernels.explain("lora_linear", "cpu")
    assert text.startswith("lora_linear on cpu: auto -> torch")
    assert lora_kernels.explain("merge_", torch.device("cpu")).startswith("merge_ on cpu")


def _half_inputs():
    inp = make_lora_inputs(6, 10, 8, 2, torch.float16)
    return inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias


CUDA_LAUNCH = [
    # (case id, make(x, w, a, b, bias) -> (out, t_out), argument named): the output shares memory
    ("out aliases weight", lambda x, w, a, b, c: (w.view(-1)[:60].view(6, 10), None), "weight", "out"),
    ("out aliases x", lambda x, w, a, b, c: (x.view(-1)[:40].view(4, 10), None), "x", "out"),
    ("out aliases bias", lambda x, w, a, b, c: (c.view(1, 10).expand(6, 10), None), "out", "out"),
    ("out expanded", lambda x, w, a, b, c: (torch.empty(1, 10, dtype=torch.float16).expand(6, 10), None), "out",
     "out"),
    ("t_out aliases lora_a", lambda x, w, a, b, c: (None, a.view(torch.float32)[:, :2]), "lora_a", "t_out"),
    ("t_out inside x", lambda x, w, a, b, c: (None, x.view(torch.float32)[:, :2]), "x", "t_out"),
    ("t_out overlaps out", lambda x, w, a, b, c: _out_and_t_sharing(), "t_out", "out"),
]


def _out_and_t_sharing():
    buf = torch.empty(6 * 10 * 2, dtype=torch.float16)
    out = buf[:60].view(6, 10)
    t = buf.view(torch.float32)[10:22].view(6, 2)
    return out, t


@pytest.mark.parametrize("make,arg,written", [c[1:] for c in CUDA_LAUNCH], ids=[c[0] for c in CUDA_LAUNCH])
def test_cuda_lora_linear_launcher_refuses_aliased_outputs(make, arg, written, monkeypatch):
    from lora_kernels.cuda import loader
    from lora_kernels.cuda import lora_linear as cuda_lora_linear
    monkeypatch.setattr(loader, "load", lambda: pytest.fail("the check must run before the extension loads"))
    x, w, a, b, c = _half_inputs()
    out, t_out = make(x, w, a, b, c)
    msg = _raises(lambda: cuda_lora_linear.lora_linear_fwd(x, w, a, b, 0.5, c, True, out=out, t_out=t_out),
                  ValueError, arg, watched=[x, w, a, b, c])
    assert written in msg


CUDA_MERGE = [
    ("lora_a aliases weight", lambda w, a, b: dict(lora_a=w[:3]), "lora_a"),
    ("lora_b aliases weight", lambda w, a, b: dict(lora_b=w[:, :3]), "lora_b"),
    ("codes inside weight", lambda w, a, b: dict(codes=w.view(torch.int8)[:12, :10]), "codes"),
    ("status inside weight", lambda w, a, b: dict(status=w.view(torch.int32)[0, :2]), "status"),
    ("escape_value inside weight", lambda w, a, b: dict(escape_value=w[3]), "escape_value"),
    ("weight expanded", lambda w, a, b: dict(weight=w[:1].expand(12, 10)), "weight"),
]


@pytest.mark.parametrize("make,arg", [c[1:] for c in CUDA_MERGE], ids=[c[0] for c in CUDA_MERGE])
def test_cuda_merge_launcher_refuses_aliasing(make, arg, monkeypatch):
    from lora_kernels.cuda import loader
    from lora_kernels.cuda import merge as cuda_merge
    monkeypatch.setattr(loader, "load", lambda: pytest.fail("the check must run before the extension loads"))
    w, a, b = _merge_inputs()
    kw = dict(weight=w, lora_a=a, lora_b=b)
    kw.update(make(w, a, b))
    extra = {k: kw.pop(k) for k in ("codes", "status", "escape_value") if k in kw}
    weight, lora_a, lora_b = kw["weight"], kw["lora_a"], kw["lora_b"]
    if extra:
        call = lambda: cuda_merge._launch(cuda_merge.MODE_MERGE_EXACT, weight, lora_a, lora_b, 1.0, False,  # noqa
                                          status=extra.get("status"), codes=extra.get("codes"),
                                          escape_value=extra.get("escape_value"))
    else:
        call = lambda: cuda_merge.apply_(weight, lora_a, lora_b, 1.0)  # noqa: E731
    _raises(call, ValueError, arg, watched=[w, a, b])


def test_dropout_under_vmap_different_randomness_is_refused():
    from torch.func import vmap
    inp = make_lora_inputs(4, 5, 6, 2, torch.float32)
    f = lambda x: lora_kernels.lora_linear(x, inp.weight, inp.lora_a, inp.lora_b, 1.0, dropout_p=0.5,  # noqa
                                           training=True)
    _raises(lambda: vmap(f, randomness="different")(inp.x[None].expand(3, 4, 6)), NotImplementedError, "dropout",
            watched=[inp.x, inp.weight, inp.lora_a, inp.lora_b])


# ---------------------------------------------------------------------------------------------
# The count the issue asks for: at least 200 distinct bad inputs across the API and backends
# ---------------------------------------------------------------------------------------------

def distinct_bad_inputs():
    """(API, case) pairs: a case counts once per entry point it is tried on (lora_linear's
    backends and merge_/unmerge_'s backends are not counted separately)."""
    import test_bad_input
    import test_multi_bad_input
    pairs = set()
    pairs |= {("lora_linear", c[0]) for c in test_bad_input.LORA_LINEAR_BAD}
    pairs |= {("lora_linear", c[0]) for c in test_bad_input.LORA_LINEAR_OPTIONS_BAD}
    pairs |= {(op, c[0]) for c in test_bad_input.MERGE_BAD for op in ("merge_", "unmerge_")}
    pairs |= {("FusedLoRALinear", c[0]) for c in test_bad_input.LAYER_BAD}
    pairs |= {(op, c[0]) for c in test_multi_bad_input.BAD for op in c[1]}
    pairs |= {("lora_linear", "hardening: " + c[0]) for c in LORA_LINEAR}
    pairs |= {(op, "hardening: " + c[0]) for c in MERGE for op in ("merge_", "unmerge_")}
    pairs |= {("MergeResidual", c[0]) for c in RESIDUAL}
    pairs |= {("FusedLoRALinear", "hardening: " + c[0]) for c in LAYER + CONSTRUCTOR_ONLY}
    pairs |= {("FusedLoRALinear.from_linear", c[0]) for c in LAYER}
    pairs |= {("inject", c[0]) for c in INJECT} | {("inject", "model not a module")}
    pairs |= {("load_adapter", c[0]) for c in LOAD} | {("load_adapter", c[0]) for c in LOAD_ARGS}
    pairs |= {("explain", c[0]) for c in EXPLAIN}
    pairs |= {("peft.fuse", c[0]) for c in PEFT_FUSE}
    pairs |= {("cuda lora_linear launcher", c[0]) for c in CUDA_LAUNCH}
    pairs |= {("cuda merge launcher", c[0]) for c in CUDA_MERGE}
    pairs |= {("lora_linear under vmap", "dropout, randomness='different'")}
    return pairs


def test_at_least_200_distinct_bad_inputs():
    pairs = distinct_bad_inputs()
    assert len(pairs) >= 200, f"only {len(pairs)} distinct bad inputs are tried"


def test_check_no_overlap_decides_as_the_pairwise_check():
    """check_no_overlap reads out's storage once (host overhead per serving call): for every input
    it raises, or not, exactly as check_no_shared_memory(input, out) does -- overlapping and
    disjoint slices of one buffer, other buffers, empty, meta and other-device tensors, lists."""
    from lora_kernels._validation import check_no_overlap, check_no_shared_memory
    buf = torch.randn(64)
    outs = [buf[:16].view(4, 4), buf[16:32].view(4, 4), buf[8:24], buf[:0], torch.randn(3, 3),
            torch.randn(4, 4, device="meta"), buf[::2][:8]]
    values = [buf[:4], buf[12:20], buf[32:48].view(4, 4), buf[1::2][:8], buf[15:17], buf[:0], torch.randn(5),
              torch.randn(2, device="meta"), buf.view(8, 8).t()[:, :2], None]

    def outcome(fn):
        try:
            fn()
            return None
        except ValueError as e:
            return str(e)
    raised = 0
    for out in outs:
        for value in values:
            pair = None if value is None else outcome(lambda: check_no_shared_memory("op", "v", value, "out", out))
            assert outcome(lambda: check_no_overlap("op", "out", out, v=value)) == pair, (out, value)
            listed = outcome(lambda: check_no_overlap("op", "out", out, v=[torch.randn(2), value]))
            assert listed == (None if pair is None else pair.replace("op: v ", "op: v[1] ")), (out, value)
            raised += pair is not None
    assert raised >= 5  # the grid has overlaps, not only disjoint pairs
