"""CPU lane: the CUDA extension's build, loading, registration and error sentences.

The build itself runs in `pip install` (setup.py) when nvcc is present; these tests check what it
left (skipping, with the recorded reason, where no extension was built) and the loader's rules.
"""
import pytest
import torch

import lora_kernels
from lora_kernels import BackendUnavailable
from lora_kernels.cuda import loader as cuda
from lora_kernels.cuda import lora_linear as cuda_lora_linear
from lora_kernels.ops.lora_linear import choose_backend

OPS = ("cuda_lora_linear_fwd",)


def _need_aot_extension():
    problem = cuda.aot_problem()
    if problem is not None:
        pytest.skip(f"no usable ahead-of-time build here: {problem}")


def test_extension_imports_and_registers_its_ops():
    _need_aot_extension()
    import lora_kernels._C  # noqa: F401  (the module is empty; loading it registers the ops)
    assert cuda.load(allow_jit=False) in ("aot", "preloaded")
    for op in OPS:
        schema = str(getattr(torch.ops.lora_kernels, op).default._schema)
        assert schema.startswith(f"lora_kernels::{op}(Tensor x, Tensor weight")


def test_build_record_matches_running_torch():
    _need_aot_extension()
    record = cuda.read_build_record(cuda.aot_library())
    assert record["torch"] == cuda.torch_version()
    assert int(record["cudart"]) >= 11000


def test_op_on_cpu_tensors_raises_a_sentence():
    _need_aot_extension()
    cuda.load(allow_jit=False)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    args = (x, torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(2, 8, dtype=torch.bfloat16),
            torch.randn(3, 2, dtype=torch.bfloat16), None, 1.0, False, True,
            torch.empty(4, 3, dtype=torch.bfloat16), torch.empty(4, 2))
    with pytest.raises(RuntimeError, match=r"cuda_lora_linear_fwd: x is on cpu, but the CUDA kernel needs CUDA tensors"):
        torch.ops.lora_kernels.cuda_lora_linear_fwd(*args)


def test_public_api_on_cpu_says_cuda_needs_cuda_tensors():
    x = torch.randn(3, 8)
    with pytest.raises(BackendUnavailable, match=r"lora_linear: cuda: the CUDA C\+\+ kernels need CUDA tensors, got tensors on cpu"):
        lora_kernels.lora_linear(x, torch.randn(5, 8), torch.randn(2, 8), torch.randn(5, 2), 1.0, backend="cuda")
    assert choose_backend(x, x[:2], "auto") == "torch"


def test_input_reasons():
    assert cuda_lora_linear.input_reason(torch.bfloat16, torch.bfloat16, 128) is None
    assert cuda_lora_linear.input_reason(torch.float16, torch.float32, 64) is None
    assert cuda_lora_linear.input_reason(torch.float32, torch.float32, 16) == (
        "cuda: dtype float32 is not supported by the CUDA kernel (float16, bfloat16); float32 runs on backend='triton'")
    assert cuda_lora_linear.input_reason(torch.bfloat16, torch.bfloat16, 129) == "cuda: rank 129 exceeds the CUDA kernel's limit of 128"
    assert cuda_lora_linear.input_reason(torch.bfloat16, torch.float32, 65).startswith(
        "cuda: rank 65 exceeds the CUDA kernel's limit of 64 for float32 adapters")


@pytest.fixture
def loader(monkeypatch):
    """lora_kernels.cuda.loader with nothing loaded yet (restored afterwards)."""
    monkeypatch.setattr(cuda, "_loaded", None)
    monkeypatch.setattr(cuda, "_load_error", None)
    monkeypatch.setattr(cuda, "_ops_registered", lambda: False)
    return monkeypatch


def test_reason_when_not_built_and_no_nvcc(loader):
    loader.setattr(cuda, "aot_library", lambda: None)
    loader.setattr(cuda, "install_status", lambda: {"cuda_extension": "skipped", "reason": "nvcc not found at install time"})
    loader.setattr(cuda, "jit_problem", lambda: "nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    assert cuda.unavailable_reason() == ("cuda: extension not built (nvcc not found at install time), and no JIT "
                                         "build is possible: nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    with pytest.raises(BackendUnavailable, match=r"^cuda: extension not built \(nvcc not found at install time\)"):
        cuda.load()


def test_not_built_but_jit_possible_is_available_and_builds_on_first_use(loader):
    loader.setattr(cuda, "aot_library", lambda: None)
    loader.setattr(cuda, "install_status", lambda: {})
    loader.setattr(cuda, "jit_problem", lambda: None)
    assert cuda.unavailable_reason() is None  # nothing compiled by asking
    built = []
    loader.setattr(cuda, "jit_build", lambda **kw: built.append(kw["why"]) or cuda.__dict__.__setitem__("_loaded", "jit"))
    assert cuda.load() == "jit"
    assert built == ["extension not built (no ahead-of-time build is installed)"]


def test_failed_jit_build_is_reported_once_and_kept(loader):
    loader.setattr(cuda, "aot_library", lambda: None)
    loader.setattr(cuda, "install_status", lambda: {})
    loader.setattr(cuda, "jit_problem", lambda: None)
    calls = []

    def failing_build(**kw):
        calls.append(1)
        raise RuntimeError("Error building extension 'lora_kernels_C'\nnvcc fatal: bad flag")

    loader.setattr(cuda, "jit_build", failing_build)
    for _ in range(2):
        with pytest.raises(BackendUnavailable, match="and the JIT build failed: RuntimeError: Error building extension"):
            cuda.load()
    assert len(calls) == 1
    assert cuda.unavailable_reason().startswith("cuda: extension not built")


def test_mismatched_build_is_reported_not_loaded(loader, tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF junk lora_kernels_build_info:torch=1.0.0;cudart=11080;end more junk")
    loader.setattr(cuda, "aot_library", lambda: fake)
    assert cuda.read_build_record(fake) == {"torch": "1.0.0", "cudart": "11080"}
    assert cuda.aot_problem() == (f"lora_kernels._C was built against torch 1.0.0 but torch {cuda.torch_version()} "
                                  "is running; reinstall (pip install --no-build-isolation -e .) to rebuild it")
    loader.setattr(cuda, "jit_problem", lambda: "JIT builds are off (LORA_KERNELS_NO_JIT is set)")
    loaded = []
    loader.setattr(torch.ops, "load_library", lambda path: loaded.append(path))
    assert cuda.unavailable_reason().startswith("cuda: lora_kernels._C was built against torch 1.0.0")
    assert loaded == []


def test_library_without_record(loader, tmp_path):
    fake = tmp_path / "_C.so"
    fake.write_bytes(b"\x7fELF no record")
    loader.setattr(cuda, "aot_library", lambda: fake)
    assert "carries no build record" in cuda.aot_problem()


def test_jit_problem_sentences(monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_NO_JIT", "1")
    assert cuda.jit_problem() == "JIT builds are off (LORA_KERNELS_NO_JIT is set)"
    monkeypatch.delenv("LORA_KERNELS_NO_JIT")
    monkeypatch.setattr(cuda, "CSRC_DIR", cuda.CSRC_DIR / "missing")
    assert cuda.jit_problem().startswith("the CUDA sources are not part of this install")


def test_jit_cache_is_per_torch_release(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_KERNELS_CACHE", str(tmp_path))
    assert cuda.jit_build_dir() == tmp_path / f"torch{cuda.torch_version()}-cuda{torch.version.cuda}"


def test_sources_listed_exist():
    for name in cuda.SOURCES:
        assert (cuda.CSRC_DIR / name).exists(), name


def test_install_built_the_extension_when_it_could():
    """After `pip install`, setup.py's record and the installed files agree."""
    status = cuda.install_status()
    if not status:
        pytest.skip("this checkout was not installed with pip (no lora_kernels/_build_status.json)")
    if status.get("torch") != torch.__version__:  # e.g. the versions lane running this checkout under torch 2.11
        pytest.skip(f"the install record is torch {status.get('torch')}'s, this process runs torch {torch.__version__}")
    if status["cuda_extension"] == "compiled":
        assert cuda.aot_library() is not None, f"setup.py compiled the extension ({status}) but lora_kernels._C is missing"
    else:
        assert status["cuda_extension"] == "skipped" and status["reason"], status


def test_build_command_when_nothing_to_do(capsys):
    _need_aot_extension()
    from lora_kernels.build import main
    assert main([]) == 0
    assert "nothing to build" in capsys.readouterr().out


def test_build_command_when_it_cannot_build(loader, capsys):
    from lora_kernels.build import main
    loader.setattr(cuda, "aot_problem", lambda: "extension not built (nvcc not found at install time)")
    loader.setattr(cuda, "jit_problem", lambda: "nvcc not found (set CUDA_HOME to a CUDA toolkit)")
    assert main([]) == 1
    assert "cannot build the CUDA extension: nvcc not found" in capsys.readouterr().err
