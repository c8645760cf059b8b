"""CPU lane: the CUDA in-place merge kernel's *source* (csrc/merge/merge.cuh), run on the host emulator.

No GPU here, so the kernel is compiled with the host C++ compiler against emulated primitives
(tests/cuda_emulation/: PTX fragment layouts of ldmatrix and mma, warp shuffles, randomly
scheduled threads) that check bounds, alignment of every vector access, shared-memory races,
barrier divergence, and count how often each byte of W and of the codes is read and stored. The
launch parameters come from the launcher's own code (make_merge_params), so strides, the
transposed layouts and the vector-or-scalar choice are tested too. The emulator's MMAs sum in
float64 (the GPU's tensor cores in fp32), so results are compared with float64 within the
merge's rounding bound -- and bit for bit with reference.py wherever delta is exact in fp32
(make_exact_merge_inputs), which is where every backend must agree. The GPU lane
(tests/test_cuda_merge_gpu.py) and compute-sanitizer (bench/device_check.sh) cover the rest.
"""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from cases import MERGE_LAYOUTS, make_exact_merge_inputs, make_merge_inputs
from cuda_emulation import driver, merge_driver as md
from lora_kernels import reference
from tolerances import assert_close, assert_rounded_once, rand

pytestmark = pytest.mark.skipif(driver.compiler() is None, reason="no host C++ compiler (g++) to build the emulator")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PENDING_FILL = 77  # codes buffers start with this (not a code the kernel writes for our data)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return md.build(tmp_path_factory.mktemp("cuda_merge_emulation"))


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _assert_bitwise(out, expected, what, nan_payload_free=False):
    diff = _bits(out) != _bits(expected)
    if nan_payload_free:  # fp16 NaNs: torch's CPU conversion picks its own payload
        diff &= ~(torch.isnan(out) & torch.isnan(expected))
    assert not diff.any(), f"{what}: {int(diff.sum())} element(s) differ bitwise"


def _apply(exe, inp, subtract=False, **kw):
    return md.run(exe, inp.weight, inp.lora_a, inp.lora_b, inp.scale, mode=md.MODE_APPLY,
                  fan_in_fan_out=inp.fan_in_fan_out, subtract=subtract, **kw)


def _codes_like(weight):
    """As MergeResidual allocates them (empty_like keeps a dense weight's strides)."""
    return torch.full_like(weight, PENDING_FILL, dtype=torch.int8)


def _merge_exact(exe, inp, weight=None, capacity=64, **kw):
    weight = inp.weight if weight is None else weight
    status = torch.zeros(2, dtype=torch.int32)
    return md.run(exe, weight, inp.lora_a, inp.lora_b, inp.scale, mode=md.MODE_MERGE_EXACT,
                  fan_in_fan_out=inp.fan_in_fan_out, status=status, codes=_codes_like(weight),
                  escape_index=torch.full((capacity,), -1, dtype=torch.int64),
                  escape_value=torch.zeros(capacity, dtype=weight.dtype), **kw)


def _unmerge_exact(exe, inp, merged, num_escapes=None, **kw):
    """The kernel pass, then the launcher's scatter of the escape table (lora_kernels.cuda.merge)."""
    run = md.run(exe, merged.weight, inp.lora_a, inp.lora_b, inp.scale, mode=md.MODE_UNMERGE_EXACT,
                 fan_in_fan_out=inp.fan_in_fan_out, codes=merged.codes, **kw)
    n = int(merged.status[0]) if num_escapes is None else num_escapes
    reference.scatter_escapes_(run.weight, merged.escape_index, merged.escape_value,
                               min(n, merged.escape_index.numel()), inp.fan_in_fan_out)
    return run


def _check_touched_once(run, writes=True, what="weight"):
    assert run.w_reads.exactly(1) and run.w_reads.stray == 0, f"{what}: every element read exactly once"
    if writes:
        assert run.w_stores.exactly(1), f"{what}: every element stored exactly once"
    else:
        assert run.w_stores.exactly(0), f"{what}: nothing stored"
    assert run.w_stores.stray == 0, f"{what}: no store outside its elements (gaps, the rest of a fused buffer)"


def _check_merged(run, inp, dtype, subtract=False):
    w0 = inp.logical64()
    ref = w0 - inp.delta64() if subtract else w0 + inp.delta64()
    out = inp.logical64(run.weight)
    assert_close(out, ref, dtype, what="merged weight")
    assert_rounded_once(out, ref, dtype, inp.lora_a.shape[0], w0.abs() + inp.delta_bound64())


# ---------------------------------------------------------------------------------------------
# Plain merge: against float64, every layout, the vector and the scalar paths
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", MERGE_LAYOUTS)
def test_merge_every_layout(emulator, dtype, layout):
    """72 x 136: rows of 16-byte multiples, so contiguous layouts take the 16-byte vector path."""
    inp = make_merge_inputs(72, 136, 5, dtype, layout=layout)
    run = _apply(emulator, inp)
    _check_merged(run, inp, dtype)
    _check_touched_once(run)
    assert run.plan["w_vec"] == 1, "the unit-stride rows are 16-byte aligned: vector loads and stores"
    assert run.plan["transposed"] == int(layout in ("fan_in_fan_out", "column_major"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "fan_in_fan_out", "col_slice"])
def test_fp32_adapters_over_16bit_weight(emulator, dtype, layout):
    """3xTF32 path; also what the op layer sends for several adapters (one packed fp32 pair)."""
    inp = make_merge_inputs(66, 130, 19, dtype, layout=layout, adapter_dtype=torch.float32)
    run = _apply(emulator, inp)
    _check_merged(run, inp, dtype)
    _check_touched_once(run)


@pytest.mark.parametrize("dtype", DTYPES)
def test_unmerge_subtracts(emulator, dtype):
    inp = make_merge_inputs(40, 72, 6, dtype, layout="row_slice")
    run = _apply(emulator, inp, subtract=True)
    _check_merged(run, inp, dtype, subtract=True)
    _check_touched_once(run)


# (N, K, r, dtype, adapter dtype, layout): tails in both directions, one-element weights, ranks
# 1 / 7 / 64 / 256 (256 = four rank chunks: V^T reloaded per tile), both MMA kinds.
ODD = [
    (1, 1, 1, torch.float16, None, "contiguous"),
    (3, 130, 1, torch.bfloat16, None, "contiguous"),
    (130, 3, 2, torch.float32, None, "contiguous"),
    (17, 33, 7, torch.bfloat16, None, "fan_in_fan_out"),
    (65, 129, 64, torch.float16, None, "contiguous"),
    (70, 200, 64, torch.bfloat16, torch.float32, "column_major"),
    (8, 40, 256, torch.bfloat16, None, "contiguous"),
    (67, 136, 256, torch.float32, None, "fan_in_fan_out"),
    (129, 257, 7, torch.float16, torch.float32, "row_slice"),
]


@pytest.mark.parametrize("N,K,r,dtype,adapter_dtype,layout", ODD)
def test_odd_sizes_and_ranks(emulator, N, K, r, dtype, adapter_dtype, layout):
    inp = make_merge_inputs(N, K, r, dtype, layout=layout, adapter_dtype=adapter_dtype)
    run = _apply(emulator, inp, num_sms=1, ctas_per_sm=3)  # fewer CTAs than tiles where there are many
    _check_merged(run, inp, dtype)
    _check_touched_once(run)


def test_vector_and_scalar_paths_and_any_grid_give_the_same_bits(emulator):
    """A misaligned start forces element accesses; a small grid makes CTAs walk tile ranges that
    cross strips (V^T reloaded on the strip change). Same tile math: the same bits."""
    inp = make_merge_inputs(150, 264, 16, torch.bfloat16)  # 3 x 3 tiles
    vector = _apply(emulator, inp, num_sms=9, ctas_per_sm=1)
    assert vector.plan["w_vec"] == 1 and vector.plan["grid"] == vector.plan["tiles"] == 9
    scalar = _apply(emulator, inp, leads={"w": 1})
    assert scalar.plan["w_vec"] == 0
    walking = _apply(emulator, inp, num_sms=2, ctas_per_sm=1)
    assert walking.plan["grid"] == 2
    for run in (scalar, walking):
        _assert_bitwise(run.weight, vector.weight, "same tile math")
        _check_touched_once(run)


def test_every_schedule_gives_the_same_bits(emulator):
    inp = make_merge_inputs(40, 136, 24, torch.float16, adapter_dtype=torch.float32)
    runs = [_apply(emulator, inp, seed=s) for s in (1, 2, 3)]
    for run in runs[1:]:
        _assert_bitwise(run.weight, runs[0].weight, "another thread schedule")


def test_adapter_strides(emulator):
    """Transposed and padded adapters are read in place (no copies in the launcher)."""
    inp = make_merge_inputs(48, 80, 9, torch.bfloat16)
    inp.lora_a = inp.lora_a.t().contiguous().t()           # [r, K] column-major
    inp.lora_b = rand(48, 16, dtype=torch.bfloat16, scale=0.01)[:, 3:12]  # padded rows
    run = _apply(emulator, inp)
    _check_merged(run, inp, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# Bit for bit with reference.py where delta is exact: rounding, ties, special values
# ---------------------------------------------------------------------------------------------

def _special_values(dtype):
    info = torch.finfo(dtype)
    return torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, info.max, -info.max, info.tiny,
                         info.tiny / 4, -info.tiny / 2, 1.0, -1.0], dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("subtract", [False, True])
def test_rounding_is_bitwise_the_reference(emulator, dtype, subtract):
    """W in [1, 2) (and negatives) with |delta| < 1 on a 2^-11 grid: many sums are exact ties
    (1 in 8 for bf16, 1 in 2 for fp16) -- round to nearest even, for bf16 with integer ops, must
    match torch's conversion -- plus zeros, infinities, NaN, subnormals and the largest finite
    values."""
    N, K = 48, 72
    inp = make_exact_merge_inputs(N, K, 8, dtype, b_exponent=-2)
    w = (1.0 + torch.rand(N, K, dtype=torch.float64)) * torch.where(torch.rand(N, K) < 0.5, -1.0, 1.0)
    w = w.to(dtype)
    specials = _special_values(dtype)
    w.view(-1)[torch.randperm(N * K)[:4 * specials.numel()]] = specials.repeat(4)
    inp.weight, inp.storage = w, w
    run = _apply(emulator, inp, subtract=subtract)
    expected = reference.merged_weight(w, inp.lora_a, inp.lora_b, inp.scale, subtract=subtract)
    # NaN payloads: torch's CPU conversions pick theirs loop by loop; the kernel's are the Triton
    # kernel's (bf16: always the canonical 0x7FC0)
    _assert_bitwise(run.weight, expected, f"{dtype} merge vs reference.merged_weight", nan_payload_free=True)
    nan = torch.isnan(run.weight)
    assert int(nan.sum()) >= 4
    if dtype == torch.bfloat16:
        assert (_bits(run.weight)[nan] == 0x7FC0).all()
    _check_touched_once(run)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fan_in_fan_out", "col_slice"])
@pytest.mark.parametrize("adapter_dtype", [None, torch.float32])
def test_exact_delta_merge_is_bitwise_the_reference(emulator, dtype, layout, adapter_dtype):
    if dtype == torch.float32 and adapter_dtype is None:
        adapter_dtype = torch.float32
    inp = make_exact_merge_inputs(72, 136, 64, dtype, layout=layout, adapter_dtype=adapter_dtype)
    run = _apply(emulator, inp)
    expected = reference.merged_weight(inp.weight, inp.lora_a, inp.lora_b, inp.scale,
                                       fan_in_fan_out=inp.fan_in_fan_out)
    _assert_bitwise(run.weight, expected, "merge vs reference.merged_weight")


# ---------------------------------------------------------------------------------------------
# Safe merge: the count pass and the gated writing pass
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("poison", ["inf adapter", "nan adapter", "overflow", "nan weight", "none"])
def test_count_nonfinite_is_the_reference_count_and_writes_nothing(emulator, dtype, poison):
    inp = make_merge_inputs(36, 80, 4, dtype, adapter_dtype=torch.float32)
    if poison == "inf adapter":
        inp.lora_b[3, 1] = math.inf
    elif poison == "nan adapter":
        inp.lora_a[2, 7] = math.nan
    elif poison == "overflow":  # finite adapters; only column 4 of row 5 overflows, by far
        inp.lora_b[5] = 1e2 if dtype == torch.float16 else 1e37
        inp.lora_a[:, 4] = 1e4 if dtype == torch.float16 else 1e3
    elif poison == "nan weight":
        inp.weight[1, 2] = math.nan
    status = torch.tensor([5, 0], dtype=torch.int32)
    run = md.run(emulator, inp.weight, inp.lora_a, inp.lora_b, inp.scale, mode=md.MODE_COUNT_NONFINITE,
                 status=status)
    ref_status = torch.tensor([5, 0], dtype=torch.int32)
    reference.count_nonfinite_(inp.weight, inp.lora_a, inp.lora_b, inp.scale, status=ref_status)
    assert run.status.tolist() == ref_status.tolist()
    assert (int(run.status[1]) > 0) == (poison != "none")
    _check_touched_once(run, writes=False)
    _assert_bitwise(run.weight, inp.weight, "weight after a count pass")


@pytest.mark.parametrize("mode", [md.MODE_APPLY, md.MODE_MERGE_EXACT])
def test_gated_launch_after_a_failed_count_touches_nothing(emulator, mode):
    inp = make_merge_inputs(40, 72, 4, torch.bfloat16)
    status = torch.tensor([0, 3], dtype=torch.int32)
    kw = {}
    if mode == md.MODE_MERGE_EXACT:
        kw = dict(codes=_codes_like(inp.weight), escape_index=torch.zeros(8, dtype=torch.int64),
                  escape_value=torch.zeros(8, dtype=torch.bfloat16))
    run = md.run(emulator, inp.weight, inp.lora_a, inp.lora_b, inp.scale, mode=mode, gated=True,
                 status=status, **kw)
    assert run.w_reads.exactly(0) and run.w_stores.exactly(0)
    _assert_bitwise(run.weight, inp.weight, "weight")
    assert run.status.tolist() == [0, 3]
    if run.codes is not None:
        assert run.code_stores.exactly(0)
    ungated = md.run(emulator, inp.weight, inp.lora_a, inp.lora_b, inp.scale, mode=md.MODE_APPLY, gated=True,
                     status=torch.zeros(2, dtype=torch.int32))
    _check_touched_once(ungated)  # status[1] == 0: the gated pass is the plain merge


# ---------------------------------------------------------------------------------------------
# Exact merge / unmerge
# ---------------------------------------------------------------------------------------------

def _reference_exact(inp, capacity):
    w = inp.weight.clone()
    codes = _codes_like(w)
    index, value = torch.full((capacity,), -1, dtype=torch.int64), torch.zeros(capacity, dtype=w.dtype)
    status = torch.zeros(2, dtype=torch.int32)
    reference.merge_exact_(w, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=inp.fan_in_fan_out,
                           codes=codes, escape_index=index, escape_value=value, status=status)
    return w, codes, index, value, status


def _escape_set(index, value, n):
    return sorted(zip(index[:n].tolist(), _bits(value[:n]).tolist()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "fan_in_fan_out", "col_slice", "column_major"])
def test_exact_codes_and_escapes_are_the_reference_ones(emulator, dtype, layout):
    """With an exact delta the kernel's W1, codes and escape table (as a set: slot order may
    differ) are reference.merge_exact_'s, bit for bit; the unmerge restores W0 bit for bit."""
    adapter_dtype = torch.float32 if dtype == torch.float32 else None
    inp = make_exact_merge_inputs(72, 136, 16, dtype, layout=layout, adapter_dtype=adapter_dtype, delta_ratio=40.0)
    specials = _special_values(dtype)
    rows = torch.randint(0, inp.weight.shape[0], (specials.numel(),))
    cols = torch.randint(0, inp.weight.shape[1], (specials.numel(),))
    inp.weight[rows, cols] = specials  # through the (possibly strided) view
    w0 = inp.weight.clone()
    merged = _merge_exact(emulator, inp, capacity=4096)
    ref_w, ref_codes, ref_index, ref_value, ref_status = _reference_exact(inp, 4096)
    n = int(ref_status[0])
    assert n > 0 and merged.status.tolist() == ref_status.tolist()
    _assert_bitwise(merged.weight, ref_w, "exact merge W1 vs reference", nan_payload_free=True)
    _assert_bitwise(merged.codes, ref_codes, "codes vs reference")
    assert _escape_set(merged.escape_index, merged.escape_value, n) == _escape_set(ref_index, ref_value, n)
    _check_touched_once(merged)
    assert merged.code_stores.exactly(1) and merged.code_stores.stray == 0
    assert merged.code_reads.exactly(0)
    restored = _unmerge_exact(emulator, inp, merged)
    _assert_bitwise(restored.weight, w0, "W0 after the exact unmerge")
    _check_touched_once(restored)
    assert restored.code_reads.exactly(1) and restored.code_stores.exactly(0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout,adapter_dtype", [("contiguous", None), ("fan_in_fan_out", torch.float32),
                                                  ("col_slice", None), ("row_slice", torch.float32)])
def test_exact_cycles_restore_every_bit(emulator, dtype, layout, adapter_dtype):
    """Random adapters (inexact delta): the exact merge writes the kernel's own plain merge, and
    three merge/unmerge cycles give W0 back bit for bit each time."""
    if dtype == torch.float32:
        adapter_dtype = torch.float32
    inp = make_merge_inputs(70, 140, 12, dtype, layout=layout, adapter_dtype=adapter_dtype, delta_ratio=8.0)
    w0 = inp.weight.clone()
    plain = _apply(emulator, inp)
    for cycle in range(3):
        merged = _merge_exact(emulator, inp, capacity=4096, seed=cycle)
        assert int(merged.status[0]) > 0, "delta_ratio 8: some elements escape"
        _assert_bitwise(merged.weight, plain.weight, "exact merge vs plain merge (same kernel)")
        restored = _unmerge_exact(emulator, inp, merged, seed=cycle + 10)
        _assert_bitwise(restored.weight, w0, f"W0 after cycle {cycle + 1}")
        inp.weight.copy_(restored.weight)


def test_full_escape_table_leaves_pending_elements_unmerged(emulator):
    """More escapes than slots: status[0] counts them all, the table's slots are all used, the
    rest keep W0 with code PENDING; unmerging with the table's count undoes the merge exactly
    (the op layer's retry path)."""
    inp = make_merge_inputs(40, 72, 4, torch.bfloat16, delta_ratio=300.0)
    w0 = inp.weight.clone()
    capacity = 5
    merged = _merge_exact(emulator, inp, capacity=capacity)
    total = int(merged.status[0])
    pending = merged.codes == reference.CODE_PENDING
    assert total > capacity and int(pending.sum()) == total - capacity
    assert int((merged.codes == reference.CODE_ESCAPE).sum()) == capacity
    assert (merged.escape_index >= 0).all() and len(set(merged.escape_index.tolist())) == capacity
    _assert_bitwise(merged.weight[pending], w0[pending], "pending elements keep W0")
    restored = _unmerge_exact(emulator, inp, merged, num_escapes=capacity)
    _assert_bitwise(restored.weight, w0, "W0 after undoing a merge with a full table")


def test_strided_codes(emulator):
    """Codes need not share the weight's layout (e.g. a contiguous residual for a sliced weight)."""
    inp = make_merge_inputs(36, 72, 5, torch.float16, delta_ratio=50.0)
    w0 = inp.weight.clone()
    status = torch.zeros(2, dtype=torch.int32)
    codes = torch.full((72, 36), PENDING_FILL, dtype=torch.int8).t()  # column-major codes
    merged = md.run(emulator, inp.weight, inp.lora_a, inp.lora_b, inp.scale, mode=md.MODE_MERGE_EXACT,
                    status=status, codes=codes, escape_index=torch.full((512,), -1, dtype=torch.int64),
                    escape_value=torch.zeros(512, dtype=torch.float16))
    assert merged.plan["c_vec"] == 0 and merged.code_stores.exactly(1)
    restored = _unmerge_exact(emulator, inp, merged)
    _assert_bitwise(restored.weight, w0, "W0 with column-major codes")


# ---------------------------------------------------------------------------------------------
# The public API on the emulated kernel: merge_ / unmerge_ with backend="cuda", where the op layer
# packs several adapters, runs the safe merge's two passes, and grows the escape table
# ---------------------------------------------------------------------------------------------

class _EmulatedCudaMerge:
    """lora_kernels.cuda.merge's launchers, each launch run on the emulator (CPU tensors)."""

    def __init__(self, exe):
        self.exe = exe
        self.launches = 0

    def _run(self, mode, weight, lora_a, lora_b, scale, fan_in_fan_out, **kw):
        if weight.numel() == 0:
            return None
        self.launches += 1
        run = md.run(self.exe, weight, lora_a, lora_b, scale, mode=mode, fan_in_fan_out=fan_in_fan_out,
                     seed=self.launches, **kw)
        weight.copy_(run.weight)
        for name in ("status", "codes", "escape_index", "escape_value"):
            if kw.get(name) is not None:
                kw[name].copy_(getattr(run, name))
        return run

    def apply_(self, weight, lora_a, lora_b, scale, *, subtract=False, fan_in_fan_out=False, status=None, gated=False):
        self._run(md.MODE_APPLY, weight, lora_a, lora_b, scale, fan_in_fan_out, subtract=subtract,
                  status=status, gated=gated)

    def count_nonfinite_(self, weight, lora_a, lora_b, scale, *, subtract=False, fan_in_fan_out=False, status):
        self._run(md.MODE_COUNT_NONFINITE, weight, lora_a, lora_b, scale, fan_in_fan_out, subtract=subtract,
                  status=status)

    def merge_exact_(self, weight, lora_a, lora_b, scale, *, fan_in_fan_out=False, codes, escape_index,
                     escape_value, status, gated=False):
        self._run(md.MODE_MERGE_EXACT, weight, lora_a, lora_b, scale, fan_in_fan_out, codes=codes,
                  escape_index=escape_index, escape_value=escape_value, status=status, gated=gated)

    def unmerge_exact_(self, weight, lora_a, lora_b, scale, *, fan_in_fan_out=False, codes, escape_index,
                       escape_value, num_escapes):
        self._run(md.MODE_UNMERGE_EXACT, weight, lora_a, lora_b, scale, fan_in_fan_out, codes=codes)
        reference.scatter_escapes_(weight, escape_index, escape_value, num_escapes, fan_in_fan_out)


@pytest.fixture
def emulated_cuda(emulator, monkeypatch):
    """backend="cuda" on CPU tensors runs the kernel source on the emulator."""
    from lora_kernels import backends
    from lora_kernels.ops import merge as ops
    launcher = _EmulatedCudaMerge(emulator)
    compiled = ops._compiled_backend
    monkeypatch.setattr(ops, "_compiled_backend", lambda b: launcher if b == "cuda" else compiled(b))
    monkeypatch.setattr(backends, "cuda_unavailable_reason", lambda device: None)
    return launcher


def test_public_exact_cycles_grow_the_escape_table(emulated_cuda):
    import lora_kernels
    inp = make_merge_inputs(40, 72, 4, torch.bfloat16, layout="fan_in_fan_out", delta_ratio=300.0)
    w0 = inp.weight.clone()
    residual = lora_kernels.MergeResidual(escape_capacity=3)
    for _ in range(2):
        lora_kernels.merge_(inp.weight, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=True,
                            residual=residual, backend="cuda")
        assert residual.num_escapes > 3 and residual.escape_index.numel() >= residual.num_escapes
        lora_kernels.unmerge_(inp.weight, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=True, residual=residual)
        _assert_bitwise(inp.weight, w0, "W0 after an exact cycle that grew the table")
    assert emulated_cuda.launches >= 5  # merge, undo, merge again, unmerge, ...


def test_public_several_adapters_and_safe_merge(emulated_cuda):
    import lora_kernels
    w = rand(30, 48, dtype=torch.float16, scale=0.05)
    a_list = [rand(2, 48, dtype=torch.float16), rand(5, 48)]
    b_list = [rand(30, 2, dtype=torch.float16, scale=0.05), rand(30, 5, scale=0.02)]
    s_list = [1.5, -0.25]
    w0 = w.clone()
    lora_kernels.merge_(w, a_list, b_list, s_list, safe_merge=True, backend="cuda")
    ref = w0.double() + sum(s * b.double() @ a.double() for a, b, s in zip(a_list, b_list, s_list))
    assert_close(w, ref, torch.float16, what="one-pass merge of 2 adapters (packed fp32 pair)")
    residual = lora_kernels.MergeResidual()
    w.copy_(w0)
    for _ in range(3):
        lora_kernels.merge_(w, a_list, b_list, s_list, residual=residual, backend="cuda")
        lora_kernels.unmerge_(w, a_list, b_list, s_list, residual=residual)
    _assert_bitwise(w, w0, "W0 after exact cycles of a 2-adapter merge")
    b_list[1][3, 1] = math.inf
    with pytest.raises(ValueError, match=r"merge_: the merged weight would have \d+ non-finite"):
        lora_kernels.merge_(w, a_list, b_list, s_list, safe_merge=True, backend="cuda")
    _assert_bitwise(w, w0, "weight after a rejected safe merge")
    b_list[1][3, 1] = 0.5
    lora_kernels.merge_(w, a_list, b_list, s_list, residual=residual, backend="cuda")
    with pytest.raises(ValueError, match="residual was made by backend 'cuda'"):
        lora_kernels.unmerge_(w, a_list, b_list, s_list, residual=residual, backend="torch")


@pytest.mark.parametrize("dtype", DTYPES)
@given(seed=st.integers(0, 2 ** 31 - 1), delta_exp=st.integers(-12, 6),
       positions=st.lists(st.integers(0, 10 ** 6), min_size=0, max_size=12), fan_in_fan_out=st.booleans())
@settings(max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])  # the fixture is stateless
def test_public_exact_unmerge_restores_any_weight_bit_for_bit(emulated_cuda, dtype, seed, delta_exp, positions,
                                                              fan_in_fan_out):
    """Zeros, subnormals, infinities, NaNs, tiny weights under a huge delta, overflowing sums, a
    table too small at first: the exact merge is the kernel's plain merge and the unmerge restores
    every bit (the CUDA twin of test_merge.py's property test)."""
    import lora_kernels
    gen = torch.Generator().manual_seed(seed)
    N, K, r = 9, 21, 3
    w = torch.randn(N * K, generator=gen, dtype=torch.float64) * 10.0 ** torch.randint(-9, 3, (N * K,), generator=gen)
    specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, 1e-40, -3e-39, 6e4, -1e30, 1e-7],
                            dtype=torch.float64)
    picks = torch.tensor(positions, dtype=torch.long) % (N * K)
    w[picks] = specials[torch.arange(len(picks)) % len(specials)]
    w = w.to(dtype).reshape((K, N) if fan_in_fan_out else (N, K))
    a = torch.randn(r, K, generator=gen).to(dtype)
    b = (torch.randn(N, r, generator=gen) * 10.0 ** delta_exp).to(dtype)
    w0, plain = w.clone(), w.clone()
    lora_kernels.merge_(plain, a, b, 0.75, fan_in_fan_out=fan_in_fan_out, backend="cuda")
    residual = lora_kernels.MergeResidual(escape_capacity=4)
    lora_kernels.merge_(w, a, b, 0.75, fan_in_fan_out=fan_in_fan_out, residual=residual, backend="cuda")
    _assert_bitwise(w, plain, "exact merge vs plain merge", nan_payload_free=True)
    lora_kernels.unmerge_(w, a, b, 0.75, fan_in_fan_out=fan_in_fan_out, residual=residual)
    _assert_bitwise(w, w0, "exact unmerge")
