"""The CUDA C++ backend's loader: finds, checks and loads the extension ``lora_kernels._C``.

Where the extension comes from, in this order:

1. the ahead-of-time build: ``pip install`` compiled ``csrc/`` into ``lora_kernels/_C*.so``
   (setup.py). It is used only if it was compiled against the running torch: the library carries
   a build record (torch version, CUDA runtime) that is read from its bytes *before* loading it,
   so a mismatched build is reported, never loaded;
2. a JIT build with ``torch.utils.cpp_extension.load`` when the AOT build is missing or
   mismatched, the CUDA sources (``csrc/``) and nvcc are present, and ``LORA_KERNELS_NO_JIT`` is
   not set. It announces itself on stderr, builds for ``TORCH_CUDA_ARCH_LIST`` (default: the
   visible GPUs, Hopper as ``9.0a``; the sm90 kernels only where ``sources.sm90_build`` allows), and caches under ``$LORA_KERNELS_CACHE`` (default ``~/.cache/lora_kernels``) in a
   folder per torch version; ``python -m lora_kernels.build`` runs it ahead of time.

Otherwise :func:`unavailable_reason` says why in one sentence, e.g. ``"cuda: extension not built
(LORA_KERNELS_SKIP_CUDA was set at install time), and no JIT build is possible: nvcc not found
(...); set CUDA_HOME to a CUDA toolkit"``. The toolkit is found as the install finds it
(lora_kernels/_toolkit.py: CUDA_HOME, else what the nvcc on PATH reports, wrappers included).

Nothing here runs at ``import lora_kernels``: this module is imported on first use of the CUDA
backend, and the library is loaded on first launch (or first availability query).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional

import torch

from .._toolkit import find_toolkit
from ..errors import BackendUnavailable
from . import sources

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # lora_kernels/
CSRC_DIR = PACKAGE_DIR.parent / "csrc"
SOURCES = sources.SOURCES   # csrc/ files of every build; the sm90 ones are added by sources.sm90_build
BUILD_STATUS_FILE = PACKAGE_DIR / "_build_status.json"   # written by setup.py
DEFAULT_ARCH_LIST = "8.0;9.0a"                            # the AOT build's targets (setup.py)
JIT_NAME = "lora_kernels_C"
NVCC_FLAGS = ("-O3", "-lineinfo")   # the C++ standard is torch's choice (C++20 for torch >= 2.10)
CXX_FLAGS = ("-O2",)
_RECORD_PREFIX = b"lora_kernels_build_info:"              # csrc/bindings.cpp
_RECORD_END = b";end"

_lock = threading.Lock()
_loaded: Optional[str] = None          # "aot" or "jit" once the ops are registered
_load_error: Optional[str] = None      # why the last load/build attempt failed


# ---------------------------------------------------------------------------------------------
# Build records and what is there
# ---------------------------------------------------------------------------------------------

def torch_version() -> str:
    """The running torch's release, without the local part ("2.14.1+cu130" -> "2.14.1")."""
    return torch.__version__.split("+")[0]


def read_build_record(library: Path) -> Optional[Dict[str, str]]:
    """The build record compiled into `library` ({"torch": "2.14.1", "cudart": "13000"}), or None."""
    try:
        data = Path(library).read_bytes()
    except OSError:
        return None
    start = data.find(_RECORD_PREFIX)
    end = data.find(_RECORD_END, start)
    if start < 0 or end < 0:
        return None
    fields = data[start + len(_RECORD_PREFIX):end].decode("ascii", "replace").split(";")
    return dict(f.split("=", 1) for f in fields if "=" in f)


def install_status() -> Dict[str, str]:
    """What setup.py recorded about the CUDA build at install time ({} if it left no record)."""
    try:
        return json.loads(BUILD_STATUS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def aot_library() -> Optional[Path]:
    """The ahead-of-time built ``lora_kernels/_C*.so``, if installed."""
    spec = importlib.util.find_spec("lora_kernels._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def aot_problem() -> Optional[str]:
    """None when the AOT build can be loaded into this torch, else why not (no "cuda: " prefix)."""
    library = aot_library()
    if library is None:
        reason = install_status().get("reason")
        return f"extension not built ({reason})" if reason else "extension not built (no ahead-of-time build is installed)"
    record = read_build_record(library)
    if record is None:
        return f"{library.name} carries no build record (built by an older lora_kernels?); rebuild it"
    if record.get("torch") != torch_version():
        return (f"lora_kernels._C was built against torch {record.get('torch')} but torch {torch_version()} "
                f"is running; reinstall (pip install --no-build-isolation -e .) to rebuild it")
    return None


def jit_problem() -> Optional[str]:
    """None when a JIT build can run here, else why not."""
    if os.environ.get("LORA_KERNELS_NO_JIT", "0") not in ("", "0"):
        return "JIT builds are off (LORA_KERNELS_NO_JIT is set)"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} has no CUDA support"
    missing = [s for s in SOURCES if not (CSRC_DIR / s).exists()]
    if missing:
        return f"the CUDA sources are not part of this install ({CSRC_DIR} lacks {', '.join(missing)})"
    home, how = find_toolkit()
    if home is None:
        return how
    if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
        return "ninja not found (pip install ninja)"
    return None


def jit_build_dir() -> Path:
    """One cache folder per torch release and CUDA version: a JIT build never meets another ABI."""
    root = Path(os.environ.get("LORA_KERNELS_CACHE", Path.home() / ".cache" / "lora_kernels"))
    return root / f"torch{torch_version()}-cuda{torch.version.cuda}"


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _with_venv_on_path():
    """torch's cpp_extension looks for `ninja` on PATH; a venv's own bin need not be on it."""
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def _use_toolkit() -> None:
    """Point torch's cpp_extension at the toolkit _toolkit.py finds (the install's choice too):
    torch's own guess, from the folder of the nvcc on PATH, is wrong for a wrapper script."""
    from torch.utils import cpp_extension
    home, how = find_toolkit()
    if home is None:
        raise BackendUnavailable(f"cuda: no JIT build is possible: {how}")
    os.environ["CUDA_HOME"] = str(home)
    cpp_extension.CUDA_HOME = str(home)


def jit_arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST when set, else the visible GPUs' architectures, with Hopper's as "9.0a"
    (torch's own default names it "9.0", which has no wgmma/TMA); the AOT default without GPUs."""
    env = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if env:
        return env
    if not torch.cuda.is_available():
        return DEFAULT_ARCH_LIST
    archs = []
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        arch = f"{major}.{minor}" + ("a" if (major, minor) == (9, 0) else "")
        if arch not in archs:
            archs.append(arch)
    return ";".join(archs)


def jit_build(verbose: bool = False, why: str = "") -> Path:
    """Compile csrc/ with torch.utils.cpp_extension.load (cached) and register the ops."""
    global _loaded
    from torch.utils.cpp_extension import load

    _with_venv_on_path()
    _use_toolkit()
    build_dir = jit_build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    archs = jit_arch_list()
    sm90 = sources.sm90_build(archs, os.environ["CUDA_HOME"])  # set by _use_toolkit
    without = f" (without the sm90 kernels: {sm90.reason})" if sm90.reason else ""
    print(f"lora_kernels: JIT-building the CUDA extension ({why or 'on request'}) for {archs}{without} in {build_dir}; "
          f"the first build takes a minute or more, later runs reuse it", file=sys.stderr, flush=True)
    start = time.time()
    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # what torch's load() compiles for
    try:
        load(name=JIT_NAME, sources=[str(CSRC_DIR / s) for s in SOURCES + tuple(sm90.sources)],
             extra_include_paths=[str(CSRC_DIR)] + sm90.include_dirs, extra_cflags=list(CXX_FLAGS),
             extra_cuda_cflags=list(NVCC_FLAGS), build_directory=str(build_dir), is_python_module=False,
             verbose=verbose)
    finally:
        if previous is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = previous
    library = build_dir / f"{JIT_NAME}.so"
    print(f"lora_kernels: CUDA extension ready ({library}, {time.time() - start:.0f} s)", file=sys.stderr, flush=True)
    _loaded = "jit"
    return library


def _ops_registered() -> bool:
    return hasattr(torch.ops.lora_kernels, "cuda_lora_linear_fwd")


def load(allow_jit: bool = True) -> str:
    """Register the CUDA ops (AOT library, else JIT build); returns "aot", "jit" or "preloaded".

    Raises BackendUnavailable with the reason when neither works."""
    global _loaded, _load_error
    with _lock:
        if _loaded is not None:
            return _loaded
        if _ops_registered():  # someone imported lora_kernels._C (or loaded a build) already
            _loaded = "preloaded"
            return _loaded
        problem = aot_problem()
        if problem is None:
            try:
                torch.ops.load_library(str(aot_library()))
                _loaded = "aot"
                return _loaded
            except OSError as e:  # e.g. a CUDA runtime library missing at run time
                problem = f"lora_kernels._C failed to load: {str(e).splitlines()[0]}"
        if _load_error is not None:
            raise BackendUnavailable(_load_error)
        blocker = jit_problem()
        if blocker is not None or not allow_jit:
            raise BackendUnavailable(f"cuda: {problem}" + (f", and no JIT build is possible: {blocker}" if blocker else ""))
        try:
            jit_build(why=problem)
        except Exception as e:  # compiler errors: keep the first lines, don't retry on every call
            first = " ".join(str(e).strip().splitlines()[:3])[:500]
            _load_error = f"cuda: {problem}, and the JIT build failed: {type(e).__name__}: {first}"
            raise BackendUnavailable(_load_error) from e
        return _loaded


def unavailable_reason() -> Optional[str]:
    """None when the CUDA backend can run (loading the AOT library, or a JIT build to come on first
    use), else a sentence saying why not. Never compiles anything."""
    if torch.version.cuda is None:
        return f"cuda: torch {torch.__version__} has no CUDA support"
    if _loaded is not None:
        return None
    if _load_error is not None:
        return _load_error
    problem = aot_problem()
    if problem is None:
        try:
            load(allow_jit=False)
            return None
        except BackendUnavailable as e:
            problem = str(e)[len("cuda: "):]
    blocker = jit_problem()
    if blocker is None:
        return None  # built on first use
    return f"cuda: {problem}, and no JIT build is possible: {blocker}"
