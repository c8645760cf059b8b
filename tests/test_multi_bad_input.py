"""Bad input to the multi-adapter ops raises a clear error naming the argument, before any kernel
runs; lora_expand_ leaves y unchanged."""
import pytest
import torch

import lora_kernels
from lora_kernels import AdapterIndex
from cases import make_multi_inputs

M, N, K, L, R = 7, 6, 5, 3, 4


def _args(**changes):
    inp = make_multi_inputs(M, N, K, L, R, ranks=[4, 2, 1], dist="none10")
    args = dict(x=inp.x, weight=inp.weight, lora_a_stack=inp.lora_a, lora_b_stack=inp.lora_b, index=inp.index(),
                scales=inp.scales, bias=inp.bias, ranks=inp.ranks, y=torch.randn(M, N),
                t=torch.randn(M, R))
    for k, v in changes.items():
        args[k] = v(args) if callable(v) else v
    return args


def _shrink(a, backend):
    return lora_kernels.lora_shrink(a["x"], a["lora_a_stack"], a["index"], a["scales"], a["ranks"], backend=backend)


def _expand(a, backend):
    return lora_kernels.lora_expand_(a["y"], a["t"], a["lora_b_stack"], a["index"], a["ranks"], backend=backend)


def _linear(a, backend):
    return lora_kernels.multi_lora_linear(a["x"], a["weight"], a["lora_a_stack"], a["lora_b_stack"], a["index"],
                                          a["scales"], a["bias"], a["ranks"], backend=backend)


OPS = {"lora_shrink": _shrink, "lora_expand_": _expand, "multi_lora_linear": _linear}
half = lambda name: (lambda a: a[name].half())  # noqa: E731

BAD = [
    # (case id, ops it applies to, changes, exception, message fragment)
    ("A stack K", ["lora_shrink", "multi_lora_linear"], dict(lora_a_stack=lambda a: torch.randn(L, R, K + 1)),
     ValueError, r"lora_a_stack must have shape \[3, 4, 5\]"),
    ("A stack L", ["lora_shrink", "multi_lora_linear"], dict(lora_a_stack=lambda a: torch.randn(L + 1, R, K)),
     ValueError, r"lora_a_stack must have shape \[3, 4, 5\] \(L = index.num_adapters"),
    ("A stack 2-D", ["lora_shrink", "multi_lora_linear"], dict(lora_a_stack=lambda a: torch.randn(R, K)),
     ValueError, r"lora_a_stack must be 3-D"),
    ("A stack r_max 0", ["lora_shrink", "multi_lora_linear"],
     dict(lora_a_stack=lambda a: torch.randn(L, 0, K), lora_b_stack=lambda a: torch.randn(L, N, 0), ranks=None),
     ValueError, r"r_max >= 1"),
    ("B stack N", ["lora_expand_", "multi_lora_linear"], dict(lora_b_stack=lambda a: torch.randn(L, N + 1, R)),
     ValueError, r"lora_b_stack must have shape \[3, 6, 4\]"),
    ("B stack rank", ["lora_expand_", "multi_lora_linear"], dict(lora_b_stack=lambda a: torch.randn(L, N, R + 1)),
     ValueError, r"lora_b_stack must have shape \[3, 6, 4\]"),
    ("B stack L", ["lora_expand_", "multi_lora_linear"], dict(lora_b_stack=lambda a: torch.randn(L - 1, N, R)),
     ValueError, r"lora_b_stack must have shape \[3, 6, 4\]"),
    ("weight K", ["multi_lora_linear"], dict(weight=lambda a: torch.randn(N, K + 2)), ValueError,
     r"weight must have shape \[6, 5\]"),
    ("bias N", ["multi_lora_linear"], dict(bias=lambda a: torch.randn(N + 1)), ValueError, r"bias must have shape \[6\]"),
    ("t shape", ["lora_expand_"], dict(t=lambda a: torch.randn(M + 1, R)), ValueError, r"t must have shape \[7, 4\]"),
    ("t dtype", ["lora_expand_"], dict(t=lambda a: a["t"].half()), TypeError, r"t must have a dtype in \(float32, float64\)"),
    ("scales length", ["lora_shrink", "multi_lora_linear"], dict(scales=lambda a: torch.ones(L + 1)), ValueError,
     r"scales must have shape \[3\]"),
    ("scales int", ["lora_shrink", "multi_lora_linear"], dict(scales=lambda a: torch.ones(L, dtype=torch.int32)),
     TypeError, r"scales must have a dtype in"),
    ("scales string", ["lora_shrink", "multi_lora_linear"], dict(scales="2.0"), TypeError,
     r"scales must be a \[L\] float tensor, a float or None, got str"),
    ("scales inf", ["lora_shrink", "multi_lora_linear"], dict(scales=float("inf")), ValueError, r"scales must be finite"),
    ("scales 0-d tensor", ["lora_shrink", "multi_lora_linear"], dict(scales=lambda a: torch.tensor(2.0)), ValueError,
     r"scales must be 1-D"),
    ("ranks > r_max", list(OPS), dict(ranks=lambda a: torch.tensor([4, 5, 1])), ValueError,
     r"ranks must lie in \[0, r_max = 4\]"),
    ("ranks < 0", list(OPS), dict(ranks=lambda a: torch.tensor([4, -1, 1])), ValueError, r"ranks must lie in"),
    ("ranks length", list(OPS), dict(ranks=lambda a: torch.tensor([4, 1])), ValueError, r"ranks must have shape \[3\]"),
    ("ranks float", list(OPS), dict(ranks=lambda a: torch.tensor([4.0, 1.0, 1.0])), TypeError,
     r"ranks must have a dtype in \(int32, int64\)"),
    ("index for other M", list(OPS),
     dict(index=lambda a: AdapterIndex.from_token_adapters(torch.zeros(M + 1, dtype=torch.int32), L)),
     ValueError, r"index was built for 8 tokens but the input has 7"),
    ("index not an index", list(OPS), dict(index=lambda a: a["index"].token_adapter), TypeError,
     r"index must be a lora_kernels.AdapterIndex"),
    ("weight dtype", ["multi_lora_linear"], dict(weight=half("weight")), TypeError, r"weight must have x's dtype"),
    ("adapter bf16 over fp16", ["lora_shrink", "multi_lora_linear"],
     dict(x=half("x"), weight=half("weight"), lora_a_stack=lambda a: a["lora_a_stack"].bfloat16(),
          lora_b_stack=lambda a: a["lora_b_stack"].bfloat16()), TypeError, r"lora_a_stack must have x's dtype"),
    ("B stack bf16 over fp16 y", ["lora_expand_"], dict(y=half("y"), lora_b_stack=lambda a: a["lora_b_stack"].bfloat16()),
     TypeError, r"lora_b_stack must have y's dtype"),
    ("A/B stack dtypes differ", ["multi_lora_linear"], dict(lora_b_stack=half("lora_b_stack")), TypeError,
     r"lora_b_stack must have lora_a_stack's dtype"),
    ("bias dtype", ["multi_lora_linear"], dict(bias=lambda a: a["bias"].double()), TypeError, r"bias must have x's dtype"),
    ("integer x", ["lora_shrink", "multi_lora_linear"], dict(x=lambda a: torch.ones(M, K, dtype=torch.int64)), TypeError,
     r"x must have a dtype in"),
    ("x 3-D for shrink", ["lora_shrink"], dict(x=lambda a: a["x"][None]), ValueError, r"x must be 2-D"),
    ("y 1-D", ["lora_expand_"], dict(y=lambda a: a["y"][0]), ValueError, r"y must be 2-D"),
    ("mixed devices", list(OPS), dict(ranks=lambda a: a["ranks"].to("meta")), ValueError,
     r"ranks is on meta but \w+ is on cpu"),
]


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("op,changes,exc,match",
                         [(op, *c[2:]) for c in BAD for op in c[1]],
                         ids=[f"{op}-{c[0]}" for c in BAD for op in c[1]])
def test_multi_ops_reject(op, changes, exc, match, backend):
    args = _args(**changes)
    y_before = args["y"].clone()
    with pytest.raises(exc, match=match) as info:
        OPS[op](args, backend)
    assert str(info.value).startswith(f"{op}: ")
    if op == "lora_expand_":
        assert torch.equal(args["y"], y_before)


def test_bad_backend_and_unsupported_triton_inputs(interpreter_device):
    with pytest.raises(ValueError, match="backend must be one of"):
        _shrink(_args(), "cudnn")
    a = _args(x=lambda a: a["x"].double(), lora_a_stack=lambda a: a["lora_a_stack"].double())
    with pytest.raises(lora_kernels.BackendUnavailable, match="float64 is not supported"):
        _shrink(a, "triton")
    assert _shrink(a, "torch").dtype == torch.float64
    big = make_multi_inputs(3, 4, 5, 2, 513)
    with pytest.raises(lora_kernels.BackendUnavailable, match="r_max 513 exceeds the kernels' limit of 512"):
        lora_kernels.lora_shrink(big.x, big.lora_a, big.index(), big.scales, backend="triton")
    with pytest.raises(lora_kernels.BackendUnavailable, match="t must be float32"):
        _expand(_args(t=lambda a: a["t"].double()), "triton")


def test_ranks_checked_once_per_version_and_again_after_modification(monkeypatch):
    """A serving loop passes one ranks tensor to every call: its values are checked once, and
    again only after an in-place change (which must then be caught)."""
    import lora_kernels._validation as validation
    calls = []
    real = validation.check_values
    monkeypatch.setattr(validation, "check_values", lambda *a, **k: (calls.append(1), real(*a, **k)))
    args = _args()
    ranks = args["ranks"]
    for _ in range(3):
        _shrink(args, "torch")
    assert len(calls) == 1
    ranks[1] = 9  # in place: version moves
    with pytest.raises(ValueError, match=r"ranks must lie in \[0, r_max = 4\]"):
        _shrink(args, "torch")
    ranks[1] = 2
    _expand(args, "torch")
    assert len(calls) == 3
    other = ranks.clone()  # same values, another tensor: checked on its own
    _shrink(dict(args, ranks=other), "torch")
    assert len(calls) == 4


def test_cuda_backend_reasons(monkeypatch):
    """Where the CUDA extension is available, backend='cuda' refuses inputs its kernels do not take,
    with a reason, rather than run something else."""
    import lora_kernels.backends as backends
    monkeypatch.setattr(backends, "unavailable_reason", lambda b, d: None)
    for op in (_shrink, _linear):
        with pytest.raises(lora_kernels.BackendUnavailable,
                           match=r": cuda: dtype float32 is not supported by the CUDA multi-adapter kernels"):
            op(_args(), "cuda")
    big = make_multi_inputs(3, 4, 5, 2, 513, torch.float16)
    with pytest.raises(lora_kernels.BackendUnavailable,
                       match="r_max 513 exceeds the CUDA multi-adapter kernels' limit of 512"):
        lora_kernels.lora_shrink(big.x, big.lora_a, big.index(), big.scales, backend="cuda")
    with pytest.raises(lora_kernels.BackendUnavailable, match="^multi_lora_linear: cuda: r_max 513 exceeds"):
        lora_kernels.multi_lora_linear(big.x, big.weight, big.lora_a, big.lora_b, big.index(), big.scales,
                                       backend="cuda")
    h = _args(y=half("y"), lora_b_stack=half("lora_b_stack"), t=lambda a: a["t"].double())
    with pytest.raises(lora_kernels.BackendUnavailable, match="^lora_expand_: cuda: t must be float32"):
        _expand(h, "cuda")


def test_cuda_backend_on_cpu_tensors_says_why():
    a = _args(x=half("x"), lora_a_stack=half("lora_a_stack"), lora_b_stack=half("lora_b_stack"),
              weight=half("weight"), bias=half("bias"), y=half("y"))
    for name, op in OPS.items():
        with pytest.raises(lora_kernels.BackendUnavailable,
                           match=rf"^{name}: cuda: the CUDA C\+\+ kernels need CUDA tensors, got tensors on cpu"):
            op(a, "cuda")


def _linear_grid():
    """multi_lora_linear's inputs (after _scale_args) around the common call: dtype combinations,
    each shape / slot / token-count mismatch, meta tensors, bias and ranks forms."""
    from lora_kernels import AdapterIndex
    M, N, K, L, R = 3, 5, 6, 2, 4
    f16, f32, f64, bf16 = torch.float16, torch.float32, torch.float64, torch.bfloat16

    def t(shape, dtype=f32, device="cpu"):
        return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    index = AdapterIndex.from_token_adapters(torch.tensor([0, -1, 1]), L)
    base = dict(x=t((M, K)), weight=t((N, K)), lora_a_stack=t((L, R, K)), lora_b_stack=t((L, N, R)),
                index=index, scales=torch.rand(L), bias=None, ranks=None)
    yield base
    for dx in (f16, f32, f64, bf16, torch.int32):
        for dw in (dx, f32):
            for da in (dx, f32, f16, f64):
                for db in (da, f32, bf16):
                    yield dict(base, x=t((M, K), dx) if dx.is_floating_point else torch.ones(M, K, dtype=dx),
                               weight=t((N, K), dw), lora_a_stack=t((L, R, K), da), lora_b_stack=t((L, N, R), db))
    for bias in (t((N,)), t((N,), f16), t((N + 1,)), t((1, N)), t((N,), device="meta"), 2.0):
        yield dict(base, bias=bias)
    for x in (t(()), t((K,)), t((1, M, K)), t((M, K + 1)), t((M + 1, K)), "x"):
        yield dict(base, x=x)
    for weight in (t((N, K + 1)), t((N,)), t((0, K)), None):
        yield dict(base, weight=weight)
    for a in (t((L, 0, K)), t((L + 1, R, K)), t((L, R, K + 1)), t((R, K)), 1.0):
        yield dict(base, lora_a_stack=a)
    for b in (t((L, N, R + 1)), t((L, N + 1, R)), t((L + 1, N, R)), t((N, R))):
        yield dict(base, lora_b_stack=b)
    yield dict(base, lora_a_stack=t((L, 0, K)), lora_b_stack=t((L, N, 0)))  # r_max = 0
    for ranks in (torch.tensor([1, 4], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32),
                  torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1.0, 2.0]), [1, 2]):
        yield dict(base, ranks=ranks)
    yield dict(base, scales=None)
    yield dict(base, index=AdapterIndex.from_token_adapters(torch.tensor([0, 1]), L))
    yield dict(base, index=AdapterIndex.from_token_adapters(torch.tensor([0, 1, 1]), L + 1))
    yield dict(base, index="index")
    for name in ("x", "weight", "lora_a_stack", "lora_b_stack", "scales"):
        yield dict(base, **{name: base[name].to("meta")})


def test_fast_linear_validation_decides_as_the_full_checks():
    """multi_lora_linear's one-pass check of the common call accepts only what the full checks
    accept, so every input gets the full checks' answer (the same error, or none)."""
    import importlib
    ops = importlib.import_module("lora_kernels.ops.multi_lora")

    def outcome(fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 -- the outcome itself is compared
            return type(e), str(e)
    fast = 0
    for case in _linear_grid():
        args = tuple(case[k] for k in ("x", "weight", "lora_a_stack", "lora_b_stack", "index", "scales", "bias",
                                       "ranks"))
        full = outcome(ops._validate_linear_all, "multi_lora_linear", *args)
        assert outcome(ops._validate_linear, "multi_lora_linear", *args) == full, case
        if ops._fast_valid_linear(*args):  # every check but the ranks' (run after it) passes
            fast += 1
            assert outcome(ops._validate_linear_all, "multi_lora_linear", *args[:-1], None) is None, case
    assert fast >= 20


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 -- the outcome itself is compared
        return type(e), str(e)


def _shrink_expand_grid():
    """(x, a_stacks, as_list, index, scales, ranks, out) and (y, t, b_stacks, as_list, index, ranks,
    offset) around the common calls: dtypes, shapes, lists, out / offset forms, aliasing, ranks."""
    from lora_kernels import AdapterIndex
    M, N, K, L, R = 3, 5, 6, 2, 4
    f16, f32, f64 = torch.float16, torch.float32, torch.float64

    def t(shape, dtype=f32, device="cpu"):
        return torch.randn(shape, dtype=torch.float64).to(dtype).to(device)
    index = AdapterIndex.from_token_adapters(torch.tensor([0, -1, 1]), L)
    other = AdapterIndex.from_token_adapters(torch.tensor([0, 1]), L)
    r_ok, r_bad = torch.tensor([1, 4], dtype=torch.int32), torch.tensor([0, 5], dtype=torch.int32)
    shrinks, expands = [], []
    x, a, out = t((M, K)), t((L, R, K)), t((M, R))
    shrinks.append((x, [a], False, index, torch.rand(L), None, None))
    for dx in (f16, f32, f64, torch.int32):
        for da in (dx, f32, f16):
            xx = t((M, K), dx) if dx.is_floating_point else torch.ones(M, K, dtype=dx)
            aa = t((L, R, K), da) if da.is_floating_point else torch.ones(L, R, K, dtype=da)
            for o in (None, t((M, R)), t((M, R), f64)):
                shrinks.append((xx, [aa], False, index, None, None, o))
    for aa in ([t((L, 0, K))], [t((L + 1, R, K))], [t((L, R, K + 1))], [t((R, K))], [a, t((L, R, K), f16)],
               [a, t((L, R + 1, K))], [a, a.to("meta")], [1.0]):
        shrinks.append((x, aa, len(aa) > 1, index, None, None, None))
    for o, as_list in ((t((2, M, R)), True), (t((M, R)), True), (t((M, R + 1)), False), (t((M + 1, R)), False),
                       (t((M, R), device="meta"), False), (t((M, R), f16), False), ("out", False)):
        shrinks.append((x, [a, a] if as_list else [a], as_list, index, None, None, o))
    buf = t((M, K + R))
    shrinks.append((buf[:, :K], [a], False, index, None, None, buf[:, K - 2:K - 2 + R]))  # out overlaps x
    shrinks.append((buf[:, :K], [a], False, index, None, None, buf[:, K:]))  # disjoint slices: fine
    for ranks in (r_ok, r_bad, torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([1.0, 2.0]), [1, 2]):
        shrinks.append((x, [a], False, index, None, ranks, out))
    for idx in (other, "index"):
        shrinks.append((x, [a], False, idx, None, None, None))
    shrinks.append((x.to("meta"), [a], False, index, None, None, None))
    shrinks.append((x, [a], False, index, torch.rand(L, device="meta"), None, None))

    y, tt, b = t((M, N)), t((M, R)), t((L, N, R))
    expands.append((y, tt, [b], False, index, None, 0))
    for dy in (f16, f32, f64, torch.int32):
        for db in (dy, f32, f16):
            for dt in (f32, f64, f16):
                yy = t((M, N), dy) if dy.is_floating_point else torch.ones(M, N, dtype=dy)
                bb = t((L, N, R), db) if db.is_floating_point else torch.ones(L, N, R, dtype=db)
                expands.append((yy, t((M, R), dt), [bb], False, index, None, 0))
    for offset in (1, -1, True, 2.0, None):
        expands.append((y, tt, [t((L, N - 1, R))], False, index, None, offset))
    expands.append((y, tt, [t((L, N - 1, R))], False, index, None, 0))  # one stack must cover y
    for bs, tt2 in (([t((L, 2, R)), t((L, 3, R))], t((2, M, R))), ([t((L, 2, R)), t((L, 4, R))], t((2, M, R))),
                    ([t((L, 2, R)), t((L, 3, R), f16)], t((2, M, R))), ([t((L, 2, R))], t((2, M, R))),
                    ([t((L, 2, R)), t((L, 2, R + 1))], t((2, M, R))), ([t((L, 2, R)), t((L + 1, 2, R))], t((2, M, R))),
                    ([t((L, 2, R)), t((2, R))], t((2, M, R))), ([t((L, 2, R)), t((L, 3, R))], t((M, R)))):
        expands.append((y, tt2, bs, True, index, None, 0))
    for tt2 in (t((M, R + 1)), t((M + 1, R)), t((M, 0)), t((1, M, R)), t((M, R), device="meta"), "t"):
        expands.append((y, tt2, [b], False, index, None, 0))
    buf = t((M, N + R))
    expands.append((buf[:, :N], buf[:, N - 1:N - 1 + R], [b], False, index, None, 0))  # t overlaps y
    expands.append((y, tt, [y.view(1, M, N).expand(L, M, N)[:, :, :R].transpose(1, 2)[:, :N]], False, index,
                    None, 0))
    for ranks in (r_ok, r_bad, torch.tensor([1, 2, 3], dtype=torch.int32), [1, 2]):
        expands.append((y, tt, [b], False, index, ranks, 0))
    for idx in (other, "index"):
        expands.append((y, tt, [b], False, idx, None, 0))
    expands.append((y.to("meta"), tt, [b], False, index, None, 0))
    return shrinks, expands


def test_fast_shrink_expand_validation_decides_as_the_full_checks():
    """lora_shrink's / lora_expand_'s one-pass check of the common call accepts only inputs that
    pass every full check before the aliasing and ranks checks (which then run as always), so
    every input gets the full checks' answer."""
    import importlib
    ops = importlib.import_module("lora_kernels.ops.multi_lora")
    shrinks, expands = _shrink_expand_grid()
    fast = 0
    for x, a, as_list, index, scales, ranks, out in shrinks:
        names = [f"lora_a_stack[{i}]" for i in range(len(a))] if as_list else ["lora_a_stack"]
        args = ("lora_shrink", x, a, names, as_list, index, scales, ranks, out)
        full = _outcome(ops._validate_shrink_all, *args)
        assert _outcome(ops._validate_shrink, *args) == full, args
        if ops._fast_valid_shrink(x, a, as_list, index, scales, ranks, out):
            fast += 1
            assert full is None or "shares memory" in full[1] or "ranks" in full[1], (args, full)
    for y, t, b, as_list, index, ranks, offset in expands:
        names = [f"lora_b_stack[{i}]" for i in range(len(b))] if as_list else ["lora_b_stack"]
        args = ("lora_expand_", y, t, b, names, as_list, index, ranks, offset)
        full = _outcome(ops._validate_expand_all, *args)
        assert _outcome(ops._validate_expand, *args) == full, args
        if ops._fast_valid_expand(y, t, b, as_list, index, ranks, offset):
            fast += 1
            assert full is None or "shares memory" in full[1] or "ranks" in full[1], (args, full)
    assert fast >= 30


def _public_outcome(fn, *args, **kwargs):
    """(exception type, message) or the returned tensor's copy."""
    try:
        r = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 -- the outcome itself is compared
        return type(e), str(e)
    return r.clone() if isinstance(r, torch.Tensor) else r


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                and (a.is_meta or torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())))
    return a == b


def _shares(out, *inputs) -> bool:
    ptr = out.untyped_storage().data_ptr()
    return any(isinstance(v, torch.Tensor) and not v.is_meta and v.untyped_storage().data_ptr() == ptr
               for v in inputs)


def test_common_call_paths_decide_and_compute_as_the_general_path(monkeypatch):
    """lora_shrink / lora_expand_'s one-pass paths of the common eager call (_shrink_common,
    _expand_common) give what the general path gives -- the same error, or the same result and the
    same bits written to out / y -- over the grid of good and bad inputs, a padded index, a
    non-contiguous out / y, inputs aliasing them, and inputs that require grad."""
    import importlib
    from lora_kernels import AdapterIndex
    ops = importlib.import_module("lora_kernels.ops.multi_lora")
    shrinks, expands = _shrink_expand_grid()
    M, K, L, R = 3, 6, 2, 4
    x, a = torch.randn(M, K), torch.randn(L, R, K)
    padded = AdapterIndex.with_capacity(5, L).update_(torch.tensor([1, 0])).padded_to(M)
    shrinks.append((x, [a], False, padded, torch.rand(L), torch.tensor([3, 4]), torch.randn(M, R)))
    shrinks.append((x, [a], False, padded, 0.5, None, None))
    shrinks.append((x, [a], False, shrinks[0][3], torch.rand(L), None, torch.randn(R, M).t()))  # strided out
    shrinks.append((x, [a.clone().requires_grad_(True)], False, shrinks[0][3], None, None, torch.randn(M, R)))
    y = torch.randn(M, 5)
    expands.append((y, torch.randn(M, R), [torch.randn(L, 5, R)], False, padded, torch.tensor([2, 4]), 0))
    expands.append((torch.randn(5, M).t(), torch.randn(M, R), [torch.randn(L, 5, R)], False, padded, None, 0))
    expands.append((y, torch.randn(M, R).requires_grad_(True), [torch.randn(L, 5, R)], False, padded, None, 0))
    taken = {"shrink": 0, "expand": 0}
    real_shrink, real_expand = ops._shrink_common, ops._expand_common

    def count(name, fn, done):
        def wrapped(*args):
            r = fn(*args)
            taken[name] += bool(done(r))
            return r
        return wrapped
    monkeypatch.setattr(ops, "_shrink_common", count("shrink", real_shrink, lambda r: r is not None))
    monkeypatch.setattr(ops, "_expand_common", count("expand", real_expand, lambda r: r))
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for x, a, as_list, index, scales, ranks, out in shrinks:
                results = []
                for fast in (True, False):
                    monkeypatch.setattr(ops, "_FAST_COMMON", fast)
                    # poisoned, out's strides kept (clone preserves a dense layout); a view of x stays a view
                    o = out
                    if isinstance(out, torch.Tensor) and not out.is_meta and not _shares(out, x):
                        o = out.clone().fill_(float("nan"))
                    res = _public_outcome(lora_kernels.lora_shrink, x, a if as_list else a[0], index, scales, ranks,
                                          out=o, backend="torch")
                    results.append((res, o.clone() if isinstance(o, torch.Tensor) and not o.is_meta else None))
                (r1, o1), (r2, o2) = results
                assert _same(r1, r2) and (o1 is None or _same(o1, o2)), (x.shape, index, scales, ranks, r1, r2)
            for y, t, b, as_list, index, ranks, offset in expands:
                results = []
                for fast in (True, False):
                    monkeypatch.setattr(ops, "_FAST_COMMON", fast)
                    yy = y  # a fresh y with y's strides; a view sharing t's / B's buffer stays one
                    if isinstance(y, torch.Tensor) and not y.is_meta and not _shares(y, t, *b):
                        yy = y.clone()
                    res = _public_outcome(lora_kernels.lora_expand_, yy, t, b if as_list else b[0], index, ranks,
                                          offset, backend="torch")
                    results.append(res)
                assert _same(results[0], results[1]), (y.shape, t, index, ranks, offset, results)
    assert taken["shrink"] >= 10 and taken["expand"] >= 10, taken


def test_contiguous_aliasing_check_decides_as_the_full_check(monkeypatch):
    """check_no_overlap's data-pointer decision (_no_overlap_contiguous) passes only where the
    full check (internal overlap, then storage and byte ranges per input) passes: over pairs of
    views of one buffer (slices, disjoint and overlapping, transposes, expands, empty views) and
    of separate tensors."""
    from lora_kernels import _validation as V
    buf = torch.randn(6, 8)
    views = [buf, buf[:2], buf[2:4], buf[:, :3], buf[:, 3:], buf.t(), buf[1:3, 2:5], buf.view(-1)[5:11],
             buf.view(-1)[11:13], buf[:0], buf[0:1, :].expand(3, 8), torch.randn(3, 4), torch.randn(0),
             torch.randn(4, 2).t(), buf.view(-1)[47:48]]

    def full(out, **inputs):
        with monkeypatch.context() as m:
            m.setattr(V, "_no_overlap_contiguous", lambda *a: False)
            return _outcome(lambda: V.check_no_overlap("op", "out", out, **inputs))
    passed = 0
    for out in views:
        for v in views:
            for inputs in ({"a": v}, {"a": None, "b": [v, None]}, {"a": (views[11], v)}):
                fast = V._no_overlap_contiguous(out, inputs)
                verdict = full(out, **inputs)
                if fast:
                    passed += 1
                    assert verdict is None, (out.shape, out.stride(), v.shape, v.stride(), verdict)
                assert _outcome(lambda: V.check_no_overlap("op", "out", out, **inputs)) == verdict
    assert passed >= 50, passed


def test_common_linear_path_decides_and_computes_as_the_general_path(monkeypatch):
    """multi_lora_linear's one-pass path of the common eager call (_linear_common) gives what the
    general path gives -- the same error, or the same y -- over the grid of good and bad inputs,
    a padded index, float scales, Parameters, and inputs that require grad."""
    import importlib
    from lora_kernels import AdapterIndex
    ops = importlib.import_module("lora_kernels.ops.multi_lora")
    cases = list(_linear_grid())
    base = cases[0]
    L = base["index"].num_adapters
    padded = AdapterIndex.with_capacity(6, L).update_(torch.tensor([1, -1])).padded_to(3)
    cases += [dict(base, index=padded, ranks=torch.tensor([2, 4], dtype=torch.int32)), dict(base, scales=0.25),
              dict(base, weight=torch.nn.Parameter(base["weight"].clone())),
              dict(base, lora_a_stack=base["lora_a_stack"].clone().requires_grad_(True)),
              dict(base, x=base["x"].t().contiguous().t()), dict(base, bias=torch.randn(5))]
    taken = []
    real = ops._linear_common
    def counted(*args):
        y = real(*args)
        taken.append(y is not None)
        return y
    monkeypatch.setattr(ops, "_linear_common", counted)
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for case in cases:
                args = tuple(case[k] for k in ("x", "weight", "lora_a_stack", "lora_b_stack", "index", "scales",
                                               "bias", "ranks"))
                results = []
                for fast in (True, False):
                    monkeypatch.setattr(ops, "_FAST_COMMON", fast)
                    results.append(_public_outcome(lora_kernels.multi_lora_linear, *args, backend="torch"))
                r1, r2 = results
                if isinstance(r1, torch.Tensor):
                    r1, r2 = r1.detach(), r2.detach()
                assert _same(r1, r2), (case, r1, r2)
    assert sum(taken) >= 20, sum(taken)
