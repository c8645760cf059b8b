"""Multi-adapter (segmented) LoRA ops: validation, backend dispatch and the registered ops.

Layers: kernels (Triton: ``lora_kernels/triton/multi_lora.py``; CUDA C++: ``csrc/multi_lora.cuh``
and ``csrc/multi_lora_linear.cuh``) -> launchers (the Triton file; ``lora_kernels/cuda/multi_lora.py``) -> the
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
from typing import Optional

import torch
from torch import Tensor

from .. import backends, reference
from ..errors import BackendUnavailable
from .._validation import (check_adapter_dtype, check_index, check_ranks, check_same_device,
                           check_shape, check_tensor, fail)
from ..serving import AdapterIndex

OPS = ("lora_shrink", "lora_expand_", "multi_lora_linear")
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_RANK = 128  # t [BLOCK_M, r_max] fp32 lives in registers beside the accumulator


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

def _check_scales(op: str, scales, num_adapters: int) -> None:
    check_tensor(op, "scales", scales, ndim=1)
    check_shape(op, "scales", scales, (num_adapters,), "one scale per adapter slot, L = index.num_adapters")


def _validate_shrink(op, x, lora_a_stack, index, scales, ranks) -> None:
    check_tensor(op, "x", x, ndim=2)
    check_tensor(op, "lora_a_stack", lora_a_stack, ndim=3)
    check_index(op, index, x.shape[0])
    L, R = index.num_adapters, lora_a_stack.shape[1]
    check_shape(op, "lora_a_stack", lora_a_stack, (L, R, x.shape[1]),
                "L = index.num_adapters, r_max, K = x.shape[-1]")
    if R < 1:
        fail(op, f"lora_a_stack must have r_max >= 1 rows per adapter, got shape {list(lora_a_stack.shape)}")
    _check_scales(op, scales, L)
    check_same_device(op, x=x, lora_a_stack=lora_a_stack, scales=scales, ranks=ranks, index=index.data)
    check_adapter_dtype(op, "lora_a_stack", lora_a_stack, x.dtype)
    check_ranks(op, ranks, L, R)


def _validate_expand(op, y, t, lora_b_stack, index, ranks) -> None:
    check_tensor(op, "y", y, ndim=2)
    check_tensor(op, "t", t, dtypes=(torch.float32, torch.float64), ndim=2)
    check_tensor(op, "lora_b_stack", lora_b_stack, ndim=3)
    check_index(op, index, y.shape[0])
    L, R = index.num_adapters, t.shape[1]
    if R < 1:
        fail(op, f"t must have r_max >= 1 columns, got shape {list(t.shape)}")
    check_shape(op, "t", t, (y.shape[0], R), "M = y.shape[0] rows, r_max columns")
    check_shape(op, "lora_b_stack", lora_b_stack, (L, y.shape[1], R),
                "L = index.num_adapters, N = y.shape[1], r_max = t.shape[1]")
    check_same_device(op, y=y, t=t, lora_b_stack=lora_b_stack, ranks=ranks, index=index.data)
    check_adapter_dtype(op, "lora_b_stack", lora_b_stack, y.dtype, base_name="y")
    check_ranks(op, ranks, L, R)


def _validate_linear(op, x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks) -> None:
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
    _check_scales(op, scales, L)
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


def choose_backend(op: str, device: torch.device, dtype: torch.dtype, r_max: int, backend: str = "auto",
                   t_dtype: Optional[torch.dtype] = None) -> str:
    """The backend that runs `op` on these inputs (see backends.py for the rule)."""
    return backends.resolve(op, backend, device, AUTO_PREFERENCE, _input_reason(dtype, r_max, t_dtype))


def _triton_vectors(scales: Optional[Tensor], ranks: Optional[Tensor]):
    """The kernels read scales as fp32 and both vectors with unit stride."""
    if scales is not None:
        scales = scales.to(torch.float32).contiguous()
    return scales, (None if ranks is None else ranks.contiguous())


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


@torch.library.custom_op("lora_kernels::lora_shrink", mutates_args=())
def lora_shrink_op(x: Tensor, lora_a_stack: Tensor, scales: Tensor, ranks: Optional[Tensor],
                   index_data: Tensor, num_adapters: int, backend: str) -> Tensor:
    """t [M, r_max] (float32; float64 for float64 inputs on the torch backend)."""
    index = AdapterIndex.from_data(index_data, x.shape[0], num_adapters)
    if backend == "triton":
        from ..triton.multi_lora import lora_shrink as launch
        return launch(x, lora_a_stack, index, *_triton_vectors(scales, ranks))
    if backend == "cuda":
        from ..cuda.multi_lora import multi_lora_shrink as launch
        return launch(x, lora_a_stack, index, scales, ranks)
    _check_torch(backend)
    return reference.lora_shrink(x, lora_a_stack, index.token_adapter, scales, ranks)


@lora_shrink_op.register_fake
def _(x, lora_a_stack, scales, ranks, index_data, num_adapters, backend):
    return x.new_empty((x.shape[0], lora_a_stack.shape[1]), dtype=_t_dtype(x.dtype, lora_a_stack.dtype))


@torch.library.custom_op("lora_kernels::lora_expand", mutates_args=("y",))
def lora_expand_op(y: Tensor, t: Tensor, lora_b_stack: Tensor, ranks: Optional[Tensor],
                   index_data: Tensor, num_adapters: int, backend: str) -> None:
    """In place on y [M, N]."""
    index = AdapterIndex.from_data(index_data, y.shape[0], num_adapters)
    if backend == "triton":
        from ..triton.multi_lora import lora_expand_ as launch
        launch(y, t, lora_b_stack, index, _triton_vectors(None, ranks)[1])
        return
    if backend == "cuda":
        from ..cuda.multi_lora import multi_lora_expand_ as launch
        launch(y, t, lora_b_stack, index, ranks)
        return
    _check_torch(backend)
    reference.lora_expand_(y, t, lora_b_stack, index.token_adapter, ranks)


@lora_expand_op.register_fake
def _(y, t, lora_b_stack, ranks, index_data, num_adapters, backend):
    return None


@torch.library.custom_op("lora_kernels::multi_lora_linear", mutates_args=())
def multi_lora_linear_op(x: Tensor, weight: Tensor, lora_a_stack: Tensor, lora_b_stack: Tensor, scales: Tensor,
                         bias: Optional[Tensor], ranks: Optional[Tensor], index_data: Tensor, num_adapters: int,
                         backend: str) -> Tensor:
    """y [M, N] in x.dtype."""
    index = AdapterIndex.from_data(index_data, x.shape[0], num_adapters)
    if backend == "triton":
        from ..triton.multi_lora import multi_lora_linear as launch
        scales32, ranks = _triton_vectors(scales, ranks)
        return launch(x, weight, lora_a_stack, lora_b_stack, index, scales32, bias, ranks)
    if backend == "cuda":
        from ..cuda.multi_lora import multi_lora_linear as launch
        return launch(x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks)
    _check_torch(backend)
    return reference.multi_lora_linear(x, weight, lora_a_stack, lora_b_stack, index.token_adapter, scales, bias, ranks)


@multi_lora_linear_op.register_fake
def _(x, weight, lora_a_stack, lora_b_stack, scales, bias, ranks, index_data, num_adapters, backend):
    return x.new_empty((x.shape[0], weight.shape[0]))


# ---------------------------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------------------------

def lora_shrink(x: Tensor, lora_a_stack: Tensor, index: AdapterIndex, scales: Tensor,
                ranks: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """The shrink half of a multi-adapter LoRA layer: each token times its adapter's A, scaled.

    Semantics (plain torch; i = index's token_adapter[m], r_i = ranks[i] or r_max)::

        t = zeros(M, r_max, dtype=float32)
        for m in range(M):
            if i >= 0:
                t[m, :r_i] = scales[i] * lora_a_stack[i, :r_i] @ x[m]

    Args:
        x: [M, K] float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
        lora_a_stack: [L, r_max, K], x's dtype or float32; rows at or past ranks[i] are never read.
        index: AdapterIndex of the batch (M tokens, L = index.num_adapters slots).
        scales: [L] float tensor (lora_alpha / r per slot).
        ranks: [L] int tensor with 0 <= ranks[i] <= r_max, or None (every slot has rank r_max).
        backend: "auto" | "triton" | "cuda" | "torch".

    Returns: t [M, r_max] float32 (float64 for float64 inputs): zero for tokens with no adapter
    and past each adapter's rank. Every element is written.
    """
    op = "lora_shrink"
    _validate_shrink(op, x, lora_a_stack, index, scales, ranks)
    chosen = choose_backend(op, x.device, x.dtype, lora_a_stack.shape[1], backend)
    return torch.ops.lora_kernels.lora_shrink(x, lora_a_stack, scales, ranks, index.data, index.num_adapters, chosen)


def lora_expand_(y: Tensor, t: Tensor, lora_b_stack: Tensor, index: AdapterIndex,
                 ranks: Optional[Tensor] = None, *, backend: str = "auto") -> Tensor:
    """The expand half, in place: each token's shrink result times its adapter's B, added to y.

    Semantics (plain torch; i = index's token_adapter[m], r_i = ranks[i] or r_max)::

        for m in range(M):
            if i >= 0:
                y[m] += lora_b_stack[i, :, :r_i] @ t[m, :r_i]     # fp32 sum, rounded once
            # rows with no adapter are not written: their bits stay as they were

    Args:
        y: [M, N] float16 / bfloat16 / float32 (float64 on the torch backend), any strides;
            updated in place.
        t: [M, r_max] float32 (e.g. from lora_shrink); columns at or past ranks[i] are never read.
        lora_b_stack: [L, N, r_max], y's dtype or float32; columns at or past ranks[i] never read.
        index, ranks, backend: as in lora_shrink.

    Returns: y.
    """
    op = "lora_expand_"
    _validate_expand(op, y, t, lora_b_stack, index, ranks)
    chosen = choose_backend(op, y.device, y.dtype, t.shape[1], backend, t_dtype=t.dtype)
    torch.ops.lora_kernels.lora_expand(y, t, lora_b_stack, ranks, index.data, index.num_adapters, chosen)
    return y


def multi_lora_linear(x: Tensor, weight: Tensor, lora_a_stack: Tensor, lora_b_stack: Tensor,
                      index: AdapterIndex, scales: Tensor, bias: Optional[Tensor] = None,
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
    _validate_linear(op, x, weight, lora_a_stack, lora_b_stack, index, scales, bias, ranks)
    chosen = choose_backend(op, x.device, x.dtype, lora_a_stack.shape[1], backend)
    K, N = x.shape[-1], weight.shape[0]
    y = torch.ops.lora_kernels.multi_lora_linear(x.reshape(-1, K), weight, lora_a_stack, lora_b_stack, scales,
                                                 bias, ranks, index.data, index.num_adapters, chosen)
    return y.reshape(*x.shape[:-1], N)
