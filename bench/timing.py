"""Timers: CUDA events via triton.testing (median) on the GPU, a host clock on the CPU."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def time_us(fn: Callable[[], object], device_type: str, cuda_graph: bool = False,
            rep_ms: int = 40) -> float:
    """Median time of one call of `fn`, in microseconds.

    GPU: ``triton.testing.do_bench`` (events, L2 flushed between calls) or, for launch-bound
    decode shapes, ``do_bench_cudagraph`` (replays of a captured graph, no launch gaps)."""
    if device_type == "cuda":
        import triton.testing as tt
        if cuda_graph:
            return 1e3 * tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")
        return 1e3 * tt.do_bench(fn, warmup=max(5, rep_ms // 4), rep=rep_ms, return_mode="median")
    fn()  # warm-up
    samples = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(samples)
