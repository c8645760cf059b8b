"""Short text tables of benchmark JSON files: ``python -m bench.summarize DIR`` (device_check's
last step). Each suite module may define ``brief(result) -> list of lines``."""
from __future__ import annotations

import glob
import importlib
import json
import os
import sys
from typing import Dict, List, Sequence

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
