"""GPU lane (`pytest -m gpu`): the CUDA C++ in-place merge on the card -- against float64, against
the Triton kernel and reference.py bit for bit where they must agree, and exact cycles.

Where backends must agree bitwise: when delta is exact in fp32 (make_exact_merge_inputs), every
backend forms the same delta, so the merged weight, the exact codes, the escape count and the
escape table (as a set: slot order may differ) are identical across CUDA, Triton and reference.py.
With arbitrary adapters the fp32 sums differ in their last bits between tensor-core codes (Triton's
tl.dot, CUDA's mma.sync, in different orders), so there each backend is checked against float64
(rounded once, up to the fp32 error of delta), and an exact merge is unmerged by its own backend.

The extension must be there (bench/device_check.sh builds it with `pip install -e .`); if it is
not, these tests fail with the reason instead of skipping, since this lane exists to run them.
"""
import math

import pytest
import torch

import lora_kernels
from lora_kernels import MergeResidual, reference
from cases import MERGE_LAYOUTS, make_exact_merge_inputs, make_merge_inputs
from tolerances import assert_close, assert_rounded_once, rand

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module", autouse=True)
def extension():
    from lora_kernels.cuda import loader as cuda
    from lora_kernels.cuda import merge as cuda_merge
    reason = cuda.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the CUDA extension is not usable on this GPU machine: {reason}")
    cuda.load()
    assert cuda_merge.registered(), "the loaded extension has no cuda_merge_ op (stale build?)"


def _bits(t):
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def _assert_bitwise(out, expected, what):
    diff = _bits(out) != _bits(expected)
    assert not diff.any(), f"{what}: {int(diff.sum())} element(s) differ bitwise"


def _merge(inp, backend, weight=None, **kw):
    w = inp.weight if weight is None else weight
    return lora_kernels.merge_(w, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=inp.fan_in_fan_out,
                               backend=backend, **kw)


def _unmerge(inp, backend="auto", weight=None, **kw):
    w = inp.weight if weight is None else weight
    return lora_kernels.unmerge_(w, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=inp.fan_in_fan_out,
                                 backend=backend, **kw)


def _fresh_weight(inp):
    """A copy of the weight with the same layout (a view of a copy of its storage: a clone of a
    non-dense slice would be contiguous)."""
    return inp.view(inp.storage.clone())


def _check_merged(inp, w0_64, dtype, peft_out=None, what="merged weight"):
    ref = w0_64 + inp.delta64()
    out = inp.logical64()
    assert_close(out, ref, dtype, torch_out=peft_out, what=what)
    assert_rounded_once(out, ref, dtype, inp.lora_a.shape[0], w0_64.abs() + inp.delta_bound64(), what=what)


# ---------------------------------------------------------------------------------------------
# Against float64
# ---------------------------------------------------------------------------------------------

SHAPES = [(4096, 4096, 16), (4096, 4096, 64), (14336, 4096, 16), (1000, 1234, 7), (77, 65, 1),
          (512, 384, 256), (1, 1, 1), (4095, 1001, 33)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("N,K,r", SHAPES)
def test_cuda_merge_matches_float64(dtype, N, K, r):
    inp = make_merge_inputs(N, K, r, dtype, device="cuda")
    w0_64, peft_out = inp.logical64(), inp.peft_expression()
    _merge(inp, "cuda")
    torch.cuda.synchronize()
    _check_merged(inp, w0_64, dtype, peft_out)
    _unmerge(inp, "cuda")
    assert_close(inp.logical64(), w0_64, dtype, what="unmerged weight")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", MERGE_LAYOUTS)
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_cuda_layouts_and_fp32_adapters(dtype, layout, adapter_dtype):
    inp = make_merge_inputs(768, 640, 16, dtype, device="cuda", layout=layout, adapter_dtype=adapter_dtype)
    storage0, w0_64, peft_out = inp.storage.clone(), inp.logical64(), inp.peft_expression()
    _merge(inp, "cuda")
    _check_merged(inp, w0_64, dtype, peft_out)
    outside = inp.outside()
    _assert_bitwise(inp.storage[outside], storage0[outside], "storage outside the weight")


@pytest.mark.parametrize("r", [1, 7, 64, 256])
@pytest.mark.parametrize("adapter_dtype", [torch.bfloat16, torch.float32])
def test_cuda_ranks(r, adapter_dtype):
    inp = make_merge_inputs(1000, 1100, r, torch.bfloat16, device="cuda", adapter_dtype=adapter_dtype)
    w0_64 = inp.logical64()
    _merge(inp, "cuda")
    _check_merged(inp, w0_64, torch.bfloat16)


def test_cuda_misaligned_weight_takes_the_element_path():
    """A weight starting one element into its buffer cannot use 16-byte vectors."""
    storage = rand(300 * 264 + 1, dtype=torch.bfloat16, device="cuda", scale=0.05)
    w = storage[1:].view(300, 264)
    inp = make_merge_inputs(300, 264, 16, torch.bfloat16, device="cuda")
    inp.weight = w
    w0_64, before = inp.logical64(), storage[:1].clone()
    _merge(inp, "cuda")
    _check_merged(inp, w0_64, torch.bfloat16)
    _assert_bitwise(storage[:1], before, "the element before the weight")


def test_cuda_several_adapters_in_one_pass():
    w = rand(2048, 1536, dtype=torch.bfloat16, device="cuda", scale=0.05)
    a_list = [rand(16, 1536, dtype=torch.bfloat16, device="cuda"), rand(8, 1536, device="cuda")]
    b_list = [rand(2048, 16, dtype=torch.bfloat16, device="cuda", scale=0.01), rand(2048, 8, device="cuda", scale=0.01)]
    w0 = w.clone()
    lora_kernels.merge_(w, a_list, b_list, [0.5, -2.0], backend="cuda")
    ref = w0.double() + sum(s * b.double() @ a.double() for a, b, s in zip(a_list, b_list, [0.5, -2.0]))
    assert_close(w, ref, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# CUDA == Triton == reference, bit for bit, where delta is exact
# ---------------------------------------------------------------------------------------------

def _exact_run(inp, backend, capacity):
    w = _fresh_weight(inp)
    codes = torch.full_like(w, 99, dtype=torch.int8)
    index = torch.full((capacity,), -1, dtype=torch.int64, device=w.device)
    value = torch.zeros(capacity, dtype=w.dtype, device=w.device)
    status = torch.zeros(2, dtype=torch.int32, device=w.device)
    kw = dict(fan_in_fan_out=inp.fan_in_fan_out, codes=codes, escape_index=index, escape_value=value, status=status)
    if backend == "torch":
        reference.merge_exact_(w, inp.lora_a, inp.lora_b, inp.scale, **kw)
    elif backend == "triton":
        from lora_kernels.triton import merge as launcher
        launcher.merge_exact_(w, inp.lora_a, inp.lora_b, inp.scale, **kw)
    else:
        from lora_kernels.cuda import merge as launcher
        launcher.merge_exact_(w, inp.lora_a, inp.lora_b, inp.scale, **kw)
    n = int(status[0])
    escapes = sorted(zip(index[:n].tolist(), _bits(value[:n]).tolist()))
    return w, codes, status.tolist(), escapes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fan_in_fan_out", "col_slice", "column_major"])
@pytest.mark.parametrize("r,adapter_dtype", [(16, None), (64, torch.float32), (256, None)])
def test_backends_agree_bitwise_on_an_exact_delta(dtype, layout, r, adapter_dtype):
    if dtype == torch.float32:
        adapter_dtype = torch.float32
    inp = make_exact_merge_inputs(1536, 1000, r, dtype, device="cuda", layout=layout,
                                  adapter_dtype=adapter_dtype, delta_ratio=20.0)
    merged = {}
    for backend in ("torch", "triton", "cuda"):
        w = _fresh_weight(inp)
        _merge(inp, backend, weight=w)
        merged[backend] = w
    _assert_bitwise(merged["cuda"], merged["torch"], "CUDA merge vs reference")
    _assert_bitwise(merged["triton"], merged["torch"], "Triton merge vs reference")
    capacity = inp.weight.numel() // 4
    runs = {b: _exact_run(inp, b, capacity) for b in ("torch", "triton", "cuda")}
    w_ref, codes_ref, status_ref, escapes_ref = runs["torch"]
    assert status_ref[0] > 0, "delta_ratio 20: some elements escape"
    for b in ("triton", "cuda"):
        w, codes, status, escapes = runs[b]
        _assert_bitwise(w, w_ref, f"{b} exact merge W1 vs reference")
        _assert_bitwise(codes, codes_ref, f"{b} codes vs reference")
        assert status == status_ref, b
        assert escapes == escapes_ref, f"{b}: escape table (as a set) differs from the reference's"


# ---------------------------------------------------------------------------------------------
# Safe merge, exact unmerge
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["inf adapter", "overflow"])
@pytest.mark.parametrize("exact", [False, True])
def test_cuda_safe_merge_leaves_weight_untouched(dtype, poison, exact):
    inp = make_merge_inputs(300, 520, 4, dtype, device="cuda", adapter_dtype=torch.float32)
    if poison == "inf adapter":
        inp.lora_b[3, 1] = math.inf
    else:
        inp.lora_b[5] = 1e2 if dtype == torch.float16 else 1e37
        inp.lora_a[:, 4] = 1e4 if dtype == torch.float16 else 1e3
    before = inp.weight.clone()
    residual = MergeResidual() if exact else None
    with pytest.raises(ValueError, match=r"merge_: the merged weight would have \d+ non-finite"):
        _merge(inp, "cuda", safe_merge=True, residual=residual)
    _assert_bitwise(inp.weight, before, "weight after a rejected safe merge")
    plain = inp.weight.clone()
    _merge(inp, "cuda", weight=plain)
    assert not torch.isfinite(plain).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_safe_merge_of_a_good_adapter_is_the_plain_merge(dtype):
    inp = make_merge_inputs(1000, 1234, 16, dtype, device="cuda", layout="col_slice")
    plain = inp.weight.clone()
    lora_kernels.merge_(plain, inp.lora_a, inp.lora_b, inp.scale, backend="cuda")
    _merge(inp, "cuda", safe_merge=True)
    _assert_bitwise(inp.weight, plain, "safe merge vs plain merge")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fan_in_fan_out"])
def test_cuda_exact_unmerge_zero_drift_after_1000_cycles(dtype, layout):
    inp = make_merge_inputs(1024, 768, 16, dtype, device="cuda", layout=layout, delta_ratio=0.5)
    w0 = inp.weight.clone()
    residual = MergeResidual()
    plain = w0.clone()
    _merge(inp, "cuda", weight=plain)
    for _ in range(1000):
        _merge(inp, "cuda", residual=residual)
        _unmerge(inp, residual=residual)
    _assert_bitwise(inp.weight, w0, "weight after 1000 exact merge/unmerge cycles (CUDA)")
    _merge(inp, "cuda", residual=residual)
    _assert_bitwise(inp.weight, plain, "exact merge vs plain merge (CUDA)")
    _unmerge(inp, residual=residual)
    drift = w0.clone()
    for _ in range(100):
        _merge(inp, "cuda", weight=drift)
        _unmerge(inp, "cuda", weight=drift)
    if dtype != torch.float32:
        assert not torch.equal(drift, w0), "plain cycles did not drift: weak test data"


def test_cuda_exact_residual_records_its_backend():
    inp = make_merge_inputs(512, 640, 8, torch.bfloat16, device="cuda", delta_ratio=2.0)
    w0 = inp.weight.clone()
    residual = MergeResidual()
    _merge(inp, "cuda", residual=residual)
    with pytest.raises(ValueError, match="residual was made by backend 'cuda'"):
        _unmerge(inp, "triton", residual=residual)
    assert residual.holds_merge
    _unmerge(inp, "auto", residual=residual)  # auto: the merge's backend
    _assert_bitwise(inp.weight, w0, "weight")


def test_cuda_exact_many_escapes_grow_the_table():
    w = rand(2048, 1536, dtype=torch.bfloat16, device="cuda", scale=0.05)
    a_list = [rand(16, 1536, dtype=torch.bfloat16, device="cuda"), rand(8, 1536, device="cuda")]
    b_list = [rand(2048, 16, dtype=torch.bfloat16, device="cuda", scale=1.0), rand(2048, 8, device="cuda")]
    w0, residual = w.clone(), MergeResidual(escape_capacity=16)
    for _ in range(5):
        lora_kernels.merge_(w, a_list, b_list, [0.5, 2.0], residual=residual, backend="cuda")
        lora_kernels.unmerge_(w, a_list, b_list, [0.5, 2.0], residual=residual)
    assert residual.num_escapes > 16
    _assert_bitwise(w, w0, "weight after exact cycles with a grown escape table (CUDA)")


# ---------------------------------------------------------------------------------------------
# Backend choice, graphs
# ---------------------------------------------------------------------------------------------

def test_auto_keeps_triton_first():
    w = torch.empty(8, 8, device="cuda")
    assert lora_kernels.ops.merge.choose_backend("merge_", w) == "triton"
    assert lora_kernels.ops.merge.choose_backend("merge_", w, "cuda") == "cuda"


def test_cuda_merge_captures_in_a_cuda_graph():
    inp = make_merge_inputs(1024, 1536, 16, torch.bfloat16, device="cuda")
    w = inp.weight
    w0_64 = w.double()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        lora_kernels.merge_(w, inp.lora_a, inp.lora_b, inp.scale, backend="cuda")  # warm-up: load, plan
        lora_kernels.unmerge_(w, inp.lora_a, inp.lora_b, inp.scale, backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    w.copy_(w0_64.to(w.dtype))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        lora_kernels.merge_(w, inp.lora_a, inp.lora_b, inp.scale, backend="cuda")
    _assert_bitwise(w, w0_64.to(w.dtype), "capture runs nothing")
    g.replay()
    torch.cuda.synchronize()
    assert_close(w, w0_64 + inp.delta64(), torch.bfloat16, what="merged by a graph replay")
