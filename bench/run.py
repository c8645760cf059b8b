"""The benchmark runner.

    python -m bench --quick                  # a small correctness-checked run on whatever is here
    python -m bench --suite forward          # the full single-adapter forward suite (GPU)
    python -m bench --suite forward --ranks 16 --tokens 1024 4096 --out DIR

Every case is checked against a float64 reference before it is timed; a wrong method is reported
and not timed. Writes ``<out>/<device>-<date>-<suite>.json`` and a markdown table beside it.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from typing import Dict, List

import torch

from . import suites
from .peers import forward_methods
from .timing import time_us

# ||y - ref|| / ||ref|| a method must meet to be timed, by dtype (the tests' tolerances, with
# headroom for the unfused peers, whose error is what it is).
CHECK_TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}
CHECK_ROWS = 256  # rows of the float64 reference per case: bounded cost on the largest shapes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def _slug(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower()
    for card in ("h200", "h100", "a100", "l40s", "l4", "b200"):
        if card in name:
            return card
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def _backends_here(device: torch.device) -> List[str]:
    """Compiled backends that can run on `device` (torch on the CPU)."""
    from lora_kernels.backends import unavailable_reason
    found = [b for b in ("triton", "cuda") if unavailable_reason(b, device) is None]
    return found or ["torch"]


def _check_rows(M: int, device) -> torch.Tensor:
    if M <= CHECK_ROWS:
        return torch.arange(M, device=device)
    return torch.linspace(0, M - 1, CHECK_ROWS, device=device).round().long()


def run_forward_case(layer, K, N, M, r, dtype, device, backends, rep_ms, log) -> Dict:
    gen = torch.Generator(device="cpu").manual_seed(M * 7919 + K * 31 + N + r)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=gen) * scale).to(device=device, dtype=dtype)  # noqa: E731
    x = rnd(M, K)
    weight = rnd(N, K, scale=K ** -0.5)
    lora_a = rnd(r, K, scale=K ** -0.5)
    lora_b = rnd(N, r, scale=r ** -0.5)
    scale = 2.0
    rows = _check_rows(M, device)
    xr = x[rows].double()
    ref = xr @ weight.double().t() + scale * (xr @ lora_a.double().t()) @ lora_b.double().t()
    base_ref = xr @ weight.double().t()
    case = {"layer": layer, "K": K, "N": N, "M": M, "r": r, "dtype": str(dtype).replace("torch.", ""),
            "times_us": {}, "errors": {}, "failed": []}
    with torch.inference_mode():
        for name, fn in forward_methods(x, weight, lora_a, lora_b, scale, backends).items():
            try:
                y = fn()
            except Exception as e:  # a peer that cannot run this case is reported, not fatal
                case["failed"].append(f"{name}: {type(e).__name__}: {e}")
                continue
            expected = base_ref if name == "base" else ref
            err = ((y[rows].double() - expected).norm() / expected.norm()).item()
            case["errors"][name] = err
            if not math.isfinite(err) or err > CHECK_TOL[dtype]:
                case["failed"].append(f"{name}: relative error {err:.2e}")
                continue
            del y
            case["times_us"][name] = time_us(fn, device.type, cuda_graph=(device.type == "cuda" and M <= 16),
                                             rep_ms=rep_ms)
    base = case["times_us"].get("base")
    case["ratio_to_base"] = {k: v / base for k, v in case["times_us"].items()} if base else {}
    log(_case_line(case))
    return case


def _case_line(case) -> str:
    ratios = " ".join(f"{k}={v:.2f}" for k, v in case["ratio_to_base"].items() if k != "base")
    base = case["times_us"].get("base", float("nan"))
    fail = f"  FAILED: {'; '.join(case['failed'])}" if case["failed"] else ""
    return f"{case['layer']:>11} K={case['K']:<5} N={case['N']:<5} M={case['M']:<5} r={case['r']:<3} base={base:9.1f}us  {ratios}{fail}"


def summarize(cases: List[Dict], backends: List[str]) -> Dict:
    """The issue's acceptance numbers: geomean ours/base at M >= 1024, r = 16, and where ours beats
    the skilled addmm_ composition."""
    out = {}
    for b in backends:
        key = f"ours_{b}"
        big = [c["ratio_to_base"][key] for c in cases
               if key in c["ratio_to_base"] and c["M"] >= 1024 and c["r"] == 16]
        beats = [c for c in cases if key in c["times_us"] and "skilled" in c["times_us"]]
        out[key] = {
            "geomean_ratio_M>=1024_r16": math.exp(sum(map(math.log, big)) / len(big)) if big else None,
            "cases_faster_than_skilled": sum(c["times_us"][key] < c["times_us"]["skilled"] for c in beats),
            "cases_compared": len(beats),
            "failures": sum(any(f.startswith(key) for f in c["failed"]) for c in cases),
        }
    return out


def markdown(result: Dict) -> str:
    meta = result["meta"]
    methods = []
    for c in result["cases"]:
        for k in c["times_us"]:
            if k != "base" and k not in methods:
                methods.append(k)
    lines = [f"# {result['suite']} on {meta['device']} ({meta['date']}, torch {meta['torch']}, "
             f"triton {meta['triton']}, commit {meta['commit']})", "",
             "Time of each method / time of the base GEMM `F.linear(x, W0)` in the same run"
             " (decode rows, M <= 16, timed under CUDA graphs on a GPU).", "",
             "| layer | K→N | M | r | base µs | " + " | ".join(methods) + " |",
             "|---|---|---|---|---|" + "---|" * len(methods)]
    for c in result["cases"]:
        cells = [f"{c['ratio_to_base'][m]:.2f}" if m in c["ratio_to_base"] else "—" for m in methods]
        base = c["times_us"].get("base")
        lines.append(f"| {c['layer']} | {c['K']}→{c['N']} | {c['M']} | {c['r']} | "
                     f"{base:.1f} | " if base else f"| {c['layer']} | {c['K']}→{c['N']} | {c['M']} | {c['r']} | — | ")
        lines[-1] += " | ".join(cells) + " |"
    lines += ["", "Summary: " + json.dumps(result["summary"], indent=None)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small suite for whatever device is here")
    p.add_argument("--suite", default="forward", choices=["forward"])
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--layers", nargs="+", default=None, help="layer names from bench/suites.py")
    p.add_argument("--backends", nargs="+", default=None, help="our backends to time (default: all that run here)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--rep-ms", type=int, default=None, help="timing budget per method and case")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    if args.quick:
        layers = suites.QUICK_GPU_LAYERS if on_gpu else suites.QUICK_CPU_LAYERS
        tokens = suites.QUICK_GPU_TOKENS if on_gpu else suites.QUICK_CPU_TOKENS
        ranks = [16]
    else:
        layers, tokens, ranks = suites.LAYERS, suites.TOKENS, suites.RANKS
    if args.layers:
        layers = [l for l in suites.LAYERS + suites.QUICK_CPU_LAYERS if l[0] in args.layers]
    tokens = args.tokens or tokens
    ranks = args.ranks or ranks
    backends = args.backends or _backends_here(device)
    rep_ms = args.rep_ms or (40 if on_gpu else 200)

    print(f"lora_kernels bench: suite={args.suite}{' (quick)' if args.quick else ''} on {_device_name(device)}, "
          f"dtype={str(dtype).replace('torch.', '')}, our backends: {', '.join(backends)}", flush=True)
    import lora_kernels
    from lora_kernels.ops.lora_linear import choose_backend
    probe = torch.empty(1, 8, device=device, dtype=dtype)
    print("  backend='auto' here picks: " + choose_backend(probe, probe[:1], "auto"), flush=True)
    log = lambda s: print(s, flush=True)  # noqa: E731
    cases = [run_forward_case(name, K, N, M, r, dtype, device, backends, rep_ms, log)
             for (name, K, N) in layers for r in ranks for M in tokens]
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    meta = {"device": _device_name(device), "date": _dt.date.today().isoformat(), "torch": torch.__version__,
            "triton": triton_version, "commit": _git_commit(), "python": sys.version.split()[0],
            "lora_kernels": lora_kernels.__version__, "dtype": str(dtype).replace("torch.", ""),
            "timer": "triton.testing do_bench median (do_bench_cudagraph for M <= 16)" if on_gpu
            else "host clock median"}
    result = {"suite": args.suite + ("-quick" if args.quick else ""), "meta": meta, "cases": cases,
              "summary": summarize(cases, backends)}
    os.makedirs(args.out, exist_ok=True)
    tag = f"-{args.tag}" if args.tag else ""
    stem = os.path.join(args.out, f"{_slug(device)}-{meta['date']}-{result['suite']}{tag}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    table = markdown(result)
    with open(stem + ".md", "w") as f:
        f.write(table)
    print()
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    failures = sum(len(c["failed"]) for c in cases)
    ours_failed = sum(f.startswith("ours_") for c in cases for f in c["failed"])
    if failures:
        print(f"{failures} method/case pairs failed their check ({ours_failed} of ours)")
    return 1 if ours_failed else 0
