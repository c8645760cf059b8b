"""CPU lane: the CUDA merge op in the extension -- registration, error sentences, backend choice.

What runs the kernel without a GPU is tests/test_cuda_merge_emulation.py; on the card,
tests/test_cuda_merge_gpu.py. The extension-level tests skip where no ahead-of-time build of
lora_kernels._C is importable (build one with `python setup.py build_ext --inplace`)."""
import importlib.util

import pytest
import torch

import lora_kernels
from lora_kernels import BackendUnavailable
from lora_kernels.cuda import loader as cuda
from lora_kernels.cuda import merge as cuda_merge
from lora_kernels.ops.merge import choose_backend


def _need_aot_extension():
    problem = cuda.aot_problem()
    if problem is not None:
        pytest.skip(f"no usable ahead-of-time build here: {problem}")
    cuda.load(allow_jit=False)


def _args(mode=0, weight=None, **kw):
    weight = torch.randn(4, 8, dtype=torch.bfloat16) if weight is None else weight
    args = dict(weight=weight, lora_a=torch.randn(2, 8, dtype=torch.bfloat16), lora_b=torch.randn(4, 2, dtype=torch.bfloat16),
                scale=1.0, fan_in_fan_out=False, mode=mode, subtract=False, gated=False, status=None, codes=None,
                escape_index=None, escape_value=None)
    args.update(kw)
    return args


def test_merge_op_is_registered_with_its_schema():
    _need_aot_extension()
    assert cuda_merge.registered()
    schema = str(torch.ops.lora_kernels.cuda_merge_.default._schema)
    assert schema.startswith("lora_kernels::cuda_merge_(Tensor(a!) weight, Tensor lora_a, Tensor lora_b, float scale")
    assert "Tensor(c!)? codes" in schema and "Tensor(e!)? escape_value" in schema


def test_merge_op_on_cpu_tensors_raises_a_sentence():
    _need_aot_extension()
    args = _args()
    before = args["weight"].clone()
    with pytest.raises(RuntimeError, match=r"cuda_merge_: weight is on cpu, but the CUDA kernel needs CUDA tensors "
                                           r"\(use backend='torch'"):
        torch.ops.lora_kernels.cuda_merge_(**args)
    assert torch.equal(args["weight"], before)


@pytest.mark.parametrize("kw,match", [
    (dict(mode=4), r"cuda_merge_: mode must be 0 \(apply\), 1 \(count non-finite\), 2 \(merge exact\) or 3"),
    (dict(mode=2, subtract=True), r"cuda_merge_: subtract applies to modes 0 and 1 only, got mode 2"),
    (dict(mode=3, gated=True), r"cuda_merge_: gated applies to modes 0 and 2 only, got mode 3"),
])
def test_merge_op_rejects_bad_modes_before_anything_runs(kw, match):
    _need_aot_extension()
    with pytest.raises(RuntimeError, match=match):
        torch.ops.lora_kernels.cuda_merge_(**_args(**kw))


@pytest.mark.parametrize("fn", [lora_kernels.merge_, lora_kernels.unmerge_])
def test_public_api_on_cpu_says_cuda_needs_cuda_tensors(fn):
    w = torch.randn(5, 8)
    before = w.clone()
    name = fn.__name__
    with pytest.raises(BackendUnavailable, match=rf"{name}: cuda: the CUDA C\+\+ kernels need CUDA tensors, got tensors on cpu"):
        fn(w, torch.randn(2, 8), torch.randn(5, 2), 1.0, backend="cuda")
    assert torch.equal(w, before)
    assert choose_backend(name, w, "auto") == "torch"


def test_cuda_input_reason_names_the_dtypes():
    assert cuda_merge.input_reason(torch.bfloat16) is None and cuda_merge.input_reason(torch.float32) is None
    assert cuda_merge.input_reason(torch.float64) == (
        "cuda: dtype float64 is not supported by the CUDA merge kernel (float16, bfloat16, float32)")
    from lora_kernels.ops import merge as ops
    assert ops._input_reason(torch.empty(1, dtype=torch.float64))("cuda") == cuda_merge.input_reason(torch.float64)
    assert ops._input_reason(torch.empty(1, dtype=torch.float16))("cuda") is None
    assert ops.CUDA_DTYPES == cuda_merge.DTYPES


def test_an_extension_built_before_the_merge_kernel_is_reported(monkeypatch):
    monkeypatch.setattr(cuda, "load", lambda allow_jit=True: "aot")
    monkeypatch.setattr(cuda_merge, "registered", lambda: False)
    with pytest.raises(BackendUnavailable, match=r"cuda: the loaded lora_kernels._C has no merge kernel .* rebuild it"):
        cuda_merge.apply_(torch.randn(3, 4), torch.randn(1, 4), torch.randn(3, 1), 1.0)


def test_merge_sources_are_built():
    """Both build paths compile the merge: the JIT and setup.py share lora_kernels/cuda/sources.py."""
    assert {"merge/merge_kernels.cu", "merge/merge.cpp"} <= set(cuda.SOURCES)
    spec = importlib.util.spec_from_file_location("lora_kernels_setup_sources", cuda.CSRC_DIR.parent / "setup.py")
    setup_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_py)  # defines SOURCES; setup() runs only as a script
    assert {"csrc/merge/merge_kernels.cu", "csrc/merge/merge.cpp"} <= set(setup_py.SOURCES)
    for name in ("merge/merge.cuh", "merge/merge_plan.h", "merge/merge_launch.h", "merge/merge.h", "common/ptx_stream.cuh"):
        assert (cuda.CSRC_DIR / name).exists(), name
