"""Suite `forward`: the single-adapter fused forward against base, naive, skilled and PEFT."""
from __future__ import annotations

from typing import Dict, List

import torch

from . import suites
from .common import add_ratios, check_rows, geomean, rel_error, seeded_randn, time_checked
from .peers import forward_methods

KEY_COLUMNS = ["layer", "K", "N", "M", "r"]
NOTE = ("Time of each method / time of the base GEMM `F.linear(x, W0)` in the same run "
        "(decode rows, M <= 16, timed under CUDA graphs on a GPU).")


def run_case(layer, K, N, M, r, dtype, device, backends, rep_ms) -> Dict:
    rnd = seeded_randn(device, dtype, M * 7919 + K * 31 + N + r)
    x, weight = rnd(M, K), rnd(N, K, scale=K ** -0.5)
    lora_a, lora_b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
    scale = 2.0
    rows = check_rows(M, device)
    xr = x[rows].double()
    base_ref = xr @ weight.double().t()
    ref = base_ref + scale * (xr @ lora_a.double().t()) @ lora_b.double().t()
    check = lambda name, y: rel_error(y[rows], base_ref if name == "base" else ref)  # noqa: E731
    case = {"layer": layer, "K": K, "N": N, "M": M, "r": r, "dtype": str(dtype).replace("torch.", "")}
    with torch.inference_mode():
        time_checked(case, forward_methods(x, weight, lora_a, lora_b, scale, backends), check, dtype,
                     device, rep_ms, cuda_graph=M <= 16)
    return add_ratios(case, "base")


def summarize(cases: List[Dict], backends: List[str]) -> Dict:
    """The acceptance numbers: geomean ours/base at M >= 1024, r = 16, and the cases where ours
    beats the skilled addmm_ composition."""
    out = {}
    for b in backends:
        key = f"ours_{b}"
        timed = [c for c in cases if key in c["times_us"] and "skilled" in c["times_us"]]
        out[key] = {
            "geomean_ratio_M>=1024_r16": geomean(c["ratios"][key] for c in timed if c["M"] >= 1024 and c["r"] == 16),
            "cases_faster_than_skilled": sum(c["times_us"][key] < c["times_us"]["skilled"] for c in timed),
            "cases_compared": len(timed),
            "failures": sum(any(f.startswith(key) for f in c["failed"]) for c in cases),
        }
    return out


def run(args, device, dtype, backends, rep_ms, log) -> Dict:
    cases = []
    for name, K, N, r, M in suites.layer_grid(args, device.type == "cuda"):
        cases.append(run_case(name, K, N, M, r, dtype, device, backends, rep_ms))
        log(cases[-1])
    return {"cases": cases, "summary": summarize(cases, backends)}


def brief(result: Dict) -> List[str]:
    from .summarize import ratio_table
    return ratio_table(result, ("layer", "M", "r"), ("skilled", "peft", "ours_triton", "ours_cuda"))
