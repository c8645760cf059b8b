"""Suite `overhead`: host time per call at M = 1, where a decode step (hundreds of layers) is bound
by Python and launches, not by the GPU.

Each method runs `calls` times, in blocks of back-to-back calls taken in turns with the other
methods (``host_us_all``), and the median host time of a call is reported (the GPU work at M = 1 is
shorter than the launch overhead, so the host is the bottleneck). Methods:

* ``base``: ``F.linear(x, W)``; ``skilled``: ``F.linear(x, W).addmm_(x @ A^T, B^T, alpha=s)``;
* ``peft``: PEFT's LoRA layer (eval);
* ``reference_work`` (CPU only): ``reference.lora_linear_forward`` called directly -- the torch
  backend's arithmetic, so ``ours_torch - reference_work`` is our Python overhead;
* ``ours_<b>``: ``lora_linear`` under ``torch.no_grad`` (the eager fast path);
  ``ours_auto``: the same with ``backend="auto"`` (the layers' default: the backend cache's lookup);
  ``ours_<b>_op``: the same through the registered op (the dispatcher path torch.compile uses);
* ``base_train`` / ``peft_train`` / ``ours_<b>_train``: forward + backward (x requires grad,
  gradients by ``torch.autograd.grad``);
* multi-adapter serving ops on the same layer, L = 4 adapter slots of rank r, the token on slot 1
  (``MULTI_SLOTS``): ``ours_multi_<b>`` (``multi_lora_linear``), ``ours_se_<b>`` (``lora_shrink``
  into a buffer, then ``lora_expand_`` into a copy of the base output), and on the CPU
  ``multi_reference_work`` / ``se_reference_work``: the torch backend's arithmetic of each
  (``reference.multi_lora_linear``; ``reference.lora_shrink`` + ``reference.lora_expand_``).

Every method's output (y, or dx for the training ones) is checked against float64 before timing.

Issue 16's target, evaluated on CPU runs (bench/targets.py): ``ours_torch - reference_work`` and
``ours_auto - reference_work`` <= 15 us on the CPU machine.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import reference

from .common import CHECK_TOL, add_ratios, rel_error, seeded_randn
from .peers import _peft_layer

KEY_COLUMNS = ["layer", "K", "N", "M", "r"]
NOTE = ("Median host time per call (back-to-back calls, methods timed in turns) / that of "
        "`F.linear(x, W)`, M = 1. `ours_torch - reference_work` (CPU) is the Python overhead of "
        "lora_linear beyond the torch backend's arithmetic.")
CPU_LAYER = ("tiny", 64, 64)
GPU_LAYER = ("8B q/o", 4096, 4096)


def host_us(fn: Callable[[], object], device: torch.device, calls: int) -> float:
    """Median host time of one call over `calls` back-to-back calls (GPU work queues behind; the
    median ignores the rare call that waits on a full launch queue or a busy shared CPU)."""
    return host_us_all({"fn": fn}, device, calls)["fn"]


BLOCK = 20  # back-to-back calls of one method per turn: warm caches, yet many turns per method


def host_us_all(fns: Dict[str, Callable[[], object]], device: torch.device, calls: int,
                block: int = BLOCK) -> Dict[str, float]:
    """Median host µs of one call of each method, `calls` calls each, timed in turns: every round
    runs `block` back-to-back calls of each method in order, so a change of load on the shared
    machine falls on all methods alike. (Timed one method after another, each over its own ~0.1 s,
    ours_torch - reference_work of one build read 3.9-14.8 µs over five runs on the shared 2-core
    CPU machine; in turns 3.9-4.4 µs over five, measured 2026-12-07.) The GPU queue is drained
    between rounds, outside the timed calls."""
    for fn in fns.values():
        for _ in range(max(10, calls // 10)):
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    clock = time.perf_counter
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(max(1, -(-calls // block))):
        for name, fn in fns.items():
            out = samples[name]
            for _ in range(block):
                t0 = clock()
                fn()
                out.append(clock() - t0)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return {name: statistics.median(v) * 1e6 for name, v in samples.items()}


def overhead_methods(x, weight, lora_a, lora_b, scale, backends) -> Dict[str, Callable[[], object]]:
    xg = x.detach().clone().requires_grad_(True)
    ag, bg = (t.detach().clone().requires_grad_(True) for t in (lora_a, lora_b))
    dy = torch.ones(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    nograd = lambda fn: (lambda: _no_grad_call(fn))  # noqa: E731
    methods = {
        "base": nograd(lambda: F.linear(x, weight)),
        "skilled": nograd(lambda: F.linear(x, weight).addmm_(F.linear(x, lora_a), lora_b.t(), alpha=scale)),
    }
    try:
        peft = _peft_layer(weight, lora_a, lora_b, scale, adapters_fp32=False)
        methods["peft"] = nograd(lambda: peft(x))
    except ImportError:
        peft = None
    if x.device.type == "cpu":
        methods["reference_work"] = nograd(lambda: reference.lora_linear_forward(x, weight, lora_a, lora_b, scale))
    for b in backends:
        methods[f"ours_{b}"] = nograd(lambda b=b: lora_kernels.lora_linear(x, weight, lora_a, lora_b, scale, backend=b))
        methods[f"ours_{b}_op"] = nograd(lambda b=b: torch.ops.lora_kernels.lora_linear_fwd(
            x, weight, lora_a, lora_b, scale, None, b, False))
    methods["ours_auto"] = nograd(lambda: lora_kernels.lora_linear(x, weight, lora_a, lora_b, scale))
    methods["base_train"] = lambda: torch.autograd.grad(F.linear(xg, weight), [xg], dy)
    if peft is not None:
        pa, pb = peft.lora_A["default"].weight, peft.lora_B["default"].weight
        methods["peft_train"] = lambda: torch.autograd.grad(peft(xg), [xg, pa, pb], dy)
    for b in backends:
        methods[f"ours_{b}_train"] = (lambda b=b: torch.autograd.grad(
            lora_kernels.lora_linear(xg, weight, ag, bg, scale, backend=b), [xg, ag, bg], dy))
    return methods


MULTI_SLOTS = 4  # adapter slots of the multi-adapter methods (the token uses slot 1)


def multi_methods(x, weight, lora_a, lora_b, scale, backends) -> Dict[str, Callable[[], object]]:
    """The multi-adapter methods (module docstring); each returns y [1, N]."""
    from lora_kernels import AdapterIndex
    L, (r, K), N = MULTI_SLOTS, lora_a.shape, weight.shape[0]
    a_stack = torch.stack([lora_a.roll(s, 0) for s in range(L)])  # slot 1 holds a row-rolled A
    b_stack = torch.stack([lora_b.roll(s, 1) for s in range(L)])  # ... and the matching B
    scales = torch.full((L,), scale, dtype=torch.float32, device=x.device)
    index = AdapterIndex.from_token_adapters(torch.tensor([1], device=x.device), L)
    y0 = F.linear(x, weight)
    t_buf, y_buf = torch.empty(1, r, dtype=torch.float32, device=x.device), torch.empty_like(y0)
    nograd = lambda fn: (lambda: _no_grad_call(fn))  # noqa: E731
    methods = {}
    if x.device.type == "cpu":
        ids = index.token_adapter
        methods["multi_reference_work"] = nograd(lambda: reference.multi_lora_linear(
            x, weight, a_stack, b_stack, ids, scales))
        methods["se_reference_work"] = nograd(lambda: reference.lora_expand_(
            y_buf.copy_(y0), reference.lora_shrink(x, a_stack, ids, scales), b_stack, ids))
    for b in backends:
        methods[f"ours_multi_{b}"] = nograd(lambda b=b: lora_kernels.multi_lora_linear(
            x, weight, a_stack, b_stack, index, scales, backend=b))
        methods[f"ours_se_{b}"] = nograd(lambda b=b: lora_kernels.lora_expand_(
            y_buf.copy_(y0), lora_kernels.lora_shrink(x, a_stack, index, scales, out=t_buf, backend=b),
            b_stack, index, backend=b))
    return methods


def _multi_y64(x, weight, lora_a, lora_b, scale):
    """float64 y of the multi-adapter methods: slot 1's adapter (A rolled by 1 row, B by 1 column)."""
    x64, w64, a64, b64 = (t.detach().double() for t in (x, weight, lora_a.roll(1, 0), lora_b.roll(1, 1)))
    return x64 @ w64.t() + scale * (x64 @ a64.t()) @ b64.t()


def _checker(x, weight, lora_a, lora_b, scale):
    """check(name, output) -> relative error of y (or of dx for *_train) against float64."""
    x64, w64, a64, b64 = (t.detach().double() for t in (x, weight, lora_a, lora_b))
    dy64 = torch.ones(x.shape[0], weight.shape[0], dtype=torch.float64, device=x.device)
    y_base, dx_base = x64 @ w64.t(), dy64 @ w64
    y_ref, dx_ref = y_base + scale * (x64 @ a64.t()) @ b64.t(), dx_base + scale * (dy64 @ b64) @ a64

    y_multi = _multi_y64(x, weight, lora_a, lora_b, scale)

    def check(name: str, out) -> float:
        if name.startswith(("multi_", "se_", "ours_multi_", "ours_se_")):
            return rel_error(out, y_multi)
        base = name.startswith("base")
        if name.endswith("_train"):
            return rel_error(out[0], dx_base if base else dx_ref)
        if name == "reference_work" or name.endswith("_op"):
            out = out[0]
        return rel_error(out, y_base if base else y_ref)
    return check


def _no_grad_call(fn):
    with torch.no_grad():
        return fn()


class _NoLaunch:
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def triton_launcher_host_us(calls: int, K: int = 4096, N: int = 4096, r: int = 16, num_sms: int = 132) -> Dict:
    """Host µs per call of the Triton forward's launcher (lora_kernels.triton.lora_linear:
    lora_linear_fwd at M = 1, 16-bit x, planned for `num_sms` SMs) with its kernels stubbed out:
    our Python work per eager decode call (plan, workspaces, strides, arguments) without Triton's
    own launch cost (its argument binding and the driver call), which needs a GPU. Not checked
    against a reference (nothing runs): reported in the summary, not as a method."""
    from lora_kernels.triton import lora_linear as ll
    names = ("lora_linear_fwd_kernel", "lora_shrink_kernel", "splitk_reduce_kernel")
    saved = {n: getattr(ll, n) for n in names}
    saved_sms = ll._num_sms
    x, w = torch.zeros(1, K, dtype=torch.bfloat16), torch.zeros(N, K, dtype=torch.bfloat16)
    a, b = torch.zeros(r, K, dtype=torch.bfloat16), torch.zeros(N, r, dtype=torch.bfloat16)
    try:
        for n in names:
            setattr(ll, n, _NoLaunch())
        ll._num_sms = lambda device: num_sms
        plan = ll.plan_forward(1, N, K, r, 2, num_sms)
        us = host_us(lambda: ll.lora_linear_fwd(x, w, a, b, 2.0, None, False), torch.device("cpu"), calls)
    finally:
        for n, k in saved.items():
            setattr(ll, n, k)
        ll._num_sms = saved_sms
    launches = 1 + (plan.shrink is not None) + plan.t_reduce + (plan.fused_grid[1] > 1)
    return {"us": us, "launches": launches, "shape": f"M=1 K={K} N={N} r={r} on {num_sms} SMs"}


def run(args, device, dtype, backends, rep_ms, log) -> Dict:
    name, K, N = GPU_LAYER if device.type == "cuda" else CPU_LAYER
    if args.layers:
        from . import suites
        (name, K, N), = [l for l in suites.LAYERS + suites.QUICK_CPU_LAYERS if l[0] == args.layers[0]]
    calls = 200 if args.quick else 2000
    if device.type == "cpu":  # the Triton interpreter's time says nothing about launch overhead
        backends = [b for b in backends if b != "triton"] or ["torch"]
    cases: List[Dict] = []
    for r in (args.ranks or [16]):
        rnd = seeded_randn(device, dtype, K + N + r)
        x, weight = rnd(1, K), rnd(N, K, scale=K ** -0.5)
        lora_a, lora_b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
        case = {"layer": name, "K": K, "N": N, "M": 1, "r": r, "dtype": str(dtype).replace("torch.", ""),
                "times_us": {}, "errors": {}, "failed": []}
        check = _checker(x, weight, lora_a, lora_b, 2.0)
        checked = {}
        methods = {**overhead_methods(x, weight, lora_a, lora_b, 2.0, backends),
                   **multi_methods(x, weight, lora_a, lora_b, 2.0, backends)}
        for method, fn in methods.items():
            try:
                err = check(method, fn())
                case["errors"][method] = err
                if not err <= CHECK_TOL[dtype]:
                    case["failed"].append(f"{method}: relative error {err:.2e}")
                    continue
                checked[method] = fn
            except Exception as e:  # a peer that cannot run here is reported, not fatal
                case["failed"].append(f"{method}: {type(e).__name__}: {e}")
        case["times_us"] = host_us_all(checked, device, calls)
        cases.append(add_ratios(case, "base"))
        log(case)
    t = cases[0]["times_us"]
    summary = {f"ours_{b}_minus_{ref}_us": t[f"ours_{b}"] - t[ref] for b in (*backends, "auto")
               for ref in ("base", "reference_work") if f"ours_{b}" in t and ref in t}
    summary.update({f"ours_{b}_train_minus_base_train_us": t[f"ours_{b}_train"] - t["base_train"]
                    for b in backends if f"ours_{b}_train" in t and "base_train" in t})
    summary.update({f"ours_{m}_{b}_minus_{m}_reference_work_us": t[f"ours_{m}_{b}"] - t[f"{m}_reference_work"]
                    for m in ("multi", "se") for b in backends
                    if f"ours_{m}_{b}" in t and f"{m}_reference_work" in t})
    if device.type == "cpu":
        summary["triton_launcher_host_no_launch"] = triton_launcher_host_us(calls)
    return {"cases": cases, "summary": summary, "backends": backends}


def brief(result: Dict) -> List[str]:
    """Host µs per call of every method (the ratios are to F.linear's)."""
    lines = []
    for c in result["cases"]:
        lines.append(f"  {c['layer']} M=1 r={c['r']}: " + " ".join(f"{m}={t:.1f}us" for m, t in c["times_us"].items()))
    return lines
