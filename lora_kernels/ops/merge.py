"""In-place merge / unmerge: ``weight += scale * lora_b @ lora_a`` and its inverse.

Validation and dispatch. The torch backend (reference.py) is what runs until the fused merge
kernels land (issue "In-place merge and unmerge kernels").
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import backends, reference
from .._validation import check_adapter_dtype, check_same_device, check_scale, check_shape, check_tensor, fail

TensorOrList = Union[Tensor, Sequence[Tensor]]


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
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        sfx = f"[{i}]" if len(a_list) > 1 else ""
        check_tensor(op, "lora_a" + sfx, a, ndim=2)
        check_tensor(op, "lora_b" + sfx, b, ndim=2)
        r = a.shape[0]
        layout = "[K, N] (fan_in_fan_out)" if fan_in_fan_out else "[N, K]"
        check_shape(op, "lora_a" + sfx, a, (r, K), f"rank r, K from weight {layout}")
        check_shape(op, "lora_b" + sfx, b, (N, r), f"N from weight {layout}, r = lora_a{sfx}.shape[0]")
        check_adapter_dtype(op, "lora_a" + sfx, a, weight.dtype)
        check_adapter_dtype(op, "lora_b" + sfx, b, weight.dtype)
        check_same_device(op, weight=weight, **{"lora_a" + sfx: a, "lora_b" + sfx: b})
    return a_list, b_list, s_list


def _apply(op, sign, weight, lora_a, lora_b, scale, fan_in_fan_out, backend):
    a_list, b_list, s_list = _validate(op, weight, lora_a, lora_b, scale, fan_in_fan_out)
    backends.resolve(op, backend, weight.device, prefer=())
    fn = reference.merge_ if sign > 0 else reference.unmerge_
    return fn(weight, a_list, b_list, s_list, fan_in_fan_out=fan_in_fan_out)


def merge_(weight: Tensor, lora_a: TensorOrList, lora_b: TensorOrList, scale, *,
           fan_in_fan_out: bool = False, backend: str = "auto") -> Tensor:
    """In place, one rounding per element::

        weight += sum_i scale[i] * lora_b[i] @ lora_a[i]        # (.T of it if fan_in_fan_out)

    weight [N, K] ([K, N] if fan_in_fan_out); lora_a [r, K]; lora_b [N, r]; scale a float. Lists
    of lora_a / lora_b / scale merge several adapters in one call. Returns weight."""
    return _apply("merge_", +1, weight, lora_a, lora_b, scale, fan_in_fan_out, backend)


def unmerge_(weight: Tensor, lora_a: TensorOrList, lora_b: TensorOrList, scale, *,
             fan_in_fan_out: bool = False, backend: str = "auto") -> Tensor:
    """In place: ``weight -= sum_i scale[i] * lora_b[i] @ lora_a[i]`` (the inverse of merge_)."""
    return _apply("unmerge_", -1, weight, lora_a, lora_b, scale, fan_in_fan_out, backend)
