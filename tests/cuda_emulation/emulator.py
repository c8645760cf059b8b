"""What the host-emulator drivers (driver.py, merge_driver.py, multi_driver.py) share: compiling a
runner (run_*.cpp) and running it on a directory of inputs, by the protocol of runner_io.h
(DIR/params.txt in; outputs and DIR/plan.txt back; a non-zero exit status is a failure)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

HERE = Path(__file__).resolve().parent
CSRC = HERE.parent.parent / "csrc"


def compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")


def build(runner: str, out_dir: Path, extra_flags: Sequence[str] = ()) -> Path:
    """Compile tests/cuda_emulation/<runner>.cpp into out_dir; returns the executable."""
    exe = out_dir / runner
    # _Float16 (the fp16 conversions) needs GCC >= 12 or Clang >= 15 on x86-64.
    cmd = [compiler(), "-std=c++17", "-O1", "-Wall", "-Wno-unknown-pragmas", *extra_flags,
           f"-I{CSRC}", "-o", str(exe), str(HERE / f"{runner}.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(f"building the emulator failed: {' '.join(cmd)}\n{proc.stderr[-4000:]}")
    return exe


def run(exe: Path, d: Path, params: Dict, timeout: int) -> Dict[str, int]:
    """Writes `params` as d/params.txt, runs the emulator on d (its inputs already there) and
    returns d/plan.txt as a dict; raises with the emulator's stderr when it fails."""
    (d / "params.txt").write_text("".join(f"{k} {v}\n" for k, v in params.items()))
    proc = subprocess.run([str(exe), str(d)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"emulator exit {proc.returncode}:\n{proc.stderr[-4000:]}")
    return {k: int(v) for k, v in (line.split() for line in (d / "plan.txt").read_text().splitlines())}


def read(path: Path, dtype: torch.dtype) -> torch.Tensor:
    """A file written by the emulator, as a flat tensor of `dtype`."""
    data = path.read_bytes()
    return torch.frombuffer(bytearray(data), dtype=dtype) if data else torch.empty(0, dtype=dtype)
