"""CPU lane: what keeps the package right across the versions it meets (issue 15) -- the backend
facts are never traced by torch.compile, and bfloat16 under the Triton interpreter is either
fixed (this lane) or refused, never silently wrong."""
import numpy as np
import pytest
import torch

import lora_kernels
from lora_kernels import BackendUnavailable, backends
from lora_kernels.ops import multi_lora
from cases import make_lora_inputs
from tolerances import assert_close
import interpreter_fixes


def test_never_traced_marks_as_torch_does():
    """backends marks its process facts without importing torch._dynamo; this is the check that
    the attribute it sets is still the one torch.compiler.assume_constant_result sets."""
    def probe():
        return None
    torch.compiler.assume_constant_result(probe)
    assert probe.__dict__ == backends._never_traced(lambda: None).__dict__ == {"_dynamo_marked_constant": True}
    for fact in (backends.unavailable_reason, backends.interpreter_bf16_fixed):
        assert fact._dynamo_marked_constant


@pytest.mark.parametrize("backend", ["auto", "triton"])
def test_every_ops_backend_choice_traces_with_fullgraph(interpreter_device, backend):
    """torch 2.11's dynamo could not trace importlib.util.find_spec (reached from the backend
    rule), so fullgraph=True failed; every op family's dispatch now traces on any torch."""
    from lora_kernels.ops.lora_linear import choose_backend as linear_backend
    from lora_kernels.ops.merge import choose_backend as merge_backend

    def choose(x):
        chosen = (linear_backend(x, x[:2], backend), merge_backend("merge_", x, backend),
                  multi_lora.choose_backend("multi_lora_linear", x.device, x.dtype, 8, backend))
        return x + len(set(chosen))
    x = torch.randn(4, 8)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(choose, fullgraph=True, backend="eager")(x), choose(x))


def test_bf16_conversions_match_torch():
    values = torch.randn(4096, dtype=torch.float64).float() * torch.logspace(-40, 38, 4096).float()
    halfway = (torch.arange(1, 200, dtype=torch.int32) << 16 | 0x8000).view(torch.float32)  # ties
    specials = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, 1e-45])
    x = torch.cat([values, halfway, -halfway, specials])
    bits = interpreter_fixes.fp32_to_bf16_bits(x.numpy())
    assert np.array_equal(bits, x.bfloat16().view(torch.int16).numpy().view(np.uint16))
    assert np.array_equal(interpreter_fixes.bf16_bits_to_fp32(bits), x.bfloat16().float().numpy())
    nan = interpreter_fixes.fp32_to_bf16_bits(np.array([np.nan, -np.nan], dtype=np.float32))
    assert np.isnan(interpreter_fixes.bf16_bits_to_fp32(nan)).all()


def test_bf16_under_the_fixed_interpreter_matches_float64(interpreter_device):
    assert backends.interpreter_bf16_fixed()
    inp = make_lora_inputs(37, 40, 48, 8, torch.bfloat16)
    y = lora_kernels.lora_linear(*inp.args(), backend="triton")
    assert_close(y, inp.reference64(), torch.bfloat16, torch_out=inp.torch_expression())


def test_bf16_under_an_unfixed_interpreter_is_refused_with_the_reason(interpreter_device, monkeypatch):
    from triton.runtime import interpreter
    for name in ("create_dot", "cast_impl"):
        monkeypatch.setattr(interpreter.InterpreterBuilder, name, interpreter_fixes.unfixed(name))
    assert not backends.interpreter_bf16_fixed()
    inp = make_lora_inputs(5, 8, 16, 2, torch.bfloat16)
    with pytest.raises(BackendUnavailable, match="bfloat16 is refused under the Triton interpreter"):
        lora_kernels.lora_linear(*inp.args(), backend="triton")
    assert "bfloat16 is refused" in multi_lora._input_reason(torch.bfloat16, 8)("triton")
    assert multi_lora._input_reason(torch.float16, 8)("triton") is None
    y = lora_kernels.lora_linear(*make_lora_inputs(5, 8, 16, 2, torch.float16).args(), backend="triton")
    assert y.dtype == torch.float16  # the other dtypes still run


def test_numpy_check_names_the_fix(monkeypatch):
    import triton
    import conftest
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(np, "__version__", "2.5.0")
    assert "pip install 'numpy<2.4'" in conftest._interpreter_numpy_problem()
    monkeypatch.setattr(triton, "__version__", "3.8.0")
    assert conftest._interpreter_numpy_problem() is None
