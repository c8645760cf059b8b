"""Build script: compiles the CUDA extension ``lora_kernels._C`` from ``csrc/`` when it can.

The extension is optional: the install never fails because of it. It is built when the build
environment has a CUDA-enabled torch and a CUDA toolkit (found by lora_kernels/_toolkit.py:
``$CUDA_HOME``, else the toolkit the ``nvcc`` on PATH reports -- wrappers included -- else
/usr/local/cuda). When it is skipped, or its build fails, the package installs as pure Python and
records why in lora_kernels/_build_status.json, so that ``backend="cuda"`` (and the JIT build,
lora_kernels/cuda/loader.py) can say so later ("cuda: extension not built (nvcc not found ...)").
No GPU is needed to build.

Environment:
  CUDA_HOME                  the toolkit (found from nvcc when unset)
  TORCH_CUDA_ARCH_LIST       target architectures; default "8.0;9.0a" (A100, H100/H200)
  LORA_KERNELS_SKIP_CUDA     =1: install pure Python without trying the CUDA build
  LORA_KERNELS_REQUIRE_CUDA  =1: fail the install when the extension is skipped or fails to build
                             (CI, and a GPU image's build stage, which wants the extension)
  MAX_JOBS                   parallel compile jobs (ninja); default: all cores

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


def flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0")


def record(status: dict, build_lib: str = "") -> None:
    """What the CUDA build did, for lora_kernels.cuda's error messages (package data). Also into
    build_lib's copy when build_py has already copied the record there (a non-editable install)."""
    text = json.dumps(status, indent=1) + "\n"
    STATUS_FILE.write_text(text)
    copy = Path(build_lib) / "lora_kernels" / STATUS_FILE.name if build_lib else None
    if copy is not None and copy.exists() and copy.resolve() != STATUS_FILE:
        copy.write_text(text)


def skipped(reason: str) -> dict:
    if flag("LORA_KERNELS_REQUIRE_CUDA"):
        raise SystemExit(f"lora_kernels setup: LORA_KERNELS_REQUIRE_CUDA is set, but the CUDA extension "
                         f"cannot be built: {reason}")
    log(f"building pure Python only: {reason}")
    record({"cuda_extension": "skipped", "reason": reason})
    return {}


# ---------------------------------------------------------------------------------------------
# The toolkit: lora_kernels/_toolkit.py (torch-free, shared with the JIT build), loaded by path
# ---------------------------------------------------------------------------------------------

def load_toolkit_finder():
    spec = importlib.util.spec_from_file_location("lora_kernels_toolkit", ROOT / "lora_kernels" / "_toolkit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def find_cuda_home():
    """(toolkit, how it was found) or (None, why not). The toolkit goes into CUDA_HOME before
    torch.utils.cpp_extension is imported, which would otherwise guess it from nvcc's folder."""
    home, how = load_toolkit_finder().find_toolkit()
    if home is not None:
        os.environ["CUDA_HOME"] = str(home)
    return home, how


# ---------------------------------------------------------------------------------------------
# The build: failures install pure Python with the reason recorded (unless REQUIRE_CUDA)
# ---------------------------------------------------------------------------------------------

def optional_build(build_ext_class):
    """build_ext that turns a failed CUDA build into a pure-Python install with the reason recorded
    (re-raised when LORA_KERNELS_REQUIRE_CUDA is set)."""
    class OptionalCudaBuild(build_ext_class):
        def run(self):
            try:
                super().run()
            except Exception as e:  # compiler, linker or ninja errors: the compiler output is above
                if flag("LORA_KERNELS_REQUIRE_CUDA"):
                    raise
                first = " ".join(str(e).strip().splitlines()[:2])[:300]
                reason = (f"the CUDA build failed at install time ({type(e).__name__}: {first}); its compiler "
                          f"output is in the pip log (pip install -v)")
                log(f"installing pure Python only: {reason}")
                record({"cuda_extension": "failed", "reason": reason}, getattr(self, "build_lib", ""))
                self.extensions = []  # nothing left to copy or install
                self.distribution.ext_modules = []
    return OptionalCudaBuild


def cuda_build_options() -> dict:
    """setup() keyword arguments that add the extension, or {} (with the reason recorded)."""
    if flag("LORA_KERNELS_SKIP_CUDA"):
        return skipped("LORA_KERNELS_SKIP_CUDA was set at install time")
    home, how = find_cuda_home()
    if home is None:
        return skipped(how)
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        return skipped(f"torch was not importable in the build environment: {e}")
    if torch.version.cuda is None:
        return skipped(f"the build environment's torch {torch.__version__} has no CUDA support")
    cpp_extension.CUDA_HOME = str(home)  # in case it was imported (and guessed) before us
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    # torch looks for `ninja` on PATH; an unactivated venv's bin (where pip put it) need not be there.
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    log(f"compiling lora_kernels._C against torch {torch.__version__} with {home}/bin/nvcc ({how}) for {archs}; "
        f"this takes minutes (LORA_KERNELS_SKIP_CUDA=1 skips it)")
    record({"cuda_extension": "compiled", "reason": "", "torch": torch.__version__, "arch_list": archs,
            "cuda_home": str(home)})
    sm90_sources, sm90_includes = sm90_parts(str(home))
    extension = cpp_extension.CUDAExtension(
        "lora_kernels._C",
        sources=SOURCES + sm90_sources,
        include_dirs=[str(ROOT / "csrc")] + sm90_includes,
        # The C++ standard is torch's choice (C++20 for torch >= 2.10); the kernels need C++17.
        extra_compile_args={"cxx": ["-O2"], "nvcc": ["-O3", "-lineinfo"]},
    )
    build_ext = optional_build(cpp_extension.BuildExtension.with_options(use_ninja=True))
    return {"ext_modules": [extension], "cmdclass": {"build_ext": build_ext}}


if __name__ == "__main__":  # pip runs it so; tests/test_install.py imports the functions above
    setup(package_data={"lora_kernels": ["_build_status.json"]}, **cuda_build_options())
