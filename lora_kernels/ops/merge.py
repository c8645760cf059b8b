"""In-place merge / unmerge: ``weight += scale * lora_b @ lora_a`` and its inverse.

Layers: kernel + launchers (``lora_kernels/triton/merge.py``; the CUDA C++ kernel
``csrc/merge/merge.cuh`` with its launchers in ``lora_kernels/cuda/merge.py``) -> the registered ops
``torch.ops.lora_kernels.{merge_, unmerge_, merge_exact_, unmerge_exact_}`` (here, with fake
impls) -> the public ``merge_`` / ``unmerge_`` (validation, safe merge, exact unmerge) ->
``FusedLoRALinear.merge()/unmerge()``.

Every backend implements one contract -- ``apply_``, ``count_nonfinite_``, ``merge_exact_``,
``unmerge_exact_`` with the arguments of ``lora_kernels.reference`` -- so the op layer, the safe
merge and the exact unmerge are written once.

Safe merge (``safe_merge=True``, PEFT's name)
---------------------------------------------
Two passes and no copy of W: a count pass reads W, forms W + ΔW tile by tile and counts the
elements that would round to inf or NaN into a device counter; the writing pass is the ordinary
merge with every load and store masked off when that counter is non-zero. Cost: 2 reads + 1 write
of W (vs 1 + 1 for a plain merge), ΔW formed twice, and one host sync to read the counter and
raise. W is left bit-for-bit unchanged when anything is non-finite.

Exact unmerge (``residual=MergeResidual()``)
--------------------------------------------
A plain unmerge computes ``round(W1 - ΔW)``, which is not W0: the merge rounded ``W0 + ΔW`` to
W1, and that rounding lost W0's bits below ulp(W1). Repeated cycles drift. The exact mode stores
what the rounding lost, as one int8 code per element:

* key(x) numbers the values of the weight's dtype in order: the sign-magnitude bit pattern made
  monotone, +0 -> 0, -0 -> -1, neighbouring values -> neighbouring integers. It is a bijection
  between bit patterns and integers.
* merge: W1 = round(W0 + ΔW) (bit-identical to a plain merge), U = round(W1 - ΔW) -- exactly what
  the unmerge will compute -- and code = key(W0) - key(U) when it lies in [-124, 127].
* unmerge: U = round(W1 - ΔW), W0 = key⁻¹(key(U) + code).

Proof of exactness: the unmerge recomputes U bit for bit (same W1, same adapters, same backend and
tile config, so the same fp32 ΔW; the Triton kernels launch with FMA contraction off, and the CUDA
kernel is one binary for both modes whose fp32 steps outside the MMAs are round-to-nearest
intrinsics that are never contracted, so that no compilation rounds ``W1 - ΔW`` differently), and
key is a bijection, so key⁻¹(key(U) + code) =
key⁻¹(key(W0)) = W0, including the sign of zero and NaN payloads. It holds after any number of
cycles because each cycle restores W0 itself: nothing accumulates.

When the code fits: U differs from W0 by at most ulp(W1)/2 + ulp(U)/2 (two roundings). If
|W1| <= 64·|W0| then ulp(W1) <= 64·ulp(W0), so U lies within 33 ulp(W0) of W0: at most 66
representable steps even where U crosses into the binade below (half-size steps). So the code
fits whenever |W0 + ΔW| <= 64·|W0|, in bf16, fp16 and fp32 alike (tested), and often well beyond.
The rest are covered by:

* two codes for W0 = +0 and -0 (pruned weights are common and never fit: any ΔW dwarfs them);
* an escape table of (logical index n·K + k, exact W0) entries for every other element (|ΔW|
  hundreds of times |W0|, or W0 + ΔW overflowing or non-finite).

No scheme can do without the table and stay at one byte: for a fixed ΔW = δ, the thousands of
bf16 values W0 with |W0| < ulp(δ)/4 all merge to the same correctly rounded W1 = round(δ), and
256 codes cannot tell them apart.

Memory: 1 byte per weight element for the codes, plus 10 bytes (16-bit weights; 12 for fp32)
per escaped element. The fraction that escapes grows with ρ = rms(ΔW) / rms(W0): measured with
the reference on a 1024 x 1024 W0 ~ N(0, 0.02), r = 16, it is ~1.3e-3 · ρ in bf16 and fp32
(1.2e-5 at ρ = 0.01, 1.3e-4 at ρ = 0.1, 1.4e-3 at ρ = 1) and far less in fp16 (none up to
ρ = 0.1: its subnormals are evenly spaced). The table starts with max(1024, numel / 2048)
entries (0.005 bytes per element; enough up to ρ ~ 0.35) and grows on demand: if a merge finds
more escapes than it holds, the overflowing elements are left unmerged (code PENDING), the merge
is undone exactly and rerun with a table of the right size. A MergeResidual keeps its buffers
from one cycle to the next, so a typical residual is 1.005 bytes per weight element.

Cost: the merge writes the codes too (bf16: 2 + 2 + 1 bytes per element, 1.25x the bandwidth
floor) and reads the escape count on the host (one sync; not capturable in a CUDA graph); the
unmerge reads the codes (1.25x) and scatters the escapes.

Limits: the unmerge is exact only if W1 and the adapters are unchanged since the merge, and it
runs on the backend and device of the merge. The residual records the weight's and adapters'
data pointers and version counters, the scales, the layout and the backend; ``unmerge_`` raises
(leaving W unchanged) when any differs. Writes through ``.data`` bypass version counters and are
not detected. float64 weights are not supported (torch's fp64 merge is already exact enough).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backends, reference
from .._validation import (check_adapter_dtype, check_allocatable, check_count, check_no_overlap,
                           check_same_device, check_scale, check_shape, check_tensor, fail)

TensorOrList = Union[Tensor, Sequence[Tensor]]
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CUDA_DTYPES = TRITON_DTYPES  # lora_kernels.cuda.merge.DTYPES (not imported here: import stays light)
# backend="auto" on CUDA tensors: Triton first, then CUDA C++. Both kernels are one streaming pass
# over W with delta on tensor cores; which is faster per shape is to be measured (bench/merge.py
# times both) -- until then the order is the one the merge shipped with.
PREFER = ("triton", "cuda")


# ---------------------------------------------------------------------------------------------
# Validation and backend choice
# ---------------------------------------------------------------------------------------------

def _as_lists(op, lora_a, lora_b, scale) -> Tuple[List[Tensor], List[Tensor], List[float]]:
    if isinstance(lora_a, Tensor) or isinstance(lora_b, Tensor):
        if not (isinstance(lora_a, Tensor) and isinstance(lora_b, Tensor)):
            fail(op, "lora_a and lora_b must both be tensors or both be lists", TypeError)
        return [lora_a], [lora_b], [check_scale(op, "scale", scale)]
    a_list, b_list = list(lora_a), list(lora_b)
    s_list = list(scale) if isinstance(scale, (list, tuple)) else None
    if s_list is None:
        fail(op, "scale must be a list of floats when lora_a and lora_b are lists", TypeError)
    if not (len(a_list) == len(b_list) == len(s_list)) or not a_list:
        fail(op, f"lora_a, lora_b and scale must be non-empty lists of one length, got "
                 f"{len(a_list)}, {len(b_list)} and {len(s_list)}")
    return a_list, b_list, [check_scale(op, f"scale[{i}]", s) for i, s in enumerate(s_list)]


def _validate(op, weight, lora_a, lora_b, scale, fan_in_fan_out):
    check_tensor(op, "weight", weight, ndim=2)
    a_list, b_list, s_list = _as_lists(op, lora_a, lora_b, scale)
    N, K = weight.shape[::-1] if fan_in_fan_out else weight.shape
    layout = "[K, N] (fan_in_fan_out)" if fan_in_fan_out else "[N, K]"
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        sfx = f"[{i}]" if len(a_list) > 1 else ""
        check_tensor(op, "lora_a" + sfx, a, ndim=2)
        check_tensor(op, "lora_b" + sfx, b, ndim=2)
        r = a.shape[0]
        if r < 1:
            fail(op, f"lora_a{sfx} must have at least one row (rank r >= 1), got shape {list(a.shape)}")
        check_shape(op, "lora_a" + sfx, a, (r, K), f"rank r, K from weight {layout}")
        check_shape(op, "lora_b" + sfx, b, (N, r), f"N from weight {layout}, r = lora_a{sfx}.shape[0]")
        check_adapter_dtype(op, "lora_a" + sfx, a, weight.dtype, "weight")
        if b.dtype != a.dtype:
            fail(op, f"lora_b{sfx} must have lora_a{sfx}'s dtype ({a.dtype}), got {b.dtype}", TypeError)
        check_same_device(op, weight=weight, **{"lora_a" + sfx: a, "lora_b" + sfx: b})
    # In place: each element must have its own memory, and no adapter may be read while W is written.
    if len(a_list) == 1:
        check_no_overlap(op, "weight", weight, lora_a=a_list[0], lora_b=b_list[0])
    else:
        check_no_overlap(op, "weight", weight, lora_a=a_list, lora_b=b_list)
    return a_list, b_list, s_list


def _input_reason(weight: Tensor):
    def reason(backend: str) -> Optional[str]:
        if backend == "triton" and weight.dtype not in TRITON_DTYPES:
            return f"triton: dtype {weight.dtype} is not supported (float16, bfloat16, float32)"
        if backend == "cuda" and weight.dtype not in CUDA_DTYPES:
            return (f"cuda: dtype {str(weight.dtype).replace('torch.', '')} is not supported by the CUDA merge "
                    f"kernel (float16, bfloat16, float32)")
        return None
    return reason


def choose_backend(op: str, weight: Tensor, backend: str = "auto") -> str:
    """The backend that runs a merge of `weight` (see backends.py for the rule)."""
    return backends.resolve(op, backend, weight.device, PREFER, _input_reason(weight))


# ---------------------------------------------------------------------------------------------
# Backends: one contract (reference.py's argument names), lists for torch, one packed pair else
# ---------------------------------------------------------------------------------------------

def pack_adapters(a_list: List[Tensor], b_list: List[Tensor], s_list: List[float]):
    """(lora_a, lora_b, scale) for the compiled kernels, which take one adapter: itself, or for
    several, A = cat(A_i) [sum r_i, K] and B = cat(s_i * B_i) [N, sum r_i] in fp32 and scale 1
    (the scales folded into B in fp32: one extra fp32 rounding of s_i * B_i, far below the
    weight's own rounding). The pack is deterministic, as the exact unmerge needs."""
    if len(a_list) == 1:
        return a_list[0], b_list[0], s_list[0]
    a = torch.cat([a.float() for a in a_list], dim=0)
    b = torch.cat([s * b.float() for b, s in zip(b_list, s_list)], dim=1)
    return a, b, 1.0


def _compiled_backend(backend: str):
    if backend in ("triton", "cuda"):
        return backends.launcher(f"{backend}.merge")
    raise AssertionError(f"no compiled merge backend {backend!r}")  # resolve() never returns it


def _run(fn: str, backend: str, weight, lora_a, lora_b, scales, **kwargs) -> None:
    if backend == "torch":
        getattr(reference, fn)(weight, lora_a, lora_b, scales, **kwargs)
    else:
        getattr(_compiled_backend(backend), fn)(weight, *pack_adapters(lora_a, lora_b, scales), **kwargs)


# ---------------------------------------------------------------------------------------------
# The registered ops (validated inputs, a concrete backend)
# ---------------------------------------------------------------------------------------------

def _apply(subtract, weight, lora_a, lora_b, scales, fan_in_fan_out, backend, status):
    kw = dict(subtract=subtract, fan_in_fan_out=fan_in_fan_out)
    if status is not None:
        _run("count_nonfinite_", backend, weight, lora_a, lora_b, scales, status=status, **kw)
    _run("apply_", backend, weight, lora_a, lora_b, scales, status=status, gated=status is not None, **kw)


@torch.library.custom_op("lora_kernels::merge_", mutates_args=("weight", "status"))
def merge_op(weight: Tensor, lora_a: List[Tensor], lora_b: List[Tensor], scales: List[float],
             fan_in_fan_out: bool, backend: str, status: Optional[Tensor]) -> None:
    """weight += sum_i scales[i] * lora_b[i] @ lora_a[i] (``.T`` of it if fan_in_fan_out).

    status: None, or int32 [2] zeros for a safe merge: status[1] receives the number of
    non-finite results, and weight is left unchanged if it is not 0."""
    _apply(False, weight, lora_a, lora_b, scales, fan_in_fan_out, backend, status)


@torch.library.custom_op("lora_kernels::unmerge_", mutates_args=("weight", "status"))
def unmerge_op(weight: Tensor, lora_a: List[Tensor], lora_b: List[Tensor], scales: List[float],
               fan_in_fan_out: bool, backend: str, status: Optional[Tensor]) -> None:
    """weight -= sum_i scales[i] * lora_b[i] @ lora_a[i]; status as for merge_."""
    _apply(True, weight, lora_a, lora_b, scales, fan_in_fan_out, backend, status)


@torch.library.custom_op("lora_kernels::merge_exact_",
                         mutates_args=("weight", "codes", "escape_index", "escape_value", "status"))
def merge_exact_op(weight: Tensor, lora_a: List[Tensor], lora_b: List[Tensor], scales: List[float],
                   fan_in_fan_out: bool, backend: str, codes: Tensor, escape_index: Tensor,
                   escape_value: Tensor, status: Tensor, safe: bool) -> None:
    """The merge_ op, also writing the exact-unmerge codes (int8, weight's shape) and escape
    table (int64 [C], weight.dtype [C]); status int32 [2]: status[0] += escapes, status[1] =
    non-finite count when safe (then nothing is written if it is not 0)."""
    kw = dict(fan_in_fan_out=fan_in_fan_out)
    if safe:
        _run("count_nonfinite_", backend, weight, lora_a, lora_b, scales, status=status, **kw)
    _run("merge_exact_", backend, weight, lora_a, lora_b, scales, codes=codes, escape_index=escape_index,
         escape_value=escape_value, status=status, gated=safe, **kw)


@torch.library.custom_op("lora_kernels::unmerge_exact_", mutates_args=("weight",))
def unmerge_exact_op(weight: Tensor, lora_a: List[Tensor], lora_b: List[Tensor], scales: List[float],
                     fan_in_fan_out: bool, backend: str, codes: Tensor, escape_index: Tensor,
                     escape_value: Tensor, num_escapes: int) -> None:
    """Restores W0 from the merge_exact_ op's codes and the escape table's first num_escapes entries."""
    _run("unmerge_exact_", backend, weight, lora_a, lora_b, scales, fan_in_fan_out=fan_in_fan_out,
         codes=codes, escape_index=escape_index, escape_value=escape_value, num_escapes=num_escapes)


for _op in (merge_op, unmerge_op, merge_exact_op, unmerge_exact_op):
    _op.register_fake(lambda *args, **kwargs: None)


# ---------------------------------------------------------------------------------------------
# Exact-unmerge state
# ---------------------------------------------------------------------------------------------

def _version(t: Tensor) -> Optional[int]:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _fingerprint(weight, a_list, b_list, s_list, fan_in_fan_out, backend):
    def tensor_id(t):
        return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device)
    return {
        "weight": tensor_id(weight),
        "adapters": [(tensor_id(a), _version(a), tensor_id(b), _version(b)) for a, b in zip(a_list, b_list)],
        "scales": list(s_list),
        "fan_in_fan_out": fan_in_fan_out,
        "backend": backend,
    }


class MergeResidual:
    """What ``unmerge_`` needs to restore a merged weight bit for bit (see this module's
    docstring for the design, its proof, memory and limits)::

        res = lora_kernels.MergeResidual()
        lora_kernels.merge_(w, a, b, s, residual=res)     # w = round(w0 + s*b@a), res records
        lora_kernels.unmerge_(w, a, b, s, residual=res)   # w == w0, bit for bit
        # ... res can serve the next merge of the same weight; its buffers are reused

    Attributes: ``codes`` int8 (weight's shape), ``escape_index`` int64 [C] and
    ``escape_value`` [C] (the escape table), ``num_escapes``, ``holds_merge``, ``nbytes``.
    ``escape_capacity`` sets the table's initial size (default max(1024, numel / 2048)).
    """

    def __init__(self, escape_capacity: Optional[int] = None):
        if escape_capacity is not None:
            check_count("MergeResidual", "escape_capacity", escape_capacity, 0)
            check_allocatable("MergeResidual", "escape_capacity", escape_capacity, (escape_capacity,), torch.int64,
                              "the escape table's int64 index [escape_capacity]")
        self.escape_capacity = escape_capacity
        self.codes: Optional[Tensor] = None
        self.escape_index: Optional[Tensor] = None
        self.escape_value: Optional[Tensor] = None
        self.num_escapes = 0
        self._merge: Optional[dict] = None
        self._weight_version: Optional[int] = None

    @property
    def holds_merge(self) -> bool:
        """True between a merge_ that filled this residual and the unmerge_ that used it."""
        return self._merge is not None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.escape_index, self.escape_value)
                   if t is not None)

    def _prepare(self, weight: Tensor) -> None:
        """Buffers for a merge of `weight`, reused when they fit."""
        if self.codes is None or self.codes.shape != weight.shape or self.codes.device != weight.device:
            # empty_like keeps a dense weight's strides, so codes are walked in W's memory order
            self.codes = torch.empty_like(weight, dtype=torch.int8)
        capacity = self.escape_capacity if self.escape_capacity is not None else max(1024, weight.numel() // 2048)
        capacity = min(capacity, weight.numel())  # never more escapes than elements
        if (self.escape_index is None or self.escape_value.dtype != weight.dtype
                or self.escape_index.device != weight.device):
            self._grow(weight, capacity)

    def _grow(self, weight: Tensor, capacity: int) -> None:
        self.escape_index = torch.empty(capacity, dtype=torch.int64, device=weight.device)
        self.escape_value = torch.empty(capacity, dtype=weight.dtype, device=weight.device)

    def mismatch(self, weight: Tensor, lora_a: TensorOrList, lora_b: TensorOrList, scale, *,
                 fan_in_fan_out: bool = False) -> Optional[str]:
        """Why an exact unmerge of these arguments would not restore the merged W0, or None."""
        if self._merge is None:
            return "residual holds no merge (it was never filled by merge_, or unmerge_ already used it)"
        a_list, b_list, s_list = _as_lists("unmerge_", lora_a, lora_b, scale)
        now = _fingerprint(weight, a_list, b_list, s_list, fan_in_fan_out, self._merge["backend"])
        then = self._merge
        if now["weight"] != then["weight"]:
            return "weight is not the tensor (pointer, shape, strides, dtype, device) that merge_ merged"
        if self._weight_version is not None and _version(weight) != self._weight_version:
            return "weight was modified since merge_ (its version counter changed)"
        if now["fan_in_fan_out"] != then["fan_in_fan_out"]:
            return f"fan_in_fan_out={fan_in_fan_out} but merge_ used {then['fan_in_fan_out']}"
        if len(now["adapters"]) != len(then["adapters"]):
            return f"{len(now['adapters'])} adapter(s) given but merge_ merged {len(then['adapters'])}"
        if now["scales"] != then["scales"]:
            return f"scale {now['scales']} differs from the merge's {then['scales']}"
        for i, (n, t) in enumerate(zip(now["adapters"], then["adapters"])):
            for j, name in ((0, "lora_a"), (2, "lora_b")):
                label = f"{name}[{i}]" if len(now["adapters"]) > 1 else name
                if n[j] != t[j]:
                    return f"{label} is not the tensor that merge_ used"
                if n[j + 1] != t[j + 1]:
                    return f"{label} was modified in place since merge_ (its version counter changed)"
        return None


def _merge_exact(weight, a_list, b_list, s_list, fan_in_fan_out, backend, residual, safe):
    residual._prepare(weight)
    status = torch.zeros(2, dtype=torch.int32, device=weight.device)
    while True:
        merge_exact_op(weight, a_list, b_list, s_list, fan_in_fan_out, backend, residual.codes,
                       residual.escape_index, residual.escape_value, status, safe)
        num_escapes, num_bad = status.tolist()  # the one host sync of an exact merge
        if num_bad:
            _raise_nonfinite(num_bad)
        capacity = residual.escape_index.numel()
        if num_escapes <= capacity:
            residual.num_escapes = num_escapes
            return
        # The table was too small: the elements past its end were left unmerged (PENDING).
        # Undo exactly, then rerun with a table that holds every escape (the count is exact).
        unmerge_exact_op(weight, a_list, b_list, s_list, fan_in_fan_out, backend, residual.codes,
                         residual.escape_index, residual.escape_value, capacity)
        residual._grow(weight, num_escapes)
        status.zero_()
        safe = False  # the count pass already passed


def _raise_nonfinite(num_bad: int):
    fail("merge_", f"the merged weight would have {num_bad} non-finite element(s) (inf or NaN); "
                   f"weight left unchanged (safe_merge=True)")


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def merge_(weight: Tensor, lora_a: TensorOrList, lora_b: TensorOrList, scale, *,
           fan_in_fan_out: bool = False, safe_merge: bool = False,
           residual: Optional[MergeResidual] = None, backend: str = "auto") -> Tensor:
    """In place, in one pass over weight, one rounding per element::

        weight += sum_i scale[i] * lora_b[i] @ lora_a[i]        # (.T of it if fan_in_fan_out)

    Args:
        weight: [N, K] ([K, N] if fan_in_fan_out), float16 / bfloat16 / float32 (float64 on the
            torch backend), any strides whose elements do not overlap (e.g. a row or column
            slice of a fused qkv weight).
        lora_a: [r, K], lora_b: [N, r] (r >= 1), weight's dtype or float32, the same dtype for
            both; or lists of them, merged together in the same single pass.
        scale: float, or a list of floats matching the lists.
        safe_merge: check W + ΔW for inf/NaN first; if any, raise ValueError and leave weight
            bit-for-bit unchanged (2 reads + 1 write of W, no copy; one host sync).
        residual: a MergeResidual to fill so that ``unmerge_(..., residual=residual)`` restores
            weight bit for bit (1 byte per element plus an escape table; one host sync).
        backend: "auto" | "triton" | "cuda" | "torch" (see ``lora_kernels.backends``).

    Returns: weight. The ΔW = B·A product is formed tile by tile in fp32 and never stored.
    """
    a_list, b_list, s_list = _validate("merge_", weight, lora_a, lora_b, scale, fan_in_fan_out)
    chosen = choose_backend("merge_", weight, backend)
    if residual is None:
        status = torch.zeros(2, dtype=torch.int32, device=weight.device) if safe_merge else None
        merge_op(weight, a_list, b_list, s_list, fan_in_fan_out, chosen, status)
        if safe_merge:
            num_bad = int(status[1])
            if num_bad:
                _raise_nonfinite(num_bad)
        return weight
    if not isinstance(residual, MergeResidual):
        fail("merge_", f"residual must be a lora_kernels.MergeResidual or None, got {type(residual).__name__}",
             TypeError)
    if weight.dtype not in reference.EXACT_DTYPES:
        fail("merge_", f"an exact unmerge (residual=...) supports float16, bfloat16 and float32 weights, "
                       f"got {str(weight.dtype).replace('torch.', '')}", TypeError)
    if residual.holds_merge:
        fail("merge_", "residual still holds a merge that was not unmerged; unmerge_ it first or use "
                       "a new MergeResidual")
    _merge_exact(weight, a_list, b_list, s_list, fan_in_fan_out, chosen, residual, safe_merge)
    residual._merge = _fingerprint(weight, a_list, b_list, s_list, fan_in_fan_out, chosen)
    residual._weight_version = _version(weight)
    return weight


def unmerge_(weight: Tensor, lora_a: TensorOrList, lora_b: TensorOrList, scale, *,
             fan_in_fan_out: bool = False, residual: Optional[MergeResidual] = None,
             backend: str = "auto") -> Tensor:
    """In place, the inverse of merge_ (arguments as for merge_)::

        weight -= sum_i scale[i] * lora_b[i] @ lora_a[i]        # residual=None: up to rounding

    With ``residual`` (filled by ``merge_(..., residual=residual)`` with these same arguments),
    weight becomes the pre-merge weight bit for bit, and the residual is emptied for reuse.
    Raises ValueError, weight unchanged, if the weight, adapters, scales, layout or backend
    differ from the merge's (``MergeResidual.mismatch`` says which). Returns weight."""
    a_list, b_list, s_list = _validate("unmerge_", weight, lora_a, lora_b, scale, fan_in_fan_out)
    if residual is None:
        unmerge_op(weight, a_list, b_list, s_list, fan_in_fan_out, choose_backend("unmerge_", weight, backend),
                   None)
        return weight
    if not isinstance(residual, MergeResidual):
        fail("unmerge_", f"residual must be a lora_kernels.MergeResidual or None, got "
                         f"{type(residual).__name__}", TypeError)
    reason = residual.mismatch(weight, a_list, b_list, s_list, fan_in_fan_out=fan_in_fan_out)
    if reason is not None:
        fail("unmerge_", reason)
    merged_by = residual._merge["backend"]
    if backend != "auto" and choose_backend("unmerge_", weight, backend) != merged_by:
        fail("unmerge_", f"residual was made by backend {merged_by!r}; an exact unmerge must run on the "
                         f"same backend (it recomputes ΔW bit for bit), got backend={backend!r}")
    unmerge_exact_op(weight, a_list, b_list, s_list, fan_in_fan_out, merged_by, residual.codes,
                     residual.escape_index, residual.escape_value, residual.num_escapes)
    residual._merge = None
    residual._weight_version = None
    return weight
