"""Serving features of the multi-adapter ops (issue 12), CPU lane: several output slices per
launch, scales as a tensor / float / None, lora_shrink(out=), lora_expand_(offset=), ranks up to
512, the persistent AdapterIndex (with_capacity / update_ / padded_to) and torch.compile over
several M with one index; issue 11's multi-adapter hardening (aliasing, inference tensors, K = 0).

Oracles are float64 per-token loops written from the definitions (not the package's reference
module). Stacks are NaN past each rank, outputs are poisoned, -1 tokens and rank-0 slots occur."""
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

import lora_kernels
from lora_kernels import AdapterIndex, MultiLoRALinear
from conftest import INTERPRETER
from tolerances import assert_close, rand

GQA = [32, 8, 8]  # q, k, v widths of a tiny GQA layer (k/v 4x narrower)


def _backends():
    return ["torch", "triton"]


def make_slices(M, K, widths, L, R, dtype, ranks, seed=0, dist_none=True):
    """x, A stacks, B stacks (NaN past each rank), ranks, token ids (some -1), scales."""
    g = torch.Generator().manual_seed(seed)
    x = rand(M, K, dtype=dtype)
    ranks_t = None if ranks is None else torch.tensor(ranks, dtype=torch.int32)
    a, b = [], []
    for n in widths:
        ai = rand(L, R, K, dtype=dtype, scale=K ** -0.5)
        bi = rand(L, n, R, dtype=dtype, scale=R ** -0.5)
        if ranks_t is not None:
            keep = torch.arange(R)[None, :] < ranks_t[:, None]
            ai.masked_fill_(~keep[:, :, None], float("nan"))
            bi.masked_fill_(~keep[:, None, :], float("nan"))
        a.append(ai)
        b.append(bi)
    ids = torch.randint(-1 if dist_none else 0, L, (M,), generator=g, dtype=torch.int32)
    scales = torch.rand(L, generator=g) + 0.5
    return x, a, b, ranks_t, ids, scales


def shrink64(x, a_stacks, ids, scale_of, ranks):
    M, R = x.shape[0], a_stacks[0].shape[1]
    t = torch.zeros(len(a_stacks), M, R, dtype=torch.float64)
    for m, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        r = R if ranks is None else int(ranks[i])
        for s, a in enumerate(a_stacks):
            t[s, m, :r] = scale_of(i) * (a[i, :r].double() @ x[m].double())
    return t


def expand64(y0, t, b_stacks, ids, ranks, offset):
    y = y0.double().clone()
    R = t.shape[-1]
    for m, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        r = R if ranks is None else int(ranks[i])
        col = offset
        for s, b in enumerate(b_stacks):
            y[m, col:col + b.shape[1]] += b[i, :, :r].double() @ t[s, m, :r].double()
            col += b.shape[1]
    return y


def _scale_of(scales):
    if scales is None:
        return lambda i: 1.0
    if isinstance(scales, float):
        return lambda i: scales
    return lambda i: float(scales[i])


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("widths", [[24], [16, 16], GQA, [8, 24, 8, 16]], ids=["S1", "S2-gate-up", "S3-qkv", "S4"])
@pytest.mark.parametrize("scales_kind", ["tensor", "float", "none"])
def test_slices_shrink_expand_match_float64(backend, widths, scales_kind, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    M, K, L, R = 21, 24, 4, 16
    x, a, b, ranks, ids, scales_t = make_slices(M, K, widths, L, R, torch.float32, [16, 5, 0, 9], seed=len(widths))
    scales = {"tensor": scales_t, "float": 0.75, "none": None}[scales_kind]
    t = lora_kernels.lora_shrink(x, a, AdapterIndex.from_token_adapters(ids, L), scales, ranks, backend=backend)
    assert t.shape == (len(widths), M, R) and t.dtype == torch.float32
    assert_close(t, shrink64(x, a, ids, _scale_of(scales), ranks), torch.float32, what="t")
    offset = 3
    y0 = rand(M, offset + sum(widths) + 2)
    y = y0.clone()
    out = lora_kernels.lora_expand_(y, t, b, AdapterIndex.from_token_adapters(ids, L), ranks, offset, backend=backend)
    assert out is y
    assert_close(y, expand64(y0, t, b, ids, ranks, offset), torch.float32, what="y")
    # untouched: rows with no adapter or rank 0, columns outside the slices (bitwise)
    untouched = (ids < 0) | (ranks[ids.clamp(min=0).long()] == 0)
    assert torch.equal(y[untouched], y0[untouched])
    assert torch.equal(y[:, :offset], y0[:, :offset]) and torch.equal(y[:, -2:], y0[:, -2:])


# bf16 is not in the list: the Triton interpreter gives garbage for bf16 loads (already so for
# the single-stack kernels before slices existed; the CPU lane's Triton tests use fp32/fp16); the
# GPU lane covers bf16 (tests/test_gpu_serving.py).
@pytest.mark.parametrize("dtype", [torch.float16])
def test_slices_16bit_triton(dtype, interpreter_device):
    M, K, L, R = 19, 32, 3, 16
    x, a, b, ranks, ids, scales = make_slices(M, K, GQA, L, R, dtype, [16, 1, 7], seed=4)
    index = AdapterIndex.from_token_adapters(ids, L)
    t = lora_kernels.lora_shrink(x, a, index, scales, ranks, backend="triton")
    assert_close(t, shrink64(x, a, ids, _scale_of(scales), ranks), torch.float32, what="t")
    y0 = rand(M, sum(GQA), dtype=dtype)
    y = lora_kernels.lora_expand_(y0.clone(), t, b, index, ranks, backend="triton")
    assert_close(y, expand64(y0, t, b, ids, ranks, 0), dtype, what="y")


def test_one_launch_for_all_slices(interpreter_device, monkeypatch):
    """Up to four slices run as one shrink launch and one expand launch (grid axis 2); five
    slices take two; stacks with other strides get their own launch (still correct)."""
    from lora_kernels.triton import multi_lora as ml
    launches = {"shrink": 0, "expand": 0}

    class Counted:
        def __init__(self, kernel, name):
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid):
            launches[self.name] += 1
            return self.kernel[grid]
    monkeypatch.setattr(ml, "lora_shrink_kernel", Counted(ml.lora_shrink_kernel, "shrink"))
    monkeypatch.setattr(ml, "lora_expand_kernel", Counted(ml.lora_expand_kernel, "expand"))
    M, K, L, R = 9, 16, 3, 16

    def run(widths, b_transform=lambda i, b: b):
        x, a, b, ranks, ids, scales = make_slices(M, K, widths, L, R, torch.float32, [16, 3, 8])
        b = [b_transform(i, bi) for i, bi in enumerate(b)]
        index = AdapterIndex.from_token_adapters(ids, L)
        launches.update(shrink=0, expand=0)
        t = lora_kernels.lora_shrink(x, a, index, scales, ranks, backend="triton")
        y0 = rand(M, sum(widths))
        y = lora_kernels.lora_expand_(y0.clone(), t, b, index, ranks, backend="triton")
        assert_close(y, expand64(y0, t, b, ids, ranks, 0), torch.float32)
        return dict(launches)

    assert run(GQA) == {"shrink": 1, "expand": 1}
    assert run([8] * 5) == {"shrink": 2, "expand": 2}
    # a B stack whose N stride differs (a column-sliced view) cannot share the launch
    odd = run([8, 8], b_transform=lambda i, bi: torch.cat([bi, bi], 1)[:, ::2] if i == 1 else bi)
    assert odd == {"shrink": 1, "expand": 2}


@pytest.mark.parametrize("backend", _backends())
def test_shrink_out_buffer_and_strided_views(backend, request):
    """out= receives t (any strides: a slice of a wider buffer, as a TP all-gather layout needs)."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    M, K, L, R = 13, 16, 3, 16
    x, a, b, ranks, ids, scales = make_slices(M, K, [8, 8], L, R, torch.float32, [16, 0, 4])
    index = AdapterIndex.from_token_adapters(ids, L)
    wide = torch.full((2, M, 2 * R), float("nan"))
    out = wide[:, :, R:]
    got = lora_kernels.lora_shrink(x, a, index, scales, ranks, out=out, backend=backend)
    assert got is out
    assert_close(out, shrink64(x, a, ids, _scale_of(scales), ranks), torch.float32)
    assert torch.isnan(wide[:, :, :R]).all(), "out= wrote outside its view"
    single = torch.full((M, R), float("nan"))
    assert lora_kernels.lora_shrink(x, a[0], index, scales, ranks, out=single, backend=backend) is single
    assert_close(single, shrink64(x, a[:1], ids, _scale_of(scales), ranks)[0], torch.float32)


@pytest.mark.parametrize("backend", _backends())
def test_tensor_parallel_shards(backend, request):
    """Row-parallel: A sliced along K on two 'ranks', partial t summed (the all-reduce) in a
    caller buffer, expand into each rank's output slice at offset = tp_rank * shard; column-
    parallel: B sliced along N, each rank expands its slices. Both equal the unsharded result."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    M, K, L, R = 11, 32, 3, 16
    x, a, b, ranks, ids, scales = make_slices(M, K, GQA, L, R, torch.float32, [16, 2, 9], seed=5)
    index = AdapterIndex.from_token_adapters(ids, L)
    t_full = shrink64(x, a, ids, _scale_of(scales), ranks)
    # row-parallel (A split along K): partial sums into one buffer
    buf = torch.zeros(2, len(a), M, R)
    for rank in range(2):
        ks = slice(rank * K // 2, (rank + 1) * K // 2)
        lora_kernels.lora_shrink(x[:, ks], [ai[:, :, ks].contiguous() for ai in a], index, scales, ranks,
                                 out=buf[rank], backend=backend)
    reduced = buf.sum(0)  # the all-reduce
    assert_close(reduced, t_full, torch.float32, what="all-reduced t")
    # column-parallel (B split along N): each rank owns half of every slice, offset into its output
    y_full = expand64(torch.zeros(M, sum(GQA)), reduced, b, ids, ranks, 0)
    for rank in range(2):
        shards = [bi[:, rank * bi.shape[1] // 2:(rank + 1) * bi.shape[1] // 2] for bi in b]
        local = torch.zeros(M, 5 + sum(s.shape[1] for s in shards))
        lora_kernels.lora_expand_(local, reduced, shards, index, ranks, 5, backend=backend)
        col, cols = 0, []
        for bi in b:
            half = bi.shape[1] // 2
            cols += list(range(col + rank * half, col + (rank + 1) * half))
            col += bi.shape[1]
        assert_close(local[:, 5:], y_full[:, cols], torch.float32, what=f"tp rank {rank}")


@pytest.mark.parametrize("R", [256, 512])
def test_large_ranks_triton(R, interpreter_device):
    """Ranks past 128 (vLLM allows 512): shrink, expand and the fused linear walk the rank in
    128-wide chunks; mixed ranks with NaN past each."""
    M, K, N, L = 17, 16, 24, 3
    x, a, b, ranks, ids, scales = make_slices(M, K, [N], L, R, torch.float32, [R, R // 2 + 3, 0], seed=R)
    index = AdapterIndex.from_token_adapters(ids, L)
    t = lora_kernels.lora_shrink(x, a[0], index, scales, ranks, backend="triton")
    t64 = shrink64(x, a, ids, _scale_of(scales), ranks)
    assert_close(t, t64[0], torch.float32, what="t")
    y0 = rand(M, N)
    y = lora_kernels.lora_expand_(y0.clone(), t, b[0], index, ranks, backend="triton")
    assert_close(y, expand64(y0, t[None], b, ids, ranks, 0), torch.float32, what="y")
    w, bias = rand(N, K, scale=K ** -0.5), rand(N)
    lin = lora_kernels.multi_lora_linear(x, w, a[0], b[0], index, scales, bias, ranks, backend="triton")
    ref = expand64(x.double() @ w.double().t() + bias.double(), t64, b, ids, ranks, 0)
    assert_close(lin, ref, torch.float32, what="multi_lora_linear")


# ---------------------------------------------------------------------------------------------
# The persistent index
# ---------------------------------------------------------------------------------------------

def _same_as_fresh(index: AdapterIndex, ids: torch.Tensor):
    """The capacity index after update_(ids) matches a fresh index on every live position."""
    fresh = AdapterIndex.from_token_adapters(ids, index.num_adapters)
    M = ids.shape[0]
    assert index.num_tokens == M
    assert torch.equal(index.token_adapter, fresh.token_adapter)
    assert torch.equal(index.sorted_tokens[:M], fresh.sorted_tokens)
    assert torch.equal(index.sorted_adapter[:M], fresh.sorted_adapter)
    assert torch.equal(index.slot_start[:-1], fresh.slot_start[:-1]) and int(index.slot_start[-1]) == index.capacity
    assert (index.sorted_adapter[M:] == -1).all()
    assert torch.equal(index.sorted_tokens[M:], torch.arange(M, index.capacity, dtype=torch.int32))
    for T in (16, 64):
        live = index.work(T)[index.work(T)[:, 2] > 0]
        fresh_live = fresh.work(T)[fresh.work(T)[:, 2] > 0]
        assert torch.equal(live, fresh_live)


def test_capacity_index_updates_in_place():
    index = AdapterIndex.with_capacity(64, 5)
    storage = index.data.data_ptr()
    assert index.num_tokens == 0
    for M, seed in ((1, 0), (64, 1), (17, 2), (0, 3), (40, 4)):
        ids = torch.randint(-1, 5, (M,), generator=torch.Generator().manual_seed(seed))
        assert index.update_(ids) is index
        assert index.data.data_ptr() == storage
        _same_as_fresh(index, ids)


@pytest.mark.parametrize("backend", _backends())
def test_ops_take_a_capacity_index_and_padded_views(backend, request):
    """Every op takes the updated index for exactly M rows; a padded_to view takes more rows,
    the rows past M having no adapter (t = 0, y untouched); the fused linear too."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    M, K, L, R, N = 10, 16, 3, 16, 24
    x, a, b, ranks, ids, scales = make_slices(M + 6, K, [N], L, R, torch.float32, [16, 4, 11], seed=9)
    ids[M:] = torch.tensor([0, 1, 2, 0, 1, 2], dtype=torch.int32)  # must be ignored: padding rows
    index = AdapterIndex.with_capacity(32, L).update_(ids[:M])
    padded = index.padded_to(M + 6)
    live = ids.clone()
    live[M:] = -1
    t = lora_kernels.lora_shrink(x[:M], a, index, scales, ranks, backend=backend)
    assert_close(t, shrink64(x[:M], a, ids[:M], _scale_of(scales), ranks), torch.float32)
    out = torch.full((1, M + 6, R), float("nan"))
    lora_kernels.lora_shrink(x, a, padded, scales, ranks, out=out, backend=backend)
    assert_close(out, shrink64(x, a, live, _scale_of(scales), ranks), torch.float32, what="padded t")
    y0 = rand(M + 6, N)
    y = lora_kernels.lora_expand_(y0.clone(), out, b, padded, ranks, backend=backend)
    assert_close(y, expand64(y0, out, b, live, ranks, 0), torch.float32)
    assert torch.equal(y[M:], y0[M:])
    w = rand(N, K, scale=K ** -0.5)
    lin = lora_kernels.multi_lora_linear(x, w, a[0], b[0], padded, scales, None, ranks, backend=backend)
    assert_close(lin, expand64(x.double() @ w.double().t(), shrink64(x, a, live, _scale_of(scales), ranks), b,
                               live, ranks, 0), torch.float32, what="padded linear")


@pytest.mark.parametrize("call,match", [
    (lambda i: i.update_(torch.zeros(33, dtype=torch.int32)), r"AdapterIndex.update_: token_adapter has 33 tokens "
                                                               r"but the index has room for max_tokens = 32"),
    (lambda i: i.update_(torch.tensor([0, 3])), r"AdapterIndex.update_: token_adapter values must lie in \[-1, 2\]"),
    (lambda i: i.update_(torch.tensor([-2])), r"token_adapter values must lie in"),
    (lambda i: i.padded_to(33), r"AdapterIndex.padded_to: num_rows must be in \[num_tokens = 4, capacity = 32\]"),
    (lambda i: i.padded_to(3), r"num_rows must be in"),
    (lambda i: i.padded_to(8).update_(torch.zeros(2, dtype=torch.int32)), "update the index padded_to"),
    (lambda i: lora_kernels.lora_shrink(torch.randn(5, 4), torch.randn(3, 2, 4), i, None),
     r"lora_shrink: index was built for 4 tokens but the input has 5"),
])
def test_capacity_index_rejects(call, match):
    index = AdapterIndex.with_capacity(32, 3).update_(torch.tensor([0, 1, -1, 2]))
    before = index.data.clone()
    with pytest.raises(ValueError, match=match):
        call(index)
    assert torch.equal(index.data, before) and index.num_tokens == 4


@pytest.mark.parametrize("call,exc,match", [
    (lambda: AdapterIndex.with_capacity(0, 3), ValueError, "max_tokens must be >= 1"),
    (lambda: AdapterIndex.with_capacity(2 ** 62, 3), ValueError, r"max_tokens must be at most 2\*\*31 - 2"),
    (lambda: AdapterIndex.with_capacity(8, 2 ** 62), ValueError, r"num_adapters must be at most 2\*\*31 - 2"),
    (lambda: AdapterIndex.with_capacity(8, 2.0), TypeError, "num_adapters must be an int"),
    (lambda: AdapterIndex.from_token_adapters(torch.zeros(2, dtype=torch.int32), 2 ** 62), ValueError,
     r"num_adapters must be at most"),
    (lambda: MultiLoRALinear(nn.Linear(4, 4), 2 ** 62, 2), ValueError, r"max_adapters must be at most 2\*\*31 - 2"),
    (lambda: MultiLoRALinear(nn.Linear(4, 4), 2, 2 ** 62), ValueError, r"max_rank must be at most"),
    (lambda: MultiLoRALinear(nn.Linear(4, 4), 2 ** 30, 2 ** 20), ValueError, "too large for one adapter stack"),
])
def test_sizes_out_of_range(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_update_is_sync_free_and_traceable():
    """update_ is fixed-shape torch work (capacity and L only): it traces with fullgraph=True."""
    index = AdapterIndex.with_capacity(48, 6)

    def step(ids):
        index.update_(ids)
        return index.data.clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    for M in (5, 17, 48):
        ids = torch.randint(-1, 6, (M,), generator=torch.Generator().manual_seed(M))
        got = compiled(ids)
        _same_as_fresh(index, ids)
        assert torch.equal(got, index.data)


@pytest.mark.parametrize("where", ["update outside", "update inside"])
def test_compile_over_several_M_with_one_index(where):
    """torch.compile(fullgraph=True, dynamic=True) over several M with one persistent index: one
    frame compiled, no recompile per M (num_tokens is a tensor shape, so symbolic)."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    L, R, K = 4, 8, 16
    widths = [16, 8, 8]
    x_all, a, b, ranks, ids_all, scales = make_slices(40, K, widths, L, R, torch.float32, [8, 3, 0, 6])
    index = AdapterIndex.with_capacity(64, L)

    def layer(x, ids):
        if where == "update inside":
            index.update_(ids)
        t = lora_kernels.lora_shrink(x, a, index, scales, ranks, backend="torch")
        y = torch.zeros(x.shape[0], sum(widths), dtype=x.dtype)
        return lora_kernels.lora_expand_(y, t, b, index, ranks, backend="torch")
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    for M in (3, 11, 29, 40):
        x, ids = x_all[:M], ids_all[:M]
        if where == "update outside":
            index.update_(ids)
        y = compiled(x, ids)
        t64 = shrink64(x, a, ids, _scale_of(scales), ranks)
        assert_close(y, expand64(torch.zeros(M, sum(widths)), t64, b, ids, ranks, 0), torch.float32)
    assert counter.frame_count == 1


# ---------------------------------------------------------------------------------------------
# Issue 11 (multi-adapter): aliasing, inference tensors, K = 0, load_adapter
# ---------------------------------------------------------------------------------------------

def _expand_args(**changes):
    M, L, R, N = 6, 3, 4, 8
    g = torch.Generator().manual_seed(1)
    args = dict(y=torch.randn(M, N, generator=g), t=torch.randn(M, R, generator=g),
                b=torch.randn(L, N, R, generator=g), ranks=torch.tensor([4, 2, 1], dtype=torch.int32),
                index=AdapterIndex.from_token_adapters(torch.tensor([0, 1, -1, 2, 0, 1], dtype=torch.int32), L),
                offset=0)
    for k, v in changes.items():
        args[k] = v(args) if callable(v) else v
    return args


EXPAND_BAD = [
    ("y expanded view", dict(y=lambda a: torch.zeros(1, 8).expand(6, 8)), r"y must not overlap itself"),
    ("y stride-0 columns", dict(y=lambda a: torch.zeros(6, 1).expand(6, 8)), r"y must not overlap itself"),
    ("t inside y", dict(y=lambda a: torch.zeros(6, 12), t=lambda a: a["y"][:, :4], b=lambda a: torch.randn(3, 12, 4)),
     r"t shares memory with y, which is updated in place"),
    ("offset past y", dict(offset=1), r"offset \+ the slices' widths"),
    ("offset negative", dict(offset=-1), r"offset must be >= 0"),
    ("offset float", dict(offset=1.0), r"offset must be an int"),
    ("t list for one stack", dict(t=lambda a: a["t"][None]), r"t must be 2-D"),
]


def _b_sharing_y():
    buf = torch.zeros(3 * 8 * 4 + 6 * 8)
    y = buf[:48].view(6, 8)
    b = buf[24:24 + 96].view(3, 8, 4)
    return y, b


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case,changes,match", EXPAND_BAD, ids=[c[0] for c in EXPAND_BAD])
def test_expand_refuses_aliasing_and_bad_offsets(case, changes, match, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    a = _expand_args(**changes)
    y_bits = a["y"].clone()
    exc = TypeError if "float" in case else ValueError
    with pytest.raises(exc, match=match) as info:
        lora_kernels.lora_expand_(a["y"], a["t"], a["b"], a["index"], a["ranks"], a["offset"], backend=backend)
    assert str(info.value).startswith("lora_expand_: ")
    assert torch.equal(a["y"], y_bits)


@pytest.mark.parametrize("backend", _backends())
def test_expand_refuses_a_b_stack_or_ranks_sharing_y(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    a = _expand_args()
    y, b = _b_sharing_y()
    b.copy_(torch.randn(3, 8, 4))
    before = y.clone()
    with pytest.raises(ValueError, match=r"lora_expand_: lora_b_stack\[1\] shares memory with y"):
        lora_kernels.lora_expand_(y[:, :4], torch.stack([a["t"], a["t"]]), [a["b"][:, :2], b[:, :2]],
                                  a["index"], a["ranks"], 0, backend=backend)
    assert torch.equal(y, before)
    ranks_in_y = y.view(torch.int32)[0, :3]
    with pytest.raises(ValueError, match=r"lora_expand_: ranks shares memory with y"):
        lora_kernels.lora_expand_(y, a["t"], a["b"], a["index"], ranks_in_y, backend=backend)
    assert torch.equal(y, before)


def test_shrink_out_refuses_aliasing_and_bad_buffers():
    M, K, L, R = 5, 8, 2, 4
    x, a = torch.randn(M, K), torch.randn(L, R, K)
    index = AdapterIndex.from_token_adapters(torch.tensor([0, 1, -1, 1, 0]), L)
    big = torch.zeros(M * K + M * R)
    x_in = big[:M * K].view(M, K)
    x_in.copy_(x)
    cases = [
        (dict(out=big[M * K - 4:M * K - 4 + M * R].view(M, R)), ValueError, "x shares memory with out"),
        (dict(out=torch.zeros(1, R).expand(M, R)), ValueError, "out must not overlap itself"),
        (dict(out=torch.zeros(M, R + 1)), ValueError, r"out must have shape \[5, 4\]"),
        (dict(out=torch.zeros(M, R, dtype=torch.float16)), TypeError, r"out must have a dtype in \(float32\)"),
        (dict(out=torch.zeros(2, M, R)), ValueError, r"out must have shape \[5, 4\]"),
    ]
    for kw, exc, match in cases:
        before = x_in.clone()
        with pytest.raises(exc, match=match):
            lora_kernels.lora_shrink(x_in, a, index, 0.5, **kw)
        assert torch.equal(x_in, before)
    with pytest.raises(TypeError, match="lora_a_stack must be a torch.Tensor or a non-empty list"):
        lora_kernels.lora_shrink(x, [], index)
    with pytest.raises(ValueError, match=r"lora_a_stack\[1\] must have shape \[2, 4, 8\]"):
        lora_kernels.lora_shrink(x, [a, torch.randn(L, R + 1, K)], index)
    with pytest.raises(TypeError, match=r"lora_a_stack\[1\] must have lora_a_stack\[0\]'s dtype"):
        lora_kernels.lora_shrink(x, [a, a.double()], index)
    with pytest.raises(ValueError, match=r"t must have shape \[2, 5, 4\]"):
        lora_kernels.lora_expand_(torch.zeros(M, 6), torch.zeros(3, M, R), [torch.zeros(L, 3, R)] * 2, index)


@pytest.mark.parametrize("backend", _backends())
def test_inference_mode_tensors(backend, request):
    """Issue 11: int tensors made under torch.inference_mode() (ranks, token ids) and a
    MultiLoRALinear built under it work in every op (the value-check cache cannot read their
    version counter)."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    with torch.inference_mode():
        M, K, L, R, N = 7, 16, 3, 16, 8
        x, a, b, _, _, scales = make_slices(M, K, [N], L, R, torch.float32, None)
        ranks = torch.tensor([16, 3, 0], dtype=torch.int32)
        ids = torch.tensor([0, 1, 2, -1, 0, 1, 1], dtype=torch.int32)
        index = AdapterIndex.from_token_adapters(ids, L)
        for _ in range(2):  # the second call hits the cache entry
            t = lora_kernels.lora_shrink(x, a[0], index, scales, ranks, backend=backend)
            y = lora_kernels.lora_expand_(torch.zeros(M, N), t, b[0], index, ranks, backend=backend)
            lin = lora_kernels.multi_lora_linear(x, torch.zeros(N, K), a[0], b[0], index, scales, None, ranks,
                                                 backend=backend)
        assert_close(lin, y.double(), torch.float32)
        layer = MultiLoRALinear(nn.Linear(K, N), L, R, backend=backend)
        layer.load_adapter(1, torch.randn(4, K), torch.randn(N, 4), 0.5)
        out = layer(x.view(1, M, K), index)
        assert out.shape == (1, M, N)


@pytest.mark.parametrize("backend", _backends())
def test_multi_lora_linear_3d_x_with_k_zero(backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    ids = torch.tensor([0, -1, 1, 1, 0, -1], dtype=torch.int32)
    bias = torch.randn(5)
    y = lora_kernels.multi_lora_linear(torch.randn(2, 3, 0), torch.randn(5, 0), torch.randn(2, 4, 0),
                                       torch.randn(2, 5, 4), AdapterIndex.from_token_adapters(ids, 2),
                                       torch.ones(2), bias, backend=backend)
    assert y.shape == (2, 3, 5)
    assert torch.equal(y, bias.expand(2, 3, 5))


def test_load_adapter_failed_copy_keeps_the_slot():
    """Issue 11: a copy that fails (here a meta tensor) leaves the adapter already in the slot."""
    layer = MultiLoRALinear(nn.Linear(8, 6), 2, 4)
    layer.load_adapter(0, torch.randn(3, 8), torch.randn(6, 3), 0.5)
    before = [t.clone() for t in (layer.lora_a_stack, layer.lora_b_stack, layer.scales, layer.ranks)]
    with pytest.raises(ValueError, match="MultiLoRALinear.load_adapter: lora_a cannot be copied"):
        layer.load_adapter(0, torch.randn(2, 8, device="meta"), torch.randn(6, 2), 1.0)
    with pytest.raises(ValueError, match="MultiLoRALinear.load_adapter: lora_b cannot be copied"):
        layer.load_adapter(0, torch.randn(2, 8), torch.randn(6, 2, device="meta"), 1.0)
    after = (layer.lora_a_stack, layer.lora_b_stack, layer.scales, layer.ranks)
    assert all(torch.equal(b, a) for b, a in zip(before, after))


@given(data=st.data())
@settings(max_examples=25, deadline=None)
def test_slices_property_torch_and_triton(data):
    """Random slice counts (1-5: five takes two launches), widths (incl. 0), ranks (incl. 0 and
    r_max), tokens (incl. M = 0 and all -1), offsets and scales forms, on both CPU-lane backends."""
    S = data.draw(st.integers(1, 5))
    widths = data.draw(st.lists(st.integers(0, 20), min_size=S, max_size=S))
    L = data.draw(st.integers(1, 4))
    R = data.draw(st.sampled_from([1, 5, 16, 17]))
    M = data.draw(st.integers(0, 20))
    K = data.draw(st.integers(1, 24))
    ranks = data.draw(st.one_of(st.none(), st.lists(st.integers(0, R), min_size=L, max_size=L)))
    offset = data.draw(st.integers(0, 3))
    scales_kind = data.draw(st.sampled_from(["tensor", "float", "none"]))
    backend = data.draw(st.sampled_from(["torch", "triton"] if INTERPRETER else ["torch"]))
    x, a, b, ranks_t, ids, scales_t = make_slices(M, K, widths, L, R, torch.float32, ranks, seed=M + K)
    scales = {"tensor": scales_t, "float": 1.5, "none": None}[scales_kind]
    index = AdapterIndex.from_token_adapters(ids, L)
    t = lora_kernels.lora_shrink(x, a, index, scales, ranks_t, backend=backend)
    assert_close(t, shrink64(x, a, ids, _scale_of(scales), ranks_t), torch.float32, what="t")
    y0 = rand(M, offset + sum(widths) + 1)
    y = lora_kernels.lora_expand_(y0.clone(), t, b, index, ranks_t, offset, backend=backend)
    assert_close(y, expand64(y0, t, b, ids, ranks_t, offset), torch.float32, what="y")


@pytest.mark.parametrize("case,changes,match", EXPAND_BAD[:3], ids=[c[0] for c in EXPAND_BAD[:3]])
def test_expand_aliasing_refused_before_any_backend_runs(case, changes, match):
    """The aliasing checks come before the backend choice: backend='cuda' (unavailable on this
    machine's CPU tensors) still reports the aliasing, not the missing backend."""
    a = _expand_args(**changes)
    y_bits = a["y"].clone()
    with pytest.raises(ValueError, match=match):
        lora_kernels.lora_expand_(a["y"], a["t"], a["b"], a["index"], a["ranks"], a["offset"], backend="cuda")
    assert torch.equal(a["y"], y_bits)
