"""Where the CUDA toolkit is: one answer for the install (setup.py) and the JIT build (cuda/loader.py).

torch guesses CUDA_HOME from the folder of the ``nvcc`` on PATH, which is wrong when that nvcc is
a wrapper script elsewhere (``/usr/local/bin/nvcc`` exec'ing ``/usr/local/cuda-13.0/bin/nvcc``:
torch then picks ``/usr/local`` and the build stops at ``cuda_runtime_api.h: No such file``).
Here the toolkit is, in this order:

1. ``$CUDA_HOME`` (else ``$CUDA_PATH``) when set -- an explicit choice is used or reported, never
   replaced by a guess;
2. the toolkit the ``nvcc`` on PATH belongs to, as nvcc itself reports it: ``nvcc -v --dryrun``
   prints ``#$ TOP=<toolkit>/bin/..`` for the real binary, through any wrapper;
3. ``/usr/local/cuda``.

A candidate counts only if it has ``bin/nvcc`` and ``include/cuda_runtime_api.h``.

Standard library only: setup.py loads this file by path, before torch and without importing the
package.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional, Tuple

DEFAULT_TOOLKIT = "/usr/local/cuda"
RUNTIME_HEADER = Path("include") / "cuda_runtime_api.h"
NVCC_QUERY_TIMEOUT_S = 60  # `nvcc -v --dryrun` takes ~0.1 s (CPU machine); the margin is for loaded machines


def toolkit_problem(home: Path) -> Optional[str]:
    """None when `home` is a usable toolkit, else what it lacks."""
    if not (home / "bin" / "nvcc").is_file():
        return f"{home} has no bin/nvcc"
    if not (home / RUNTIME_HEADER).is_file():
        return f"{home} has no {RUNTIME_HEADER} (not a complete CUDA toolkit)"
    return None


def nvcc_reported_toolkit(nvcc: str) -> Optional[Path]:
    """The toolkit folder that `nvcc` (a binary or a wrapper) really runs from, or None.

    nvcc's dry run prints its environment without compiling anything; the input file need not
    exist."""
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "lora_kernels_probe.cu", "-o", os.devnull],
                             capture_output=True, text=True, timeout=NVCC_QUERY_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            return Path(line[len("#$ TOP="):].strip()).resolve()
    return None


def find_toolkit() -> Tuple[Optional[Path], str]:
    """(toolkit, how it was found), or (None, why no toolkit was found)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        value = os.environ.get(var)
        if value:
            home = Path(value)
            problem = toolkit_problem(home)
            if problem:
                return None, f"{var}={value} is not a usable CUDA toolkit: {problem}"
            return home, f"${var}"
    nvcc = shutil.which("nvcc")
    if nvcc is not None:
        home = nvcc_reported_toolkit(nvcc)
        if home is None:
            return None, f"the nvcc on PATH ({nvcc}) did not report its toolkit (nvcc -v --dryrun); set CUDA_HOME"
        problem = toolkit_problem(home)
        if problem:
            return None, f"the nvcc on PATH ({nvcc}) belongs to {home}, which is not usable: {problem}; set CUDA_HOME"
        return home, f"the nvcc on PATH ({nvcc})"
    home = Path(DEFAULT_TOOLKIT)
    if toolkit_problem(home) is None:
        return home, DEFAULT_TOOLKIT
    return None, "nvcc not found (not on PATH, no CUDA_HOME, no /usr/local/cuda); set CUDA_HOME to a CUDA toolkit"
