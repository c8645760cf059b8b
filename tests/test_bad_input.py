"""Bad input raises a clear error naming the argument, before any kernel runs."""
import math

import pytest
import torch

import lora_kernels
from cases import make_lora_inputs
from unchanged import assert_unchanged, snapshot


def _inputs():
    return make_lora_inputs(5, 12, 10, 3, torch.float32)


def _mutate(**changes):
    def build():
        inp = _inputs()
        args = dict(x=inp.x, weight=inp.weight, lora_a=inp.lora_a, lora_b=inp.lora_b,
                    scale=inp.scale, bias=inp.bias)
        for k, v in changes.items():
            args[k] = v(args) if callable(v) else v
        return args
    return build


LORA_LINEAR_BAD = [
    # (case id, arguments, exception, message fragment)
    ("K mismatch x/weight", _mutate(x=lambda a: torch.randn(5, 11)), ValueError, r"weight must have shape \[12, 11\]"),
    ("K mismatch lora_a", _mutate(lora_a=lambda a: torch.randn(3, 9)), ValueError, r"lora_a must have shape \[3, 10\]"),
    ("rank mismatch A/B", _mutate(lora_b=lambda a: torch.randn(12, 4)), ValueError, r"lora_b must have shape \[12, 3\]"),
    ("N mismatch lora_b", _mutate(lora_b=lambda a: torch.randn(11, 3)), ValueError, r"lora_b must have shape \[12, 3\]"),
    ("bias length", _mutate(bias=lambda a: torch.randn(11)), ValueError, r"bias must have shape \[12\]"),
    ("bias 2-D", _mutate(bias=lambda a: torch.randn(1, 12)), ValueError, r"bias must be 1-D"),
    ("weight 3-D", _mutate(weight=lambda a: torch.randn(1, 12, 10)), ValueError, r"weight must be 2-D"),
    ("x 0-D", _mutate(x=lambda a: torch.tensor(1.0)), ValueError, r"x must have at least 1"),
    ("rank 0", _mutate(lora_a=lambda a: torch.randn(0, 10), lora_b=lambda a: torch.randn(12, 0)), ValueError, r"rank r >= 1"),
    ("integer x", _mutate(x=lambda a: torch.ones(5, 10, dtype=torch.int32)), TypeError, r"x must have a dtype in"),
    ("integer weight", _mutate(weight=lambda a: torch.ones(12, 10, dtype=torch.int64)), TypeError, r"weight must have a dtype in"),
    ("weight dtype", _mutate(weight=lambda a: a["weight"].half()), TypeError, r"weight must have x's dtype"),
    ("adapter dtype", _mutate(x=lambda a: a["x"].half(), weight=lambda a: a["weight"].half(),
                              lora_a=lambda a: a["lora_a"].bfloat16(), lora_b=lambda a: a["lora_b"].bfloat16()),
     TypeError, r"lora_a must have x's dtype"),
    ("A/B dtypes differ", _mutate(lora_b=lambda a: a["lora_b"].double()), TypeError, r"lora_b must have lora_a's dtype"),
    ("mixed devices", _mutate(lora_b=lambda a: a["lora_b"].to("meta")), ValueError, r"lora_b is on meta but x is on cpu"),
    ("inf scale", _mutate(scale=math.inf), ValueError, r"scale must be finite"),
    ("nan scale", _mutate(scale=math.nan), ValueError, r"scale must be finite"),
    ("string scale", _mutate(scale="2"), TypeError, r"scale must be a float"),
    ("tensor scale", _mutate(scale=lambda a: torch.ones(2)), TypeError, r"scale must be a number"),
    ("x not a tensor", _mutate(x=[[1.0] * 10]), TypeError, r"x must be a torch.Tensor"),
]


@pytest.mark.parametrize("build,exc,match", [c[1:] for c in LORA_LINEAR_BAD], ids=[c[0] for c in LORA_LINEAR_BAD])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_lora_linear_rejects(build, exc, match, backend):
    args = build()
    tensors = [v for v in args.values() if isinstance(v, torch.Tensor)]
    before = [snapshot(t) for t in tensors]
    with pytest.raises(exc, match=match) as info:
        lora_kernels.lora_linear(**args, backend=backend)
    assert str(info.value).startswith("lora_linear: ")
    for t, s in zip(tensors, before):
        assert_unchanged(t, s)


LORA_LINEAR_OPTIONS_BAD = [
    ("dropout_p 1", dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout_p < 0", dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
    ("backend cudnn", dict(backend="cudnn"), ValueError, r"backend must be one of"),
]


@pytest.mark.parametrize("kwargs,exc,match", [c[1:] for c in LORA_LINEAR_OPTIONS_BAD],
                         ids=[c[0] for c in LORA_LINEAR_OPTIONS_BAD])
def test_lora_linear_rejects_options(kwargs, exc, match):
    args = _inputs().args()
    before = [snapshot(t) for t in args if isinstance(t, torch.Tensor)]
    with pytest.raises(exc, match=match):
        lora_kernels.lora_linear(*args, **kwargs)
    for t, s in zip([t for t in args if isinstance(t, torch.Tensor)], before):
        assert_unchanged(t, s)


MERGE_BAD = [
    ("weight 1-D", lambda w, a, b: (w[0], a, b, 1.0), ValueError, r"weight must be 2-D"),
    ("lora_a K", lambda w, a, b: (w, a[:, :-1], b, 1.0), ValueError, r"lora_a must have shape \[3, 10\]"),
    ("lora_b rank", lambda w, a, b: (w, a, b[:, :-1], 1.0), ValueError, r"lora_b must have shape \[12, 3\]"),
    ("fan_in_fan_out layout", lambda w, a, b: (w.t(), a, b, 1.0), ValueError, r"lora_a must have shape"),
    ("inf scale", lambda w, a, b: (w, a, b, math.inf), ValueError, r"scale must be finite"),
    ("list lengths", lambda w, a, b: (w, [a, a], [b], [1.0, 1.0]), ValueError, r"non-empty lists of one length"),
    ("list without scales", lambda w, a, b: (w, [a], [b], 1.0), TypeError, r"scale must be a list"),
    ("int weight", lambda w, a, b: (w.int(), a, b, 1.0), TypeError, r"weight must have a dtype"),
    ("rank 0", lambda w, a, b: (w, a[:0], b[:, :0], 1.0), ValueError, r"rank r >= 1"),
    ("A/B dtypes differ", lambda w, a, b: (w, a, b.double(), 1.0), TypeError, r"lora_b must have lora_a's dtype"),
    ("adapter dtype", lambda w, a, b: (w.half(), a.bfloat16(), b.bfloat16(), 1.0), TypeError,
     r"lora_a must have weight's dtype"),
    ("list entry shape", lambda w, a, b: (w, [a, a[:, :-1]], [b, b], [1.0, 1.0]), ValueError,
     r"lora_a\[1\] must have shape \[3, 10\]"),
    ("nan scale in list", lambda w, a, b: (w, [a, a], [b, b], [1.0, math.nan]), ValueError, r"scale\[1\] must be finite"),
    ("expanded weight", lambda w, a, b: (w[:1].expand(12, 10), a, b, 1.0), ValueError,
     r"weight must not overlap itself in memory"),
    ("adapter aliases weight", lambda w, a, b: (w, w[:3], b, 1.0), ValueError, r"lora_a shares memory with weight"),
    ("mixed devices", lambda w, a, b: (w, a, b.to("meta"), 1.0), ValueError, r"lora_b is on meta but weight is on cpu"),
    ("A tensor, B list", lambda w, a, b: (w, a, [b], 1.0), TypeError, r"both be tensors or both be lists"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in MERGE_BAD], ids=[c[0] for c in MERGE_BAD])
@pytest.mark.parametrize("op", ["merge_", "unmerge_"])
def test_merge_rejects_and_leaves_weight_unchanged(make, exc, match, op):
    inp = _inputs()
    w, a, b, s = make(inp.weight, inp.lora_a, inp.lora_b)
    watched = [inp.weight, inp.lora_a, inp.lora_b, w]
    before = [snapshot(t) for t in watched]
    with pytest.raises(exc, match=match) as info:
        getattr(lora_kernels, op)(w, a, b, s)
    assert str(info.value).startswith(op + ": ")
    for t, snap in zip(watched, before):
        assert_unchanged(t, snap)


@pytest.mark.parametrize("backend,weight_dtype,match", [
    ("cuda", torch.float32, r"cuda: "),
    ("triton", torch.float64, r"triton: dtype torch.float64 is not supported"),
])
def test_merge_backend_unavailable_says_why(backend, weight_dtype, match, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inp = _inputs()
    w = inp.weight.to(weight_dtype)
    before = w.clone()
    with pytest.raises(lora_kernels.BackendUnavailable, match=match):
        lora_kernels.merge_(w, inp.lora_a.to(weight_dtype), inp.lora_b.to(weight_dtype), 1.0, backend=backend)
    assert torch.equal(w, before)


LAYER_BAD = [
    ("r 0", lambda: lora_kernels.FusedLoRALinear(8, 8, r=0), ValueError, "r must be a positive int"),
    ("lora_dropout 1.5", lambda: lora_kernels.FusedLoRALinear(8, 8, r=2, lora_dropout=1.5), ValueError,
     "lora_dropout must be in"),
    ("from_linear of a Conv1d", lambda: lora_kernels.FusedLoRALinear.from_linear(torch.nn.Conv1d(2, 2, 1), r=2),
     TypeError, "linear must be an nn.Linear"),
]


@pytest.mark.parametrize("make,exc,match", [c[1:] for c in LAYER_BAD], ids=[c[0] for c in LAYER_BAD])
def test_fused_lora_linear_rejects_bad_hparams(make, exc, match):
    with pytest.raises(exc, match=match):
        make()
