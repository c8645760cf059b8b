"""Tuned kernel configurations per card: ``lora_kernels/configs/<card>.json``.

``python -m bench --suite tune`` measures candidate configurations per shape bucket on a GPU and
writes the table; the config functions (triton/lora_linear.py ``forward_config`` /
``shrink_config``) read it through ``lookup`` and fall back to their heuristics when the card
has no table or no entry is near enough. A table::

    {"card": "NVIDIA H200", "num_sms": 132, "triton": "3.6.0", "written": "...",
     "entries": {"forward": [{"key": {"M": 1024, "N": 4096, "K": 4096, "r": 16, "elem_bytes": 2,
                                      "mask_epilogue": false, "split_adapters": false},
                              "config": {...ForwardConfig fields...}, "us": 31.2}, ...],
                 "shrink": [...]}}

Nearest bucket: among the entries of a kind whose non-size keys (dtype size, flags) are equal,
the one at the smallest distance sum |log2(a / b)| over the size keys (M, N, K, r); none when
that exceeds MAX_LOG2_DISTANCE. Nothing is read at import; the table of the current CUDA device
is loaded on the first lookup.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Dict, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE_KEYS = ("M", "N", "K", "r")
# A measured entry stands in for shapes within a factor 2^3 in total over M, N, K and r (say M
# 4x and r 2x away); beyond, the heuristic knows as much. Reasoning, not measured yet.
MAX_LOG2_DISTANCE = 3.0

_UNSET = object()
_active = _UNSET  # the table in use: a dict, None (no table), or _UNSET (not loaded yet)


def card_slug(device_name: str) -> str:
    """'NVIDIA H200' -> 'nvidia-h200': the table's file name stem."""
    return re.sub(r"[^a-z0-9]+", "-", device_name.lower()).strip("-")


def table_path(device_name: str, folder: str = HERE) -> str:
    return os.path.join(folder, card_slug(device_name) + ".json")


def new_table(device_name: str, num_sms: int, triton_version: str, written: str = "") -> Dict:
    return {"card": device_name, "num_sms": num_sms, "triton": triton_version, "written": written,
            "entries": {}}


def record(table: Dict, kind: str, key: Dict, config: Dict, us: Optional[float] = None) -> None:
    """Put (key -> config) into `table`, replacing an entry with the same key (when `table` is the
    one in use, the config functions' caches are cleared: the next launch reads the new entry)."""
    entries = table["entries"].setdefault(kind, [])
    entries[:] = [e for e in entries if e["key"] != key]
    entries.append({"key": dict(key), "config": dict(config), "us": us})
    if table is _active:  # the table in use changed: the config functions' answers may have
        _clear_config_caches()


def save_table(table: Dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")


def load_table(path: str) -> Optional[Dict]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        table = json.load(f)
    if not isinstance(table, dict) or "entries" not in table:
        raise ValueError(f"{path}: not a lora_kernels config table (no 'entries')")
    return table


def distance(a: Dict, b: Dict) -> float:
    """sum over M, N, K, r of |log2(a / b)|; inf when any other key differs."""
    if any(a.get(k) != b.get(k) for k in set(a) | set(b) if k not in SIZE_KEYS):
        return math.inf
    return sum(abs(math.log2(max(a[k], 1)) - math.log2(max(b[k], 1))) for k in SIZE_KEYS if k in a and k in b)


def nearest(table: Optional[Dict], kind: str, key: Dict) -> Optional[Dict]:
    """The config of the nearest entry of `kind` within MAX_LOG2_DISTANCE, else None."""
    if not table:
        return None
    best, best_d = None, math.inf
    for entry in table["entries"].get(kind, []):
        d = distance(entry["key"], key)
        if d < best_d:
            best, best_d = entry, d
    return dict(best["config"]) if best is not None and best_d <= MAX_LOG2_DISTANCE else None


def set_table(table: Optional[Dict]) -> None:
    """Use `table` (None: no table) for every later lookup; clears the config functions' caches."""
    global _active
    _active = table
    _clear_config_caches()


def reset() -> None:
    """Forget the table in use: the next lookup loads the current device's again."""
    set_table(_UNSET)  # type: ignore[arg-type]


def _clear_config_caches() -> None:
    import sys
    mod = sys.modules.get("lora_kernels.triton.lora_linear")
    if mod is not None:
        mod.forward_config.cache_clear()
        mod.shrink_config.cache_clear()
        mod.plan_forward.cache_clear()
        mod.clear_launch_cache()


def _current_table() -> Optional[Dict]:
    global _active
    if _active is _UNSET:
        _active = None
        import torch
        if torch.cuda.is_available() and not os.environ.get("LORA_KERNELS_NO_TUNED_CONFIGS"):
            _active = load_table(table_path(torch.cuda.get_device_name()))
    return _active


def lookup(kind: str, num_sms: int, **key) -> Optional[Dict]:
    """The tuned config of `kind` ("forward", "shrink") nearest to `key`, or None: no table for
    this card, the table was measured on a card with another SM count, or nothing near."""
    table = _current_table()
    if not table or table.get("num_sms") not in (None, num_sms):
        return None
    return nearest(table, kind, key)
