"""Fused LoRA linear: validation, backend dispatch, the registered op and its autograd formula.

Layers: kernel (``lora_kernels/triton/lora_linear.py``) -> launcher (same file) -> the custom op
``torch.ops.lora_kernels.lora_linear_fwd`` + autograd (here) -> ``FusedLoRALinear`` (layers.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import backends, reference
from .._validation import (check_adapter_dtype, check_probability, check_same_device, check_scale,
                           check_shape, check_tensor, fail)

OP = "lora_linear"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_RANK = 128  # t [BLOCK_M, r] lives in registers beside the accumulator


def _validate(x, weight, lora_a, lora_b, scale, bias) -> float:
    check_tensor(OP, "x", x, min_ndim=1)
    check_tensor(OP, "weight", weight, ndim=2)
    check_tensor(OP, "lora_a", lora_a, ndim=2)
    check_tensor(OP, "lora_b", lora_b, ndim=2)
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1)
    check_same_device(OP, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)
    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_a.shape[0]
    check_shape(OP, "weight", weight, (N, K), "N outputs, K = x.shape[-1]")
    if r < 1:
        fail(OP, f"lora_a must have at least one row (rank r >= 1), got shape {list(lora_a.shape)}")
    check_shape(OP, "lora_a", lora_a, (r, K), "rank r, K = x.shape[-1]")
    check_shape(OP, "lora_b", lora_b, (N, r), "N = weight.shape[0], rank r = lora_a.shape[0]")
    if bias is not None:
        check_shape(OP, "bias", bias, (N,), "N = weight.shape[0]")
    if weight.dtype != x.dtype:
        fail(OP, f"weight must have x's dtype ({x.dtype}), got {weight.dtype}", TypeError)
    check_adapter_dtype(OP, "lora_a", lora_a, x.dtype)
    if lora_b.dtype != lora_a.dtype:
        fail(OP, f"lora_b must have lora_a's dtype ({lora_a.dtype}), got {lora_b.dtype}", TypeError)
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        fail(OP, f"bias must have x's dtype ({x.dtype}) or float32, got {bias.dtype}", TypeError)
    return check_scale(OP, "scale", scale)


def _input_reason(x: Tensor, lora_a: Tensor):
    def reason(backend: str) -> Optional[str]:
        if backend == "triton":
            if x.dtype not in TRITON_DTYPES:
                return f"triton: dtype {x.dtype} is not supported (float16, bfloat16, float32)"
            if lora_a.shape[0] > TRITON_MAX_RANK:
                return f"triton: rank {lora_a.shape[0]} exceeds the kernel's limit of {TRITON_MAX_RANK}"
        if backend == "cuda":
            from .. import cuda
            return cuda.input_reason(x.dtype, lora_a.dtype, lora_a.shape[0])
        return None
    return reason


# Under "auto" on CUDA tensors: Triton first, the CUDA C++ kernel when Triton cannot run (e.g. a
# serving image without triton). Which of the two is faster per shape is to be measured on an
# H100/H200 (bench/, suite forward, ours_triton vs ours_cuda); no measurement exists yet, so
# this order is a default, not a result.
AUTO_PREFERENCE = ("triton", "cuda")


def choose_backend(x: Tensor, lora_a: Tensor, backend: str = "auto") -> str:
    """The backend that runs these inputs (see backends.py for the rule)."""
    return backends.resolve(OP, backend, x.device, AUTO_PREFERENCE, _input_reason(x, lora_a))


# ---------------------------------------------------------------------------------------------
# The registered op: 2-D x, validated inputs, a concrete backend.
# ---------------------------------------------------------------------------------------------

@torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                    bias: Optional[Tensor], backend: str, save_t: bool) -> Tuple[Tensor, Tensor]:
    """(y, t): y = x @ weight.T + bias + scale * t @ lora_b.T, t = x @ lora_a.T in fp32.

    x [M, K], weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] | None; y [M, N] in x.dtype;
    t [M, r] float32 when save_t (kept for the backward), else an empty [0, r]."""
    if backend == "triton":
        from ..triton.lora_linear import lora_linear_fwd as launch
        return launch(x, weight, lora_a, lora_b, scale, bias, save_t)
    if backend == "cuda":
        from ..cuda import lora_linear_fwd as launch
        return launch(x, weight, lora_a, lora_b, scale, bias, save_t)
    y = reference.lora_linear(x, weight, lora_a, lora_b, scale, bias)
    acc = reference.acc_dtype(x.dtype, lora_a.dtype)
    t = (x.to(acc) @ lora_a.to(acc).t()).float() if save_t else x.new_empty((0, lora_a.shape[0]), dtype=torch.float32)
    return y, t


@lora_linear_fwd.register_fake
def _(x, weight, lora_a, lora_b, scale, bias, backend, save_t):
    M, r = x.shape[0], lora_a.shape[0]
    return (x.new_empty((M, weight.shape[0])),
            x.new_empty((M if save_t else 0, r), dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, scale, bias, backend, save_t = inputs
    ctx.scale = scale
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, lora_a, lora_b, output[1] if save_t else None)


def _backward(ctx, dy, _dt):
    """dx = dy W + s (dy B) A;  dA = s (dy B)^T x;  dB = s dy^T t;  dbias = sum dy;  dW = dy^T x.

    Plain torch ops with fp32 accumulation for the rank-r products (the fused backward kernel is
    a later issue)."""
    x, weight, lora_a, lora_b, t = ctx.saved_tensors
    s = ctx.scale
    need_x, need_w, need_a, need_b, _, need_bias, _, _ = ctx.needs_input_grad
    dx = dw = da = db = dbias = None
    dy = dy.contiguous()
    acc = reference.acc_dtype(dy.dtype, lora_a.dtype)
    if need_x or need_a:
        u = dy.to(acc) @ lora_b.to(acc)  # dy.B [M, r]
    if need_x:
        dx = ((dy @ weight).to(acc) + s * (u @ lora_a.to(acc))).to(x.dtype)
    if need_w:
        dw = (dy.t() @ x).to(weight.dtype)
    if need_a:
        da = (s * (u.t() @ x.to(acc))).to(lora_a.dtype)
    if need_b:
        if t is None:
            t = x.to(acc) @ lora_a.to(acc).t()
        db = (s * (dy.to(acc).t() @ t.to(acc))).to(lora_b.dtype)
    if need_bias:
        dbias = dy.to(acc).sum(0).to(ctx.bias_dtype)
    return dx, dw, da, db, None, dbias, None, None


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Optional[Tensor] = None, *, dropout_p: float = 0.0, training: bool = False,
                backend: str = "auto") -> Tensor:
    """LoRA linear layer in one fused pass.

    Semantics (plain torch; dropout on the LoRA input only, as PEFT)::

        y = x @ weight.T + bias + scale * (dropout(x, dropout_p, training) @ lora_a.T) @ lora_b.T

    Args:
        x: [..., K] float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
        weight: [N, K], x's dtype.
        lora_a: [r, K], x's dtype or float32. lora_b: [N, r], lora_a's dtype.
        scale: finite float (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        bias: [N] or None.
        dropout_p, training: LoRA dropout probability, applied only when ``training``.
        backend: "auto" | "triton" | "cuda" | "torch" (see ``lora_kernels.backends``).

    Returns: y [..., N] in x's dtype. Differentiable in x, lora_a, lora_b, bias (and weight when
    it requires grad).
    """
    scale = _validate(x, weight, lora_a, lora_b, scale, bias)
    dropout_p = check_probability(OP, "dropout_p", dropout_p)
    chosen = choose_backend(x, lora_a, backend)
    K, N = x.shape[-1], weight.shape[0]
    if training and dropout_p > 0.0:
        # Unfused composition with PEFT's exact formula; in-kernel dropout is a later issue.
        x_drop = F.dropout(x, dropout_p, training=True).to(lora_a.dtype)
        lora = F.linear(F.linear(x_drop, lora_a), lora_b) * scale
        return F.linear(x, weight, bias) + lora.to(x.dtype)
    save_t = torch.is_grad_enabled() and lora_b.requires_grad
    y, _ = torch.ops.lora_kernels.lora_linear_fwd(x.reshape(-1, K), weight, lora_a, lora_b, scale,
                                                  bias, chosen, save_t)
    return y.reshape(*x.shape[:-1], N)
