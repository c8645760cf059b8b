"""What every benchmark suite shares: timing, correctness checks, result files, tables."""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

# ||y - ref|| / ||ref|| a method must meet to be timed, by dtype (the tests' tolerances, with
# headroom for the unfused peers, whose error is what it is).
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CHECK_ROWS = 256  # rows of a float64 reference per case: bounded cost on the largest shapes


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


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((out.double() - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_rows(M: int, device) -> torch.Tensor:
    """Row indices at which a case is checked against float64 (all rows when few)."""
    if M <= CHECK_ROWS:
        return torch.arange(M, device=device)
    return torch.linspace(0, M - 1, CHECK_ROWS, device=device).round().long()


def seeded_randn(device, dtype, seed: int):
    """rnd(*shape, scale=1.0): reproducible random normal tensors (never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)


def time_checked(case: Dict, methods: Dict[str, Callable[[], torch.Tensor]],
                 check: Callable[[str, torch.Tensor], float], dtype, device, rep_ms: int,
                 cuda_graph: bool = False) -> Dict:
    """Run each method once, check it (`check(name, out)` -> relative error), time it if right.

    Fills case["times_us"], case["errors"], case["failed"] (a method that raises or is wrong is
    reported there and not timed)."""
    case.setdefault("times_us", {})
    case.setdefault("errors", {})
    case.setdefault("failed", [])
    for name, fn in methods.items():
        try:
            out = fn()
            err = check(name, out)
        except Exception as e:  # a peer that cannot run this case is reported, not fatal
            case["failed"].append(f"{name}: {type(e).__name__}: {e}")
            continue
        del out
        case["errors"][name] = err
        if not math.isfinite(err) or err > CHECK_TOL[dtype]:
            case["failed"].append(f"{name}: relative error {err:.2e}")
            continue
        case["times_us"][name] = time_us(fn, device.type, cuda_graph=cuda_graph and device.type == "cuda",
                                         rep_ms=rep_ms)
    return case


def add_ratios(case: Dict, baseline: str) -> Dict:
    base = case["times_us"].get(baseline)
    case["baseline"] = baseline
    case["ratios"] = {k: v / base for k, v in case["times_us"].items()} if base else {}
    return case


def geomean(values: Sequence[float]) -> Optional[float]:
    values = list(values)
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for card in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if card in name:
            return card
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def run_metadata(device: torch.device, dtype: torch.dtype, on_gpu_timer: str) -> Dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    import lora_kernels
    return {"device": device_name(device), "date": _dt.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton_version, "commit": git_commit(), "python": sys.version.split()[0],
            "lora_kernels": lora_kernels.__version__, "dtype": str(dtype).replace("torch.", ""),
            "timer": on_gpu_timer if device.type == "cuda" else "host clock median"}


def markdown(result: Dict, key_columns: Sequence[str], note: str) -> str:
    """One row per case: its key columns, the baseline's µs, and every method's ratio to it."""
    meta = result["meta"]
    methods: List[str] = []
    for c in result["cases"]:
        for k in c["times_us"]:
            if k != c.get("baseline") and k not in methods:
                methods.append(k)
    lines = [f"# {result['suite']} on {meta['device']} ({meta['date']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['commit']})", "", note, "",
             "| " + " | ".join(key_columns) + " | baseline µs | " + " | ".join(methods) + " |",
             "|" + "---|" * (len(key_columns) + 1 + len(methods))]
    for c in result["cases"]:
        base = c["times_us"].get(c.get("baseline"))
        cells = [str(c[k]) for k in key_columns] + [f"{base:.1f}" if base else "—"]
        cells += [f"{c['ratios'][m]:.2f}" if m in c.get("ratios", {}) else "—" for m in methods]
        line = "| " + " | ".join(cells) + " |"
        if c["failed"]:
            line += " failed: " + "; ".join(c["failed"])
        lines.append(line)
    lines += ["", "Summary: `" + json.dumps(result["summary"]) + "`"]
    return "\n".join(lines) + "\n"


def write_result(result: Dict, out_dir: str, device: torch.device, table: str, tag: str = "") -> str:
    os.makedirs(out_dir, exist_ok=True)
    suffix = f"-{tag}" if tag else ""
    stem = os.path.join(out_dir, f"{device_slug(device)}-{result['meta']['date']}-{result['suite']}{suffix}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table)
    return stem
