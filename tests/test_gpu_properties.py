"""GPU lane property tests: every op, random shapes / ranks / strides / adapter distributions, every
compiled backend that runs here, bf16 and fp16, against the float64 reference.

Errors are measured against the same sums over absolute values (assert_close_to_magnitude): random
tiny shapes can make a result a single nearly cancelling sum, where no precision meets a plain
relative bound."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import lora_kernels
from lora_kernels import reference
from lora_kernels.backends import unavailable_reason
from cases import make_lora_inputs, make_merge_inputs, make_multi_inputs, MERGE_LAYOUTS
from tolerances import assert_close_to_magnitude

pytestmark = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
FEW = settings(max_examples=15, deadline=None)  # each new shape regime compiles kernels: keep it short


def _backends():
    return [b for b in ("triton", "cuda") if unavailable_reason(b, torch.device("cuda")) is None]


def _abs(*tensors):
    return [None if t is None else t.detach().double().abs() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(M=st.integers(0, 300), N=st.integers(1, 300), K=st.integers(1, 300), r=st.integers(1, 128),
       bias=st.booleans(), x_layout=st.sampled_from(["contiguous", "strided", "transposed"]),
       data=st.data())
def test_lora_linear_property(dtype, M, N, K, r, bias, x_layout, data):
    backend = data.draw(st.sampled_from(_backends()))
    inp = make_lora_inputs(M, N, K, r, dtype, device="cuda", bias=bias, x_layout=x_layout)
    try:
        y = lora_kernels.lora_linear(*inp.args(), backend=backend)
    except lora_kernels.BackendUnavailable as e:  # e.g. an input this backend documents it cannot take
        pytest.skip(str(e))
    if M == 0:
        assert y.shape == (0, N)
        return
    x, w, a, b, bias_abs = _abs(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias)
    magnitude = x @ w.t() + abs(inp.scale) * (x @ a.t()) @ b.t() + (0 if bias_abs is None else bias_abs)
    assert_close_to_magnitude(y, inp.reference64(), magnitude, dtype, what=f"lora_linear ({backend})")


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(N=st.integers(1, 400), K=st.integers(1, 400), r=st.integers(1, 256),
       layout=st.sampled_from(MERGE_LAYOUTS), data=st.data())
def test_merge_property(dtype, N, K, r, layout, data):
    backend = data.draw(st.sampled_from(_backends()))
    inp = make_merge_inputs(N, K, r, dtype, device="cuda", layout=layout)
    expected = inp.logical64() + inp.delta64()
    magnitude = inp.logical64().abs() + inp.delta_bound64()
    try:
        lora_kernels.merge_(inp.weight, inp.lora_a, inp.lora_b, inp.scale, fan_in_fan_out=inp.fan_in_fan_out,
                            backend=backend)
    except lora_kernels.BackendUnavailable as e:
        pytest.skip(str(e))
    assert_close_to_magnitude(inp.logical64(), expected, magnitude, dtype, what=f"merge_ ({backend})")


@pytest.mark.parametrize("dtype", DTYPES)
@FEW
@given(M=st.integers(0, 300), N=st.integers(1, 200), K=st.integers(1, 200), L=st.integers(1, 64),
       r_max=st.sampled_from([1, 8, 16, 64, 128]), dist=st.sampled_from(["decode", "prefill", "zipf", "one",
                                                                        "none10", "none"]),
       mixed=st.booleans(), data=st.data())
def test_multi_lora_property(dtype, M, N, K, L, r_max, dist, mixed, data):
    backend = data.draw(st.sampled_from(_backends()))
    inp = make_multi_inputs(M, N, K, L, r_max, dtype, device="cuda", dist=dist, ranks="mixed" if mixed else None)
    index = inp.index()
    try:
        y = lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales,
                                           inp.bias, inp.ranks, backend=backend)
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend=backend)
    except lora_kernels.BackendUnavailable as e:
        pytest.skip(str(e))
    if M == 0:
        assert y.shape == (0, N) and t.shape == (0, r_max)
        return
    keep = reference.rank_keep(inp.ranks, L, r_max, "cuda")
    a_abs = torch.where(keep[:, :, None], inp.lora_a.double().abs(), 0.0)
    b_abs = torch.where(keep[:, None, :], inp.lora_b.double().abs(), 0.0)
    scales_abs = inp.scales.double().abs()
    t_magnitude = reference.lora_shrink(inp.x.double().abs(), a_abs, inp.token_adapter, scales_abs, inp.ranks)
    assert_close_to_magnitude(t, inp.t64(), t_magnitude, dtype, what=f"lora_shrink ({backend})")
    y_magnitude = reference.multi_lora_linear(inp.x.double().abs(), inp.weight.double().abs(), a_abs, b_abs,
                                              inp.token_adapter, scales_abs,
                                              None if inp.bias is None else inp.bias.double().abs(), inp.ranks)
    assert_close_to_magnitude(y, inp.linear64(), y_magnitude, dtype, what=f"multi_lora_linear ({backend})")
