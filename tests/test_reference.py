"""The plain-torch reference (the CPU backend and the oracle) against float64 math."""
import pytest
import torch

from lora_kernels import reference
import lora_kernels
from cases import make_lora_inputs
from tolerances import assert_close, rand

ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_lora_linear_reference_vs_float64(dtype):
    inp = make_lora_inputs(33, 29, 41, 5, dtype)
    y = reference.lora_linear(*inp.args())
    x, w, a, b, bias = (t.double() for t in (inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.bias))
    expected = x @ w.t() + bias + inp.scale * (x @ a.t()) @ b.t()
    assert y.dtype == dtype
    assert_close(y, expected, dtype, torch_out=inp.torch_expression())


def test_reference_keeps_t_in_fp32():
    """x.A^T is not rounded to bf16 before .B^T: large-K bf16 products keep their precision."""
    inp = make_lora_inputs(16, 8, 4096, 16, torch.bfloat16)
    inp.weight.zero_()  # isolate the LoRA branch (the reference itself is what is tested here)
    inp.bias = None
    y = reference.lora_linear(*inp.args())
    expected = inp.reference64()
    t_rounded = (inp.x @ inp.lora_a.t()).to(torch.bfloat16)
    naive = inp.scale * (t_rounded @ inp.lora_b.t())
    assert_close(y, expected, torch.bfloat16)
    from tolerances import rel_error
    assert rel_error(y, expected) <= rel_error(naive, expected)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_merge_unmerge_reference(dtype, fan_in_fan_out):
    N, K, r = 40, 24, 6
    w = rand(K, N, dtype=dtype) if fan_in_fan_out else rand(N, K, dtype=dtype)
    a, b = rand(r, K, dtype=dtype), rand(N, r, dtype=dtype)
    w0 = w.clone()
    lora_kernels.merge_(w, a, b, 0.5, fan_in_fan_out=fan_in_fan_out)
    delta = 0.5 * b.double() @ a.double()
    expected = w0.double() + (delta.t() if fan_in_fan_out else delta)
    assert_close(w, expected, dtype, what="merged weight")
    lora_kernels.unmerge_(w, a, b, 0.5, fan_in_fan_out=fan_in_fan_out)
    assert_close(w, w0.double(), dtype, what="unmerged weight")


def test_merge_several_adapters_equals_sum():
    w = rand(20, 16)
    adapters = [(rand(r, 16), rand(20, r), s) for r, s in ((2, 0.5), (5, -1.0), (1, 3.0))]
    w_multi = w.clone()
    lora_kernels.merge_(w_multi, [a for a, _, _ in adapters], [b for _, b, _ in adapters], [s for *_, s in adapters])
    expected = w.double() + sum(s * b.double() @ a.double() for a, b, s in adapters)
    assert_close(w_multi, expected, torch.float32)


@pytest.mark.parametrize("dtype, adapter_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float32),
                                                  (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
@pytest.mark.parametrize("with_keep", [False, True])
def test_lora_linear_forward_same_bits_as_plain_casts(dtype, adapter_dtype, with_keep):
    """lora_linear_forward skips no-op .to calls (host overhead): bit for bit the written-out
    formula with every cast made."""
    inp = make_lora_inputs(5, 9, 13, 3, dtype, adapter_dtype=adapter_dtype)
    keep = (torch.rand(5, 13, generator=torch.Generator().manual_seed(1)) > 0.3) if with_keep else None
    p = 0.3 if with_keep else 0.0
    y, t = reference.lora_linear_forward(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.scale, inp.bias, keep, p)
    acc = reference.acc_dtype(dtype, adapter_dtype)
    t_ref = reference.lora_input(inp.x, p, dropout_mask=keep).to(acc) @ inp.lora_a.to(acc).t()
    y_ref = torch.addmm(inp.x.to(acc) @ inp.weight.to(acc).t(), t_ref, inp.lora_b.to(acc).t(), alpha=inp.scale)
    y_ref += inp.bias.to(acc)
    assert torch.equal(t, t_ref) and t.dtype == acc
    assert torch.equal(y, y_ref.to(dtype)) and y.dtype == dtype
