"""Launch templates (lora_kernels/triton/launch_templates.py; issue 16 point 6): a launcher call
whose signature was seen replays the allocations and launches recorded from the first such call.

The replay must be indistinguishable from the launcher itself. With every @triton.jit kernel the
launchers call replaced by a stub that logs its launches (nothing runs: the CPU lane checks the
host side over every path, at any size), each case is called three times on fresh tensors of one
signature -- templates off (the launcher's own path), recording, replaying -- and the three calls
must make the same launches: the same kernels, grids, scalar arguments and constexprs, and each
tensor argument the same role (which input, or which new allocation, of what shape, strides and
dtype), and return tensors of the same roles. Paths a template cannot replay must leave none.
The interpreter tests at the end run the kernels: a replayed call computes what the first did."""
import dataclasses

import pytest
import torch

from lora_kernels import AdapterIndex
from lora_kernels.triton import launch_templates as templates
from lora_kernels.triton import lora_linear as ll
from lora_kernels.triton import lora_linear_backward as lb
from lora_kernels.triton import multi_lora as ml
from lora_kernels.triton.lora_linear import ForwardConfig, ShrinkConfig

from cases import make_multi_inputs
from tolerances import assert_close

KERNELS = {
    ll: ("lora_linear_fwd_kernel", "lora_shrink_kernel", "splitk_reduce_kernel", "split_halves_kernel"),
    lb: ("lora_weight_grads_kernel",),
    ml: ("lora_shrink_kernel", "lora_expand_kernel", "multi_lora_linear_kernel", "multi_lora_linear_chunked_kernel"),
}


class _Logged:
    """Stands in for a kernel: kernel[grid](*args, **kw) appends (name, grid, args, kw) to LOG."""

    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        return lambda *args, **kw: LOG.append((self.name, grid, args, kw))


LOG = []
ZEROED = set()  # ids of the tensors torch.zeros made during the call being described


@pytest.fixture
def stubbed(monkeypatch):
    """Every launcher kernel logged instead of run, torch.zeros' tensors noted (a role says
    whether a new tensor was zeroed); the launch cache (records and templates) empty before and
    after (its entries hold the stubs)."""
    for mod, names in KERNELS.items():
        for name in names:
            monkeypatch.setattr(mod, name, _Logged(f"{mod.__name__.rsplit('.', 1)[1]}.{name}"))
    real_zeros = torch.zeros

    def zeros(*args, **kw):
        out = real_zeros(*args, **kw)
        ZEROED.add(id(out))
        return out
    monkeypatch.setattr(torch, "zeros", zeros)
    ll.clear_launch_cache()
    yield
    ll.clear_launch_cache()


def _roles(inputs, launches, result):
    """The launches and the result with each tensor replaced by its role: ("in", i) for inputs[i],
    ("new", j) for the j-th other tensor seen, with its shape, strides and dtype, and whether
    torch.zeros made it."""
    roles, seen = {}, []
    for i, t in enumerate(inputs):
        if isinstance(t, torch.Tensor):
            roles.setdefault(id(t), ("in", i))

    def role(t):
        if id(t) not in roles:
            roles[id(t)] = ("new", len(seen))
            seen.append(t)  # kept alive: ids stay unique
        return roles[id(t)] + (tuple(t.shape), t.stride(), t.dtype, id(t) in ZEROED)
    described = [(name, grid, tuple(role(a) if isinstance(a, torch.Tensor) else a for a in args), kw)
                 for name, grid, args, kw in launches]
    return described, tuple(None if r is None else role(r) for r in result)


def _three_calls(make, call, template_kind, replayable=True):
    """call(*make()) with templates off, then twice on: (the roles of each call, the number of
    templates of `template_kind` in the launch cache). make() draws fresh tensors."""
    out = []
    for enabled in (False, True, True):
        templates.ENABLED = enabled
        try:
            out.append(_described_call(make, call))
        finally:
            templates.ENABLED = True
    kept = [k for k, v in ll._LAUNCHES.items() if isinstance(v, templates.Template) and k[0] == template_kind]
    assert out[0] == out[1] == out[2]
    assert out[0][0], "the case launches nothing: it checks nothing"
    assert len(kept) == (1 if replayable else 0)


def _rand(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape).to(dtype)


def _neighbours(variants):
    """Calls whose signatures differ in one element each (variants: name -> (make, call)), run
    twice in turns with templates on: each call makes the launches it makes with templates off,
    so no signature element the launcher decides from is missing from its template key."""
    want = {}
    templates.ENABLED = False
    try:
        for name, (make, call) in variants.items():
            want[name] = _described_call(make, call)
    finally:
        templates.ENABLED = True
    for _ in range(2):
        for name, (make, call) in variants.items():
            assert _described_call(make, call) == want[name], name


def _described_call(make, call):
    """_roles of one call(*make()) on fresh tensors: its launches and its result."""
    inputs = make()
    LOG.clear()
    ZEROED.clear()
    result = _as_tuple(call(*inputs))
    return _roles(inputs, list(LOG), result)


def _as_tuple(result):
    return result if isinstance(result, tuple) else (result,)


# ------------------------------------------------------------------------------------------------
# Forward (lora_linear_fwd): every branch of launch_fused
# ------------------------------------------------------------------------------------------------

FWD_CONFIGS = {
    "heuristic": (None, None),
    "fused t": (ForwardConfig(16, 32, 16, 16, 2, 2, 4, 2), None),
    "shrink writes t": (ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, precompute_t=True), ShrinkConfig(16, 16, 16, 4, 2)),
    "t partials read": (ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, precompute_t=True),
                        ShrinkConfig(16, 16, 16, 4, 2, split_k=3)),
    "k split": (ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, split_k=3, precompute_t=True),
                ShrinkConfig(16, 16, 16, 4, 2, split_k=2)),
}


@pytest.mark.parametrize("config", list(FWD_CONFIGS))
@pytest.mark.parametrize("M,r", [(1, 16), (37, 5), (300, 80)])
@pytest.mark.parametrize("adapters", ["bf16", "fp32", "fp32 x"])
@pytest.mark.parametrize("save_t,bias,dropout", [(False, False, False), (True, True, False), (True, False, True)])
def test_forward_replay_launches_as_the_launcher(stubbed, config, M, r, adapters, save_t, bias, dropout):
    cfg, sc = FWD_CONFIGS[config]
    K, N = 48, 40
    x_dtype = torch.float32 if adapters == "fp32 x" else torch.bfloat16
    a_dtype = torch.bfloat16 if adapters == "bf16" else torch.float32
    if cfg is not None:
        cfg = dataclasses.replace(cfg, block_r=ll.block_r_for(r))

    def make():
        return (_rand(M, K, dtype=x_dtype), _rand(N, K, dtype=x_dtype), _rand(r, K, dtype=a_dtype),
                _rand(N, r, dtype=a_dtype), _rand(N, dtype=x_dtype) if bias else None,
                torch.tensor([12345]) if dropout else None)

    def call(x, w, a, b, bias_, seed):
        return ll.lora_linear_fwd(x, w, a, b, 0.5, bias_, save_t, cfg, dropout_p=0.25 if dropout else 0.0, seed=seed,
                                  shrink=sc, want_t=save_t)
    _three_calls(make, call, "fwd template")


def test_forward_signature_neighbours_never_share_a_template(stubbed):
    """Each element of the forward's template key, changed alone: strides of each tensor, the
    adapters' dtype, the scale, dropout's p (its threshold and 1 / (1 - p)), bias, save_t,
    want_t, a config, M, N, K and r."""
    def fwd(M=3, N=24, K=32, r=8, a_dtype=torch.bfloat16, scale=0.5, p=0.0, bias=False, save_t=False, want_t=False,
            cfg=None, x_cols=1, w_t=False):
        def make():
            x = _rand(M, K * x_cols)[:, ::x_cols]
            w = _rand(K, N).t() if w_t else _rand(N, K)
            return (x, w, _rand(r, K, dtype=a_dtype), _rand(N, r, dtype=a_dtype), _rand(N) if bias else None,
                    torch.tensor([7]) if p else None)

        def call(x, w, a, b, bias_, seed):
            return ll.lora_linear_fwd(x, w, a, b, scale, bias_, save_t, cfg, dropout_p=p, seed=seed, want_t=want_t)
        return make, call
    _neighbours({
        "base": fwd(), "x strided": fwd(x_cols=2), "w transposed": fwd(w_t=True), "fp32 adapters": fwd(a_dtype=torch.float32),
        "scale": fwd(scale=0.25), "p 0.1": fwd(p=0.1), "p 0.3": fwd(p=0.3), "bias": fwd(bias=True),
        "save_t": fwd(save_t=True), "want_t": fwd(want_t=True), "M": fwd(M=4), "N": fwd(N=40), "K": fwd(K=48),
        "r": fwd(r=16), "config": fwd(cfg=ForwardConfig(16, 16, 16, 16, 1, 2, 4, 2, precompute_t=True))})


def test_backward_and_multi_signature_neighbours_never_share_a_template(stubbed):
    """The same for the backward (strides of dy and t, u given, the flags, scale, p) and for the
    multi-adapter launchers (the index's capacity and slots, scales / ranks given, the offset)."""
    def bwd(M=3, p=0.0, scale=0.5, needs=(True, True, True), bias=None, dy_cols=1, u=False):
        def make():
            return (_rand(M, 24 * dy_cols)[:, ::dy_cols], _rand(M, 32), _rand(24, 32), _rand(8, 32), _rand(24, 8),
                    torch.randn(M, 8), torch.tensor([5]) if p else None, torch.randn(M, 8) if u else None)

        def call(dy, x, w, a, b, t, seed, u_):
            return lb.lora_linear_bwd(dy, x, w, a, b, t, scale, p, seed, bias, *needs, u=u_)
        return make, call
    _neighbours({"base": bwd(), "M": bwd(M=5), "p": bwd(p=0.2), "p'": bwd(p=0.4), "scale": bwd(scale=2.0),
                 "no dx": bwd(needs=(False, True, True)), "u given": bwd(needs=(False, True, False), u=True),
                 "bias": bwd(bias=torch.bfloat16), "fp32 bias": bwd(bias=torch.float32), "dy strided": bwd(dy_cols=2)})

    L, R = 3, 16

    chunked = ml.LinearConfig(ForwardConfig(16, 32, 16, R, 1, 1, 4, 1), False, _seg(16, R))

    def multi(kind, spare=False, slots=L, scales=True, ranks=False, offset=0, scale=1.0, config=None):
        index = _index(5, slots, spare)

        def make():
            return (_rand(5, 32), _rand(24, 32), _rand(slots, R, 32), _rand(slots, 24, R),
                    torch.rand(slots) if scales else None,
                    torch.full((slots,), 4, dtype=torch.int32) if ranks else None, torch.randn(5, R), _rand(5, 30))

        def call(x, w, a, b, scales_, ranks_, t, y):
            if kind == "linear":
                return ml.multi_lora_linear(x, w, a, b, index, scales_, None, ranks_, config, scale=scale)
            if kind == "shrink":
                return ml.shrink_slices(x, [a], index, scales_, scale, ranks_, torch.empty(5, R))
            return ml.expand_slices_(y, t, [b], index, ranks_, offset)
        return make, call
    _neighbours({f"{kind} {name}": multi(kind, **kw) for kind in ("linear", "shrink", "expand")
                 for name, kw in {"base": {}, "spare": {"spare": True}, "slots": {"slots": 4},
                                  "no scales": {"scales": False}, "ranks": {"ranks": True},
                                  "offset": {"offset": 6}, "scale": {"scale": 0.5}}.items()}
                | {"linear chunked": multi("linear", config=chunked),
                   "linear chunked spare": multi("linear", config=chunked, spare=True)})


def test_forward_paths_that_cannot_replay_keep_no_template(stubbed, monkeypatch):
    """fp32 x on a GPU reads its precision per call (a global flag): never a template. Neither is
    a call given its outputs (tests' poisoned buffers) or an empty one that zeroes t."""
    x, w = _rand(3, 32, dtype=torch.float32), _rand(24, 32, dtype=torch.float32)
    a, b = _rand(8, 32, dtype=torch.float32), _rand(24, 8, dtype=torch.float32)
    per_call = ll.base_precision_per_call
    monkeypatch.setattr(ll, "base_precision_per_call", lambda dtype, device: True)
    ll.clear_launch_cache()
    ll.lora_linear_fwd(x, w, a, b, 1.0, None, False)
    ll.lora_linear_fwd(x, w, a, b, 1.0, None, False)
    monkeypatch.setattr(ll, "base_precision_per_call", per_call)
    ll.clear_launch_cache()
    ll.lora_linear_fwd(x, w, a, b, 1.0, None, True, out=torch.empty(3, 24), t_out=torch.empty(3, 8))
    ll.lora_linear_fwd(x, w[:0], a, b[:0], 1.0, None, True)  # N = 0: t zeroed
    assert not [k for k in ll._LAUNCHES if k[0] == "fwd template"]


def test_aliased_inputs_and_foreign_tensors_make_no_template(stubbed):
    """One tensor passed as two inputs (a replay could not tell which a kernel took), and a
    result the recording did not allocate, each leave no template; a later call records again."""
    rec = templates.Recording()
    t = torch.empty(2, 2)
    rec.allocs.append((False, t))
    rec.launches.append((_Logged("k"), (1,), (t, t, 3), {}))
    assert rec.template((t, t), (t,)) is None  # aliased inputs
    assert rec.template((None,), (torch.empty(1),)) is None  # a result made elsewhere
    assert rec.template((None,), (t,)) is not None
    rec.launches.append((_Logged("k"), (1,), (t, 3, torch.empty(1)), {}))  # a tensor after a scalar
    assert rec.template((None,), (t,)) is None
    ll.lora_linear_fwd(_rand(16, 16), _rand(16, 16), _rand(4, 16), _rand(16, 4), 1.0, None, False)
    w = _rand(16, 16)
    ll.lora_linear_fwd(w, w, _rand(4, 16), _rand(16, 4), 1.0, None, False)  # x is weight
    kept = [k for k in ll._LAUNCHES if k[0] == "fwd template"]
    assert len(kept) == 1  # the first call's; the aliased call's signature has none


# ------------------------------------------------------------------------------------------------
# Backward (lora_linear_bwd)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("M,r", [(1, 16), (37, 5), (130, 64)])
@pytest.mark.parametrize("x_dtype,a_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("needs", ["all", "x only", "a b bias", "b only", "a with u"])
@pytest.mark.parametrize("dropout", [False, True])
def test_backward_replay_launches_as_the_launcher(stubbed, M, r, x_dtype, a_dtype, needs, dropout):
    K, N = 48, 40
    need_x, need_a, need_b, need_bias, u_given = {
        "all": (True, True, True, True, False), "x only": (True, False, False, False, False),
        "a b bias": (False, True, True, True, False), "b only": (False, False, True, False, False),
        "a with u": (False, True, False, False, True)}[needs]
    grad_cfg = lb.WeightGradConfig(16, 16, ll.block_r_for(r), 1, 4, 2)  # one row split: replayable

    def make():
        return (_rand(M, N, dtype=x_dtype), _rand(M, K, dtype=x_dtype), _rand(N, K, dtype=x_dtype),
                _rand(r, K, dtype=a_dtype), _rand(N, r, dtype=a_dtype), torch.randn(M, r),
                torch.tensor([99]) if dropout else None, torch.randn(M, r) if u_given else None)

    def call(dy, x, w, a, b, t, seed, u):
        return lb.lora_linear_bwd(dy, x, w, a, b, t, 0.5, 0.25 if dropout else 0.0, seed,
                                  x_dtype if need_bias else None, need_x, need_a, need_b, grad_config=grad_cfg, u=u)
    _three_calls(make, call, "bwd template")


@pytest.mark.parametrize("case", ["row splits", "M = 0"])
def test_backward_paths_that_cannot_replay_keep_no_template(stubbed, case):
    """Row-split partials are summed by torch, and an empty batch zeroes its gradients: both are
    torch work a template does not replay, so both always run the launcher's own path."""
    M = 0 if case == "M = 0" else 70
    split = 1 if case == "M = 0" else 3
    grad_cfg = lb.WeightGradConfig(16, 16, 16, split, 4, 2)

    def make():
        return (_rand(M, 40), _rand(M, 48), _rand(40, 48), _rand(8, 48), _rand(40, 8), torch.randn(M, 8), None, None)

    def call(dy, x, w, a, b, t, seed, u):
        LOG.append(("call", None, (), {}))  # an empty batch launches nothing: the check still compares
        return lb.lora_linear_bwd(dy, x, w, a, b, t, 0.5, 0.0, seed, None, False, True, True, grad_config=grad_cfg)
    _three_calls(make, call, "bwd template", replayable=False)


# ------------------------------------------------------------------------------------------------
# Multi-adapter (shrink_slices, expand_slices_, multi_lora_linear)
# ------------------------------------------------------------------------------------------------

def _seg(item_m, r_max):
    return ml.SegmentConfig(item_m, 16, 16 if item_m == 16 else ml.block_r_for(r_max), 32, 4, 1, 64, 4)


def _index(M, L, spare=False):
    """An index of M tokens (some with no adapter); `spare`: with room for 5 more (capacity != M:
    the chunked path zeroes t's rows past the work lists)."""
    ids = torch.randint(-1, L, (M,), generator=torch.Generator().manual_seed(M))
    if not spare:
        return AdapterIndex.from_token_adapters(ids, L)
    return AdapterIndex.with_capacity(M + 5, L).update_(ids)


@pytest.mark.parametrize("M,R", [(1, 16), (37, 40)])
@pytest.mark.parametrize("dtype,adapter_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                                 (torch.float32, torch.float32)])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("vectors", [(False, False, False), (True, True, True)], ids=["plain", "bias scales ranks"])
@pytest.mark.parametrize("spare", [False, True], ids=["index of M", "spare capacity"])
def test_multi_linear_replay_launches_as_the_launcher(stubbed, M, R, dtype, adapter_dtype, fused, vectors, spare):
    K, N, L = 48, 40, 3
    has_bias, has_scales, has_ranks = vectors
    tiles = ForwardConfig(16, 32, 16, ml.block_r_for(R), 1, 1, 4, 1)
    config = ml.LinearConfig(tiles, fused, _seg(16, R))
    index = _index(M, L, spare)

    def make():
        return (_rand(M, K, dtype=dtype), _rand(N, K, dtype=dtype), _rand(L, R, K, dtype=adapter_dtype),
                _rand(L, N, R, dtype=adapter_dtype), torch.rand(L) if has_scales else None,
                _rand(N, dtype=dtype) if has_bias else None,
                torch.tensor([R, 1, R // 2], dtype=torch.int32) if has_ranks else None)

    def call(x, w, a, b, scales, bias, ranks):
        return ml.multi_lora_linear(x, w, a, b, index, scales, bias, ranks, config, scale=0.5)
    _three_calls(make, call, "linear template")


@pytest.mark.parametrize("stacks", [1, 3, 5], ids=["one stack", "three slices", "five slices: two launches"])
@pytest.mark.parametrize("M,R", [(1, 16), (37, 40)])
@pytest.mark.parametrize("item_m", [16, 64])
def test_shrink_and_expand_replay_launches_as_the_launcher(stubbed, stacks, M, R, item_m):
    K, N, L = 48, 24, 3
    index = _index(M, L)
    cfg = _seg(item_m, R)
    split_view = stacks > ml.MAX_SLICES  # the second launch takes a view of t: no template

    def make_shrink():
        return (_rand(M, K), torch.rand(L), *[_rand(L, R, K) for _ in range(stacks)],
                torch.empty(M, R) if stacks == 1 else torch.empty(stacks, M, R))

    def shrink(x, scales, *rest):
        *a_stacks, out = rest
        return ml.shrink_slices(x, list(a_stacks), index, scales, 1.0, None, out, cfg)
    _three_calls(make_shrink, shrink, "shrink template", replayable=not split_view)

    def make_expand():
        return (_rand(M, N * stacks + 3), torch.randn(M, R) if stacks == 1 else torch.randn(stacks, M, R),
                torch.tensor([R, 2, 0], dtype=torch.int32), *[_rand(L, N, R) for _ in range(stacks)])

    def expand(y, t, ranks, *b_stacks):
        return ml.expand_slices_(y, t, list(b_stacks), index, ranks, 3, cfg)
    _three_calls(make_expand, expand, "expand template", replayable=not split_view)


# ------------------------------------------------------------------------------------------------
# Interpreter: a replayed call computes what the launcher computes
# ------------------------------------------------------------------------------------------------

def test_replayed_forward_and_backward_compute_the_same(interpreter_device):
    """Two calls of one signature on different values: the second replays (its template is in the
    launch cache) and both match the float64 reference; a third call with the first call's
    values gives the first call's bits."""
    ll.clear_launch_cache()
    M, K, N, r = 5, 32, 24, 8
    gen = torch.Generator().manual_seed(1)

    def values():
        return [torch.randn(*s, generator=gen) for s in ((M, K), (N, K), (r, K), (N, r), (M, N))]
    runs = []
    for vals in (values(), values()):
        x, w, a, b, dy = vals
        y, t = ll.lora_linear_fwd(x, w, a, b, 0.5, None, True)
        assert_close(y, x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double().T,
                     torch.float32, what="y")
        dx, da, db, _ = lb.lora_linear_bwd(dy, x, w, a, b, t, 0.5, 0.0, None, None, True, True, True)
        u = dy.double() @ b.double()
        assert_close(dx, dy.double() @ w.double() + 0.5 * u @ a.double(), torch.float32, what="dx")
        assert_close(da, 0.5 * u.T @ x.double(), torch.float32, what="dA")
        assert_close(db, 0.5 * dy.double().T @ (x.double() @ a.double().T), torch.float32, what="dB")
        runs.append((vals, y, dx, da, db))
    kinds = {k[0] for k, v in ll._LAUNCHES.items() if isinstance(v, templates.Template)}
    assert {"fwd template", "bwd template"} <= kinds
    (x, w, a, b, dy), y0, dx0, da0, db0 = runs[0]
    y, t = ll.lora_linear_fwd(x, w, a, b, 0.5, None, True)
    grads = lb.lora_linear_bwd(dy, x, w, a, b, t, 0.5, 0.0, None, None, True, True, True)
    for got, want in zip((y, *grads[:3]), (y0, dx0, da0, db0)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("fused", [True, False])
def test_replayed_multi_adapter_calls_compute_the_same(interpreter_device, fused):
    """multi_lora_linear, then lora_shrink + lora_expand_ through the public ops, twice per
    signature on different values (the second call replays): each matches the float64 reference."""
    import lora_kernels
    from lora_kernels import reference
    ll.clear_launch_cache()
    tiles = ForwardConfig(16, 32, 16, 16, 1, 1, 4, 1)
    config = ml.LinearConfig(tiles, fused, _seg(16, 16))
    for seed in (1, 2):
        inp = make_multi_inputs(9, 24, 32, 3, 16, torch.float32, ranks="mixed", seed=seed)
        index = inp.index()
        y = ml.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias, inp.ranks,
                                 config)
        want = reference.multi_lora_linear(*(v.double() if isinstance(v, torch.Tensor) and v.is_floating_point()
                                             else v for v in (inp.x, inp.weight, inp.lora_a, inp.lora_b)),
                                           index.token_adapter, inp.scales.double(), inp.bias.double(), inp.ranks)
        assert_close(y, want, torch.float32, what="multi_lora_linear")
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend="triton")
        y0 = torch.randn(9, 24)
        y1 = lora_kernels.lora_expand_(y0.clone(), t, inp.lora_b, index, inp.ranks, backend="triton")
        t64 = reference.lora_shrink(inp.x.double(), inp.lora_a.double(), index.token_adapter, inp.scales.double(),
                                    inp.ranks)
        assert_close(t, t64, torch.float32, what="t")
        assert_close(y1, reference.lora_expand_(y0.double(), t64, inp.lora_b.double(), index.token_adapter,
                                                inp.ranks), torch.float32, what="expand")
    kinds = {k[0] for k, v in ll._LAUNCHES.items() if isinstance(v, templates.Template)}
    assert {"linear template", "shrink template", "expand template"} <= kinds


def test_templates_off_change_nothing(stubbed):
    """ENABLED False (bench A/B timing, the tests' direct path): no template is recorded."""
    templates.ENABLED = False
    try:
        ll.lora_linear_fwd(_rand(1, 16), _rand(16, 16), _rand(4, 16), _rand(16, 4), 1.0, None, False)
    finally:
        templates.ENABLED = True
    assert not [k for k, v in ll._LAUNCHES.items() if isinstance(v, templates.Template)]
    assert LOG  # it launched
