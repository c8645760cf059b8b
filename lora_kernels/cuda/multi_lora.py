"""The CUDA C++ multi-adapter (segmented) shrink / expand and fused linear
(``csrc/multi_lora/multi_lora.cuh``, ``csrc/multi_lora/multi_lora_linear.cuh``): input checks and launchers, with the
contract of ``lora_kernels.triton.multi_lora`` so that ``lora_kernels.ops.multi_lora`` runs either
backend the same way. Loading the extension is ``loader``'s job.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch

from . import loader
from .lora_linear import CUDA_DTYPES, unit_stride_along_k

MULTI_MAX_R = 128  # csrc/multi_lora/multi_lora_plan.h kMultiMaxRank: the expand keeps t [rows, r_max] on chip
# The shrink's work-list piece size follows the Triton launcher's rule (triton/multi_lora.py,
# segment_config; reasoning there, not measured): 64-token pieces (the 64 x 64 tile, each A tile
# reused over 64 tokens) only when there are at least 2 of them per SM, else 16-token pieces
# (more CTAs for the few pieces of a small batch). The expand always takes 64-token pieces: its
# CTAs come from N tiles, and a piece of <= 16 tokens is one piece in either list.
MULTI_PREFILL_PIECES_PER_SM = 2
MULTI_EXPAND_ITEM_M = 64
_NUM_SMS: Dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def multi_input_reason(dtype: torch.dtype, r_max: int, t_dtype: Optional[torch.dtype] = None) -> Optional[str]:
    """None when the CUDA multi-adapter kernels take inputs of this dtype and r_max, else why not.
    (Adapters may be in x's dtype or float32, as the ops' validation allows.)"""
    if dtype not in CUDA_DTYPES:
        return (f"cuda: dtype {str(dtype).replace('torch.', '')} is not supported by the CUDA multi-adapter "
                f"kernels (float16, bfloat16); float32 runs on backend='triton'")
    if r_max > MULTI_MAX_R:
        return f"cuda: r_max {r_max} exceeds the CUDA multi-adapter kernels' limit of {MULTI_MAX_R}"
    if t_dtype is not None and t_dtype != torch.float32:
        return f"cuda: t must be float32, got {str(t_dtype).replace('torch.', '')}"
    return None


def shrink_item_m(num_tokens: int, device: torch.device) -> int:
    """16 or 64: the work list (and tile) the shrink uses for a batch of `num_tokens` tokens."""
    pieces64 = (num_tokens + 63) // 64
    return 64 if pieces64 >= MULTI_PREFILL_PIECES_PER_SM * _num_sms(device) else 16


def _ranks_int32(ranks: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read ranks as contiguous int32 (int64 ranks cost one tiny cast kernel)."""
    return None if ranks is None else ranks.to(torch.int32).contiguous()


def multi_lora_shrink(x: torch.Tensor, lora_a_stack: torch.Tensor, index, scales: torch.Tensor,
                      ranks: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
                      item_m: int = 0) -> torch.Tensor:
    """t [M, r_max] float32 = lora_shrink on validated inputs (see reference.lora_shrink): x [M, K]
    float16/bfloat16, lora_a_stack [L, r_max, K] in x's dtype or float32, index an AdapterIndex,
    scales [L], ranks [L] int | None. Every element of t is written. `out` receives t (tests
    poison it); item_m (16 or 64) overrides the work-list choice (tests reach both tiles).

    x and the stack are read along K as contiguous runs: a stack whose last dimension is not
    unit-stride is copied on every call (keep stacks contiguous, as MultiLoRALinear does)."""
    loader.load()
    M = x.shape[0]
    R = lora_a_stack.shape[1]
    t = torch.empty((M, R), dtype=torch.float32, device=x.device) if out is None else out
    if M == 0:
        return t
    item_m = item_m or shrink_item_m(M, x.device)
    a = lora_a_stack if lora_a_stack.shape[2] <= 1 or lora_a_stack.stride(2) == 1 else lora_a_stack.contiguous()
    torch.ops.lora_kernels.cuda_lora_shrink(unit_stride_along_k(x), a, scales.to(torch.float32).contiguous(),
                                            _ranks_int32(ranks), index.work(item_m), index.sorted_tokens, item_m, t)
    return t


def multi_lora_expand_(y: torch.Tensor, t: torch.Tensor, lora_b_stack: torch.Tensor, index,
                       ranks: Optional[torch.Tensor], item_m: int = MULTI_EXPAND_ITEM_M) -> torch.Tensor:
    """In place y[m] += lora_b_stack[i, :, :rank_i] @ t[m, :rank_i] for tokens with an adapter
    (see reference.lora_expand_) on validated inputs: y [M, N] float16/bfloat16 (any strides),
    t [M, r_max] float32, lora_b_stack [L, N, r_max] in y's dtype or float32 (any strides).
    Rows of tokens with no adapter are never stored to."""
    loader.load()
    torch.ops.lora_kernels.cuda_lora_expand(y, t, lora_b_stack, _ranks_int32(ranks), index.work(item_m),
                                            index.sorted_tokens, item_m)
    return y


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a_stack: torch.Tensor, lora_b_stack: torch.Tensor,
                      index, scales: torch.Tensor, bias: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                      out: Optional[torch.Tensor] = None, tile_kind: int = 0, tiles_per_cta: int = 0,
                      item_m: int = 0) -> torch.Tensor:
    """y [M, N] = x @ weight.T + bias + each token's adapter (see reference.multi_lora_linear) on
    validated inputs: x [M, K] float16/bfloat16, weight [N, K] x's dtype, stacks [L, r_max, K] and
    [L, N, r_max] in x's dtype or float32, bias [N] (x's dtype or float32) or None.

    Two launches: the segmented shrink (t [M, r_max] fp32), then the base GEMM over the sorted
    token order with each segment's t . B^T added in its epilogue and y stored once
    (csrc/multi_lora/multi_lora_linear.cuh). `out` receives y (tests poison it); tile_kind (1 small-M,
    2 large), tiles_per_cta and item_m (the shrink's work list) override the heuristics.

    On Hopper the second launch is the sm90 tail GEMM with a per-slot LoRA tail where
    multi_lora_sm90.sm90_multi_plan says so (tile_kind 3 / 4 / 5 force its tiles)."""
    loader.load()
    M, N = x.shape[0], weight.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    # rows past the index's work lists (an AdapterIndex.padded_to view) must read as zeros
    t = torch.zeros((M, lora_a_stack.shape[1]), dtype=torch.float32, device=x.device) if index.capacity != M else None
    t = multi_lora_shrink(x, lora_a_stack, index, scales, ranks, out=t, item_m=item_m)
    tile = _sm90_tile(x, weight, lora_b_stack, out, tile_kind)
    if tile is not None:
        from .multi_lora_sm90 import launch_sm90_multi
        return launch_sm90_multi(x, weight, t, lora_b_stack, index.token_adapter, bias, ranks, y, tile)
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    torch.ops.lora_kernels.cuda_multi_lora_linear(
        unit_stride_along_k(x), unit_stride_along_k(weight), bias, lora_b_stack, t, _ranks_int32(ranks),
        index.sorted_tokens, index.sorted_adapter, index.slot_start, y, tile_kind, tiles_per_cta)
    return y


# ---- Hopper: the sm90 tail GEMM with a per-slot LoRA tail (lora_kernels/cuda/multi_lora_sm90.py) ----

def _sm90_tile(x, weight, lora_b_stack, out, tile_kind):
    """The sm90 tile when this launch takes the sm90 path, else None (multi_lora_sm90.sm90_multi_choice)."""
    if x.shape[1] == 0:  # K = 0: y = bias, the mma.sync launcher's case
        return None
    from .multi_lora_sm90 import sm90_multi_choice
    return sm90_multi_choice(x, weight, lora_b_stack, out, tile_kind).tile
