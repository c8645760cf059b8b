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

# ---------------------------------------------------------------------------------------------
# Multi-adapter suite (DESIGN.md section 7, GPU_BASELINES.md): token -> adapter distributions.
# ---------------------------------------------------------------------------------------------
MULTI_LAYERS = [("8B q/o", 4096, 4096), ("8B gate/up", 4096, 14336)]
MULTI_TOKENS = [1, 16, 64, 256, 1024, 4096]
MULTI_ADAPTERS = [8, 128]
# decode = a random adapter per token; prefill = 32 contiguous segments (GPU_BASELINES.md)
MULTI_DISTRIBUTIONS = ["decode", "prefill", "zipf", "one", "none10"]
PREFILL_SEGMENTS = 32
ZIPF_EXPONENT = 1.2


def token_adapters(dist: str, M: int, L: int, seed: int = 0):
    """int32 [M] (CPU): the adapter slot of each token, -1 = no adapter.

    decode: uniform random slot per token. prefill: min(32, M) contiguous segments of near-equal
    length, each a random slot. zipf: slot i drawn with probability ~ (i + 1)^-1.2, shuffled.
    one: every token uses one random slot. none10: decode with 10% of the tokens on no adapter.
    none: every token without adapter (tests)."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    if dist == "decode":
        ids = torch.randint(0, L, (M,), generator=gen)
    elif dist == "prefill":
        segments = max(1, min(PREFILL_SEGMENTS, M))
        slots = torch.randint(0, L, (segments,), generator=gen)
        ids = slots.repeat_interleave(torch.diff(torch.linspace(0, M, segments + 1).round().long()))
    elif dist == "zipf":
        p = (torch.arange(1, L + 1, dtype=torch.float64) ** -ZIPF_EXPONENT)
        ids = torch.multinomial(p / p.sum(), M, replacement=True, generator=gen)
    elif dist == "one":
        ids = torch.full((M,), int(torch.randint(0, L, (1,), generator=gen)))
    elif dist == "none10":
        ids = torch.randint(0, L, (M,), generator=gen)
        ids[torch.rand(M, generator=gen) < 0.1] = -1
    elif dist == "none":
        ids = torch.full((M,), -1)
    else:
        raise ValueError(f"unknown token distribution {dist!r}")
    return ids.to(torch.int32)


def layer_grid(args, on_gpu: bool):
    """(layer name, K, N, r, M) of the single-layer suites: the full grid, or `--quick`'s, narrowed
    by --layers / --ranks / --tokens."""
    if args.quick:
        layers = QUICK_GPU_LAYERS if on_gpu else QUICK_CPU_LAYERS
        tokens, ranks = (QUICK_GPU_TOKENS if on_gpu else QUICK_CPU_TOKENS), [16]
    else:
        layers, tokens, ranks = LAYERS, TOKENS, RANKS
    if args.layers:
        layers = [layer for layer in LAYERS + QUICK_CPU_LAYERS if layer[0] in args.layers]
    for name, K, N in layers:
        for r in args.ranks or ranks:
            for M in args.tokens or tokens:
                yield name, K, N, r, M
