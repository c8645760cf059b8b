"""Suite `multi`: multi-adapter serving kernels against a PEFT-style loop and the bandwidth floor.

Per case (layer K->N, rank r, L adapter slots, M tokens, a token->adapter distribution), all
timed under CUDA graphs on a GPU (DESIGN.md section 7; GPU_BASELINES.md's multi-adapter rows):

* ``floor``: not timed -- the bytes of x, y in and out, and the active adapters' A and B (each at
  its real rank) over the copy bandwidth measured in this run. The table's baseline.
* ``ours_se_<b>``: ``lora_shrink`` then ``lora_expand_`` into y (the index prebuilt: a serving
  loop builds it once per batch for all layers); ``ours_shrink_<b>`` / ``ours_expand_<b>`` alone.
  <b> = each of our compiled backends that runs here: ``triton`` and ``cuda`` (the CUDA C++
  kernels, csrc/multi_lora/*.cuh) on a GPU; ours_*_triton vs ours_*_cuda is the measurement that
  should decide ops/multi_lora.py's AUTO_PREFERENCE.
* ``peft_loop``: PEFT's mixed-batch LoRA path (for each active adapter: gather its rows,
  ``B(A(x_rows)) * s``, scatter-add into y), with the row indices prepared on the host as PEFT
  does. ``ours_se_*`` is compared with it.
* ``base``: cuBLAS ``F.linear(x, W)``; ``ours_linear_<b>``: ``multi_lora_linear`` (base + adapters
  in one op); ``peft_loop_layer``: base then the PEFT loop. ``linear/base`` is ours_linear / base
  (the first backend's).
* ``ours_index``: building the AdapterIndex (reported in the case, outside the table).
* ``ours_linear_triton_fp32ab`` / ``ours_linear_triton_fp32ab_untransposed`` (GPU, 16-bit x):
  ``multi_lora_linear`` with the same adapters in fp32, with and without the t4 epilogue
  (triton/multi_lora.py SPLIT_T_ENABLED): the pair that should decide that switch.
* ``ours_linear_cuda_mma`` (Hopper only): ``multi_lora_linear`` on the mma.sync kernel, where
  ``ours_linear_cuda`` takes the sm90 tail GEMM with a per-slot tail when its tail is at most
  K / 8 columns (lora_kernels/cuda/multi_lora_sm90.py): the pair is what measures that threshold
  (``--adapters 2 4 8 16 --ranks 8 16 32`` sweeps it).

Multi-slice cases (``slices``: QKV 4096 -> 4096+1024+1024 under GQA, gate/up 4096 -> 2 x 14336):
``ours_slices_<b>`` = one shrink and one expand launch for all slices; ``ours_per_slice_<b>`` = S
shrinks + S expands (what the ops cost before slices existed); ``floor`` as above with x read
once and every slice's y and adapters. Targets (issue 12): shrink+expand for all slices <= 1.5x
the floor at M >= 1024, <= 5 µs at M <= 64.

Serving decode step (``decode_step``): the LoRA work of one Llama-3-8B decoder layer at decode
(qkv, o, gate/up, down), on one persistent AdapterIndex rebuilt with update_ per step (timed
with the step), the way the vLLM / SGLang integrations drive it. GPU_BASELINES.md measures vLLM
and SGLang only at 4096 -> 4096 (the o projection): those figures sit beside the o projection's
own time (``o_proj_us``), not beside the whole step.

vLLM / SGLang are not installed here: their columns are GPU_BASELINES.md's H200 numbers for the
matching rows (copied below), not measurements of this run.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import AdapterIndex, reference
from . import suites
from .common import add_ratios, check_rows, geomean, rel_error, seeded_randn, time_checked, time_us

KEY_COLUMNS = ["layer", "r", "L", "M", "dist", "active", "vllm_h200_doc_us", "sglang_h200_doc_us", "linear/base"]
NOTE = ("Time of each method / the bandwidth floor (bytes of x, y in+out and the active adapters' A and B at "
        "the copy bandwidth measured in this run; the 'baseline µs' column). All methods under CUDA graphs on a "
        "GPU (inputs may stay L2-resident across replays, so small cases can beat the DRAM floor). "
        "`linear/base` = multi_lora_linear / cuBLAS F.linear(x, W) in this run. vllm/sglang columns: "
        "GPU_BASELINES.md's H200 numbers (µs), not measured here.")

# GPU_BASELINES.md, multi-adapter 4096->4096 under CUDA graphs on an H200:
# (r, L, M, mode) -> (floor µs, vLLM µs, SGLang µs); decode = a random adapter per token,
# prefill = 32 contiguous segments.
DOC_BASELINES = {
    (16, 8, 1, "decode"): (0.1, 7.7, 12.9), (16, 8, 64, "decode"): (0.9, 9.6, 15.3),
    (16, 8, 1024, "decode"): (6.5, 21.7, 49.8), (16, 8, 4096, "prefill"): (24.4, 63.1, 148.2),
    (16, 128, 64, "decode"): (3.4, 34.7, 19.3), (16, 128, 1024, "decode"): (13.9, 126.9, 51.7),
    (16, 128, 4096, "prefill"): (25.8, 282.3, 149.5), (64, 8, 1024, "decode"): (8.0, 29.4, 93.9),
    (64, 8, 4096, "prefill"): (25.8, 90.7, 295.5), (64, 128, 64, "decode"): (12.8, 93.7, 54.2),
    (64, 128, 1024, "decode"): (37.8, 179.4, 138.9), (64, 128, 4096, "prefill"): (31.8, 510.2, 291.9),
}
LAUNCH_FLOOR_US = 5.0  # the bar where the floor is below launch latency
QUICK_CPU = dict(layers=[("tiny", 64, 48)], ranks=[8], adapters=[4], tokens=[1, 24], dists=["decode", "prefill"])

_COPY_BW: Dict[str, float] = {}


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second), measured once per run."""
    key = str(device)
    if key not in _COPY_BW:
        n = (1 << 29) if device.type == "cuda" else (1 << 24)  # 512 MiB: far past L2
        src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
        dst = torch.empty_like(src)
        seconds = time_us(lambda: dst.copy_(src), device.type, rep_ms=100) * 1e-6
        _COPY_BW[key] = 2 * n / seconds
        del src, dst
    return _COPY_BW[key]


def floor_us(M, K, N, ranks_active: List[int], elem: int, bw: float) -> float:
    """Bytes of x, y in and out, and the active adapters' A and B at their real ranks."""
    nbytes = elem * (M * K + 2 * M * N + sum(r * (K + N) for r in ranks_active))
    return 1e6 * nbytes / bw


def default_grid(args, on_gpu: bool):
    """(layers, ranks, adapters, tokens, dists) or, for --quick on a GPU, GPU_BASELINES' rows."""
    if args.quick and not on_gpu:
        g = QUICK_CPU
        return [(l, r, L, M, d) for l in g["layers"] for r in g["ranks"] for L in g["adapters"]
                for M in g["tokens"] for d in g["dists"]]
    if args.quick:
        layer = suites.MULTI_LAYERS[0]
        return [(layer, r, L, M, mode) for (r, L, M, mode) in DOC_BASELINES]
    layers = suites.MULTI_LAYERS
    if args.layers:
        layers = [l for l in suites.LAYERS + suites.MULTI_LAYERS + QUICK_CPU["layers"] if l[0] in args.layers]
    ranks, adapters = args.ranks or [16, 64], getattr(args, "adapters", None) or suites.MULTI_ADAPTERS
    tokens, dists = args.tokens or suites.MULTI_TOKENS, getattr(args, "dists", None) or suites.MULTI_DISTRIBUTIONS
    return [(l, r, L, M, d) for l in dict.fromkeys(layers) for r in ranks for L in adapters for M in tokens
            for d in dists]


def _peft_loop(x, y, rows_per_adapter):
    """PEFT's _mixed_batch_forward, LoRA part: one gather / two GEMMs / scatter per adapter."""
    for rows, a, b, s in rows_per_adapter:
        y[rows] += F.linear(F.linear(x[rows], a), b) * s
    return y


def _mma_sync_linear(x, weight, lora_a, lora_b, index, scales, ranks):
    """backend="cuda" multi_lora_linear with the sm90 path switched off (captured once under CUDA graphs)."""
    from lora_kernels.cuda import multi_lora_sm90
    multi_lora_sm90.ENABLED = False
    try:
        return lora_kernels.multi_lora_linear(x, weight, lora_a, lora_b, index, scales, None, ranks, backend="cuda")
    finally:
        multi_lora_sm90.ENABLED = True


def _untransposed_fp32_b_linear(x, weight, lora_a, lora_b, index, scales, ranks):
    """backend="triton" multi_lora_linear with fp32 adapters and the t4 epilogue switched off
    (triton/multi_lora.py SPLIT_T_ENABLED; captured once under CUDA graphs)."""
    from lora_kernels.triton import multi_lora
    multi_lora.SPLIT_T_ENABLED = False
    try:
        return lora_kernels.multi_lora_linear(x, weight, lora_a, lora_b, index, scales, None, ranks, backend="triton")
    finally:
        multi_lora.SPLIT_T_ENABLED = True


def run_case(layer, r, L, M, dist, dtype, device, backends, rep_ms) -> Dict:
    name, K, N = layer
    rnd = seeded_randn(device, dtype, M * 7919 + K * 31 + N + r * 13 + L)
    x, weight = rnd(M, K), rnd(N, K, scale=K ** -0.5)
    lora_a, lora_b = rnd(L, r, K, scale=K ** -0.5), rnd(L, N, r, scale=r ** -0.5)
    scales = torch.full((L,), 2.0, dtype=torch.float32, device=device)
    ranks = torch.full((L,), r, dtype=torch.int32, device=device)
    ids_cpu = suites.token_adapters(dist, M, L, seed=M + L + r)
    ids = ids_cpu.to(device)
    index = AdapterIndex.from_token_adapters(ids, L)
    active = sorted(set(ids_cpu.tolist()) - {-1})
    case = {"layer": name, "K": K, "N": N, "r": r, "L": L, "M": M, "dist": dist, "active": len(active),
            "dtype": str(dtype).replace("torch.", "")}
    doc = DOC_BASELINES.get((r, L, M, dist)) if (K, N) == (4096, 4096) else None
    case["vllm_h200_doc_us"] = doc[1] if doc else "—"
    case["sglang_h200_doc_us"] = doc[2] if doc else "—"

    # float64 expectations on a bounded set of rows
    rows = check_rows(M, device)
    xr = x[rows].double()
    base_ref = xr @ weight.double().t()
    t_ref = reference.lora_shrink(xr, lora_a.double(), ids[rows], scales.double(), ranks)
    delta_ref = reference.lora_expand_delta(t_ref, lora_b.double(), ids[rows], ranks)
    y_init = rnd(M, N)
    expect = {"base": base_ref, "layer": base_ref + delta_ref, "add": y_init[rows].double() + delta_ref}

    y_se, y_expand, y_peft = y_init.clone(), y_init.clone(), y_init.clone()
    t_fixed = lora_kernels.lora_shrink(x, lora_a, index, scales, ranks, backend="torch").float()
    rows_per_adapter = []
    for i in active:
        tok = (ids_cpu == i).nonzero().flatten().to(device)  # PEFT builds these on the host
        rows_per_adapter.append((tok, lora_a[i].contiguous(), lora_b[i].contiguous(), 2.0))
    methods = {
        "base": lambda: F.linear(x, weight),
        "peft_loop": lambda: _peft_loop(x, y_peft, rows_per_adapter),
        "peft_loop_layer": lambda: _peft_loop(x, F.linear(x, weight), rows_per_adapter),
    }
    kind = {"base": "base", "peft_loop": "add", "peft_loop_layer": "layer"}
    for b in backends:
        methods[f"ours_se_{b}"] = (lambda b=b: lora_kernels.lora_expand_(
            y_se, lora_kernels.lora_shrink(x, lora_a, index, scales, ranks, backend=b), lora_b, index, ranks,
            backend=b))
        methods[f"ours_shrink_{b}"] = lambda b=b: lora_kernels.lora_shrink(x, lora_a, index, scales, ranks, backend=b)
        methods[f"ours_expand_{b}"] = (lambda b=b: lora_kernels.lora_expand_(y_expand, t_fixed, lora_b, index, ranks,
                                                                             backend=b))
        methods[f"ours_linear_{b}"] = (lambda b=b: lora_kernels.multi_lora_linear(x, weight, lora_a, lora_b, index,
                                                                                  scales, None, ranks, backend=b))
        kind.update({f"ours_se_{b}": "add", f"ours_expand_{b}": "add", f"ours_linear_{b}": "layer",
                     f"ours_shrink_{b}": "t"})

    if "cuda" in backends and device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0):
        # Hopper: multi_lora_linear's mma.sync kernel where ours_linear_cuda may run the sm90 tail GEMM
        # (lora_kernels/cuda/multi_lora_sm90.py): the pair measures its SM90_MULTI_TAIL_DIVISOR threshold.
        methods["ours_linear_cuda_mma"] = lambda: _mma_sync_linear(x, weight, lora_a, lora_b, index, scales, ranks)
        kind["ours_linear_cuda_mma"] = "layer"

    if "triton" in backends and device.type == "cuda" and dtype != torch.float32:
        # fp32 adapters (PEFT's default) over 16-bit x: the t4 epilogue (fp32 B on wgmma tiles) and the
        # untransposed tf32x3 one it replaced -- the pair that should decide SPLIT_T_ENABLED. The
        # adapters hold the same values as the 16-bit ones, so the expectation is the same.
        a32, b32 = lora_a.float(), lora_b.float()
        methods["ours_linear_triton_fp32ab"] = lambda: lora_kernels.multi_lora_linear(
            x, weight, a32, b32, index, scales, None, ranks, backend="triton")
        methods["ours_linear_triton_fp32ab_untransposed"] = lambda: _untransposed_fp32_b_linear(
            x, weight, a32, b32, index, scales, ranks)
        kind.update({"ours_linear_triton_fp32ab": "layer", "ours_linear_triton_fp32ab_untransposed": "layer"})

    def check(method: str, out: torch.Tensor) -> float:
        if kind[method] == "t":
            return rel_error(out[rows], t_ref)
        return rel_error(out[rows], expect[kind[method]])

    on_gpu = device.type == "cuda"
    with torch.inference_mode():
        time_checked(case, methods, check, dtype, device, rep_ms, cuda_graph=True)
        case["index_us"] = time_us(lambda: AdapterIndex.from_token_adapters(ids, L), device.type,
                                   cuda_graph=on_gpu, rep_ms=rep_ms)
    ranks_active = [r] * len(active)
    case["times_us"]["floor"] = floor_us(M, K, N, ranks_active, x.element_size(), copy_bandwidth(device))
    add_ratios(case, "floor")
    ours_linear = [k for k in case["times_us"] if k.startswith("ours_linear_")]
    base = case["times_us"].get("base")
    case["linear/base"] = (f"{case['times_us'][ours_linear[0]] / base:.2f}" if ours_linear and base else "—")
    return case


def summarize(cases: List[Dict], backends: List[str]) -> Dict:
    """The issue's acceptance numbers, per backend: shrink+expand within 2x the floor (or <= 5 µs
    where the floor is under 5 µs); faster than both documented peers (only meaningful on an
    H200, the card they were measured on); multi_lora_linear <= 1.15x base at M >= 1024."""
    out = {}
    cases = [c for c in cases if "kind" not in c]
    for b in backends:
        se, lin = f"ours_se_{b}", f"ours_linear_{b}"
        timed = [c for c in cases if se in c["times_us"]]
        ok_floor = [c for c in timed
                    if c["times_us"][se] <= max(2 * c["times_us"]["floor"], LAUNCH_FLOOR_US)]
        peers = [c for c in timed if c["vllm_h200_doc_us"] != "—"]
        beat = [c for c in peers if c["times_us"][se] < min(c["vllm_h200_doc_us"], c["sglang_h200_doc_us"])]
        big = [c for c in cases if c["M"] >= 1024 and lin in c["times_us"] and "base" in c["times_us"]]
        lin_ratios = [c["times_us"][lin] / c["times_us"]["base"] for c in big]
        vs_peft = [c["times_us"]["peft_loop"] / c["times_us"][se] for c in timed if "peft_loop" in c["times_us"]]
        out[b] = {
            "se_within_2x_floor_or_5us": f"{len(ok_floor)}/{len(timed)}",
            "se_worst_ratio_to_floor": max((c["ratios"][se] for c in timed), default=None),
            "se_faster_than_both_doc_peers": f"{len(beat)}/{len(peers)}",
            "se_speedup_vs_peft_loop_geomean": geomean(vs_peft),
            "linear_over_base_M>=1024_max": max(lin_ratios, default=None),
            "linear_over_base_M>=1024_geomean": geomean(lin_ratios),
            "index_us_median": sorted(c["index_us"] for c in cases)[len(cases) // 2] if cases else None,
            "cases_with_failures": sum(any(f.startswith("ours_") and f.split(":")[0].endswith(f"_{b}")
                                           for f in c["failed"]) for c in cases),
        }
    return out


def brief(result: Dict) -> List[str]:
    """Short text table for device_check's summary: per case, the floor, each backend's
    shrink+expand and its ratio to the floor, the documented peers, and multi_lora_linear / base."""
    se_names = list(dict.fromkeys(k for c in result["cases"] for k in c["times_us"] if k.startswith("ours_se_")))
    slices = [c for c in result["cases"] if c.get("kind") == "slices"]
    se_head = "".join(f" {'se ' + k[len('ours_se_'):]:>10} {'/floor':>6}" for k in se_names)
    lines = [f"  copy bandwidth {result['copy_bandwidth_GBps']:.0f} GB/s",
             f"  {'layer':>10} {'r':>3} {'L':>4} {'M':>5} {'dist':>8} {'floor':>7}{se_head} "
             f"{'vllm':>7} {'sglang':>7} {'lin/base':>8}"]
    for c in result["cases"]:
        if "kind" in c:  # multi-slice / decode-step cases: in the JSON and the markdown table
            continue
        t = c["times_us"]
        se_cols = "".join(f" {t.get(k, float('nan')):>10.1f} {t.get(k, float('nan')) / t['floor']:>6.2f}"
                          for k in se_names)
        lines.append(f"  {c['layer']:>10} {c['r']:>3} {c['L']:>4} {c['M']:>5} {c['dist']:>8} {t['floor']:>7.1f}"
                     f"{se_cols} {c['vllm_h200_doc_us']!s:>7} {c['sglang_h200_doc_us']!s:>7} "
                     f"{c['linear/base']:>8}" + ("  FAILED " + "; ".join(c["failed"]) if c["failed"] else ""))
    for c in slices:
        t = c["times_us"]
        cols = "".join(f" {k[len('ours_'):]} {v:.1f}" for k, v in t.items() if k.startswith("ours_"))
        lines.append(f"  slices {c['layer']} r={c['r']} M={c['M']}: floor {t['floor']:.1f}{cols}"
                     + ("  FAILED " + "; ".join(c["failed"]) if c["failed"] else ""))
    return lines


# name, K, slice widths: Llama-3-8B's packed projections (GQA: 8 kv heads of 128 next to 32 q heads)
SLICE_LAYERS = [("8B qkv", 4096, (4096, 1024, 1024)), ("8B gate/up", 4096, (14336, 14336))]
SLICE_TOKENS = [1, 64, 1024, 4096]
QUICK_CPU_SLICES = [("tiny qkv", 64, (48, 16, 16))]
# One decoder layer's LoRA projections (K, slice widths), Llama-3-8B.
DECODE_STEP = [("qkv", 4096, (4096, 1024, 1024)), ("o", 4096, (4096,)), ("gate_up", 4096, (14336, 14336)),
               ("down", 14336, (4096,))]
QUICK_CPU_STEP = [("qkv", 64, (48, 16, 16)), ("o", 48, (64,)), ("gate_up", 64, (32, 32)), ("down", 32, (64,))]
DECODE_STEP_TOKENS = [1, 16, 64]


def _slice_inputs(K, widths, r, L, M, dist, dtype, device):
    rnd = seeded_randn(device, dtype, M * 7919 + K * 31 + sum(widths) + r * 13 + L)
    x = rnd(M, K)
    a = [rnd(L, r, K, scale=K ** -0.5) for _ in widths]
    b = [rnd(L, n, r, scale=r ** -0.5) for n in widths]
    scales = torch.full((L,), 2.0, dtype=torch.float32, device=device)
    ranks = torch.full((L,), r, dtype=torch.int32, device=device)
    ids_cpu = suites.token_adapters(dist, M, L, seed=M + L + r)
    return x, a, b, scales, ranks, ids_cpu


def run_slices_case(layer, r, L, M, dist, dtype, device, backends, rep_ms) -> Dict:
    """All slices of a packed projection: one shrink + one expand launch vs per-slice launches."""
    name, K, widths = layer
    x, a, b, scales, ranks, ids_cpu = _slice_inputs(K, widths, r, L, M, dist, dtype, device)
    ids = ids_cpu.to(device)
    index = AdapterIndex.from_token_adapters(ids, L)
    active = sorted(set(ids_cpu.tolist()) - {-1})
    N = sum(widths)
    case = {"kind": "slices", "layer": name, "K": K, "N": N, "slices": list(widths), "r": r, "L": L, "M": M,
            "dist": dist, "active": len(active), "dtype": str(dtype).replace("torch.", ""),
            "vllm_h200_doc_us": "—", "sglang_h200_doc_us": "—", "linear/base": "—"}
    rows = check_rows(M, device)
    y_init = seeded_randn(device, dtype, M + N)(M, N)
    delta = torch.cat([reference.lora_expand_delta(
        reference.lora_shrink(x[rows].double(), ai.double(), ids[rows], scales.double(), ranks), bi.double(),
        ids[rows], ranks) for ai, bi in zip(a, b)], dim=1)
    expect = y_init[rows].double() + delta
    methods = {}
    for bk in backends:
        y_one, y_per = y_init.clone(), y_init.clone()
        methods[f"ours_slices_{bk}"] = (lambda bk=bk, y=y_one: lora_kernels.lora_expand_(
            y, lora_kernels.lora_shrink(x, a, index, scales, ranks, backend=bk), b, index, ranks, backend=bk))

        def per_slice(bk=bk, y=y_per):
            col = 0
            for ai, bi in zip(a, b):
                t = lora_kernels.lora_shrink(x, ai, index, scales, ranks, backend=bk)
                lora_kernels.lora_expand_(y[:, col:col + bi.shape[1]], t, bi, index, ranks, backend=bk)
                col += bi.shape[1]
            return y
        methods[f"ours_per_slice_{bk}"] = per_slice
    with torch.inference_mode():
        # methods accumulate into y on every replay: compare the first call only (time_checked
        # runs each method once before timing it)
        time_checked(case, methods, lambda m, out: rel_error(out[rows], expect), dtype, device, rep_ms,
                     cuda_graph=True)
    elem = x.element_size()
    nbytes = elem * (M * K + 2 * M * N + sum(r * (K + n) for n in widths) * len(active))
    case["times_us"]["floor"] = 1e6 * nbytes / copy_bandwidth(device)
    add_ratios(case, "floor")
    return case


def run_decode_step(r, L, M, dtype, device, backends, rep_ms, quick_cpu: bool) -> Dict:
    """One decoder layer's LoRA work at decode on a persistent index (update_ once per step)."""
    step = QUICK_CPU_STEP if quick_cpu else DECODE_STEP
    ids_cpu = suites.token_adapters("decode", M, L, seed=M + L)
    ids = ids_cpu.to(device)
    index = AdapterIndex.with_capacity(max(64, M), L, device=device)
    layers = [(name, _slice_inputs(K, widths, r, L, M, "decode", dtype, device)[:5]) for name, K, widths in step]
    case = {"kind": "decode_step", "layer": "decode step" if not quick_cpu else "tiny step", "r": r, "L": L, "M": M,
            "dist": "decode", "active": len(set(ids_cpu.tolist()) - {-1}), "dtype": str(dtype).replace("torch.", ""),
            "linear/base": "—"}
    doc = DOC_BASELINES.get((r, L, M, "decode"))
    case["vllm_h200_doc_us"] = doc[1] if doc and not quick_cpu else "—"
    case["sglang_h200_doc_us"] = doc[2] if doc and not quick_cpu else "—"
    index.update_(ids)
    ys = {name: torch.zeros(M, sum(bi.shape[1] for bi in b), dtype=dtype, device=device)
          for name, (_x, _a, b, _s, _r) in layers}
    expect = {}
    rows = check_rows(M, device)
    for name, (x, a, b, scales, ranks) in layers:
        expect[name] = torch.cat([reference.lora_expand_delta(
            reference.lora_shrink(x[rows].double(), ai.double(), ids[rows], scales.double(), ranks), bi.double(),
            ids[rows], ranks) for ai, bi in zip(a, b)], dim=1)

    def make(bk, only=None):
        def run_step():
            index.update_(ids)
            for name, (x, a, b, scales, ranks) in layers:
                if only is None or name == only:
                    y = ys[name].zero_()
                    lora_kernels.lora_expand_(y, lora_kernels.lora_shrink(x, a, index, scales, ranks, backend=bk),
                                              b, index, ranks, backend=bk)
            return ys[only or "down"]
        return run_step
    methods = {}
    for bk in backends:
        methods[f"ours_step_{bk}"] = make(bk)
        methods[f"ours_o_proj_{bk}"] = make(bk, "o")
    with torch.inference_mode():
        time_checked(case, methods, lambda m, out: rel_error(out[rows], expect["o" if "o_proj" in m else "down"]),
                     dtype, device, rep_ms, cuda_graph=True)
    return case


def run(args, device, dtype, backends, rep_ms, log) -> Dict:
    on_gpu = device.type == "cuda"
    cases = []
    for (layer, r, L, M, dist) in default_grid(args, on_gpu):
        cases.append(run_case(layer, r, L, M, dist, dtype, device, backends, rep_ms))
        log(cases[-1])
        if on_gpu:
            torch.cuda.empty_cache()
    quick_cpu = args.quick and not on_gpu
    slice_cases = []
    for layer in (QUICK_CPU_SLICES if quick_cpu else SLICE_LAYERS):
        for M in ([1, 24] if quick_cpu else SLICE_TOKENS):
            for r, L in ([(8, 4)] if quick_cpu else [(16, 8), (64, 8)]):
                slice_cases.append(run_slices_case(layer, r, L, M, "decode" if M <= 64 else "prefill", dtype, device,
                                                   backends, rep_ms))
                log(slice_cases[-1])
                if on_gpu:
                    torch.cuda.empty_cache()
    step_cases = [run_decode_step(r, L, M, dtype, device, backends, rep_ms, quick_cpu)
                  for M in ([1, 8] if quick_cpu else DECODE_STEP_TOKENS)
                  for r, L in ([(8, 4)] if quick_cpu else [(16, 8)])]
    for c in step_cases:
        log(c)
    # one list, so that the table and bench.run's failure check cover every case; "kind" tells
    # the multi-slice and decode-step cases apart
    return {"cases": cases + slice_cases + step_cases, "summary": summarize(cases, backends),
            "slice_summary": summarize_slices(slice_cases, backends),
            "copy_bandwidth_GBps": copy_bandwidth(device) / 1e9}


def summarize_slices(cases: List[Dict], backends: List[str]) -> Dict:
    """Issue 12's targets per backend: all slices' shrink+expand <= 1.5x the floor at M >= 1024 and
    <= 5 µs at M <= 64; and the one-launch path's speedup over per-slice launches."""
    out = {}
    for b in backends:
        one, per = f"ours_slices_{b}", f"ours_per_slice_{b}"
        timed = [c for c in cases if one in c["times_us"]]
        big = [c for c in timed if c["M"] >= 1024]
        small = [c for c in timed if c["M"] <= 64]
        out[b] = {
            "slices_within_1.5x_floor_M>=1024": f"{sum(c['ratios'][one] <= 1.5 for c in big)}/{len(big)}",
            "slices_within_5us_M<=64": f"{sum(c['times_us'][one] <= LAUNCH_FLOOR_US for c in small)}/{len(small)}",
            "one_launch_speedup_vs_per_slice_geomean": geomean(
                [c["times_us"][per] / c["times_us"][one] for c in timed if per in c["times_us"]]),
        }
    return out
