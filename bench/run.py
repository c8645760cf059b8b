"""The benchmark runner.

    python -m bench --quick                  # a small correctness-checked run on whatever is here
    python -m bench --suite forward          # the full single-adapter forward suite (GPU)
    python -m bench --suite forward --ranks 16 --tokens 1024 4096 --out DIR --tag r16
    python -m bench --suite multi --quick    # multi-adapter: GPU_BASELINES.md's rows (GPU)

Every method of every case is checked against a float64 reference before it is timed; a wrong
method is reported and not timed. Writes ``<out>/<device>-<date>-<suite>[-tag].json`` and a
markdown table beside it. Suites live one per module (bench/forward.py, ...), registered below.
"""
from __future__ import annotations

import argparse
import importlib
import os
from typing import List

import torch

from .common import device_name, markdown, run_metadata, write_result

# suite name -> module with run(args, device, dtype, backends, rep_ms, log), KEY_COLUMNS, NOTE
# (and optionally table(result) -> markdown, where the generic table does not fit)
SUITES = {
    "forward": "bench.forward",
    "tune": "bench.tune",
    "merge": "bench.merge",
    "model": "bench.model",
    "multi": "bench.multi",
    "training": "bench.training",
    "overhead": "bench.overhead",
}


def _backends_here(device: torch.device) -> List[str]:
    """Our compiled backends that can run on `device` (torch on a plain CPU)."""
    from lora_kernels.backends import unavailable_reason
    found = [b for b in ("triton", "cuda") if unavailable_reason(b, device) is None]
    return found or ["torch"]


def _case_line(case) -> str:
    keys = " ".join(f"{k}={case[k]}" for k in case if k not in ("times_us", "errors", "failed", "ratios", "baseline", "dtype"))
    base = case["times_us"].get(case.get("baseline"), float("nan"))
    ratios = " ".join(f"{k}={v:.2f}" for k, v in case.get("ratios", {}).items() if k != case.get("baseline"))
    fail = f"  FAILED: {'; '.join(case['failed'])}" if case["failed"] else ""
    return f"{keys}  {case.get('baseline')}={base:.1f}us  {ratios}{fail}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small suite for whatever device is here")
    p.add_argument("--suite", default="forward", choices=sorted(SUITES))
    p.add_argument("--ranks", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, nargs="+", default=None)
    p.add_argument("--layers", nargs="+", default=None, help="layer names from bench/suites.py")
    p.add_argument("--adapters", type=int, nargs="+", default=None, help="multi suite: adapter slots L")
    p.add_argument("--dists", nargs="+", default=None, help="multi suite: token->adapter distributions")
    p.add_argument("--backends", nargs="+", default=None, help="our backends to time (default: all that run here)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--rep-ms", type=int, default=None, help="timing budget per method and case")
    p.add_argument("--tag", default="", help="appended to the output file names")
    p.add_argument("--budget-s", type=float, default=None, help="tune suite: GPU-time budget in seconds")
    p.add_argument("--table", default=None, help="tune suite: config table to write (default: "
                   "lora_kernels/configs/<card>.json)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = p.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    backends = args.backends or _backends_here(device)
    rep_ms = args.rep_ms or (40 if device.type == "cuda" else 200)
    suite = importlib.import_module(SUITES[args.suite])

    from lora_kernels.ops.lora_linear import choose_backend
    probe = torch.empty(1, 8, device=device, dtype=dtype)
    print(f"lora_kernels bench: suite={args.suite}{' (quick)' if args.quick else ''} on {device_name(device)}, "
          f"dtype={str(dtype).replace('torch.', '')}, our backends timed: {', '.join(backends)}; "
          f"backend='auto' here picks {choose_backend(probe, probe[:1], 'auto')}", flush=True)
    body = suite.run(args, device, dtype, backends, rep_ms, lambda case: print(_case_line(case), flush=True))
    result = {"suite": args.suite + ("-quick" if args.quick else ""),
              "meta": run_metadata(device, dtype, "triton.testing do_bench median (do_bench_cudagraph for decode)"),
              **body}
    table = suite.table(result) if hasattr(suite, "table") else markdown(result, suite.KEY_COLUMNS, suite.NOTE)
    from . import targets
    # the targets are GPU targets, never evaluated on CPU times -- but for its host-time
    # targets, which it sets on the CPU machine (and which a GPU run's host does not measure)
    rows = targets.evaluate(result, backends) if device.type == "cuda" else targets.evaluate_host(result, backends)
    if rows:
        result["targets"] = rows
        table += targets.markdown(rows)
    stem = write_result(result, args.out, device, table, args.tag)
    print()
    print(table)
    print(f"wrote {stem}.json and {stem}.md")
    from .summarize import plot
    print(plot(result, stem + ".png"))
    ours_failed = [f for c in result["cases"] for f in c["failed"] if f.startswith("ours_")]
    if ours_failed:
        print(f"{len(ours_failed)} of our method/case pairs failed their check")
    return 1 if ours_failed else 0
