"""Short text tables of benchmark JSON files: ``python -m bench.summarize DIR`` (device_check's
last step; each suite module may define ``brief(result) -> list of lines``), and the PNG each
run writes beside its markdown (``plot``: time / the suite's baseline against M, one line per
method, one panel per layer shape; matplotlib is the optional ``[bench]`` extra, imported only
here and only when plotting)."""
from __future__ import annotations

import glob
import importlib
import json
import os
import sys
from typing import Dict, List, Sequence

from .common import geomean
from .run import SUITES


def ratio_table(result: Dict, keys: Sequence[str], methods: Sequence[str], width: int = 11) -> List[str]:
    """One line per case: its key fields, the baseline's µs, and the chosen methods' ratios."""
    head = " ".join(f"{k:>11}" for k in keys) + f" {result['cases'][0].get('baseline', 'base') + ' us':>10} "
    lines = ["  " + head + " ".join(f"{m:>{width}}" for m in methods)]
    for c in result["cases"]:
        rt = c.get("ratios", {})
        base = c["times_us"].get(c.get("baseline"), float("nan"))
        cells = " ".join(f"{rt[m]:>{width}.2f}" if m in rt else f"{'-':>{width}}" for m in methods)
        lines.append("  " + " ".join(f"{str(c[k]):>11}" for k in keys) + f" {base:>10.1f} " + cells
                     + ("  FAILED " + "; ".join(c["failed"]) if c["failed"] else ""))
    return lines


def plot_series(result: Dict):
    """{layer: {line label: [(M, ratio), ...] sorted by M}} of a result's cases: each method's
    time / the case baseline, a line per method (and per rank / adapter count / distribution
    when the suite varies them), a panel per layer. Cases without layer and M are left out."""
    panels: Dict[str, Dict[str, Dict[int, List[float]]]] = {}
    extra_keys = [k for k in ("r", "L", "dist") if len({c.get(k) for c in result["cases"]}) > 1]
    for c in result["cases"]:
        if "layer" not in c or "M" not in c:
            continue
        for method, ratio in c.get("ratios", {}).items():
            if method == c.get("baseline"):
                continue
            label = method + "".join(f" {k}={c[k]}" for k in extra_keys if k in c)
            panels.setdefault(str(c["layer"]), {}).setdefault(label, {}).setdefault(int(c["M"]), []).append(ratio)
    return {layer: {label: sorted((m, geomean(v)) for m, v in points.items()) for label, points in lines.items()}
            for layer, lines in panels.items()}


def plot(result: Dict, path: str) -> str:
    """Write the run's PNG to `path`; returns a line saying what was written or why not."""
    series = plot_series(result)
    if not series:
        return f"no plot for suite {result['suite']}: its cases have no layer/M axes"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no plot: matplotlib is not installed (pip install 'lora_kernels[bench]')"
    baseline = next((c.get("baseline") for c in result["cases"] if c.get("baseline")), "baseline")
    n = len(series)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (layer, lines) in zip(axes.flat, series.items()):
        for label, points in sorted(lines.items()):
            ms, ratios = zip(*points)
            ax.plot(ms, ratios, marker="o", markersize=3, label=label,
                    linewidth=2.2 if label.startswith("ours_") else 1.0)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(layer)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel(f"time / {baseline}")
        ax.grid(True, alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    meta = result.get("meta", {})
    fig.suptitle(f"{result['suite']} on {meta.get('device', '?')} ({meta.get('date', '')}, commit "
                 f"{meta.get('commit', '?')}): time / {baseline}, lower is better")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"wrote {path}"


def main(argv=None) -> int:
    folder = (argv or sys.argv[1:] or ["bench/results"])[0]
    for path in sorted(glob.glob(os.path.join(folder, "*.json"))):
        result = json.load(open(path))
        print(f"{os.path.basename(path)}: {result['meta']['device']}")
        module = importlib.import_module(SUITES[result["suite"].split("-")[0]])
        if hasattr(module, "brief") and result["cases"]:
            print("\n".join(module.brief(result)))
        print("  summary:", json.dumps(result["summary"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
