"""Plain-torch implementation of every op: the CPU backend and the test oracle.

Numerics follow DESIGN.md section 4: everything is computed in float32 (float64 for float64
inputs) and rounded once to the output dtype. Called with float64 tensors these functions are the
float64 oracle the tests compare against.

No input validation here: the public ops in ``lora_kernels.ops`` validate before dispatching.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation dtype."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def lora_input(x: torch.Tensor, dropout_p: float = 0.0, training: bool = False,
               dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PEFT's dropout placement: the LoRA branch sees ``dropout(x)``, the base sees ``x``.

    dropout_mask: bool [..., K] (True = keep), used instead of drawing one; scaled by 1/(1-p)."""
    if dropout_mask is not None:
        return x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    if training and dropout_p > 0.0:
        return F.dropout(x, dropout_p, training=True)
    return x


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, bias: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
                training: bool = False, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T

    x [..., K], weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] | None -> y [..., N] in
    x.dtype. Differentiable (plain torch autograd)."""
    acc = acc_dtype(x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
    xa = x.to(acc)
    y = F.linear(xa, weight.to(acc), None if bias is None else bias.to(acc))
    t = lora_input(x, dropout_p, training, dropout_mask).to(acc) @ lora_a.to(acc).t()
    y = y + scale * (t @ lora_b.to(acc).t())
    return y.to(x.dtype)


def _as_lists(lora_a, lora_b, scale):
    if isinstance(lora_a, torch.Tensor):
        return [lora_a], [lora_b], [scale]
    return list(lora_a), list(lora_b), list(scale)


def lora_delta(weight: torch.Tensor, lora_a, lora_b, scale, fan_in_fan_out: bool = False) -> torch.Tensor:
    """sum_i scale_i * lora_b_i @ lora_a_i in the accumulation dtype, laid out like `weight`
    ([N, K], or [K, N] when fan_in_fan_out)."""
    a_list, b_list, s_list = _as_lists(lora_a, lora_b, scale)
    acc = acc_dtype(weight.dtype, *(a.dtype for a in a_list), *(b.dtype for b in b_list))
    delta = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for a, b, s in zip(a_list, b_list, s_list):
        d = float(s) * (b.to(acc) @ a.to(acc))
        delta += d.t() if fan_in_fan_out else d
    return delta


@torch.no_grad()
def merge_(weight: torch.Tensor, lora_a: Union[torch.Tensor, Sequence[torch.Tensor]],
           lora_b: Union[torch.Tensor, Sequence[torch.Tensor]], scale, *,
           fan_in_fan_out: bool = False) -> torch.Tensor:
    """In place: weight += sum_i scale_i * lora_b_i @ lora_a_i, one rounding per element.

    weight [N, K] ([K, N] if fan_in_fan_out), lora_a [r, K], lora_b [N, r]; lists merge several."""
    delta = lora_delta(weight, lora_a, lora_b, scale, fan_in_fan_out)
    weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))
    return weight


@torch.no_grad()
def unmerge_(weight: torch.Tensor, lora_a, lora_b, scale, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """In place: weight -= sum_i scale_i * lora_b_i @ lora_a_i (the inverse of merge_, up to rounding)."""
    delta = lora_delta(weight, lora_a, lora_b, scale, fan_in_fan_out)
    weight.copy_((weight.to(delta.dtype) - delta).to(weight.dtype))
    return weight
