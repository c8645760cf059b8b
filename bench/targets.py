"""The targets of issue 16 per suite, evaluated on a run's cases (GPU runs only: on a CPU the
times say nothing about a GPU, so no GPU target is evaluated there and no number is made up) --
except the host-time targets (``HOST_TARGETS``), which issue 16 sets on the CPU machine and which
are evaluated on CPU runs only (``evaluate_host``).

Each target: a name, what is measured (a reduction of per-case ratios over a subset of cases),
and the bound. ``evaluate(result)`` returns one row per (target, our backend) with the measured
value (None when the run had no such cases) and pass/fail; ``markdown(rows)`` is the table
the runner appends to the suite's markdown."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

from .common import geomean


def _ratios(cases, method, where: Callable[[Dict], bool], num: Optional[str] = None):
    """method's ratio to the case baseline (or to `num` when given) over the cases selected."""
    out = []
    for c in cases:
        if not where(c) or method not in c.get("times_us", {}):
            continue
        if num is None:
            if method in c.get("ratios", {}):
                out.append(c["ratios"][method])
        elif num in c["times_us"]:
            out.append(c["times_us"][method] / c["times_us"][num])
    return out


# suite -> [(target name, method template, reduce, case filter, other method or None, bound)]
TARGETS = {
    "forward": [
        ("fused forward, geomean ours/cuBLAS at M >= 1024, r = 16", "ours_{b}", "geomean",
         lambda c: c["M"] >= 1024 and c["r"] == 16, None, 1.05),
        ("fused forward, geomean ours/cuBLAS at M >= 1024, r = 64", "ours_{b}", "geomean",
         lambda c: c["M"] >= 1024 and c["r"] == 64, None, 1.10),
        ("fused forward, geomean ours/cuBLAS at M <= 16 (CUDA graphs)", "ours_{b}", "geomean",
         lambda c: c["M"] <= 16, None, 1.10),
        ("fused forward, worst shape ours/cuBLAS", "ours_{b}", "max", lambda c: True, None, 1.25),
    ],
    "training": [
        ("training step, geomean ours/two-GEMM base at M >= 4096", "ours_{b}", "geomean",
         lambda c: c["M"] >= 4096, None, 1.15),
    ],
    "merge": [
        ("merge, worst ours/copy floor (>= 80% of copy bandwidth)", "ours_{b}", "max", lambda c: True, None, 1.25),
        ("exact merge+unmerge cycle / plain merge", "ours_{b}_exact_cycle", "max", lambda c: True, "ours_{b}", 1.5),
    ],
    "multi": [
        ("multi-adapter shrink+expand, worst / bandwidth floor at M >= 1024", "ours_se_{b}", "max",
         lambda c: c["M"] >= 1024, None, 2.0),
    ],
}


# suite -> [(target name, summary key template, bound in µs, also for backend="auto" -- or None:
# the key names no backend, one row)]: host time per call, CPU runs. Point 6 of issue 16 sets
# 15 µs for the host overhead of an eager call at M = 1: lora_linear's, and the multi-adapter
# ops' (each call) to the same bound. Overhead is the time beyond the work every implementation
# does: for the torch backend its arithmetic (reference_work), for the Triton launch path its
# allocations and kernel launches with their arguments (bench/overhead.py recorded_floor).
_TRITON_HOST = ("Triton launch path's host overhead at M = 1, kernels stubbed (8B q/o, r = 16; CPU machine): "
                "time minus its floor (the call's allocations and launches, replayed)")
HOST_TARGETS = {
    "overhead": [
        ("eager host overhead per call at M = 1: lora_linear minus the torch backend's arithmetic "
         "(no grad; CPU machine)", "ours_{b}_minus_reference_work_us", 15.0, True),
        ("the same for multi_lora_linear (L = 4)", "ours_multi_{b}_minus_multi_reference_work_us", 15.0, False),
        ("the same for lora_shrink (L = 4)", "ours_shrink_{b}_minus_shrink_reference_work_us", 15.0, False),
        ("the same for lora_expand_ (L = 4)", "ours_expand_{b}_minus_expand_reference_work_us", 15.0, False),
        # The Triton backend's host work, its kernels' launches stubbed (bench/overhead.py,
        # TRITON_HOST_NOTE): excludes Triton's own launch cost and the driver call (need a GPU).
        (f"{_TRITON_HOST}: the forward launcher", "triton_host_fwd_launcher_minus_floor_us", 15.0, None),
        ("the same: eager lora_linear(backend='triton')", "triton_host_eager_fwd_minus_floor_us", 15.0, None),
        ("the same: the backward launcher (dx, dA, dB)", "triton_host_bwd_launcher_minus_floor_us", 15.0, None),
        ("the same: multi_lora_linear(backend='triton'), L = 4", "triton_host_multi_eager_minus_floor_us", 15.0,
         None),
        ("the same: lora_shrink(backend='triton')", "triton_host_shrink_eager_minus_floor_us", 15.0, None),
        ("the same: lora_expand_(backend='triton')", "triton_host_expand_eager_minus_floor_us", 15.0, None),
    ],
}


def evaluate_host(result: Dict, backends: List[str]) -> List[Dict]:
    """The host-time rows of a CPU run: one per (target, backend and "auto"), measured from the
    run's summary (None when the run has no such number). The backends are the ones the suite
    timed (``result["backends"]``, e.g. not the Triton interpreter) where it says so."""
    suite = result["suite"].split("-")[0]
    rows = []
    for name, template, bound, with_auto in HOST_TARGETS.get(suite, []):
        per_backend = (*result.get("backends", backends), *(("auto",) if with_auto else ()))
        for b in (per_backend if with_auto is not None else ("",)):
            key = template.format(b=b)
            measured = result.get("summary", {}).get(key)
            if not isinstance(measured, (int, float)) or not math.isfinite(measured):
                measured = None
            rows.append({"target": name, "method": key, "bound": bound, "unit": "us", "measured": measured,
                         "cases": 0 if measured is None else len(result["cases"]),
                         "pass": None if measured is None else measured <= bound})
    return rows


def evaluate(result: Dict, backends: List[str]) -> List[Dict]:
    suite = result["suite"].split("-")[0]
    rows = []
    for name, template, how, where, num, bound in TARGETS.get(suite, []):
        for b in backends:
            method = template.format(b=b)
            values = _ratios(result["cases"], method, where, num.format(b=b) if num else None)
            values = [v for v in values if v is not None and math.isfinite(v) and v > 0]
            measured = (geomean(values) if how == "geomean" else max(values)) if values else None
            rows.append({"target": name, "method": method, "bound": bound, "measured": measured,
                         "cases": len(values), "pass": None if measured is None else measured <= bound})
    return rows


def markdown(rows: List[Dict]) -> str:
    if not rows:
        return ""
    lines = ["", "## Targets (issue 16)", "", "| target | method | target | measured | cases | pass |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        us = r.get("unit") == "us"
        measured = "—" if r["measured"] is None else (f"{r['measured']:.1f} µs" if us else f"{r['measured']:.3f}x")
        bound = f"{r['bound']:.1f} µs" if us else f"{r['bound']:.2f}x"
        verdict = "not measured" if r["pass"] is None else ("pass" if r["pass"] else "FAIL")
        lines.append(f"| {r['target']} | {r['method']} | <= {bound} | {measured} | {r['cases']} | {verdict} |")
    return "\n".join(lines) + "\n"
