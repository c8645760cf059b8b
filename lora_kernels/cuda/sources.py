"""What the CUDA extension is compiled from: the ``csrc/`` sources and, for Hopper, the CUTLASS 4
headers of the ``nvidia-cutlass`` package (a build requirement, not vendored).

One list for both builds -- setup.py (ahead of time) loads this file by path, without importing
the package or torch; ``loader.py`` (JIT) imports it. The sm90 sources are added only when the
build can compile them: the CUTLASS headers are installed, a ``9.0a`` target is in the arch list
(wgmma and TMA exist only on sm_90a) and nvcc is recent enough; otherwise the extension is built
without them and :func:`sm90_build` says why (``backend="cuda"`` then runs the sm_80 kernels on
Hopper too). Standard library only.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
from pathlib import Path
from typing import List, NamedTuple, Optional

# Paths under csrc/, one folder per op family (its kernel headers, plan and launchers; common/
# holds what the families share). The sm_80 kernels (mma.sync) and the torch-facing launchers:
# in every build. The sm90 launcher (lora_linear_sm90.cpp) is too: it reports a build without the
# sm90 kernels in a sentence.
SOURCES = ("lora_linear/lora_linear_kernels.cu", "lora_linear/lora_linear.cpp", "bindings.cpp")
SOURCES += ("merge/merge_kernels.cu", "merge/merge.cpp")  # in-place merge (launchers in cuda/merge.py)
SOURCES += ("multi_lora/multi_lora_kernels.cu", "multi_lora/multi_lora.cpp")  # multi-adapter shrink / expand / linear
SOURCES += ("lora_linear/lora_linear_sm90.cpp",)  # Hopper fused forward: launcher (kernels below)
# One .cu per instantiation family, so that ninja compiles them in parallel.
SM90_SOURCES = ("lora_linear/lora_linear_sm90_bf16.cu", "lora_linear/lora_linear_sm90_fp16.cu",
                "lora_linear/lora_linear_sm90_dx_bf16.cu", "lora_linear/lora_linear_sm90_dx_fp16.cu")  # + backward dx
CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"  # pyproject.toml's [build-system] requires, the same pin
SM90_ARCH = "9.0a"
MIN_NVCC_FOR_SM90 = (12, 3)  # CUTLASS 4's sm90 collectives; checked with nvcc 13.0 here, older not tried


class Sm90Build(NamedTuple):
    sources: List[str]        # file names under csrc/ to add ([] when not built)
    include_dirs: List[str]   # the CUTLASS include directory ([] when not built)
    reason: str               # "" when built, else why not (one sentence)


def cutlass_include_dir() -> Optional[Path]:
    """``cutlass_library/source/include`` of the installed ``nvidia-cutlass`` package, or None."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.origin:
        return None
    include = Path(spec.origin).parent / "source" / "include"
    return include if (include / "cutlass" / "cutlass.h").exists() and (include / "cute" / "tensor.hpp").exists() else None


def nvcc_version(cuda_home: Optional[str]) -> Optional[tuple]:
    """(major, minor) of ``$cuda_home/bin/nvcc``, or None when it cannot be run."""
    if not cuda_home:
        return None
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def sm90_build(arch_list: str, cuda_home: Optional[str]) -> Sm90Build:
    """Whether this build compiles the sm90 kernels, for the targets `arch_list` (the value of
    TORCH_CUDA_ARCH_LIST, e.g. "8.0;9.0a") and the toolkit at `cuda_home`."""
    archs = [a.strip() for a in re.split(r"[;\s]+", arch_list or "") if a.strip()]
    if SM90_ARCH not in [a.replace("+PTX", "") for a in archs]:
        return Sm90Build([], [], f"TORCH_CUDA_ARCH_LIST={arch_list!r} has no {SM90_ARCH} target "
                                 f"(wgmma and TMA need sm_90a; '9.0' alone is not enough)")
    include = cutlass_include_dir()
    if include is None:
        return Sm90Build([], [], f"the CUTLASS headers were not found (pip install {CUTLASS_REQUIREMENT})")
    version = nvcc_version(cuda_home)
    if version is None or version < MIN_NVCC_FOR_SM90:
        found = "unknown" if version is None else f"{version[0]}.{version[1]}"
        return Sm90Build([], [], f"nvcc {found} is older than the {MIN_NVCC_FOR_SM90[0]}.{MIN_NVCC_FOR_SM90[1]} "
                                 f"that CUTLASS 4's sm90 kernels need")
    return Sm90Build(list(SM90_SOURCES), [str(include)], "")
