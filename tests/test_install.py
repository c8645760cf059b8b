"""CPU lane: the install's toolkit detection (lora_kernels/_toolkit.py, shared with the JIT build)
and setup.py's rule that the optional CUDA extension never fails a user's install."""
import importlib.util
import json
import os
import stat
from pathlib import Path

import pytest

from lora_kernels import _toolkit
from lora_kernels.cuda import loader

ROOT = Path(__file__).resolve().parent.parent


def _toolkit_tree(root: Path, header: bool = True) -> Path:
    """A fake toolkit: bin/nvcc answering the dry run as nvcc does (TOP=<its bin>/..)."""
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    if header:
        (root / "include" / "cuda_runtime_api.h").write_text("")
    _script(root / "bin" / "nvcc", f'echo "#$ _HERE_={root}/bin"; echo "#$ TOP={root}/bin/.."')
    return root


def _script(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(_toolkit, "DEFAULT_TOOLKIT", str(tmp_path / "no-default-toolkit"))
    return monkeypatch


def test_wrapper_nvcc_on_path_finds_the_real_toolkit(clean_env, tmp_path):
    """The bug of issue 15: /usr/local/bin/nvcc exec'ing the toolkit's nvcc made torch pick
    /usr/local. The dry run names the real folder."""
    real = _toolkit_tree(tmp_path / "cuda-13.0")
    wrappers = tmp_path / "wrappers"
    wrappers.mkdir()
    _script(wrappers / "nvcc", f'exec {real}/bin/nvcc "$@"')
    clean_env.setenv("PATH", f"{wrappers}{os.pathsep}/usr/bin{os.pathsep}/bin")
    home, how = _toolkit.find_toolkit()
    assert home == real.resolve() and str(wrappers / "nvcc") in how


def test_incomplete_toolkits_are_refused_with_the_reason(clean_env, tmp_path):
    headless = _toolkit_tree(tmp_path / "headless", header=False)
    clean_env.setenv("PATH", f"{headless / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin")
    home, why = _toolkit.find_toolkit()
    assert home is None and "cuda_runtime_api.h" in why and "CUDA_HOME" in why
    clean_env.setenv("CUDA_HOME", str(tmp_path))  # an explicit choice is reported, never replaced
    home, why = _toolkit.find_toolkit()
    assert home is None and why.startswith(f"CUDA_HOME={tmp_path} is not a usable CUDA toolkit")


def test_no_nvcc_anywhere(clean_env, tmp_path):
    clean_env.setenv("PATH", str(tmp_path))
    home, why = _toolkit.find_toolkit()
    assert home is None and why.startswith("nvcc not found")


def test_jit_build_reports_the_same_toolkit_problem(clean_env, tmp_path):
    clean_env.setenv("CUDA_HOME", str(tmp_path))
    clean_env.delenv("LORA_KERNELS_NO_JIT", raising=False)
    if loader.torch.version.cuda is None:
        pytest.skip("this torch has no CUDA support: the JIT check stops before the toolkit")
    assert loader.jit_problem().startswith(f"CUDA_HOME={tmp_path} is not a usable CUDA toolkit")


@pytest.fixture
def setup_py(tmp_path, monkeypatch):
    """setup.py's functions (it calls setup() only when run as a script), its record redirected."""
    spec = importlib.util.spec_from_file_location("lora_kernels_setup_under_test", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "STATUS_FILE", tmp_path / "_build_status.json")
    monkeypatch.delenv("LORA_KERNELS_REQUIRE_CUDA", raising=False)
    return module


class _FailingBuild:
    def __init__(self, distribution):
        self.distribution, self.extensions, self.build_lib = distribution, ["lora_kernels._C"], ""

    def run(self):
        raise RuntimeError("Error compiling objects for extension")


def _failed_build(setup_py):
    distribution = type("Distribution", (), {"ext_modules": ["lora_kernels._C"]})()
    build = setup_py.optional_build(_FailingBuild)(distribution)
    build.run()
    return build, distribution


def test_failed_build_installs_pure_python_and_records_why(setup_py, capsys):
    build, distribution = _failed_build(setup_py)
    assert build.extensions == [] and distribution.ext_modules == []
    status = json.loads(setup_py.STATUS_FILE.read_text())
    assert status["cuda_extension"] == "failed"
    assert "the CUDA build failed at install time (RuntimeError: Error compiling objects" in status["reason"]
    assert "installing pure Python only" in capsys.readouterr().err


def test_require_cuda_fails_on_a_failed_or_skipped_build(setup_py, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_REQUIRE_CUDA", "1")
    with pytest.raises(RuntimeError, match="Error compiling objects"):
        _failed_build(setup_py)
    with pytest.raises(SystemExit, match="LORA_KERNELS_REQUIRE_CUDA is set.*nvcc not found"):
        setup_py.skipped("nvcc not found")
    assert not setup_py.STATUS_FILE.exists()


def test_skip_records_the_reason_the_loader_reports(setup_py, monkeypatch):
    monkeypatch.setenv("LORA_KERNELS_SKIP_CUDA", "1")
    assert setup_py.cuda_build_options() == {}
    status = json.loads(setup_py.STATUS_FILE.read_text())
    assert status == {"cuda_extension": "skipped", "reason": "LORA_KERNELS_SKIP_CUDA was set at install time"}
    monkeypatch.setattr(loader, "BUILD_STATUS_FILE", setup_py.STATUS_FILE)
    monkeypatch.setattr(loader, "aot_library", lambda: None)
    assert loader.aot_problem() == "extension not built (LORA_KERNELS_SKIP_CUDA was set at install time)"
