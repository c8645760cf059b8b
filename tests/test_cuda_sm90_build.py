"""CPU lane: the Hopper fused forward and backward dx (csrc/lora_linear/lora_linear_sm90*.cu) as
built for sm_90a -- their SASS runs on Hopper's own instructions (HGMMA = wgmma, UTMALDG = TMA
loads, multicast inside a cluster; dx's wgmma reads B transposed, .tnspB), ptxas reports no
local-memory spills; and the build plumbing (CUTLASS headers found, sm90 sources added only when
they can be compiled).

The same kernels serve the Hopper multi-adapter linear (lora_kernels/cuda/multi_lora_sm90.py):
it launches cuda_lora_linear_sm90_fwd with a per-slot LoRA tail, no kernel or CUTLASS
instantiation of its own, so the SASS and spill checks here cover the kernel that path launches
(same translation units, lora_linear_sm90_bf16.cu / _fp16.cu; tests/test_cuda_sm90_multi_plan.py
checks that the path calls exactly that op).

The object is the ahead-of-time build's library when it carries the sm90 kernels (no extra
compile), else lora_linear_sm90_bf16.cu / lora_linear_sm90_dx_bf16.cu compiled here with the
extension's nvcc flags (about a CPU-minute each: marked slow). The emulator cannot model wgmma or
TMA; the GPU lane runs the kernels.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from lora_kernels.cuda import sources

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
SASS_NEEDED = ("HGMMA.64x256x16.F32.BF16", "HGMMA.64x128x16.F32.BF16", "HGMMA.64x64x16.F32.BF16", "UTMALDG",
               "UTMALDG.3D.MULTICAST", "UTMASTG")


def cuda_home():
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    return home if (Path(home) / "bin" / "nvcc").exists() else None


def cuobjdump():
    """cuobjdump from the toolkit, PATH, or the copy that ships with Triton."""
    home = cuda_home()
    candidates = [Path(home) / "bin" / "cuobjdump"] if home else []
    if shutil.which("cuobjdump"):
        candidates.append(Path(shutil.which("cuobjdump")))
    try:
        import triton
        candidates.append(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.exists()), None)


def extension_nvcc_flags():
    """The flags torch's cpp_extension gives our .cu files (C++ standard, half/bf16 macros)."""
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    from lora_kernels.cuda.loader import NVCC_FLAGS
    return ["-std=c++20", *COMMON_NVCC_FLAGS, *NVCC_FLAGS]


def _sm90_object(tmp_path_factory, source: str, built: str):
    """(path of an sm_90a object holding `source`'s kernels, ptxas's -v report or None): the AOT
    library when its `built` flag (a function of lora_kernels.cuda.lora_linear) says it has them,
    else `source` compiled here."""
    if cuobjdump() is None:
        pytest.skip("cuobjdump not found (CUDA toolkit or Triton's bundled copy)")
    from lora_kernels.cuda import loader
    if loader.aot_problem() is None:
        loader.load(allow_jit=False)
        from lora_kernels.cuda import lora_linear
        if getattr(lora_linear, built)():  # (the symbol's name alone is in every build: a weak reference there)
            return loader.aot_library(), None
    home = cuda_home()
    build = sources.sm90_build(sources.SM90_ARCH, home)
    if build.reason:
        pytest.skip(f"cannot compile the sm90 kernels here: {build.reason}")
    obj = tmp_path_factory.mktemp("sm90") / (Path(source).stem + ".o")
    cmd = [str(Path(home) / "bin" / "nvcc"), *extension_nvcc_flags(), "-gencode", "arch=compute_90a,code=sm_90a",
           "-Xptxas", "-v", f"-I{CSRC}", *(f"-I{d}" for d in build.include_dirs),
           "-c", str(CSRC / source), "-o", str(obj)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return obj, done.stderr


@pytest.fixture(scope="module")
def sm90_build(tmp_path_factory):
    """(path of an sm_90a object holding the bf16 forward kernels, ptxas's -v report or None)."""
    return _sm90_object(tmp_path_factory, "lora_linear/lora_linear_sm90_bf16.cu", "sm90_built")


@pytest.fixture(scope="module")
def sm90_dx_build(tmp_path_factory):
    """(path of an sm_90a object holding the bf16 backward-dx kernels, ptxas's -v report or None)."""
    return _sm90_object(tmp_path_factory, "lora_linear/lora_linear_sm90_dx_bf16.cu", "sm90_dx_built")


def sm90a_sass(obj) -> str:
    """The SASS of `obj`'s sm_90a code only: an AOT library built for "8.0;9.0a" also holds the
    CUTLASS kernels' sm_80 bodies, stubs that report the wrong architecture with printf (a CALL)."""
    sass = subprocess.run([cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, timeout=600).stdout
    return "".join(section for section in sass.split("Fatbin elf code:") if "arch = sm_90a" in section)


@pytest.mark.slow
def test_sm90_kernels_use_wgmma_and_tma(sm90_build):
    obj, _ = sm90_build
    sass = sm90a_sass(obj)
    found = set(re.findall(r"\b(HGMMA\.[0-9x]+\.F32\.BF16|UTMALDG(?:\.[0-9A-Z]+)*|UTMASTG(?:\.[0-9A-Z]+)*)", sass))
    ops = {f.split(".")[0] for f in found} | found | {".".join(f.split(".")[:2]) for f in found}
    print("sm90 SASS:", {f: sass.count(f) for f in sorted(found)})
    missing = [s for s in SASS_NEEDED if s not in ops]
    assert not missing, f"SASS lacks {missing}; found {sorted(found)}"
    # No mma.sync (HMMA) in the sm90 kernels: the tensor-core work is all wgmma.
    kernels = [k for k in re.split(r"\n\s*Function : ", sass) if "TailMainloop" in k.split("\n", 1)[0]
               or "device_kernel" in k.split("\n", 1)[0]]
    assert kernels, "no CUTLASS device_kernel in the object"
    assert all("HMMA" not in k for k in kernels)
    # No CALL: ptxas serializes wgmma across a call (C7510; CUTLASS's device asserts are calls,
    # hence NDEBUG in lora_linear_sm90.cuh).
    assert all(not re.search(r"\bCALL\b", k) for k in kernels), "a CALL in an sm90 kernel: wgmma serialized"


def sm90_resource_usage(obj):
    """[(REG, STACK, LOCAL)] of the sm90 kernels in the sm_90a code of `obj` (cuobjdump -res-usage)."""
    out = subprocess.run([cuobjdump(), "-res-usage", str(obj)], capture_output=True, text=True, timeout=600).stdout
    usage = []
    for section in out.split("Fatbin elf code:")[1:]:
        if "arch = sm_90a" not in section:
            continue
        for name, regs, stack, local in re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) \S+ LOCAL:(\d+)", section):
            if "TailMainloop" in name:
                usage.append((int(regs), int(stack), int(local)))
    return usage


@pytest.mark.slow
def test_sm90_kernels_do_not_spill(sm90_build):
    obj, report = sm90_build
    if report is None:  # the AOT library: its sm_90a code's resource usage (no local memory = no spills)
        usage = sm90_resource_usage(obj)
        print("sm90 kernels (registers, stack, local):", usage)
        assert len(usage) >= 6 and all(stack == 0 and local == 0 and regs <= 168 for regs, stack, local in usage), usage
        return
    kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'.*?Used (\d+) registers", report, re.S)
    assert len(kernels) >= 3, report[-2000:]  # the three tiles
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    print("sm90 kernels (registers):", [(name[-40:], int(regs)) for name, regs in kernels], "spills:", spills)
    assert spills and all(s == ("0", "0") for s in spills), report[-2000:]
    assert all(int(regs) <= 168 for _, regs in kernels), kernels  # 168: the register cap of 3 warpgroups
    assert "C7510" not in report, "ptxas serialized wgmma (a call inside the kernel; see lora_linear_sm90.cuh)"


def _kernels(sass: str):
    """{kernel name: its SASS} of the CUTLASS device kernels in a cuobjdump -sass listing."""
    parts = re.split(r"\n\s*Function : ", sass)[1:]
    return {k.split("\n", 1)[0].strip(): k for k in parts
            if "TailMainloop" in k.split("\n", 1)[0] or "device_kernel" in k.split("\n", 1)[0]}


@pytest.mark.slow
def test_sm90_dx_kernels_use_wgmma_with_mn_major_b_and_tma(sm90_dx_build):
    """dx = dy @ W + [u_hi | u_lo] @ [A; A] reads W [N, K] and the tail [L, K] as stored: B
    MN-major, which wgmma takes for 16-bit types as a transposed B descriptor (.tnspB)."""
    obj, report = sm90_dx_build
    sass = sm90a_sass(obj)
    dx = {name: k for name, k in _kernels(sass).items() if "gdesc" in k and ".tnspB" in k}
    found = {name: sorted(set(re.findall(r"\b(HGMMA\.[0-9x]+\.F32\.BF16|UTMALDG(?:\.[0-9A-Z]+)*|UTMASTG"
                                         r"(?:\.[0-9A-Z]+)*)", k))) for name, k in dx.items()}
    print("sm90 dx SASS:", [(name[-30:], ops) for name, ops in found.items()])
    assert len(dx) >= (2 if report is not None else 4), sorted(_kernels(sass))  # 2 tiles (x 2 dtypes in the AOT library)
    ops = set().union(*found.values())
    for needed in ("HGMMA.64x256x16.F32.BF16", "HGMMA.64x128x16.F32.BF16", "UTMALDG.3D", "UTMALDG.3D.MULTICAST",
                   "UTMASTG.3D"):
        assert needed in ops, (needed, sorted(ops))
    for name, k in dx.items():
        hgmma = re.findall(r"HGMMA\.\S+ [^;]*;", k)
        assert hgmma and all(".tnspB" in h for h in hgmma), (name[-60:], hgmma[:3])  # every wgmma: B MN-major
        assert "HMMA" not in k and not re.search(r"\b(LDL|STL)\b", k), name[-60:]  # no mma.sync, no local memory
        assert not re.search(r"\bCALL\b", k), name[-60:]  # no call: ptxas would serialize wgmma (C7510)
    if report is not None:  # ptxas -v of the compiled object: its two kernels, no spills, <= 168 registers
        kernels = re.findall(r"Compiling entry function '(\w+)' for 'sm_90a'.*?Used (\d+) registers", report, re.S)
        spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
        print("sm90 dx kernels (registers):", [int(regs) for _, regs in kernels], "spills:", spills)
        assert len(kernels) == 2 and all(int(regs) <= 168 for _, regs in kernels), kernels
        assert len(spills) == 2 and all(sp == ("0", "0") for sp in spills), report[-2000:]
        assert "C7510" not in report, "ptxas serialized wgmma (a call inside the kernel)"
    else:
        usage = [u for name, u in _resource_usage_by_name(obj).items() if name in dx]
        print("sm90 dx kernels (registers, stack, local):", usage)
        assert len(usage) >= 4 and all(stack == 0 and local == 0 and regs <= 168 for regs, stack, local in usage), usage


def _resource_usage_by_name(obj):
    """{kernel name: (REG, STACK, LOCAL)} of the sm_90a code of `obj` (cuobjdump -res-usage)."""
    out = subprocess.run([cuobjdump(), "-res-usage", str(obj)], capture_output=True, text=True, timeout=600).stdout
    usage = {}
    for section in out.split("Fatbin elf code:")[1:]:
        if "arch = sm_90a" in section:
            for name, regs, stack, local in re.findall(r"Function (\S+):\s*REG:(\d+) STACK:(\d+) \S+ LOCAL:(\d+)",
                                                       section):
                usage[name] = (int(regs), int(stack), int(local))
    return usage


def test_sm90_sources_need_a_90a_target_and_the_headers(monkeypatch):
    assert sources.sm90_build("8.0", "/usr/local/cuda").reason.startswith("TORCH_CUDA_ARCH_LIST='8.0' has no 9.0a target")
    assert "9.0' alone is not enough" in sources.sm90_build("8.0;9.0", "/usr/local/cuda").reason
    monkeypatch.setattr(sources, "cutlass_include_dir", lambda: None)
    assert sources.sm90_build("8.0;9.0a", "/usr/local/cuda") == sources.Sm90Build(
        [], [], "the CUTLASS headers were not found (pip install nvidia-cutlass==4.2.0.0)")


def test_sm90_sources_with_headers_and_toolkit(monkeypatch, tmp_path):
    monkeypatch.setattr(sources, "cutlass_include_dir", lambda: tmp_path)
    monkeypatch.setattr(sources, "nvcc_version", lambda home: (12, 8))
    assert sources.sm90_build("8.0;9.0a", "/x") == sources.Sm90Build(list(sources.SM90_SOURCES), [str(tmp_path)], "")
    monkeypatch.setattr(sources, "nvcc_version", lambda home: (12, 1))
    assert sources.sm90_build("9.0a", "/x").reason == "nvcc 12.1 is older than the 12.3 that CUTLASS 4's sm90 kernels need"
    for name in sources.SOURCES + sources.SM90_SOURCES:
        assert (CSRC / name).exists(), name
    # the backward's dx in translation units of its own, beside the forward's (ninja builds them in parallel)
    assert {"lora_linear/lora_linear_sm90_dx_bf16.cu", "lora_linear/lora_linear_sm90_dx_fp16.cu"} <= set(
        sources.SM90_SOURCES)


def test_cutlass_pin_matches_the_build_requirement():
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"{sources.CUTLASS_REQUIREMENT}"' in pyproject



def test_jit_targets_hopper_as_90a(monkeypatch):
    """torch's own default would compile an H100 for "9.0", which has no wgmma: the JIT says 9.0a."""
    import torch
    from lora_kernels.cuda import loader
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: [(9, 0), (8, 0), (9, 0)][i])
    assert loader.jit_arch_list() == "9.0a;8.0"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.6")
    assert loader.jit_arch_list() == "8.6"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader.jit_arch_list() == loader.DEFAULT_ARCH_LIST
