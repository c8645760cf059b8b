"""Multi-adapter (segmented) LoRA ops: validation, backend dispatch and the registered ops.

Layers: kernels (Triton: ``lora_kernels/triton/multi_lora.py``; CUDA C++: ``csrc/multi_lora/multi_lora.cuh``
and ``csrc/multi_lora/multi_lora_linear.cuh``) -> launchers (the Triton file; ``lora_kernels/cuda/multi_lora.py``) -> the
custom ops ``torch.ops.lora_kernels.{lora_shrink, lora_expand, multi_lora_linear}`` (here) ->
``MultiLoRALinear`` (layers.py). Per-batch metadata comes from ``AdapterIndex`` (serving.py); both
compiled backends read the same index.

These are inference (serving) ops: no autograd formula is registered, so a backward through them
raises torch's "no autograd formula" error; train adapters with ``lora_linear`` instead.
Validation reads no device values: shape, dtype and device checks are host-side, and value
checks (ranks in range) use ``check_values`` (immediate on CPU, ``torch._assert_async`` on GPUs),
so every op here can be captured in a CUDA graph.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backends, reference
from ..errors import BackendUnavailable
from .._validation import (_FLOAT_DTYPE_SET, check_adapter_dtype, check_count, check_index, check_no_overlap,
                           check_ranks, check_same_device, check_scale, check_shape, check_tensor, fail)
from ..serving import AdapterIndex

OPS = ("lora_shrink", "lora_expand_", "multi_lora_linear")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Above 128 the Triton kernels walk the rank in 128-wide chunks (t and B tiles stay [*, 128]);
# 512 is vLLM's largest max_lora_rank.
TRITON_MAX_RANK = 512

Stacks = Union[Tensor, Sequence[Tensor]]


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _stack_list(op: str, name: str, value) -> Tuple[List[Tensor], bool, List[str]]:
    """(stacks, given as a list, argument names): one tensor, or a non-empty list/tuple of them."""
    if isinstance(value, Tensor):
        return [value], False, [name]
    if isinstance(value, (list, tuple)) and len(value) > 0:
        return list(value), True, [f"{name}[{i}]" for i in range(len(value))]
    fail(op, f"{name} must be a torch.Tensor or a non-empty list of them, got "
             f"{type(value).__name__}{' (empty)' if isinstance(value, (list, tuple)) else ''}", TypeError)


def _scale_args(op: str, scales, num_adapters: int) -> Tuple[Optional[Tensor], float]:
    """(scales tensor or None, scalar scale): a [L] tensor, a finite float, or None (= 1)."""
    if scales is None:
        return None, 1.0
    if type(scales) is Tensor and scales.dtype in _FLOAT_DTYPE_SET and scales.shape == (num_adapters,):
        return scales, 1.0  # the checks below pass: a float [L] tensor, read in one pass
    if isinstance(scales, Tensor):
        check_tensor(op, "scales", scales, ndim=1)
        check_shape(op, "scales", scales, (num_adapters,), "one scale per adapter slot, L = index.num_adapters")
        return scales, 1.0
    if isinstance(scales, bool) or not isinstance(scales, (int, float)):
        fail(op, f"scales must be a [L] float tensor, a float or None, got {type(scales).__name__}", TypeError)
    return None, check_scale(op, "scales", scales)


def _check_same_dtype(op: str, names: List[str], stacks: List[Tensor]) -> None:
    for name, s in zip(names[1:], stacks[1:]):
        if s.dtype != stacks[0].dtype:
            fail(op, f"{name} must have {names[0]}'s dtype ({stacks[0].dtype}), got {s.dtype}", TypeError)


def _fast_valid_shrink(x, a_stacks, as_list, index, scales, ranks, out) -> bool:
    """True only for inputs whose every check in ``_validate_shrink_all`` before the aliasing and
    ranks checks passes (x [M, K] of a float dtype, stacks [L, r_max >= 1, K] of one dtype, x's
    or float32, an AdapterIndex of M tokens, out None or [S,] M, r_max in the accumulation
    dtype, all on x's device), tested in one pass. False decides nothing: the full checks then
    accept or raise. tests/test_multi_bad_input.py checks it over a grid of inputs."""
    if not (isinstance(x, Tensor) and isinstance(index, AdapterIndex) and isinstance(a_stacks[0], Tensor)):
        return False
    dtype, a_dtype = x.dtype, a_stacks[0].dtype
    if dtype not in _FLOAT_DTYPE_SET or not (a_dtype == dtype or a_dtype == torch.float32):
        return False
    try:
        M, K = x.shape
        _, R, _ = a_stacks[0].shape
    except ValueError:
        return False
    L, device = index.num_adapters, x.device
    if R < 1 or index.num_tokens != M or index.data.device != device:
        return False
    for a in a_stacks:
        if not (isinstance(a, Tensor) and a.dtype == a_dtype and a.device == device and a.shape == (L, R, K)):
            return False
    for v in (scales, ranks):
        if v is not None and not (isinstance(v, Tensor) and v.device == device):
            return False
    if out is None:
        return True
    return (isinstance(out, Tensor) and out.device == device and out.dtype == _t_dtype(dtype, a_dtype)
            and out.shape == ((len(a_stacks), M, R) if as_list else (M, R)))


def _validate_shrink(op, x, a_stacks, names, as_list, index, scales, ranks, out) -> None:
    """Every check of lora_shrink's inputs; the common call passes the shape, dtype and device
    checks in one pass (_fast_valid_shrink), then the aliasing and ranks checks as always."""
    if _fast_valid_shrink(x, a_stacks, as_list, index, scales, ranks, out):
        if out is not None and not torch.compiler.is_compiling():
            check_no_overlap(op, "out", out, x=x, lora_a_stack=a_stacks, scales=scales, ranks=ranks,
                             index=index.data)
        check_ranks(op, ranks, index.num_adapters, a_stacks[0].shape[1])
        return
    _validate_shrink_all(op, x, a_stacks, names, as_list, index, scales, ranks, out)


def _validate_shrink_all(op, x, a_stacks, names, as_list, index, scales, ranks, out) -> None:
    check_tensor(op, "x", x, ndim=2)
    for name, a in zip(names, a_stacks):
        check_tensor(op, name, a, ndim=3)
    check_index(op, index, x.shape[0])
    L, R = index.num_adapters, a_stacks[0].shape[1]
    for name, a in zip(names, a_stacks):
        check_shape(op, name, a, (L, R, x.shape[1]), "L = index.num_adapters, r_max, K = x.shape[-1]")
    if R < 1:
        fail(op, f"{names[0]} must have r_max >= 1 rows per adapter, got shape {list(a_stacks[0].shape)}")
    _check_same_dtype(op, names, a_stacks)
    check_same_device(op, x=x, scales=scales, ranks=ranks, index=index.data, out=out, **dict(zip(names, a_stacks)))
    check_adapter_dtype(op, names[0], a_stacks[0], x.dtype)
    if out is not None:
        t_dtype = _t_dtype(x.dtype, a_stacks[0].dtype)
        check_tensor(op, "out", out, dtypes=(t_dtype,))
        shape = (len(a_stacks), x.shape[0], R) if as_list else (x.shape[0], R)
        check_shape(op, "out", out, shape, "[S,] M = x.shape[0], r_max" if as_list else "M = x.shape[0], r_max")
        if not torch.compiler.is_compiling():  # fake tensors under tracing have no memory
            check_no_overlap(op, "out", out, x=x, lora_a_stack=a_stacks, scales=scales, ranks=ranks,
                             index=index.data)
    check_ranks(op, ranks, L, R)


def _fast_valid_expand(y, t, b_stacks, as_list, index, ranks, offset) -> bool:
    """True only for inputs whose every check in ``_validate_expand_all`` before the aliasing and
    ranks checks passes (y [M, N_y] of a float dtype, t [S,] M, r_max >= 1 in float32/64, stacks
    [L, N_i, r_max] of one dtype, y's or float32, that fit in y from a non-negative int offset --
    one stack at offset 0 covering y exactly -- an AdapterIndex of M tokens, all on y's device),
    tested in one pass. False decides nothing: the full checks then accept or raise.
    tests/test_multi_bad_input.py checks it over a grid of inputs."""
    if not (isinstance(y, Tensor) and isinstance(t, Tensor) and isinstance(index, AdapterIndex)
            and type(offset) is int and offset >= 0 and isinstance(b_stacks[0], Tensor)):
        return False
    dtype, b_dtype = y.dtype, b_stacks[0].dtype
    if (dtype not in _FLOAT_DTYPE_SET or not (t.dtype == torch.float32 or t.dtype == torch.float64)
            or not (b_dtype == dtype or b_dtype == torch.float32)):
        return False
    try:
        M, n_y = y.shape
        if as_list:
            s_t, m_t, R = t.shape
        else:
            (m_t, R), s_t = t.shape, 1
    except ValueError:
        return False
    L, device = index.num_adapters, y.device
    if not (R >= 1 and m_t == M and s_t == len(b_stacks) and index.num_tokens == M and t.device == device
            and index.data.device == device):
        return False
    if ranks is not None and not (isinstance(ranks, Tensor) and ranks.device == device):
        return False
    width = offset
    for b in b_stacks:
        if not (isinstance(b, Tensor) and b.dtype == b_dtype and b.device == device):
            return False
        try:
            l_b, n_b, r_b = b.shape
        except ValueError:
            return False
        if l_b != L or r_b != R:
            return False
        width += n_b
    return width <= n_y and (as_list or offset != 0 or width == n_y)


def _validate_expand(op, y, t, b_stacks, names, as_list, index, ranks, offset) -> None:
    """Every check of lora_expand_'s inputs; the common call passes the shape, dtype and device
    checks in one pass (_fast_valid_expand), then the aliasing and ranks checks as always."""
    if _fast_valid_expand(y, t, b_stacks, as_list, index, ranks, offset):
        if not torch.compiler.is_compiling():  # fake tensors under tracing have no memory
            check_no_overlap(op, "y", y, t=t, lora_b_stack=b_stacks, ranks=ranks, index=index.data)
        check_ranks(op, ranks, index.num_adapters, t.shape[-1])
        return
    _validate_expand_all(op, y, t, b_stacks, names, as_list, index, ranks, offset)


def _validate_expand_all(op, y, t, b_stacks, names, as_list, index, ranks, offset) -> None:
    check_tensor(op, "y", y, ndim=2)
    check_tensor(op, "t", t, dtypes=(torch.float32, torch.float64), ndim=3 if as_list else 2)
    for name, b in zip(names, b_stacks):
        check_tensor(op, name, b, ndim=3)
    check_index(op, index, y.shape[0])
    check_count(op, "offset", offset, minimum=0)
    L, R, S = index.num_adapters, t.shape[-1], len(b_stacks)
    if R < 1:
        fail(op, f"t must have r_max >= 1 columns, got shape {list(t.shape)}")
    if as_list:
        check_shape(op, "t", t, (S, y.shape[0], R), "S = len(lora_b_stack) slices, M = y.shape[0], r_max")
    else:
        check_shape(op, "t", t, (y.shape[0], R), "M = y.shape[0] rows, r_max columns")
    if not as_list and offset == 0:  # one stack over the whole of y, as before slices existed
        check_shape(op, names[0], b_stacks[0], (L, y.shape[1], R),
                    "L = index.num_adapters, N = y.shape[1], r_max = t.shape[1]")
    for name, b in zip(names, b_stacks):
        check_shape(op, name, b, (L, b.shape[1], R), "L = index.num_adapters, N_i, r_max = t.shape[-1]")
    width = offset + sum(b.shape[1] for b in b_stacks)
    if width > y.shape[1]:
        fail(op, f"offset + the slices' widths ({offset} + {[b.shape[1] for b in b_stacks]} = {width}) "
                 f"exceed y's {y.shape[1]} columns")
    _check_same_dtype(op, names, b_stacks)
    check_same_device(op, y=y, t=t, ranks=ranks, index=index.data, **dict(zip(names, b_stacks)))
    check_adapter_dtype(op, names[0], b_stacks[0], y.dtype, base_name="y")
    if not torch.compiler.is_compiling():  # fake tensors under tracing have no memory
        check_no_overlap(op, "y", y, t=t, lora_b_stack=b_stacks, ranks=ranks, index=index.data)
    check_ranks(op, ranks, L, R)


def _fast_valid_linear(x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks) -> bool:
    """True only for inputs whose every check in ``_validate_linear_all`` but the ranks' passes:
    the common call (tensors of matching shapes, x of a float dtype, weight in x's dtype, the
    stacks both in x's dtype or both float32, bias None or [N] in x's dtype or float32, an
    AdapterIndex of x's M tokens, all on x's device), tested in one pass without building a
    message. False decides nothing: the full checks then accept or raise.
    tests/test_multi_bad_input.py checks "accepted here => accepted there" over a grid of inputs."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_a_stack, Tensor)
            and isinstance(lora_b_stack, Tensor) and isinstance(index, AdapterIndex)):
        return False
    dtype, a_dtype = x.dtype, lora_a_stack.dtype
    if (dtype not in _FLOAT_DTYPE_SET or weight.dtype != dtype or lora_b_stack.dtype != a_dtype
            or not (a_dtype == dtype or a_dtype == torch.float32)):
        return False
    try:  # unpacking checks the ranks of the tensors
        N, k_w = weight.shape
        L, R, k_a = lora_a_stack.shape
        l_b, n_b, r_b = lora_b_stack.shape
        shape = x.shape
        K = shape[-1]  # IndexError for a 0-d x
    except (ValueError, IndexError):
        return False
    M = shape[0] if len(shape) == 2 else math.prod(shape[:-1])
    if not (k_w == K and k_a == K and R >= 1 and L == index.num_adapters and l_b == L and n_b == N
            and r_b == R and index.num_tokens == M):
        return False
    device = x.device
    if not (weight.device == device and lora_a_stack.device == device and lora_b_stack.device == device
            and index.data.device == device):
        return False
    for t in (scales, ranks):
        if t is not None and not (isinstance(t, Tensor) and t.device == device):
            return False
    if bias is None:
        return True
    return (isinstance(bias, Tensor) and (bias.dtype == dtype or bias.dtype == torch.float32)
            and bias.shape == (N,) and bias.device == device)


def _validate_linear(op, x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks) -> None:
    """Every check of multi_lora_linear's inputs; the common call passes in one pass (~6 us less per
    call, CPU machine), anything else gets the full checks' verdict."""
    if _fast_valid_linear(x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks):
        check_ranks(op, ranks, index.num_adapters, lora_a_stack.shape[1])  # the full checks' last
        return
    _validate_linear_all(op, x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks)


def _validate_linear_all(op, x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks) -> None:
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "weight", weight, ndim=2)
    check_tensor(op, "lora_a_stack", lora_a_stack, ndim=3)
    check_tensor(op, "lora_b_stack", lora_b_stack, ndim=3)
    if bias is not None:
        check_tensor(op, "bias", bias, ndim=1)
    K, N = x.shape[-1], weight.shape[0]
    check_index(op, index, math.prod(x.shape[:-1]))
    L, R = index.num_adapters, lora_a_stack.shape[1]
    check_shape(op, "weight", weight, (N, K), "N outputs, K = x.shape[-1]")
    check_shape(op, "lora_a_stack", lora_a_stack, (L, R, K), "L = index.num_adapters, r_max, K = x.shape[-1]")
    if R < 1:
        fail(op, f"lora_a_stack must have r_max >= 1 rows per adapter, got shape {list(lora_a_stack.shape)}")
    check_shape(op, "lora_b_stack", lora_b_stack, (L, N, R),
                "L = index.num_adapters, N = weight.shape[0], r_max = lora_a_stack.shape[1]")
    if bias is not None:
        check_shape(op, "bias", bias, (N,), "N = weight.shape[0]")
    check_same_device(op, x=x, weight=weight, lora_a_stack=lora_a_stack, lora_b_stack=lora_b_stack,
                      scales=scales, bias=bias, ranks=ranks, index=index.data)
    if weight.dtype != x.dtype:
        fail(op, f"weight must have x's dtype ({x.dtype}), got {weight.dtype}", TypeError)
    check_adapter_dtype(op, "lora_a_stack", lora_a_stack, x.dtype)
    if lora_b_stack.dtype != lora_a_stack.dtype:
        fail(op, f"lora_b_stack must have lora_a_stack's dtype ({lora_a_stack.dtype}), got {lora_b_stack.dtype}",
             TypeError)
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        fail(op, f"bias must have x's dtype ({x.dtype}) or float32, got {bias.dtype}", TypeError)
    check_ranks(op, ranks, L, R)


# ---------------------------------------------------------------------------------------------
# Backend choice
# ---------------------------------------------------------------------------------------------

def _input_reason(dtype: torch.dtype, r_max: int, t_dtype: Optional[torch.dtype] = None):
    def reason(backend: str) -> Optional[str]:
        if backend == "cuda":
            from ..cuda import multi_lora as cuda_multi
            return cuda_multi.multi_input_reason(dtype, r_max, t_dtype)
        if backend == "triton":
            if dtype not in TRITON_DTYPES:
                return f"triton: dtype {dtype} is not supported (float16, bfloat16, float32)"
            if r_max > TRITON_MAX_RANK:
                return f"triton: r_max {r_max} exceeds the kernels' limit of {TRITON_MAX_RANK}"
            if t_dtype is not None and t_dtype != torch.float32:
                return f"triton: t must be float32, got {t_dtype}"
            return backends.interpreter_dtype_reason(dtype)
        return None
    return reason


# Under "auto" on CUDA tensors: Triton first, the CUDA C++ kernels when Triton cannot run (e.g. a
# serving image without triton). Which is faster per shape and token distribution is to be
# measured on an H100/H200 (bench/, suite multi: ours_se_triton vs ours_se_cuda, ours_linear_triton
# vs ours_linear_cuda); no measurement
# exists yet, so this order is a default, not a result.
AUTO_PREFERENCE = ("triton", "cuda")


_BACKEND_CACHE: dict = {}


def choose_backend(op: str, device: torch.device, dtype: torch.dtype, r_max: int, backend: str = "auto",
                   t_dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs `op` on these inputs (see backends.py for the rule).

    Eager calls memoise the answer on everything the rule reads (as lora_linear's choose_backend:
    the op, the requested backend, the device, the dtypes, r_max, the two environment variables
    and whether the interpreter's bfloat16 dot is fixed). A backend whose reasons read anything
    else must add it to the key.

    An explicit "torch" resolves to "torch" whatever the device, inputs and environment (the
    variable only replaces "auto"; the torch backend has no reason to refuse an input), so it is
    returned at once."""
    if backend == "torch" and type(backend) is str:
        return backend
    if torch.compiler.is_compiling() or type(backend) is not str:  # resolve() names a bad backend
        return backends.resolve(op, backend, device, AUTO_PREFERENCE, _input_reason(dtype, r_max, t_dtype))
    return _choose_eager(op, device, dtype, r_max, backend, t_dtype)


def _choose_eager(op: str, device: torch.device, dtype: torch.dtype, r_max: int, backend: str,
                  t_dtype: Optional[torch.dtype] = None) -> str:
    """choose_backend outside torch.compile (the common paths have checked the modes): the
    memoised answer, without the compile check (~0.2 us a call, CPU machine)."""
    if type(backend) is not str:  # resolve() names a bad backend
        return backends.resolve(op, backend, device, AUTO_PREFERENCE, _input_reason(dtype, r_max, t_dtype))
    if backend == "torch":
        return backend
    key = (op, backend, device, dtype, r_max, t_dtype, backends.choice_state())
    chosen = _BACKEND_CACHE.get(key)
    if chosen is None:
        chosen = backends.resolve(op, backend, device, AUTO_PREFERENCE, _input_reason(dtype, r_max, t_dtype))
        _BACKEND_CACHE[key] = chosen
    return chosen


def _triton_vectors(scales: Optional[Tensor], ranks: Optional[Tensor]):
    """The kernels read scales as fp32 and both vectors with unit stride. Vectors that already are
    so pass as they are, without the calls (``.to`` + ``.contiguous`` cost ~1.5 us per call at
    M = 1 even when they return their tensor, CPU machine)."""
    if scales is not None and not (scales.dtype == torch.float32 and scales.is_contiguous()):
        scales = scales.to(torch.float32).contiguous()
    if ranks is not None and not ranks.is_contiguous():
        ranks = ranks.contiguous()
    return scales, ranks


def _scales_tensor(scales: Optional[Tensor], scale: float, num_adapters: int, like: Tensor) -> Tensor:
    """The [L] scales for the backends that take only a tensor (torch reference, CUDA C++)."""
    if scales is not None:
        return scales
    return torch.full((num_adapters,), scale, dtype=torch.float32, device=like.device)


# ---------------------------------------------------------------------------------------------
# Registered ops: validated inputs, 2-D x / y, the index as its data tensor, a concrete backend.
# ---------------------------------------------------------------------------------------------

def _check_torch(backend: str) -> None:
    """The ops run "triton", "cuda" or "torch"; any other name reaching them is a dispatch bug,
    not a reason to fall back silently."""
    if backend != "torch":
        raise BackendUnavailable(f"multi-adapter ops: no {backend!r} implementation")


def _t_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return reference.acc_dtype(*dtypes)


@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=("out",))
def lora_shrink_op(x: Tensor, lora_a_stacks: List[Tensor], scales: Optional[Tensor], scale: float,
                   ranks: Optional[Tensor], index_data: Tensor, num_adapters: int, capacity: int, padded: bool,
                   backend: str, out: Tensor) -> None:
    """out [S, M, r_max] (float32; float64 for float64 inputs on the torch backend), every element
    written: out[i] = shrink with lora_a_stacks[i]. ``padded``: rows past the index's last update
    are not in its work lists (AdapterIndex.padded_to), so they are zeroed first."""
    index = AdapterIndex.from_data(index_data, x.shape[0], num_adapters, capacity)
    _shrink(x, lora_a_stacks, scales, scale, ranks, index, num_adapters, padded, backend, out)


def _shrink(x: Tensor, lora_a_stacks: List[Tensor], scales: Optional[Tensor], scale: float,
            ranks: Optional[Tensor], index: AdapterIndex, num_adapters: int, padded: bool, backend: str,
            out: Tensor) -> None:
    """lora_shrink_op's work, given the index itself."""
    if padded:
        out.zero_()
    if backend == "triton":
        scales32, ranks = _triton_vectors(scales, ranks)
        backends.launcher("triton.multi_lora").shrink_slices(x, lora_a_stacks, index, scales32, scale, ranks, out)
        return
    scales_t = _scales_tensor(scales, scale, num_adapters, x)
    if backend == "cuda":  # one launch for up to 4 slices
        backends.launcher("cuda.multi_lora").multi_lora_shrink(x, lora_a_stacks, index, scales_t, ranks, out=out)
        return
    _check_torch(backend)
    _shrink_torch(x, lora_a_stacks, scales_t, ranks, index, out.unbind(0))  # unbind: not Tensor.__iter__ (~3 us more)


def _shrink_torch(x: Tensor, lora_a_stacks: List[Tensor], scales_t: Tensor, ranks: Optional[Tensor],
                  index: AdapterIndex, outs: Sequence[Tensor]) -> None:
    """The torch backend's shrink into outs[i] [M, r_max] (the slices of out): the eager call of
    one stack passes its 2-D out itself, not a view of a 3-D one (a view costs ~2 us, CPU machine)."""
    ids = index.token_adapter
    for a, t in zip(lora_a_stacks, outs):
        reference.lora_shrink(x, a, ids, scales_t, ranks, out=t)  # written in place, no copy


@lora_shrink_op.register_fake
def _(x, lora_a_stacks, scales, scale, ranks, index_data, num_adapters, capacity, padded, backend, out):
    return None


@torch.library.custom_op("lora_kernels::lora_expand", mutates_args=("y",))
def lora_expand_op(y: Tensor, t: Tensor, lora_b_stacks: List[Tensor], ranks: Optional[Tensor],
                   index_data: Tensor, num_adapters: int, capacity: int, offset: int, backend: str) -> None:
    """In place on y [M, N_y]: slice i adds t[i] @ B_i^T into columns offset + N_0 + ... + N_{i-1} on."""
    index = AdapterIndex.from_data(index_data, y.shape[0], num_adapters, capacity)
    _expand(y, t, lora_b_stacks, ranks, index, offset, backend)


def _expand(y: Tensor, t: Tensor, lora_b_stacks: List[Tensor], ranks: Optional[Tensor], index: AdapterIndex,
            offset: int, backend: str) -> None:
    """lora_expand_op's work, given the index itself."""
    if backend == "triton":
        backends.launcher("triton.multi_lora").expand_slices_(y, t, lora_b_stacks, index,
                                                              _triton_vectors(None, ranks)[1], offset)
        return
    if backend == "cuda":  # one launch for up to 4 slices
        backends.launcher("cuda.multi_lora").multi_lora_expand_(y, t, lora_b_stacks, index, ranks, offset=offset)
        return
    _check_torch(backend)
    _expand_torch(y, t.unbind(0), lora_b_stacks, ranks, index, offset)


def _expand_torch(y: Tensor, ts: Sequence[Tensor], lora_b_stacks: List[Tensor], ranks: Optional[Tensor],
                  index: AdapterIndex, offset: int) -> None:
    """The torch backend's expand of ts[i] [M, r_max] (the slices of t): the eager call of one
    stack passes its 2-D t itself, not a view of a 3-D one (a view costs ~2 us, CPU machine)."""
    ids, n_y = index.token_adapter, y.shape[1]
    for t_i, (b, col) in zip(ts, _slice_columns(lora_b_stacks, offset)):
        width = b.shape[1]
        cols = y if col == 0 and width == n_y else y[:, col:col + width]  # no view of all of y
        reference.lora_expand_(cols, t_i, b, ids, ranks)


@lora_expand_op.register_fake
def _(y, t, lora_b_stacks, ranks, index_data, num_adapters, capacity, offset, backend):
    return None


def _slice_columns(b_stacks: List[Tensor], offset: int):
    """(B_i, first column of slice i in y)."""
    col = offset
    for b in b_stacks:
        yield b, col
        col += b.shape[1]


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: Tensor, weight: Tensor, lora_a_stack: Tensor, lora_b_stack: Tensor,
                         scales: Optional[Tensor], scale: float, bias: Optional[Tensor], ranks: Optional[Tensor],
                         index_data: Tensor, num_adapters: int, capacity: int, backend: str) -> Tensor:
    """y [M, N] in x.dtype."""
    index = AdapterIndex.from_data(index_data, x.shape[0], num_adapters, capacity)
    return _linear(x, weight, lora_a_stack, lora_b_stack, scales, scale, bias, ranks, index, num_adapters, backend)


def _linear(x: Tensor, weight: Tensor, lora_a_stack: Tensor, lora_b_stack: Tensor, scales: Optional[Tensor],
            scale: float, bias: Optional[Tensor], ranks: Optional[Tensor], index: AdapterIndex,
            num_adapters: int, backend: str) -> Tensor:
    """multi_lora_linear_op's work, given the index itself."""
    if backend == "triton":
        scales32, ranks = _triton_vectors(scales, ranks)
        return backends.launcher("triton.multi_lora").multi_lora_linear(
            x, weight, lora_a_stack, lora_b_stack, index, scales32, bias, ranks, scale=scale)
    scales_t = _scales_tensor(scales, scale, num_adapters, x)
    if backend == "cuda":
        return backends.launcher("cuda.multi_lora").multi_lora_linear(x, weight, lora_a_stack, lora_b_stack, index,
                                                                       scales_t, bias, ranks)
    _check_torch(backend)
    return reference.multi_lora_linear(x, weight, lora_a_stack, lora_b_stack, index.token_adapter, scales_t, bias,
                                       ranks)


@multi_lora_linear_op.register_fake
def _(x, weight, lora_a_stack, lora_b_stack, scales, scale, bias, ranks, index_data, num_adapters, capacity, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)
# The one-pass paths of the common eager call (_shrink_common, _expand_common, _linear_common);
# tests turn them off to compare with the general path.
_FAST_COMMON = True


def _eager_direct(*tensors: Optional[Tensor]) -> bool:
    """True when calling an op's work (_shrink, _expand, _linear) directly is indistinguishable
    from calling the registered op, whose dispatch costs ~15 us of a call at M = 1 (CPU
    machine): eager mode, no dispatch modes, functorch transforms or profiler (a trace shows the
    op by its name), plain non-meta tensors, and nothing for autograd to record (the ops have no
    formula: through the op, an input that requires grad gets torch's "no autograd formula"
    error at backward, so such calls keep the op). The caller bumps the version counter of what
    the op mutates, as the op's ADInplaceOrView kernel does."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._are_functorch_transforms_active() or torch.autograd._profiler_enabled()):
        return False
    if torch.is_grad_enabled():
        for t in tensors:
            if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta or t.requires_grad):
                return False
        return True
    for t in tensors:  # no_grad (serving): requires_grad is not read
        if t is not None and (type(t) not in _PLAIN_TENSOR_TYPES or t.is_meta):
            return False
    return True


def _eager_modes_off() -> bool:
    """No torch.compile tracing, dispatch mode, functorch transform or profiler: _eager_direct's
    conditions on the state, apart from the tensors."""
    return not (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
                or torch._C._are_functorch_transforms_active() or torch.autograd._profiler_enabled())


_CPU = torch.device("cpu")


def _on(t: Tensor, device: torch.device) -> bool:
    """t.device == device, where `device` is _CPU for CPU tensors (which have no index): then
    ``t.is_cpu`` answers without building t's device."""
    return t.is_cpu if device is _CPU else t.device == device


def _all_on(device: torch.device, *tensors: Tensor) -> bool:
    """_on(t, device) for every one of the tensors, in one call (the common paths ask it of two to
    four tensors per call: ~0.1 us a call saved each, CPU machine)."""
    if device is _CPU:
        for t in tensors:
            if not t.is_cpu:
                return False
        return True
    for t in tensors:
        if t.device != device:
            return False
    return True


def _disjoint_from(out: Tensor, *inputs: Optional[Tensor]) -> bool:
    """True only where check_no_overlap(op, ..., out, **inputs) passes (decided as
    _validation._no_overlap_contiguous does: contiguous plain tensors whose byte ranges miss
    out's); False decides nothing."""
    if not out.is_contiguous():
        return False
    lo = out.data_ptr()
    hi = lo + out.nbytes
    for t in inputs:
        if t is not None:
            if not t.is_contiguous():
                return False
            t_lo = t.data_ptr()
            if t_lo < hi and lo < t_lo + t.nbytes:
                return False
    return True


def _shrink_common(x, a, index, scales, scale, ranks, out, backend):
    """lora_shrink's common eager call in one pass: one stack (a plain tensor), an AdapterIndex,
    ``scales`` as _scale_args returned it, ``out`` None or a contiguous [M, r_max] buffer of the
    accumulation dtype, every tensor plain, contiguous, on x's CPU or CUDA device, sharing no
    bytes with out, nothing requiring grad under grad mode, no mode active. Returns the result
    after doing the work, or None having done nothing and checked nothing that the full path
    would not check the same way: every check of the full path but the ranks' passes for such
    inputs (the one-pass shape, dtype and device check, the aliasing check), then the ranks
    check, the backend choice and the work run as there. ~2x less host time than the general
    path (CPU machine, overhead suite); tests/test_multi_bad_input.py compares the two over a
    grid of good and bad inputs."""
    if not (type(x) is Tensor and type(a) in _PLAIN_TENSOR_TYPES and type(index) is AdapterIndex
            and (x.is_cpu or x.is_cuda)):
        return None
    dtype, a_dtype = x.dtype, a.dtype
    if dtype not in _FLOAT_DTYPE_SET or not (a_dtype == dtype or a_dtype == torch.float32):
        return None
    x_shape, a_shape = x.shape, a.shape
    if len(x_shape) != 2 or len(a_shape) != 3:
        return None
    M, K = x_shape
    L, R, k_a = a_shape
    data = index.data
    if not (R >= 1 and k_a == K and L == index.num_adapters and index.num_tokens == M):
        return None
    device = _CPU if x.is_cpu else x.device
    if not _all_on(device, a, data):
        return None
    for v in (scales, ranks):
        if v is not None and not (type(v) is Tensor and _on(v, device)):
            return None
    if out is not None:
        if not (type(out) is Tensor and _on(out, device) and out.shape == (M, R)
                and out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                and _disjoint_from(out, x, a, scales, ranks, data)):
            return None
    if not _eager_modes_off() or (torch.is_grad_enabled() and (
            x.requires_grad or a.requires_grad or (out is not None and out.requires_grad)
            or (scales is not None and scales.requires_grad) or (ranks is not None and ranks.requires_grad))):
        return None
    check_ranks("lora_shrink", ranks, L, R)
    chosen = _choose_eager("lora_shrink", device, dtype, R, backend)
    if chosen == "torch":  # its in-place writes move out's version counter (no bump needed)
        # every element written; padding rows (padded_to) are -1 in token_adapter: zeros
        return reference.lora_shrink(x, a, index.token_adapter, _scales_tensor(scales, scale, L, x), ranks, out)
    else:
        result = out if out is not None else x.new_empty((M, R), dtype=torch.float32)
        # the Triton launcher takes one slice's 2-D out as it is (no view: ~2 us)
        _shrink(x, [a], scales, scale, ranks, index, L, index.padded, chosen,
                result if chosen == "triton" else result.unsqueeze(0))
        out = result
    torch.autograd.graph.increment_version(out)  # as the op does for its mutated argument
    return out


def _expand_common(y, t, b, index, ranks, offset, backend) -> bool:
    """lora_expand_'s common eager call in one pass (as _shrink_common): one stack (a plain
    tensor) over all of y (offset 0), t [M, r_max] float32/64, y of a float dtype, the stack in
    y's dtype or float32, every tensor plain, contiguous, on y's CPU or CUDA device, none sharing
    bytes with y, nothing requiring grad under grad mode, no mode active. True after doing the
    work; False having done nothing (the full path then decides). tests/test_multi_bad_input.py
    compares the two over a grid of good and bad inputs."""
    if not (type(y) is Tensor and type(t) is Tensor and type(b) in _PLAIN_TENSOR_TYPES
            and type(index) is AdapterIndex and type(offset) is int and offset == 0 and (y.is_cpu or y.is_cuda)):
        return False
    dtype, t_dtype, b_dtype = y.dtype, t.dtype, b.dtype
    if (dtype not in _FLOAT_DTYPE_SET or not (t_dtype == torch.float32 or t_dtype == torch.float64)
            or not (b_dtype == dtype or b_dtype == torch.float32)):
        return False
    y_shape, t_shape, b_shape = y.shape, t.shape, b.shape
    if len(y_shape) != 2 or len(t_shape) != 2 or len(b_shape) != 3:
        return False
    M, N = y_shape
    m_t, R = t_shape
    L, n_b, r_b = b_shape
    data = index.data
    if not (R >= 1 and m_t == M and n_b == N and r_b == R and L == index.num_adapters and index.num_tokens == M):
        return False
    device = _CPU if y.is_cpu else y.device
    if not _all_on(device, t, b, data):
        return False
    if ranks is not None and not (type(ranks) is Tensor and _on(ranks, device)):
        return False
    if not _disjoint_from(y, t, b, ranks, data):
        return False
    if not _eager_modes_off() or (torch.is_grad_enabled() and (
            y.requires_grad or t.requires_grad or b.requires_grad or (ranks is not None and ranks.requires_grad))):
        return False
    check_ranks("lora_expand_", ranks, L, R)
    chosen = _choose_eager("lora_expand_", device, dtype, R, backend, t_dtype)
    if chosen == "torch":  # y.copy_ there moves y's version counter (no bump needed)
        reference.lora_expand_(y, t, b, index.token_adapter, ranks)
        return True
    _expand(y, t if chosen == "triton" else t.unsqueeze(0), [b], ranks, index, 0, chosen)  # as in _shrink_common
    torch.autograd.graph.increment_version(y)  # as the op does for its mutated argument
    return True


def _linear_common(x, weight, a, b, index, scales, scale, bias, ranks, backend):
    """multi_lora_linear's common eager call in one pass (as _shrink_common): x [M, K] of a float
    dtype, weight [N, K] in x's dtype, the stacks [L, r_max >= 1, K] / [L, N, r_max] both in x's
    dtype or both float32, bias None or [N] in x's dtype or float32, every tensor plain on x's
    CPU or CUDA device, nothing requiring grad under grad mode, no mode active: every check of
    the general path but the ranks' passes (_fast_valid_linear's conditions, 2-D x), then the
    ranks check, the backend choice and the work run as there. Returns y, or None having done
    nothing. tests/test_multi_bad_input.py compares the two paths over a grid of inputs."""
    if not (type(x) is Tensor and type(weight) in _PLAIN_TENSOR_TYPES and type(a) in _PLAIN_TENSOR_TYPES
            and type(b) in _PLAIN_TENSOR_TYPES and type(index) is AdapterIndex and (x.is_cpu or x.is_cuda)):
        return None
    dtype, a_dtype = x.dtype, a.dtype
    if (dtype not in _FLOAT_DTYPE_SET or weight.dtype != dtype or b.dtype != a_dtype
            or not (a_dtype == dtype or a_dtype == torch.float32)):
        return None
    x_shape, w_shape, a_shape, b_shape = x.shape, weight.shape, a.shape, b.shape
    if len(x_shape) != 2 or len(w_shape) != 2 or len(a_shape) != 3 or len(b_shape) != 3:
        return None
    M, K = x_shape
    N, k_w = w_shape
    L, R, k_a = a_shape
    data = index.data
    if not (k_w == K and k_a == K and R >= 1 and L == index.num_adapters and b_shape == (L, N, R)
            and index.num_tokens == M):
        return None
    device = _CPU if x.is_cpu else x.device
    if not _all_on(device, weight, a, b, data):
        return None
    for v in (scales, ranks):
        if v is not None and not (type(v) is Tensor and _on(v, device)):
            return None
    if bias is not None and not (type(bias) in _PLAIN_TENSOR_TYPES and (bias.dtype == dtype or bias.dtype == torch.float32)
                                 and bias.shape == (N,) and _on(bias, device)):
        return None
    if not _eager_modes_off() or (torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or a.requires_grad or b.requires_grad
            or (bias is not None and bias.requires_grad) or (scales is not None and scales.requires_grad)
            or (ranks is not None and ranks.requires_grad))):
        return None
    check_ranks("multi_lora_linear", ranks, L, R)
    chosen = _choose_eager("multi_lora_linear", device, dtype, R, backend)
    if chosen == "torch":
        return reference.multi_lora_linear(x, weight, a, b, index.token_adapter, _scales_tensor(scales, scale, L, x),
                                           bias, ranks)
    return _linear(x, weight, a, b, scales, scale, bias, ranks, index, L, chosen)


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def lora_shrink(x: Tensor, lora_a_stack: Stacks, index: AdapterIndex, scales: Union[Tensor, float, None] = None,
                ranks: Optional[Tensor] = None, *, out: Optional[Tensor] = None, backend: str = "auto") -> Tensor:
    """The shrink half of a multi-adapter LoRA layer: each token times its adapter's A, scaled;
    one launch for every slice (q/k/v, gate/up; up to 4 per launch) on the Triton and CUDA C++
    backends.

    Semantics (plain torch; i = index's token_adapter[m], r_i = ranks[i] or r_max, s_i = scales[i]
    for a tensor, the float itself, or 1 for None; A_0 .. A_{S-1} the stacks)::

        t = zeros(S, M, r_max, dtype=float32)
        for m in range(M):
            if i >= 0:
                for s in range(S):
                    t[s, m, :r_i] = s_i * A_s[i, :r_i] @ x[m]
        return t if lora_a_stack is a list else t[0]

    Args:
        x: [M, K] float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
        lora_a_stack: [L, r_max, K], or a list of S such stacks (one shape and dtype): x's dtype or
            float32; rows at or past ranks[i] are never read.
        index: AdapterIndex of the batch (M tokens, L = index.num_adapters slots), from
            from_token_adapters, a with_capacity index after update_, or its padded_to(M) view.
        scales: [L] float tensor (lora_alpha / r per slot), a float for every slot, or None (1:
            vLLM folds the scale into B).
        ranks: [L] int tensor with 0 <= ranks[i] <= r_max, or None (every slot has rank r_max).
        out: a buffer for t ([S, M, r_max] for a list, [M, r_max] for one stack; float32, any
            strides, sharing no memory with the inputs), written and returned: the tensor-parallel
            path shrinks straight into the buffer it all-reduces.
        backend: "auto" | "triton" | "cuda" | "torch".

    Returns: t (or out): zero for tokens with no adapter and past each adapter's rank. Every
    element is written.
    """
    op = "lora_shrink"
    if isinstance(index, AdapterIndex):
        scales, scale = _scale_args(op, scales, index.num_adapters)
    else:
        scale = 1.0
    if _FAST_COMMON:
        result = _shrink_common(x, lora_a_stack, index, scales, scale, ranks, out, backend)
        if result is not None:
            return result
    a_stacks, as_list, names = _stack_list(op, "lora_a_stack", lora_a_stack)
    _validate_shrink(op, x, a_stacks, names, as_list, index, scales, ranks, out)
    R = a_stacks[0].shape[1]
    chosen = choose_backend(op, x.device, x.dtype, R, backend)
    if out is None:
        out = x.new_empty((len(a_stacks), x.shape[0], R), dtype=_t_dtype(x.dtype, a_stacks[0].dtype))
        result = out if as_list else out[0]
    else:  # the op takes out [S, M, r_max]: one stack's [M, r_max] gets its view when needed
        result, out = out, (out if as_list else None)
    if _eager_direct(x, result, scales, ranks, index.data, *a_stacks):
        if chosen == "torch" and not as_list:  # _shrink's work on the 2-D out itself, no [1, M, r_max] view
            if index.padded:
                result.zero_()
            _shrink_torch(x, a_stacks, _scales_tensor(scales, scale, index.num_adapters, x), ranks, index, (result,))
        else:
            _shrink(x, a_stacks, scales, scale, ranks, index, index.num_adapters, index.padded, chosen,
                    result.unsqueeze(0) if out is None else out)
        torch.autograd.graph.increment_version(result)  # as the op does for its mutated argument
        return result
    torch.ops.lora_kernels.lora_shrink(x, a_stacks, scales, scale, ranks, index.data, index.num_adapters,
                                       index.capacity, index.padded, chosen,
                                       result.unsqueeze(0) if out is None else out)
    return result


def lora_expand_(y: Tensor, t: Tensor, lora_b_stack: Stacks, index: AdapterIndex,
                 ranks: Optional[Tensor] = None, offset: int = 0, *, backend: str = "auto") -> Tensor:
    """The expand half, in place: each token's shrink result times its adapter's B, added to y;
    one launch for every slice (up to 4 per launch) on the Triton and CUDA C++ backends.

    Semantics (plain torch; i = index's token_adapter[m], r_i = ranks[i] or r_max, B_s the stacks
    [L, N_s, r_max], t [S, M, r_max] for a list of stacks, [M, r_max] for one)::

        col = offset
        for s in range(S):
            for m in range(M):
                if i >= 0:
                    y[m, col:col + N_s] += B_s[i, :, :r_i] @ t[s, m, :r_i]   # fp32 sum, rounded once
            col += N_s
        # every other element of y (no-adapter rows, columns outside the slices) keeps its bits

    Args:
        y: [M, N_y] float16 / bfloat16 / float32 (float64 on the torch backend), any strides
            with no two elements at one address; updated in place. offset + sum(N_s) <= N_y; one
            stack at offset 0 must cover y exactly (N_0 = N_y).
        t: float32 (e.g. from lora_shrink), sharing no memory with y; columns at or past
            ranks[i] are never read.
        lora_b_stack: [L, N, r_max] or a list of S stacks [L, N_s, r_max] (one dtype; the widths
            may differ, as q and k/v do under GQA): y's dtype or float32; columns at or past
            ranks[i] never read.
        offset: the first column of y the slices write (tensor-parallel row shards,
            vLLM's offset_start).
        index, ranks, backend: as in lora_shrink.

    Returns: y.
    """
    op = "lora_expand_"
    if _FAST_COMMON and _expand_common(y, t, lora_b_stack, index, ranks, offset, backend):
        return y
    b_stacks, as_list, names = _stack_list(op, "lora_b_stack", lora_b_stack)
    _validate_expand(op, y, t, b_stacks, names, as_list, index, ranks, offset)
    chosen = choose_backend(op, y.device, y.dtype, t.shape[-1], backend, t_dtype=t.dtype)
    if _eager_direct(y, t, ranks, index.data, *b_stacks):
        if chosen == "torch":  # _expand's work on t's 2-D slices, no [1, M, r_max] view of one
            _expand_torch(y, t.unbind(0) if as_list else (t,), b_stacks, ranks, index, offset)
        else:
            _expand(y, t if as_list else t.unsqueeze(0), b_stacks, ranks, index, offset, chosen)
        torch.autograd.graph.increment_version(y)  # as the op does for its mutated argument
        return y
    torch.ops.lora_kernels.lora_expand(y, t if as_list else t.unsqueeze(0), b_stacks, ranks, index.data, index.num_adapters, index.capacity,
                                       offset, chosen)
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, lora_a_stack: Tensor, lora_b_stack: Tensor,
                      index: AdapterIndex, scales: Union[Tensor, float, None], bias: Optional[Tensor] = None,
                      ranks: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """A linear layer whose every token adds its own LoRA adapter, in one fused pass.

    Semantics (plain torch; i = index's token_adapter[m], r_i = ranks[i] or r_max)::

        y = x @ weight.T + bias
        for m in range(M):
            if i >= 0:
                y[m] += scales[i] * lora_b_stack[i, :, :r_i] @ (lora_a_stack[i, :r_i] @ x[m])
        # computed in fp32 (the rank-r intermediate included) and rounded once

    Args:
        x: [..., K] float16 / bfloat16 / float32 (float64 on the torch backend); its leading
            dimensions flattened give the M tokens of `index`.
        weight: [N, K], x's dtype. bias: [N] (x's dtype or float32) or None.
        lora_a_stack: [L, r_max, K], lora_b_stack: [L, N, r_max]: x's dtype or float32, one dtype.
        index, scales, ranks, backend: as in lora_shrink.

    Returns: y [..., N] in x's dtype. Inference only (no autograd formula).
    """
    op = "multi_lora_linear"
    if isinstance(index, AdapterIndex):
        scales, scale = _scale_args(op, scales, index.num_adapters)
    else:
        scale = 1.0
    if _FAST_COMMON:
        y = _linear_common(x, weight, lora_a_stack, lora_b_stack, index, scales, scale, bias, ranks, backend)
        if y is not None:
            return y
    _validate_linear(op, x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks)
    chosen = choose_backend(op, x.device, x.dtype, lora_a_stack.shape[1], backend)
    K, N = x.shape[-1], weight.shape[0]
    M = math.prod(x.shape[:-1])  # not reshape(-1, K): K = 0 would leave -1 undetermined
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(M, K)
    if _eager_direct(x, weight, lora_a_stack, lora_b_stack, scales, bias, ranks, index.data):
        y = _linear(x2, weight, lora_a_stack, lora_b_stack, scales, scale, bias, ranks, index, index.num_adapters,
                    chosen)
    else:
        y = torch.ops.lora_kernels.multi_lora_linear(x2, weight, lora_a_stack, lora_b_stack, scales, scale, bias,
                                                     ranks, index.data, index.num_adapters, index.capacity, chosen)
    return y if flat else y.reshape(*x.shape[:-1], N)
