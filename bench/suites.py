"""Shape suites (DESIGN.md section 7)."""
from __future__ import annotations

# (name, K in, N out)
LAYERS = [
    ("8B q/o", 4096, 4096),
    ("8B k/v", 4096, 1024),
    ("8B gate/up", 4096, 14336),
    ("8B down", 14336, 4096),
    ("70B q/o", 8192, 8192),
    ("70B up", 8192, 28672),
    ("70B down", 28672, 8192),
]
TOKENS = [1, 16, 128, 1024, 4096, 16384]
RANKS = [16, 64]

# A CPU-sized smoke suite for `--quick` without a GPU: seconds, not minutes.
QUICK_CPU_LAYERS = [("tiny", 256, 256), ("tiny wide", 256, 1024)]
QUICK_CPU_TOKENS = [1, 16, 128]
# `--quick` on a GPU: one layer, decode and prefill.
QUICK_GPU_LAYERS = [("8B q/o", 4096, 4096)]
QUICK_GPU_TOKENS = [16, 4096]
