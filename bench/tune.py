"""Suite `tune`: measure the Triton forward's launch configurations per shape bucket on this card
and write the fastest into ``lora_kernels/configs/<card>.json``, which ``forward_config`` reads
(nearest bucket; its heuristic is the fallback).

    python -m bench --suite tune                    # the suite's buckets, ~4 minutes of GPU time
    python -m bench --suite tune --budget-s 600 --ranks 16 64 --tokens 1 16 128 1024 4096

Buckets are the benchmark suite's (layer K, N) x M x r, in an order that covers every layer at
the first rank before the next rank. Each bucket times the heuristic's config and a small grid
around it (tiles, K splits, where t comes from, stages); every candidate is checked against
float64 first. When the GPU-time budget is spent, the remaining buckets keep the heuristic
(nothing is written for them). The heuristic runs with no table loaded, so the table never
feeds on itself.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from dataclasses import asdict, replace
from typing import Callable, Dict, Iterable, List, Optional

from . import suites
from .common import CHECK_TOL, check_rows, geomean, rel_error, seeded_randn, time_us

KEY_COLUMNS = ["layer", "K", "N", "M", "r"]
NOTE = ("Time of the fastest checked candidate configuration / time of the heuristic's, same run. "
        "`best` goes into lora_kernels/configs/<card>.json.")
DEFAULT_BUDGET_S = 240.0  # "a few minutes" of GPU time (issue 16); --budget-s overrides


def candidates(M: int, r: int, elem_bytes: int, heuristic) -> List:
    """A small grid around the heuristic: the regime's tiles (and 128x256, which the heuristic
    leaves out for its epilogue spills), K splits 1/2/4 x the heuristic's, t from the shrink or
    in the fused kernel, 3 or 4 stages, and the persistent TMA variant (with and without warp
    specialization) of each config it applies to."""
    from lora_kernels.triton.lora_linear import FUSED_T_MAX_BLOCK_R, _tile_candidates
    tiles = list(_tile_candidates(M, heuristic.block_r, elem_bytes >= 4, False))
    if M > 64:
        tiles.insert(0, (128, 256, tiles[0][2], 8, 3))
    splits = sorted({1, heuristic.split_k, 2 * heuristic.split_k, max(1, heuristic.split_k // 2)})
    out = []
    for (bm, bn, bk, warps, stages), split, pre, extra_stage in itertools.product(
            tiles, splits, (True, False), (0, 1)):
        if not pre and (split > 1 or heuristic.block_r >= FUSED_T_MAX_BLOCK_R):
            continue  # not a plan the launcher runs (K splits need t first; rank >= 64 spills)
        out.append(replace(heuristic, block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                           num_stages=stages + extra_stage, tiles_per_program=1, split_k=split,
                           precompute_t=pre))
    # the Hopper variant (persistent, TMA; warp-specialized or not) where it applies: t first, no K split
    out += [replace(c, persistent_tma=True, warp_specialize=ws) for c in list(out)
            if c.precompute_t and c.split_k == 1 for ws in (False, True)]
    unique = []
    for c in out:
        if c not in unique and c != heuristic:
            unique.append(c)
    return unique


def bucket_key(M: int, N: int, K: int, r: int, elem_bytes: int) -> Dict:
    """The table key of a forward bucket (lora_kernels.configs: sizes, then exact-match fields)."""
    return {"M": M, "N": N, "K": K, "r": r, "elem_bytes": elem_bytes, "mask_epilogue": False,
            "split_adapters": False}


def tune_buckets(buckets: Iterable[Dict], measure: Callable[[Dict, object], Optional[float]],
                 candidates_of: Callable[[Dict], List], budget_s: float,
                 clock: Callable[[], float] = time.perf_counter, log=lambda case: None) -> List[Dict]:
    """For each bucket (a dict with "key" and "heuristic"): measure the heuristic, then its
    candidates, while the budget lasts. measure(bucket, config) -> µs, or None when the config
    fails its check or cannot run. Returns one case per bucket measured: times, the best config."""
    start, cases = clock(), []
    for bucket in buckets:
        if clock() - start >= budget_s:
            break
        case = {**bucket["fields"], "times_us": {}, "configs": {}, "failed": [], "errors": {}}
        configs = [("heuristic", bucket["heuristic"])] + [(f"c{i + 1}", c) for i, c in
                                                         enumerate(candidates_of(bucket))]
        for name, cfg in configs:
            if clock() - start >= budget_s:
                case["failed"].append("budget spent before the remaining candidates")
                break
            us = measure(bucket, cfg)
            if us is None:
                case["failed"].append(f"{name}: failed its check or could not run")
                continue
            case["times_us"][name], case["configs"][name] = us, asdict(cfg)
        if "heuristic" in case["times_us"]:
            best = min(case["times_us"], key=case["times_us"].get)
            case.update(best=best, baseline="heuristic", key=bucket["key"],
                        ratios={"best": case["times_us"][best] / case["times_us"]["heuristic"]})
            cases.append(case)
            log(case)
    return cases


def write_table(cases: List[Dict], table: Dict, path: str) -> Dict:
    """Record each case's best config under its key and save the table (lora_kernels.configs)."""
    from lora_kernels import configs
    for c in cases:
        configs.record(table, "forward", c["key"], c["configs"][c["best"]], c["times_us"][c["best"]])
    configs.save_table(table, path)
    return table


def _buckets(args, dtype, device):
    from lora_kernels.triton.lora_linear import _num_sms, forward_config
    layers = suites.LAYERS if not args.layers else [l for l in suites.LAYERS if l[0] in args.layers]
    tokens = args.tokens or ([16, 4096] if args.quick else suites.TOKENS)
    elem = torch_elem_bytes(dtype)
    for r in (args.ranks or suites.RANKS):
        for (name, K, N) in layers:
            for M in tokens:
                yield {"fields": {"layer": name, "K": K, "N": N, "M": M, "r": r}, "key": bucket_key(M, N, K, r, elem),
                       "heuristic": forward_config(M, N, K, r, elem, _num_sms(device)), "dtype": dtype}


def torch_elem_bytes(dtype) -> int:
    import torch
    return torch.empty((), dtype=dtype).element_size()


def _measure_on(device, rep_ms):
    """measure(bucket, config): check the forward with `config` on this bucket's shape against
    float64 (sampled rows), then time it (CUDA graphs at decode sizes)."""
    from lora_kernels.triton.lora_linear import lora_linear_fwd
    inputs = {}

    def measure(bucket, cfg) -> Optional[float]:
        f, dtype = bucket["fields"], bucket["dtype"]
        M, K, N, r = f["M"], f["K"], f["N"], f["r"]
        if (M, K, N, r) not in inputs:
            inputs.clear()  # one shape's tensors at a time
            rnd = seeded_randn(device, dtype, M * 7919 + K * 31 + N + r)
            x, w = rnd(M, K), rnd(N, K, scale=K ** -0.5)
            a, b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
            rows = check_rows(M, device)
            xr = x[rows].double()
            ref = xr @ w.double().t() + 2.0 * (xr @ a.double().t()) @ b.double().t()
            inputs[(M, K, N, r)] = (x, w, a, b, rows, ref)
        x, w, a, b, rows, ref = inputs[(M, K, N, r)]
        fn = lambda: lora_linear_fwd(x, w, a, b, 2.0, None, False, config=cfg)[0]  # noqa: E731
        try:
            if rel_error(fn()[rows], ref) > CHECK_TOL[dtype]:
                return None
            return time_us(fn, device.type, cuda_graph=M <= 16, rep_ms=rep_ms)
        except Exception:  # e.g. out of shared memory for this tile on this card
            return None
    return measure


def run(args, device, dtype, backends, rep_ms, log) -> Dict:
    if device.type != "cuda":
        raise SystemExit("bench --suite tune measures GPU launch configurations; it needs a CUDA device")
    import torch
    import triton
    from lora_kernels import configs
    from lora_kernels.triton.lora_linear import _num_sms
    configs.set_table(None)  # heuristics only while tuning
    budget = getattr(args, "budget_s", None) or DEFAULT_BUDGET_S
    cases = tune_buckets(list(_buckets(args, dtype, device)), _measure_on(device, min(rep_ms, 20)),
                         lambda b: candidates(b["fields"]["M"], b["fields"]["r"], torch_elem_bytes(dtype),
                                              b["heuristic"]),
                         budget, log=log)
    name = torch.cuda.get_device_name(device)
    path = getattr(args, "table", None) or configs.table_path(name)
    table = configs.load_table(path) or configs.new_table(name, _num_sms(device), triton.__version__,
                                                         time.strftime("%Y-%m-%d"))
    write_table(cases, table, path)
    configs.reset()
    summary = {"geomean_best_over_heuristic": geomean(c["ratios"]["best"] for c in cases),
               "buckets_measured": len(cases), "budget_s": budget, "table": os.path.relpath(path)}
    return {"cases": cases, "summary": summary}


def table(result: Dict) -> str:
    meta = result["meta"]
    lines = [f"# tune on {meta['device']} ({meta['date']}, torch {meta['torch']}, triton {meta['triton']}, "
             f"commit {meta['commit']})", "", NOTE, "",
             "| layer | K→N | M | r | heuristic µs | best µs | best / heuristic | best config |",
             "|---|---|---|---|---|---|---|---|"]
    for c in result["cases"]:
        h, best = c["times_us"].get("heuristic"), c.get("best")
        cfg = c["configs"].get(best, {}) if best else {}
        cfg_text = ", ".join(f"{k}={v}" for k, v in cfg.items())
        lines.append(f"| {c['layer']} | {c['K']}→{c['N']} | {c['M']} | {c['r']} | "
                     f"{h:.1f} | {c['times_us'][best]:.1f} | {c['ratios'].get('best', float('nan')):.2f} | {cfg_text} |"
                     if h and best else f"| {c['layer']} | {c['K']}→{c['N']} | {c['M']} | {c['r']} | — | — | — | failed |")
    lines += ["", "Summary: `" + json.dumps(result["summary"]) + "`"]
    return "\n".join(lines) + "\n"
