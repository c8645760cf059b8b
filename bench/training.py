"""Suite `training`: one layer's forward + backward (x requires grad, W0 frozen) against the base
layer's two GEMMs and against PEFT, with the activation memory each keeps for its backward.

Methods (each returns (y, dx[, dA, dB]); gradients come from ``torch.autograd.grad``, so nothing
accumulates into ``.grad`` between timed calls):

* ``base``: the floor -- cuBLAS ``y = x @ W0^T`` and ``dx = dy @ W0``, no autograd bookkeeping;
* ``base_autograd``: ``F.linear`` through autograd (what LoRAFusion measured against);
* ``peft`` / ``peft_fp32``: PEFT's LoRA layer with bf16 / fp32 adapters (PEFT's default);
* ``peft_dropout``: PEFT, bf16 adapters, lora_dropout = 0.1;
* ``ours_<backend>`` / ``ours_<backend>_fp32`` / ``ours_<backend>_dropout``: ``lora_linear``
  with the same three adapter set-ups.

Memory (GPU only): ``kept_mb`` = bytes still allocated after the forward beyond y (what autograd
keeps for the backward); ``peak_mb`` = peak allocation during forward + backward above the
inputs. The acceptance bound is kept(ours) <= kept(base) + M*r*4 bytes.
"""
from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels.ops.lora_linear import draw_dropout_seed, dropout_mask

from . import suites
from .common import add_ratios, check_rows, geomean, rel_error, seeded_randn, time_checked
from .peers import _peft_layer

KEY_COLUMNS = ["layer", "K", "N", "M", "r"]
NOTE = ("Forward + backward of one layer (x requires grad, W0 frozen; dx, dA, dB) / the base "
        "layer's two cuBLAS GEMMs y = x·W0ᵀ and dx = dy·W0 timed the same way, in the same run. "
        "Dropout methods use p = 0.1.")
DROPOUT_P = 0.1
CHECK_SEED = 1234


class TrainMethod(NamedTuple):
    forward: Callable[[], object]                   # -> state handed to backward
    backward: Callable[[object], tuple]             # state -> (y, dx[, dA, dB])
    # one call that also says which dropout mask it drew (bool like x; None without dropout)
    run_with_mask: Optional[Callable[[], Tuple[tuple, Optional[torch.Tensor]]]] = None


def _autograd_method(forward_y, x, params, dy, run_with_mask=None) -> TrainMethod:
    def backward(y):
        return (y,) + torch.autograd.grad(y, [x, *params], dy)
    return TrainMethod(forward_y, backward, run_with_mask)


def _peft_method(layer, x, dy) -> TrainMethod:
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    method = _autograd_method(lambda: layer(x), x, params, dy)

    def run_with_mask():  # PEFT's nn.Dropout draws the mask: read it off the module's output
        seen = []
        hook = layer.lora_dropout["default"].register_forward_hook(lambda m, i, o: seen.append(o != 0))
        try:
            out = method.backward(method.forward())
        finally:
            hook.remove()
        return out, (seen[0] if isinstance(layer.lora_dropout["default"], torch.nn.Dropout) else None)
    return method._replace(run_with_mask=run_with_mask)


def _ours_method(x, weight, a, b, scale, p, backend, dy) -> TrainMethod:
    method = _autograd_method(lambda: lora_kernels.lora_linear(x, weight, a, b, scale, dropout_p=p,
                                                               training=True, backend=backend), x, [a, b], dy)

    def run_with_mask():  # the op draws one Philox seed from torch's generator: replay it
        torch.manual_seed(CHECK_SEED)
        out = method.backward(method.forward())
        if not p:
            return out, None
        torch.manual_seed(CHECK_SEED)
        seed = draw_dropout_seed(x.device)
        return out, dropout_mask(seed, x.shape, p, backend="triton" if backend == "triton" else "torch")
    return method._replace(run_with_mask=run_with_mask)


def training_methods(x, weight, lora_a, lora_b, scale, dy, backends) -> Dict[str, TrainMethod]:
    """name -> TrainMethod; x requires grad, weight is frozen."""
    xd = x.detach()
    methods = {
        "base": TrainMethod(lambda: F.linear(xd, weight), lambda y: (y, torch.mm(dy, weight))),
        "base_autograd": _autograd_method(lambda: F.linear(x, weight), x, [], dy),
    }
    try:
        for name, fp32, p in (("peft", False, 0.0), ("peft_fp32", True, 0.0), ("peft_dropout", False, DROPOUT_P)):
            layer = _peft_layer(weight, lora_a, lora_b, scale, adapters_fp32=fp32, lora_dropout=p).train()
            methods[name] = _peft_method(layer, x, dy)
    except ImportError:
        pass
    a32, b32 = (t.detach().float().requires_grad_(True) for t in (lora_a, lora_b))
    for b in backends:
        for suffix, (a, bb), p in (("", (lora_a, lora_b), 0.0), ("_fp32", (a32, b32), 0.0),
                                   ("_dropout", (lora_a, lora_b), DROPOUT_P)):
            methods[f"ours_{b}{suffix}"] = _ours_method(x, weight, a, bb, scale, p, b, dy)
    return methods


@torch.no_grad()
def _references(x, weight, lora_a, lora_b, scale, dy, rows, keep=None, p=0.0):
    """float64 y and dx on the check rows; dA and dB in fp32, summed over 4096-row chunks (a float64
    copy of the largest x would not fit). keep: bool like x, the dropout mask (None: none)."""
    def drop(xc, m0):
        xc = xc.float()
        return xc if keep is None else xc * keep[m0:m0 + xc.shape[0]] / (1.0 - p)
    xr, dyr = x[rows].double(), dy[rows].double()
    a, b, w = lora_a.double(), lora_b.double(), weight.double()
    xr_drop = xr if keep is None else xr * keep[rows] / (1.0 - p)
    ref = {"y_base": xr @ w.t(), "dx_base": dyr @ w}
    ref["y"] = ref["y_base"] + scale * (xr_drop @ a.t()) @ b.t()
    lora_dx = scale * (dyr @ b) @ a
    ref["dx"] = ref["dx_base"] + (lora_dx if keep is None else lora_dx * keep[rows] / (1.0 - p))
    da = torch.zeros(lora_a.shape, dtype=torch.float32, device=x.device)
    db = torch.zeros(lora_b.shape, dtype=torch.float32, device=x.device)
    for m0 in range(0, x.shape[0], 4096):
        xc, dyc = drop(x[m0:m0 + 4096], m0), dy[m0:m0 + 4096].float()
        da += scale * (dyc @ lora_b.float()).t() @ xc
        db += scale * dyc.t() @ (xc @ lora_a.float().t())
    ref["dA"], ref["dB"] = da, db
    return ref


def _checker(methods, inputs, rows):
    x, weight, lora_a, lora_b, scale, dy = inputs
    plain = _references(x, weight, lora_a, lora_b, scale, dy, rows)

    def errors(out, ref):
        errs = [rel_error(out[0][rows], ref["y"]), rel_error(out[1][rows], ref["dx"])]
        return max(errs + [rel_error(out[2], ref["dA"]), rel_error(out[3], ref["dB"])])

    def check(name: str, out) -> float:
        if name.startswith("base"):
            return max(rel_error(out[0][rows], plain["y_base"]), rel_error(out[1][rows], plain["dx_base"]))
        if not name.endswith("dropout"):
            return errors(out, plain)
        # a fresh mask per call: rerun once knowing the mask, and check against it exactly
        out, keep = methods[name].run_with_mask()
        if keep is None:
            raise RuntimeError("could not recover the dropout mask")
        return errors(out, _references(x, weight, lora_a, lora_b, scale, dy, rows, keep, DROPOUT_P))
    return check


def _memory(method: TrainMethod, device, out_bytes: int) -> Dict[str, float]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    state = method.forward()
    torch.cuda.synchronize(device)
    kept = torch.cuda.memory_allocated(device) - before - out_bytes
    grads = method.backward(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del state, grads
    return {"kept_mb": kept / 2 ** 20, "peak_mb": peak / 2 ** 20}


def run_case(layer, K, N, M, r, dtype, device, backends, rep_ms) -> Dict:
    rnd = seeded_randn(device, dtype, M * 7919 + K * 31 + N + r + 1)
    x = rnd(M, K).requires_grad_(True)
    weight = rnd(N, K, scale=K ** -0.5)
    lora_a = rnd(r, K, scale=K ** -0.5).requires_grad_(True)
    lora_b = rnd(N, r, scale=r ** -0.5).requires_grad_(True)
    dy = rnd(M, N)
    scale = 2.0
    rows = check_rows(M, device)
    case = {"layer": layer, "K": K, "N": N, "M": M, "r": r, "dtype": str(dtype).replace("torch.", "")}
    methods = training_methods(x, weight, lora_a, lora_b, scale, dy, backends)
    calls = {name: (lambda m=m: m.backward(m.forward())) for name, m in methods.items()}
    time_checked(case, calls, _checker(methods, (x, weight, lora_a, lora_b, scale, dy), rows), dtype,
                 device, rep_ms)
    if device.type == "cuda":
        out_bytes = ((M * N * x.element_size() + 511) // 512) * 512  # y, as the allocator rounds it
        case["memory"] = {name: _memory(m, device, out_bytes) for name, m in methods.items()
                          if name in case["times_us"]}
        case["t_mb"] = M * r * 4 / 2 ** 20
    return add_ratios(case, "base")


def summarize(cases: List[Dict], backends: List[str]) -> Dict:
    """Acceptance numbers: ours/base geomean at M >= 4096 (r = 16), worst ratio at M 128..1024,
    memory kept beyond the base's over M*r*4, and how often ours beats PEFT."""
    out = {}
    for b in backends:
        key = f"ours_{b}"
        timed = [c for c in cases if key in c["times_us"]]
        big = [c["ratios"][key] for c in timed if c["M"] >= 4096 and c["r"] == 16]
        mid = [c["ratios"][key] for c in timed if 128 <= c["M"] <= 1024 and c["r"] == 16]
        mem = [c["memory"][key]["kept_mb"] - c["memory"]["base"]["kept_mb"] - c["t_mb"]
               for c in timed if "memory" in c and key in c["memory"] and "base" in c["memory"]]
        out[key] = {
            "geomean_ratio_M>=4096_r16": geomean(big),
            "max_ratio_M128..1024_r16": max(mid) if mid else None,
            "max_kept_mb_beyond_base_plus_Mr4": max(mem) if mem else None,
            "cases_faster_than_peft": sum(c["times_us"][key] < c["times_us"]["peft"]
                                          for c in timed if "peft" in c["times_us"]),
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
    """Ratios to the two base GEMMs, then MB kept for the backward: ours minus base vs M*r*4."""
    from .summarize import ratio_table
    ours = sorted({m for c in result["cases"] for m in c["times_us"] if m.startswith("ours_")})
    lines = ratio_table(result, ("layer", "M", "r"), ["base_autograd", "peft", "peft_fp32"] + ours, width=20)
    for c in result["cases"]:
        mem = c.get("memory", {})
        kept = {m: mem[m]["kept_mb"] - mem["base"]["kept_mb"] for m in mem if m != "base" and "base" in mem}
        if kept:
            cells = " ".join(f"{m}={v:.2f}" for m, v in kept.items())
            lines.append(f"  kept MB beyond base, {c['layer']} M={c['M']} (M*r*4 = {c['t_mb']:.2f}): {cells}")
    return lines
