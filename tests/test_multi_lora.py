"""Multi-adapter serving on the CPU lane: AdapterIndex, the reference ops against an independent
per-token float64 loop, the public ops on the torch backend, MultiLoRALinear, opcheck."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, strategies as st

import lora_kernels
from lora_kernels import AdapterIndex, MultiLoRALinear, reference
from lora_kernels.serving import ITEM_SIZES, num_work_items
from bench.suites import token_adapters
from cases import make_multi_inputs
from tolerances import assert_close, rand

DISTS = ["decode", "prefill", "zipf", "one", "none10", "none"]


# ---------------------------------------------------------------------------------------------
# AdapterIndex
# ---------------------------------------------------------------------------------------------

def _check_index(ids: torch.Tensor, L: int):
    index = AdapterIndex.from_token_adapters(ids, L)
    M = ids.shape[0]
    key = torch.where(ids >= 0, ids.long(), L)
    # tokens grouped by slot, no-adapter tokens last, token order kept inside a group
    order = index.sorted_tokens.long()
    assert torch.equal(torch.sort(order).values, torch.arange(M))
    assert torch.equal(order, torch.argsort(key, stable=True))
    assert torch.equal(index.sorted_adapter.long(), torch.where(key[order] < L, key[order], -1))
    assert torch.equal(index.token_adapter.long(), torch.where(key < L, key, -1))
    counts = torch.bincount(key, minlength=L + 1)
    assert torch.equal(index.slot_start.long(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]))
    for T in ITEM_SIZES:
        work = index.work(T).long()
        assert work.shape == (num_work_items(M, L, T), 3)
        real = work[work[:, 2] > 0]
        assert (real[:, 2] <= T).all() and (work[work[:, 2] == 0, 0] == -1).all()
        # the pieces partition the sorted positions, each piece inside its slot's group
        covered = torch.zeros(M, dtype=torch.long)
        for slot, start, length in real.tolist():
            covered[start:start + length] += 1
            assert (index.sorted_adapter[start:start + length] == slot).all()
        assert (covered == 1).all()
        assert len(real) == int(((counts + T - 1) // T).sum())
    return index


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("M,L", [(1, 1), (1, 8), (37, 5), (130, 3), (64, 256), (200, 16)])
def test_index_groups_tokens_and_partitions_work(dist, M, L):
    _check_index(token_adapters(dist, M, L, seed=M + L), L)


def test_index_empty_segments_and_int64_ids():
    ids = torch.tensor([4, 4, 0, -1, 4, 0, 7], dtype=torch.int64)  # slots 1-3, 5, 6 empty
    index = _check_index(ids, 8)
    assert index.slot_start.tolist() == [0, 2, 2, 2, 2, 5, 5, 5, 6, 7]


def test_index_empty_batch():
    index = _check_index(torch.zeros(0, dtype=torch.int32), 4)
    assert index.num_tokens == 0 and index.work(16).shape == (0, 3)


def test_index_views_made_once_follow_update_and_data():
    """The views are cached per index (host time), so they must stay views of data: an update_
    reaches views taken before it, and a replaced data tensor gets fresh views."""
    index = AdapterIndex.with_capacity(40, 6)
    before = (index.sorted_tokens, index.sorted_adapter, index.slot_start, index.work(16), index.work(64))
    ids = token_adapters("zipf", 33, 6, seed=3)
    index.update_(ids)
    fresh = AdapterIndex.with_capacity(40, 6).update_(ids)
    after = (index.sorted_tokens, index.sorted_adapter, index.slot_start, index.work(16), index.work(64))
    for old, new, want in zip(before, after, (fresh.sorted_tokens, fresh.sorted_adapter, fresh.slot_start,
                                              fresh.work(16), fresh.work(64))):
        assert new is old and torch.equal(old, want)
    for item_m in (0, 16, 64):  # the launchers' tuple: the same views, kept with them
        launch = index.launch_views(item_m)
        assert launch is index.launch_views(item_m)
        assert launch[0] is (index.work(item_m) if item_m else None)
        assert all(v is want for v, want in zip(launch[1:], after[:3]))
    index.data = index.data.clone().fill_(-7)
    assert (index.sorted_tokens == -7).all() and index.sorted_tokens is not before[0]
    work, *segments = index.launch_views(16)  # re-made from the new data
    assert all(v is not old and (v == -7).all() for v, old in zip([work, *segments], (before[3], *before[:3])))


def test_index_sizes_depend_only_on_M_and_L():
    a = AdapterIndex.from_token_adapters(token_adapters("decode", 50, 9, 1), 9)
    b = AdapterIndex.from_token_adapters(token_adapters("one", 50, 9, 2), 9)
    assert a.data.shape == b.data.shape and not torch.equal(a.data, b.data)


@pytest.mark.parametrize("bad", [[0, 5], [-2, 0], [7, -9]])
def test_index_rejects_out_of_range_ids(bad):
    with pytest.raises(ValueError, match=r"AdapterIndex.from_token_adapters: token_adapter values must lie in \[-1, 4\]"):
        AdapterIndex.from_token_adapters(torch.tensor(bad), 5)


def test_index_maps_invalid_ids_to_no_adapter_when_not_raised(monkeypatch):
    """On a GPU the report is asynchronous; whatever happens next, no kernel may read a stack at
    an invalid id: the index itself has mapped it to -1 (base only)."""
    import lora_kernels.serving as serving
    monkeypatch.setattr(serving, "check_values", lambda *a, **k: None)
    ids = torch.tensor([3, 9, -5, 1, 2 ** 30], dtype=torch.int64)
    index = AdapterIndex.from_token_adapters(ids, 4)
    assert index.token_adapter.tolist() == [3, -1, -1, 1, -1]
    inp = make_multi_inputs(5, 6, 8, 4, 2)
    inp.token_adapter = index.token_adapter
    t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, backend="torch")
    assert (t[[1, 2, 4]] == 0).all() and (t[[0, 3]] != 0).all()


@pytest.mark.parametrize("bad,exc,match", [
    (torch.zeros(3, 1, dtype=torch.int32), ValueError, "token_adapter must be 1-D"),
    (torch.zeros(3), TypeError, "token_adapter must have a dtype in"),
    ([0, 1], TypeError, "token_adapter must be a torch.Tensor"),
])
def test_index_rejects_bad_token_tensor(bad, exc, match):
    with pytest.raises(exc, match=match):
        AdapterIndex.from_token_adapters(bad, 3)


@pytest.mark.parametrize("L,exc", [(0, ValueError), (2.0, TypeError), (True, TypeError)])
def test_index_rejects_bad_num_adapters(L, exc):
    with pytest.raises(exc, match="num_adapters"):
        AdapterIndex.from_token_adapters(torch.zeros(3, dtype=torch.int32), L)


def test_index_traces_with_no_data_dependent_op():
    """fullgraph=True fails on any graph break, which .item(), nonzero or unique would cause: the
    build is a fixed-shape program, as a CUDA graph needs."""
    def build(ids):
        return AdapterIndex.from_token_adapters(ids, 6).data
    ids = token_adapters("zipf", 40, 6, 3)
    compiled = torch.compile(build, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(ids), build(ids))


# ---------------------------------------------------------------------------------------------
# Reference ops against an independent per-token float64 loop
# ---------------------------------------------------------------------------------------------

def _per_token_loop(inp):
    """y, t in float64 by the definition, one token at a time (slicing to each rank)."""
    x, w, a, b = (v.double() for v in (inp.x, inp.weight, inp.lora_a, inp.lora_b))
    M, R = x.shape[0], a.shape[1]
    y = x @ w.t() + (0 if inp.bias is None else inp.bias.double())
    t = torch.zeros(M, R, dtype=torch.float64)
    for m, i in enumerate(inp.token_adapter.tolist()):
        if i < 0:
            continue
        r = R if inp.ranks is None else int(inp.ranks[i])
        t[m, :r] = float(inp.scales[i]) * (a[i, :r] @ x[m])
        y[m] += b[i, :, :r] @ t[m, :r]
    return y, t


@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("ranks", [None, "mixed"])
def test_reference_matches_per_token_loop(dist, ranks):
    inp = make_multi_inputs(29, 13, 11, 6, 5, torch.float64, dist=dist, ranks=ranks, seed=7)
    y_loop, t_loop = _per_token_loop(inp)
    assert_close(inp.t64(), t_loop, torch.float64, what="t")
    assert_close(inp.linear64(), y_loop, torch.float64, what="y")
    y0 = rand(29, 13, dtype=torch.float64)
    y = reference.lora_expand_(y0.clone(), t_loop, inp.lora_b, inp.token_adapter, inp.ranks)
    assert_close(y, y0 + y_loop - (inp.x @ inp.weight.t() + inp.bias), torch.float64, what="expand")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_in_low_precision_vs_float64(dtype):
    inp = make_multi_inputs(40, 24, 32, 5, 8, dtype, dist="zipf", ranks="mixed")
    y = reference.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.token_adapter, inp.scales,
                                    inp.bias, inp.ranks)
    assert y.dtype == dtype
    assert_close(y, inp.linear64(), dtype, torch_out=inp.linear_torch_expression())


def test_reference_chunks_rows(monkeypatch):
    """The bounded-memory row chunking gives the same answer as one chunk."""
    inp = make_multi_inputs(23, 9, 7, 4, 3, torch.float64, ranks="mixed")
    whole = inp.linear64()
    monkeypatch.setattr(reference, "_GATHER_ELEMENTS", 30)
    assert torch.equal(inp.linear64(), whole)


# ---------------------------------------------------------------------------------------------
# Public ops (torch backend here; the Triton backend in test_triton_multi_lora.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_public_ops_torch_backend(dtype):
    inp = make_multi_inputs(30, 20, 16, 4, 6, dtype, dist="none10", ranks="mixed")
    index = inp.index()
    t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend="torch")
    assert t.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(t, inp.t64(), torch.float32 if dtype != torch.float64 else dtype, what="t")
    y0 = rand(30, 20, dtype=dtype)
    y = y0.clone()
    assert lora_kernels.lora_expand_(y, t, inp.lora_b, index, inp.ranks, backend="torch") is y
    none = inp.token_adapter < 0
    assert torch.equal(y[none], y0[none])
    x3 = inp.x.reshape(2, 15, 16)
    y3 = lora_kernels.multi_lora_linear(x3, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias,
                                        inp.ranks, backend="torch")
    assert y3.shape == (2, 15, 20) and y3.dtype == dtype
    assert_close(y3.reshape(30, 20), inp.linear64(), dtype)


def test_auto_is_torch_on_cpu_and_inference_only():
    inp = make_multi_inputs(6, 5, 4, 2, 2)
    from lora_kernels.ops.multi_lora import choose_backend
    assert choose_backend("multi_lora_linear", torch.device("cpu"), torch.float32, 2) == "torch"
    x = inp.x.clone().requires_grad_(True)
    y = lora_kernels.multi_lora_linear(x, inp.weight, inp.lora_a, inp.lora_b, inp.index(), inp.scales, inp.bias)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        y.sum().backward()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_opcheck(backend, interpreter_device):
    inp = make_multi_inputs(18, 10, 12, 3, 4, ranks=[4, 1, 0], dist="none10", poison_padding=False)
    index, L = inp.index(), 3
    t = reference.lora_shrink(inp.x, inp.lora_a, inp.token_adapter, inp.scales, inp.ranks).float()
    C = index.capacity
    for ranks, scales in ((None, None), (inp.ranks, inp.scales)):
        torch.library.opcheck(torch.ops.lora_kernels.lora_shrink.default,
                              (inp.x, [inp.lora_a, inp.lora_a.flip(0)], scales, 0.5, ranks, index.data, L, C, False,
                               backend, torch.empty(2, 18, 4)))
        torch.library.opcheck(torch.ops.lora_kernels.lora_expand.default,
                              (rand(18, 13), torch.stack([t, t.flip(0)]), [inp.lora_b, inp.lora_b[:, :2]], ranks,
                               index.data, L, C, 1, backend))
        torch.library.opcheck(torch.ops.lora_kernels.multi_lora_linear.default,
                              (inp.x, inp.weight, inp.lora_a, inp.lora_b, scales, 0.5, inp.bias, ranks, index.data,
                               L, C, backend))


# ---------------------------------------------------------------------------------------------
# MultiLoRALinear
# ---------------------------------------------------------------------------------------------

def test_multi_lora_linear_module_load_unload_and_forward():
    base = nn.Linear(16, 12)
    layer = MultiLoRALinear(base, max_adapters=4, max_rank=8)
    assert not base.weight.requires_grad and layer.base_layer is base
    adapters = {0: (rand(8, 16, scale=0.25), rand(12, 8), 0.5), 2: (rand(3, 16, scale=0.25), rand(12, 3), 2.0)}
    for slot, (a, b, s) in adapters.items():
        layer.load_adapter(slot, a, b, s)
    assert layer.ranks.tolist() == [8, 0, 3, 0]
    ids = torch.tensor([0, 2, -1, 1, 2, 0, 3], dtype=torch.int32)  # slots 1 and 3 are empty
    x = rand(7, 16)
    y = layer(x, AdapterIndex.from_token_adapters(ids, 4))
    expected = base(x).detach().double()
    for m, i in enumerate(ids.tolist()):
        if i in adapters:
            a, b, s = adapters[i]
            expected[m] += s * (b.double() @ (a.double() @ x[m].double()))
    assert_close(y, expected, torch.float32)
    layer.unload_adapter(2)
    y2 = layer(x, AdapterIndex.from_token_adapters(ids, 4))
    assert_close(y2[1], base(x[1]).detach().double(), torch.float32, what="unloaded slot: base only")
    assert torch.equal(y2[0], y[0])


def test_multi_lora_linear_module_matches_peft_mixed_batch():
    """PEFT's mixed-batch forward (adapter_names per sample) gives what MultiLoRALinear gives."""
    peft = pytest.importorskip("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(20, 14)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]),
                                adapter_name="first", autocast_adapter_dtype=False)
    model.add_adapter("second", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["proj"]))
    proj = model.base_model.model.proj
    with torch.no_grad():
        for name in ("first", "second"):
            proj.lora_B[name].weight.normal_()
    layer = MultiLoRALinear(proj.base_layer, max_adapters=3, max_rank=4)
    for slot, name in ((1, "first"), (2, "second")):
        layer.load_adapter(slot, proj.lora_A[name].weight, proj.lora_B[name].weight, proj.scaling[name])
    x = rand(4, 3, 20)
    names = ["first", "__base__", "second", "first"]
    model.eval()
    with torch.no_grad():
        expected = model(x, adapter_names=names)
    slot_of = {"first": 1, "second": 2, "__base__": -1}
    ids = torch.tensor([slot_of[n] for n in names for _ in range(3)], dtype=torch.int32)
    y = layer(x, AdapterIndex.from_token_adapters(ids, 3))
    assert_close(y, expected.double(), torch.float32)


@pytest.mark.parametrize("call,exc,match", [
    (lambda l: l.load_adapter(4, torch.randn(2, 16), torch.randn(12, 2), 1.0), ValueError, r"slot must be in \[0, 3\]"),
    (lambda l: l.load_adapter(True, torch.randn(2, 16), torch.randn(12, 2), 1.0), TypeError, "slot must be an int"),
    (lambda l: l.load_adapter(0, torch.randn(9, 16), torch.randn(12, 9), 1.0), ValueError, "1 to max_rank = 8 rows"),
    (lambda l: l.load_adapter(0, torch.randn(2, 15), torch.randn(12, 2), 1.0), ValueError, r"lora_a must have shape \[2, 16\]"),
    (lambda l: l.load_adapter(0, torch.randn(2, 16), torch.randn(12, 3), 1.0), ValueError, r"lora_b must have shape \[12, 2\]"),
    (lambda l: l.load_adapter(0, torch.randn(2, 16), torch.randn(12, 2), float("inf")), ValueError, "scale must be finite"),
    (lambda l: l.unload_adapter(-1), ValueError, "slot must be in"),
])
def test_multi_lora_linear_module_rejects(call, exc, match):
    layer = MultiLoRALinear(nn.Linear(16, 12), max_adapters=4, max_rank=8)
    before = [t.clone() for t in (layer.lora_a_stack, layer.lora_b_stack, layer.scales, layer.ranks)]
    with pytest.raises(exc, match=match) as info:
        call(layer)
    assert str(info.value).startswith("MultiLoRALinear.")
    after = (layer.lora_a_stack, layer.lora_b_stack, layer.scales, layer.ranks)
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_multi_lora_linear_module_rejects_bad_construction():
    with pytest.raises(TypeError, match="base must be an nn.Linear"):
        MultiLoRALinear(nn.Conv1d(2, 2, 1), 2, 2)
    with pytest.raises(ValueError, match="max_rank must be >= 1"):
        MultiLoRALinear(nn.Linear(2, 2), 2, 0)


@given(ids=st.lists(st.integers(-1, 11), min_size=0, max_size=150), L=st.integers(1, 12),
       wide=st.booleans())
def test_index_hypothesis(ids, L, wide):
    """Any mapping (-1 and every slot below L, any order, empty batch): the index's invariants."""
    dtype = torch.int64 if wide else torch.int32
    _check_index(torch.tensor([i if i < L else -1 for i in ids], dtype=dtype), L)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_eager_direct_calls_match_the_registered_ops(backend, interpreter_device, monkeypatch):
    """Eager calls skip the dispatcher (host overhead at decode): the same bits as through the
    registered ops, on a padded index too, and the written tensor's version counter moves as the
    op's ADInplaceOrView kernel moves it (Triton writes through pointers: only the bump shows it)."""
    from lora_kernels.ops import multi_lora as ops
    inp = make_multi_inputs(5, 12, 16, 3, 4, ranks="mixed")
    index = lora_kernels.AdapterIndex.with_capacity(8, 3)
    index.update_(inp.token_adapter)
    x = torch.cat([inp.x, rand(2, 16)])  # 7 rows: 5 live, 2 padding
    padded = index.padded_to(7)
    y0 = rand(7, 12)

    def run():
        out = torch.full((7, 4), float("nan"))
        v0 = out._version
        t = lora_kernels.lora_shrink(x, inp.lora_a, padded, inp.scales, inp.ranks, out=out, backend=backend)
        assert t is out and out._version > v0
        y = y0.clone()
        v0 = y._version
        lora_kernels.lora_expand_(y, t, inp.lora_b, padded, inp.ranks, backend=backend)
        assert y._version > v0
        z = lora_kernels.multi_lora_linear(x, inp.weight, inp.lora_a, inp.lora_b, padded, inp.scales, inp.bias,
                                           inp.ranks, backend=backend)
        return t, y, z
    with torch.no_grad():
        common = run()  # the one-pass paths of the common call (_shrink_common, _expand_common)
        monkeypatch.setattr(ops, "_FAST_COMMON", False)
        direct = run()
        calls = []
        monkeypatch.setattr(ops, "_eager_direct", lambda *t: calls.append(1) and False)
        through_op = run()
    assert len(calls) == 3
    for a, b, c in zip(common, direct, through_op):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_eager_direct_only_without_autograd_or_modes():
    """An input that requires grad (grad enabled), a dispatch mode or a profiler keeps the op."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from lora_kernels.ops import multi_lora as ops
    inp = make_multi_inputs(3, 5, 4, 2, 2)
    a = inp.lora_a.clone().requires_grad_(True)
    assert ops._eager_direct(inp.x, inp.lora_a) and not ops._eager_direct(inp.x, a)
    with torch.no_grad():
        assert ops._eager_direct(inp.x, a)
    assert not ops._eager_direct(inp.x, inp.x.to("meta"))

    class Seen(TorchDispatchMode):
        names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))
    with Seen():
        assert not ops._eager_direct(inp.x)
        lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.index(), inp.scales)
    assert any("lora_kernels.multi_lora_linear" in n for n in Seen.names)
    with torch.profiler.profile() as prof:
        lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.index(), inp.scales)
    assert any(e.name == "lora_kernels::multi_lora_linear" for e in prof.events())


def test_eager_direct_calls_bump_what_they_write(monkeypatch):
    """A kernel that writes through pointers (Triton, CUDA on a GPU) moves no version counter; the
    eager direct path moves out's / y's itself, as the op's ADInplaceOrView kernel does."""
    from lora_kernels.ops import multi_lora as ops
    monkeypatch.setattr(ops, "_shrink", lambda *args: None)  # stands in for a pointer-writing kernel
    monkeypatch.setattr(ops, "_expand", lambda *args: None)
    inp = make_multi_inputs(3, 5, 4, 2, 2)
    out, y = torch.zeros(3, 2), torch.zeros(3, 5)
    with torch.no_grad():
        v_out, v_y = out._version, y._version
        lora_kernels.lora_shrink(inp.x, inp.lora_a, inp.index(), inp.scales, out=out)
        lora_kernels.lora_expand_(y, out, inp.lora_b, inp.index())
    assert out._version > v_out and y._version > v_y


def test_backend_cache_follows_the_environment(monkeypatch, interpreter_device):
    """The multi-adapter ops' memoised backend choice is re-derived when LORA_KERNELS_BACKEND changes."""
    from lora_kernels.ops.multi_lora import choose_backend
    monkeypatch.delenv("LORA_KERNELS_BACKEND", raising=False)
    cpu = torch.device("cpu")
    assert choose_backend("lora_shrink", cpu, torch.float32, 8) == "torch"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "triton")
    assert choose_backend("lora_shrink", cpu, torch.float32, 8) == "triton"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="LORA_KERNELS_BACKEND"):
        choose_backend("lora_shrink", cpu, torch.float32, 8)
    monkeypatch.delenv("LORA_KERNELS_BACKEND")
    assert choose_backend("lora_shrink", cpu, torch.float32, 8) == "torch"


def test_reference_shrink_into_out_is_the_allocating_shrink():
    """reference.lora_shrink(..., out=) (what the torch backend's eager shrink runs) writes every
    element of a poisoned out, strided or not, with the bits of the allocating call."""
    from lora_kernels import reference
    inp = make_multi_inputs(7, 12, 16, 3, 4, ranks="mixed")
    ids = torch.tensor([0, -1, 2, 1, 1, -1, 2])
    for out in (torch.full((7, 4), float("nan")), torch.full((4, 7), float("nan")).t()):
        want = reference.lora_shrink(inp.x, inp.lora_a, ids, inp.scales, inp.ranks)
        got = reference.lora_shrink(inp.x, inp.lora_a, ids, inp.scales, inp.ranks, out=out)
        assert got is out and torch.equal(out, want)
