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
  (``MULTI_SLOTS``): ``ours_multi_<b>`` (``multi_lora_linear``), ``ours_shrink_<b>`` (``lora_shrink``
  into a buffer), ``ours_expand_<b>`` (``lora_expand_`` of a given t into a copy of the base
  output), each call timed on its own, and on the CPU ``multi_reference_work`` /
  ``shrink_reference_work`` / ``expand_reference_work``: the torch backend's arithmetic of each
  (``reference.multi_lora_linear``, ``reference.lora_shrink``, ``reference.lora_expand_``; the
  copy of the base output is in both expand methods).

Every method's output (y, or dx for the training ones) is checked against float64 before timing.

On CPU runs a second case times the Triton backend's own Python at M = 1 on the 8B q/o layer
(bf16, r = 16, planned for 132 SMs) with every @triton.jit kernel's launch replaced by a no-op
stub (``triton_host_us``, ``TRITON_HOST_NOTE`` lists the stubbed kernels): the host work a GPU
user pays per eager call on top of Triton's own launch cost and the driver's, which it excludes
(they need a GPU). Beside each method it times that method's floor (``recorded_floor``): the
same allocations and the same kernel launches with the same arguments, recorded from one call of
the method and replayed with nothing decided -- the work any launcher of those kernels must do, as
``reference_work`` is for the torch backend. Its own table follows the cases' (``table``); summary
keys ``triton_host_<method>_us``, ``..._floor_us`` and ``..._minus_floor_us``.

Issue 16's target (point 6: host overhead per eager call at M = 1 <= 15 us on the CPU machine),
evaluated on CPU runs (bench/targets.py): ``ours_torch - reference_work`` and ``ours_auto -
reference_work`` for lora_linear, and the same for each multi-adapter call; for the stubbed Triton
case, each method minus its floor. The absolute times stay in the table.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

import lora_kernels
from lora_kernels import reference

from .common import CHECK_TOL, add_ratios, markdown, rel_error, seeded_randn
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
    L, r = MULTI_SLOTS, lora_a.shape[0]
    a_stack = torch.stack([lora_a.roll(s, 0) for s in range(L)])  # slot 1 holds a row-rolled A
    b_stack = torch.stack([lora_b.roll(s, 1) for s in range(L)])  # ... and the matching B
    scales = torch.full((L,), scale, dtype=torch.float32, device=x.device)
    index = AdapterIndex.from_token_adapters(torch.tensor([1], device=x.device), L)
    y0 = F.linear(x, weight)
    t_buf, y_buf = torch.empty(1, r, dtype=torch.float32, device=x.device), torch.empty_like(y0)
    nograd = lambda fn: (lambda: _no_grad_call(fn))  # noqa: E731
    methods = {}
    t_in = lora_kernels.lora_shrink(x, a_stack, index, scales, backend="torch")  # the expands' given t
    if x.device.type == "cpu":
        ids = index.token_adapter
        methods["multi_reference_work"] = nograd(lambda: reference.multi_lora_linear(
            x, weight, a_stack, b_stack, ids, scales))
        methods["shrink_reference_work"] = nograd(lambda: reference.lora_shrink(x, a_stack, ids, scales))
        methods["expand_reference_work"] = nograd(lambda: reference.lora_expand_(
            y_buf.copy_(y0), t_in, b_stack, ids))
    for b in backends:
        methods[f"ours_multi_{b}"] = nograd(lambda b=b: lora_kernels.multi_lora_linear(
            x, weight, a_stack, b_stack, index, scales, backend=b))
        methods[f"ours_shrink_{b}"] = nograd(lambda b=b: lora_kernels.lora_shrink(
            x, a_stack, index, scales, out=t_buf, backend=b))
        methods[f"ours_expand_{b}"] = nograd(lambda b=b: lora_kernels.lora_expand_(
            y_buf.copy_(y0), t_in, b_stack, index, backend=b))
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
    t_multi = scale * x64 @ lora_a.detach().double().roll(1, 0).t()  # slot 1's t (scale folded in)

    def check(name: str, out) -> float:
        if name.startswith(("shrink_", "ours_shrink_")):
            return rel_error(out, t_multi)
        if name.startswith(("multi_", "expand_", "ours_multi_", "ours_expand_")):
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
    """Stands in for a @triton.jit kernel: kernel[grid](*args, **kw) does nothing (the arguments
    are still built and passed: only Triton's own binding and the driver launch are skipped);
    while ``_RECORDED`` is a list, each launch's (grid, args, kw) is appended to it."""

    def __getitem__(self, grid):
        return _no_launch if _RECORDED is None else (lambda *args, **kw: _RECORDED.append((grid, args, kw)))


def _no_launch(*args, **kwargs):
    return None


_RECORDED = None  # the launches of recorded_floor's recording call


def recorded_floor(fn: Callable[[], object]):
    """(floor, launches, allocations) of one call of `fn` with the kernels stubbed: floor() makes
    the same torch.empty / torch.zeros allocations and the same stubbed launches, with the
    arguments recorded from that call (nothing decided, nothing read off a tensor). Time beyond
    the floor is what the launcher decides and checks: its overhead. Anything else the call runs
    (a view, a cast, a torch op) is not in the floor, so it counts as overhead."""
    global _RECORDED
    allocs, launches = [], []
    real = {"empty": torch.empty, "zeros": torch.zeros}

    def recording(make):
        def alloc(*args, **kw):
            allocs.append((make, args, kw))
            return make(*args, **kw)
        return alloc
    _RECORDED = launches
    try:
        for name, make in real.items():
            setattr(torch, name, recording(make))
        fn()
    finally:
        _RECORDED = None
        for name, make in real.items():
            setattr(torch, name, make)
    stub = _NoLaunch()

    def floor():
        for make, args, kw in allocs:
            make(*args, **kw)
        for grid, args, kw in launches:
            stub[grid](*args, **kw)
    return floor, len(launches), len(allocs)


# (module, kernel names) the stubbed Triton host case replaces by _NoLaunch: every @triton.jit
# kernel the forward, backward and multi-adapter launchers call.
STUBBED_KERNELS = (
    ("lora_kernels.triton.lora_linear", ("lora_linear_fwd_kernel", "lora_shrink_kernel", "splitk_reduce_kernel",
                                         "split_halves_kernel")),
    ("lora_kernels.triton.lora_linear_backward", ("lora_weight_grads_kernel",)),
    ("lora_kernels.triton.multi_lora", ("lora_shrink_kernel", "lora_expand_kernel", "multi_lora_linear_kernel",
                                        "multi_lora_linear_chunked_kernel")),
)
# the modules that read the SM count (each imported _num_sms by name)
_SMS_MODULES = ("lora_kernels.triton.lora_linear", "lora_kernels.triton.lora_linear_backward",
                "lora_kernels.triton.multi_lora")

TRITON_HOST_LAYER = ("8B q/o", 4096, 4096)
TRITON_HOST_NOTE = (
    "Host µs per call of the Triton backend's Python at M = 1 (bf16, K = N = 4096, r = 16, planned for "
    "132 SMs), measured on the CPU with every @triton.jit kernel's launch replaced by a no-op stub "
    "(`kernel[grid](*args, **kw)` builds and passes the arguments, then returns): it EXCLUDES Triton's "
    "own launch cost (argument binding, the driver's cuLaunchKernel), which needs a GPU. Stubbed: "
    + "; ".join(f"{m.rsplit('.', 1)[1]}: {', '.join(n)}" for m, n in STUBBED_KERNELS)
    + ". Nothing is computed, so nothing is checked. Timed in turns under one torch.no_grad (as a "
    "decode step runs), no grad-mode switch per call. Methods: `alloc_ref` = one torch.empty of y "
    "[1, N] (a yardstick of the machine's load: the launcher allocates y and one fp32 workspace); "
    "`fwd_launcher` = "
    "triton.lora_linear.lora_linear_fwd (plan, workspaces, arguments; at decode 2 launches: shrink, fused); "
    "`eager_fwd` = lora_kernels.lora_linear(..., backend='triton') under no_grad (validation, backend "
    "cache, the launcher); `bwd_launcher` = triton.lora_linear_backward.lora_linear_bwd (dx, dA, dB); "
    "`multi_eager` = multi_lora_linear(..., backend='triton'), `shrink_eager` = lora_shrink and `expand_eager` "
    "= lora_expand_ (backend='triton', L = 4 slots, each call on its own, the base output not copied). "
    "`<method> floor` = `recorded_floor`: that method's allocations and stubbed launches, with the "
    "arguments recorded from one of its calls, replayed with nothing decided; `<method> - floor` = "
    "the launch path's own decisions and checks (issue 16's target); `work` = launches / allocations "
    "of one call.")


def triton_host_us(calls: int, K: int = 4096, N: int = 4096, r: int = 16, num_sms: int = 132) -> Dict[str, float]:
    """Median host µs per call of each method of TRITON_HOST_NOTE, timed in turns (host_us_all)
    with the kernels stubbed out and `num_sms` SMs; everything is restored afterwards (kernels,
    SM counts, the backend caches, whose entries made here would claim Triton runs CPU tensors,
    and the launch cache, whose plans are for `num_sms`)."""
    import importlib
    from lora_kernels import AdapterIndex, backends as bk
    # the modules (lora_kernels.ops exports functions of the same names)
    op_ll, op_multi = (importlib.import_module(f"lora_kernels.ops.{m}") for m in ("lora_linear", "multi_lora"))
    ll, llb = (importlib.import_module(f"lora_kernels.triton.{m}") for m in ("lora_linear", "lora_linear_backward"))
    mods = {m: importlib.import_module(m) for m in {*_SMS_MODULES, *(m for m, _ in STUBBED_KERNELS)}}
    saved_kernels = [(mods[m], n, getattr(mods[m], n)) for m, names in STUBBED_KERNELS for n in names]
    saved_sms = [(mods[m], mods[m]._num_sms) for m in _SMS_MODULES]
    saved_reason = (bk.triton_unavailable_reason, bk.interpreter_dtype_reason)
    saved_caches = [(c, dict(c)) for c in (op_ll._BACKEND_CACHE, op_multi._BACKEND_CACHE)]
    bf = torch.bfloat16
    rnd = seeded_randn(torch.device("cpu"), bf, K + N + r)
    x, w = rnd(1, K), rnd(N, K, scale=K ** -0.5)
    a, b = rnd(r, K, scale=K ** -0.5), rnd(N, r, scale=r ** -0.5)
    dy, t = rnd(1, N), torch.zeros(1, r)
    L = MULTI_SLOTS
    a_stack, b_stack = torch.stack([a] * L), torch.stack([b] * L)
    scales = torch.full((L,), 2.0)
    index = AdapterIndex.from_token_adapters(torch.tensor([1]), L)
    t_buf, y_buf, t_in = torch.empty(1, r), torch.empty(1, N, dtype=bf), torch.randn(1, r)
    methods = {
        "alloc_ref": lambda: torch.empty((1, N), dtype=bf),
        "fwd_launcher": lambda: ll.lora_linear_fwd(x, w, a, b, 2.0, None, False, want_t=False),
        "eager_fwd": lambda: lora_kernels.lora_linear(x, w, a, b, 2.0, backend="triton"),
        "bwd_launcher": lambda: llb.lora_linear_bwd(dy, x, w, a, b, t, 2.0, 0.0, None, None, True, True, True),
        "multi_eager": lambda: lora_kernels.multi_lora_linear(x, w, a_stack, b_stack, index, scales, backend="triton"),
        "shrink_eager": lambda: lora_kernels.lora_shrink(x, a_stack, index, scales, out=t_buf, backend="triton"),
        "expand_eager": lambda: lora_kernels.lora_expand_(y_buf, t_in, b_stack, index, backend="triton"),
    }
    work = {}
    try:
        for mod, n, _ in saved_kernels:
            setattr(mod, n, _NoLaunch())
        for mod, _ in saved_sms:
            mod._num_sms = lambda device: num_sms
        bk.triton_unavailable_reason = lambda device: None  # as on a GPU: Triton runs these tensors
        bk.interpreter_dtype_reason = lambda dtype: None
        for cache, _ in saved_caches:
            cache.clear()
        ll.clear_launch_cache()
        with torch.no_grad():
            for m in [m for m in methods if m != "alloc_ref"]:
                floor, launches, allocs = recorded_floor(methods[m])
                methods[f"{m}_floor"], work[m] = floor, f"{launches} / {allocs}"
            times = host_us_all(methods, torch.device("cpu"), calls)
        return {"times_us": times, "work": work}
    finally:
        for mod, n, k in saved_kernels:
            setattr(mod, n, k)
        for mod, f in saved_sms:
            mod._num_sms = f
        bk.triton_unavailable_reason, bk.interpreter_dtype_reason = saved_reason
        for cache, old in saved_caches:
            cache.clear()
            cache.update(old)
        ll.clear_launch_cache()


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
                    for m in ("multi", "shrink", "expand") for b in backends
                    if f"ours_{m}_{b}" in t and f"{m}_reference_work" in t})
    result = {"cases": cases, "summary": summary, "backends": backends}
    if device.type == "cpu":
        host = result["triton_host"] = triton_host_us(calls)
        times = host["times_us"]
        summary.update({f"triton_host_{m}_us": us for m, us in times.items()})
        summary.update({f"triton_host_{m}_minus_floor_us": times[m] - times[f"{m}_floor"] for m in host["work"]})
    return result


def table(result: Dict) -> str:
    """The cases' table (common.markdown), then the stubbed Triton host case's (CPU runs)."""
    text = markdown(result, KEY_COLUMNS, NOTE)
    host = result.get("triton_host")
    if host:
        name, K, N = TRITON_HOST_LAYER
        times = host["times_us"]
        text += "\n## Triton backend's host work, kernels stubbed (CPU)\n\n" + TRITON_HOST_NOTE + "\n\n"
        text += (f"{name} layer (K = {K}, N = {N}), M = 1, r = 16; `alloc_ref` {times['alloc_ref']:.1f} µs.\n\n"
                 "| method | µs | floor µs | µs - floor | work (launches / allocations) |\n|---|---|---|---|---|\n")
        for m, w in host["work"].items():
            text += f"| {m} | {times[m]:.1f} | {times[m + '_floor']:.1f} | {times[m] - times[m + '_floor']:.1f} | {w} |\n"
    return text


def brief(result: Dict) -> List[str]:
    """Host µs per call of every method (the ratios are to F.linear's)."""
    lines = []
    for c in result["cases"]:
        lines.append(f"  {c['layer']} M=1 r={c['r']}: " + " ".join(f"{m}={t:.1f}us" for m, t in c["times_us"].items()))
    return lines
