"""The CUDA C++ in-place merge (``csrc/merge/merge.cuh``): launchers with the contract of
``lora_kernels.triton.merge`` (and ``reference.py``'s argument names), so that the op layer
(``lora_kernels.ops.merge``) runs either backend the same way.

Each launcher is one launch of ``torch.ops.lora_kernels.cuda_merge_`` on validated tensors as they
are: any weight strides (row / column slices of a fused weight, column-major, fan_in_fan_out), any
adapter strides, 16-bit adapters of the weight's dtype or fp32 ones (several adapters arrive
packed into one fp32 pair by the op layer). Nothing is copied. The kernel forms delta on tensor
cores in fp32 (16-bit adapters: exact products; fp32 adapters: 3xTF32) and rounds once, as the
Triton kernel does; the exact-unmerge codes are ``reference.py``'s.

Loading the extension (AOT build or a JIT build on first use) is ``loader``'s job.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import reference
from .._validation import check_no_overlap
from ..errors import BackendUnavailable
from . import loader

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODE_APPLY, MODE_COUNT_NONFINITE, MODE_MERGE_EXACT, MODE_UNMERGE_EXACT = 0, 1, 2, 3  # csrc/merge/merge_plan.h


def input_reason(weight_dtype: torch.dtype) -> Optional[str]:
    """None when the CUDA merge kernel takes a weight of this dtype, else why not."""
    if weight_dtype not in DTYPES:
        return (f"cuda: dtype {str(weight_dtype).replace('torch.', '')} is not supported by the CUDA merge "
                f"kernel (float16, bfloat16, float32)")
    return None


def registered() -> bool:
    """Whether the loaded extension has the merge op (a build older than it does not)."""
    return hasattr(torch.ops.lora_kernels, "cuda_merge_")


def _op():
    loader.load()
    if not registered():
        raise BackendUnavailable(
            "cuda: the loaded lora_kernels._C has no merge kernel (it was built before csrc/merge.cu existed); "
            "rebuild it (pip install --no-build-isolation -e ., or python -m lora_kernels.build --jit)")
    return torch.ops.lora_kernels.cuda_merge_


def _launch(mode: int, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
            fan_in_fan_out: bool, *, subtract: bool = False, gated: bool = False,
            status: Optional[torch.Tensor] = None, codes: Optional[torch.Tensor] = None,
            escape_index: Optional[torch.Tensor] = None, escape_value: Optional[torch.Tensor] = None) -> None:
    if weight.numel() == 0:
        return
    # weight is written in place; the kernel reads the adapters (and the residual's buffers) with
    # plain loads that another CTA's writes to weight would race: none may share its memory.
    check_no_overlap("merge_", "weight", weight, lora_a=lora_a, lora_b=lora_b, status=status, codes=codes,
                     escape_index=escape_index, escape_value=escape_value)
    _op()(weight, lora_a, lora_b, float(scale), fan_in_fan_out, mode, subtract, gated, status, codes,
       escape_index, escape_value)


def apply_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
           subtract: bool = False, fan_in_fan_out: bool = False, status: Optional[torch.Tensor] = None,
           gated: bool = False) -> None:
    """In place: weight = round(weight ± scale * lora_b @ lora_a) (skipped if gated and
    status[1] != 0). weight [N, K] ([K, N] if fan_in_fan_out), lora_a [R, K], lora_b [N, R]."""
    _launch(MODE_APPLY, weight, lora_a, lora_b, scale, fan_in_fan_out, subtract=subtract, gated=gated,
            status=status)


def count_nonfinite_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                     subtract: bool = False, fan_in_fan_out: bool = False, status: torch.Tensor) -> None:
    """status[1] += number of non-finite round(weight ± delta) elements; weight is only read."""
    _launch(MODE_COUNT_NONFINITE, weight, lora_a, lora_b, scale, fan_in_fan_out, subtract=subtract,
            status=status)


def merge_exact_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                 fan_in_fan_out: bool = False, codes: torch.Tensor, escape_index: torch.Tensor,
                 escape_value: torch.Tensor, status: torch.Tensor, gated: bool = False) -> None:
    """The kernel form of ``reference.merge_exact_`` (same arguments, same codes; escape-table
    slots in another order, which the unmerge does not depend on)."""
    _launch(MODE_MERGE_EXACT, weight, lora_a, lora_b, scale, fan_in_fan_out, gated=gated, status=status,
            codes=codes, escape_index=escape_index, escape_value=escape_value)


def unmerge_exact_(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
                   fan_in_fan_out: bool = False, codes: torch.Tensor, escape_index: torch.Tensor,
                   escape_value: torch.Tensor, num_escapes: int) -> None:
    """The kernel form of ``reference.unmerge_exact_``: one pass over W and the codes, then the
    escape table's first num_escapes entries scattered into W."""
    _launch(MODE_UNMERGE_EXACT, weight, lora_a, lora_b, scale, fan_in_fan_out, codes=codes)
    reference.scatter_escapes_(weight, escape_index, escape_value, num_escapes, fan_in_fan_out)
