"""Build script: compiles the CUDA extension ``lora_kernels._C`` from ``csrc/`` when it can.

The extension is built when the build environment has a CUDA-enabled torch and a CUDA toolkit
(``$CUDA_HOME/bin/nvcc``, or torch's own search); otherwise the package installs as pure Python
and records why, so that ``backend="cuda"`` can say so later ("cuda: extension not built (nvcc
not found at install time) ..."). No GPU is needed to build.

Environment:
  CUDA_HOME               the toolkit (e.g. /usr/local/cuda when nvcc on PATH is elsewhere)
  TORCH_CUDA_ARCH_LIST    target architectures; default "8.0;9.0a" (A100, H100/H200)
  LORA_KERNELS_SKIP_CUDA  =1: install pure Python without trying the CUDA build
  MAX_JOBS                parallel compile jobs (ninja); default: all cores

The extension must be compiled against the torch it runs with. pyproject.toml lists torch as a
build requirement, so an isolated build (plain ``pip install``) compiles against the torch that
pip resolves for the build environment -- the same release as the runtime one when the
environment pins it; ``pip install --no-build-isolation`` compiles against the installed torch.
lora_kernels/cuda/loader.py reads the torch version recorded in the library and refuses (with a reason,
and a JIT rebuild where possible) to load a build made for another torch.
"""
import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
STATUS_FILE = ROOT / "lora_kernels" / "_build_status.json"
DEFAULT_ARCH_LIST = "8.0;9.0a"


def _sources_module():
    """lora_kernels/cuda/sources.py (the one source list, shared with the JIT build), loaded by path:
    setup.py imports neither the package nor torch at module level."""
    spec = importlib.util.spec_from_file_location("_lora_kernels_sources", ROOT / "lora_kernels" / "cuda" / "sources.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


_SOURCES = _sources_module()
SOURCES = [f"csrc/{name}" for name in _SOURCES.SOURCES]


def sm90_parts(cuda_home: str):
    """(sources, include dirs) of the Hopper kernels: the CUTLASS headers of nvidia-cutlass (a
    build requirement) when this build can compile them, else ([], []) with the reason logged --
    the extension is then built with the sm_80 kernels only; never a failed install."""
    build = _SOURCES.sm90_build(os.environ.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST), cuda_home)
    if build.reason:
        log(f"building without the sm90 (Hopper) kernels: {build.reason}")
    return [f"csrc/{name}" for name in build.sources], build.include_dirs


def log(message: str) -> None:
    print(f"lora_kernels setup: {message}", file=sys.stderr, flush=True)


def record(status: dict) -> None:
    """What the CUDA build did, for lora_kernels.cuda's error messages (package data)."""
    STATUS_FILE.write_text(json.dumps(status, indent=1) + "\n")


def skipped(reason: str) -> dict:
    log(f"building pure Python only: {reason}")
    record({"cuda_extension": "skipped", "reason": reason})
    return {}


def cuda_build_options() -> dict:
    """setup() keyword arguments that add the extension, or {} (with the reason recorded)."""
    if os.environ.get("LORA_KERNELS_SKIP_CUDA", "0") not in ("", "0"):
        return skipped("LORA_KERNELS_SKIP_CUDA was set at install time")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as e:
        return skipped(f"torch was not importable in the build environment: {e}")
    if torch.version.cuda is None:
        return skipped(f"the build environment's torch {torch.__version__} has no CUDA support")
    if CUDA_HOME is None or not (Path(CUDA_HOME) / "bin" / "nvcc").exists():
        return skipped("nvcc not found at install time")
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    # torch looks for `ninja` on PATH; an unactivated venv's bin (where pip put it) need not be there.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    log(f"compiling lora_kernels._C against torch {torch.__version__} with {CUDA_HOME}/bin/nvcc for {archs}")
    record({"cuda_extension": "compiled", "reason": "", "torch": torch.__version__, "arch_list": archs,
            "cuda_home": str(CUDA_HOME)})
    sm90_sources, sm90_includes = sm90_parts(str(CUDA_HOME))
    extension = CUDAExtension(
        "lora_kernels._C",
        sources=SOURCES + sm90_sources,
        include_dirs=[str(ROOT / "csrc")] + sm90_includes,
        # The C++ standard is torch's choice (C++20 for torch >= 2.10); the kernels need C++17.
        extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(package_data={"lora_kernels": ["_build_status.json"]}, **cuda_build_options())
