"""Suite `tune`: measure the Triton forward's tile configurations against its heuristic.

For each shape, every candidate ``ForwardConfig`` is checked against float64 and timed; the table
shows the heuristic's time over the best candidate's. This is how the heuristic in
``lora_kernels/triton/lora_linear.py::forward_config`` gets measured reasons (GPU only).
"""
from __future__ import annotations

import itertools
import json
from dataclasses import asdict, replace
from typing import Dict, List


from . import suites
from .common import CHECK_TOL, check_rows, geomean, rel_error, seeded_randn, time_us

KEY_COLUMNS = ["layer", "K", "N", "M", "r"]
NOTE = ("Time of each candidate tile configuration / time of the heuristic's configuration, same "
        "run; `best` is the fastest candidate.")


def candidates(M: int, r: int, elem_bytes: int, heuristic) -> List:
    """A small grid around the heuristic's regime (M <= 16: decode tiles; else GEMM tiles)."""
    out = []
    if M <= 16:
        for bn, bk, stages in itertools.product((32, 64, 128), (64, 128, 256), (3, 4, 5)):
            out.append(replace(heuristic, block_n=bn, block_k=bk, num_stages=stages, tiles_per_program=1))
    else:
        for bm, bn, warps, stages, tiles in itertools.product((64, 128), (128, 256), (4, 8), (3, 4),
                                                              (1, heuristic.tiles_per_program)):
            if bm * bn >= 128 * 256 and warps < 8:
                continue  # a 128x256 fp32 accumulator does not fit 4 warps' registers
            out.append(replace(heuristic, block_m=bm, block_n=bn, block_k=64, num_warps=warps,
                               num_stages=stages, tiles_per_program=tiles))
    unique = []
    for c in out:
        if c not in unique and c != heuristic:
            unique.append(c)
    return unique


def run_case(layer, K, N, M, r, dtype, device, rep_ms) -> Dict:
    from lora_kernels.triton.lora_linear import _num_sms, forward_config, lora_linear_fwd
    rnd = seeded_randn(device, dtype, M * 7919 + K * 31 + N + r)
    x, weight = rnd(M, K), rnd(N, K, scale=K ** -0.5)
    lora_a, lora_b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
    rows = check_rows(M, device)
    xr = x[rows].double()
    ref = xr @ weight.double().t() + 2.0 * (xr @ lora_a.double().t()) @ lora_b.double().t()
    heuristic = forward_config(M, N, K, r, x.element_size(), _num_sms(device))
    case = {"layer": layer, "K": K, "N": N, "M": M, "r": r, "heuristic": asdict(heuristic),
            "times_us": {}, "errors": {}, "failed": [], "configs": {}}
    for i, cfg in enumerate([heuristic] + candidates(M, r, x.element_size(), heuristic)):
        name = "heuristic" if i == 0 else f"c{i}"
        fn = lambda cfg=cfg: lora_linear_fwd(x, weight, lora_a, lora_b, 2.0, None, False, config=cfg)[0]  # noqa: E731
        try:
            err = rel_error(fn()[rows], ref)
        except Exception as e:  # e.g. out of shared memory for this tile
            case["failed"].append(f"{name}: {type(e).__name__}: {str(e)[:120]}")
            continue
        case["errors"][name] = err
        if err > CHECK_TOL[dtype]:
            case["failed"].append(f"{name}: relative error {err:.2e}")
            continue
        case["configs"][name] = asdict(cfg)
        case["times_us"][name] = time_us(fn, device.type, cuda_graph=M <= 16, rep_ms=rep_ms)
    base = case["times_us"].get("heuristic")
    best = min(case["times_us"], key=case["times_us"].get) if case["times_us"] else None
    case["best"] = best
    case["baseline"] = "heuristic"
    case["ratios"] = ({"best": case["times_us"][best] / base} if base and best else {})
    return case


def run(args, device, dtype, backends, rep_ms, log) -> Dict:
    if device.type != "cuda":
        raise SystemExit("bench --suite tune measures GPU tile configurations; it needs a CUDA device")
    layers = suites.LAYERS if not args.layers else [l for l in suites.LAYERS if l[0] in args.layers]
    tokens = args.tokens or ([16, 4096] if args.quick else suites.TOKENS)
    cases = []
    for (name, K, N) in layers:
        for r in (args.ranks or [16]):
            for M in tokens:
                cases.append(run_case(name, K, N, M, r, dtype, device, min(rep_ms, 20)))
                log(cases[-1])
    summary = {"geomean_heuristic_over_best": geomean(1.0 / c["ratios"]["best"] for c in cases if c["ratios"])}
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
