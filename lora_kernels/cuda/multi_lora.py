"""The CUDA C++ multi-adapter (segmented) shrink / expand and fused linear
(``csrc/multi_lora/multi_lora.cuh``, ``csrc/multi_lora/multi_lora_linear.cuh``): input checks and launchers, with the
contract of ``lora_kernels.triton.multi_lora`` so that ``lora_kernels.ops.multi_lora`` runs either
backend the same way. Loading the extension is ``loader``'s job.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import loader
from .lora_linear import CUDA_DTYPES, unit_stride_along_k

# csrc/multi_lora/multi_lora_plan.h kMultiMaxRank (vLLM's largest max_lora_rank): the shrink has a
# grid dimension over rank chunks, the expand stages t 128 rank columns at a time, the fused
# linear's epilogue walks the rank 8 columns a step.
MULTI_MAX_R = 512
MULTI_MAX_SLICES = 4  # kMultiMaxSlices: output slices per launch (grid z); more take more launches
# The shrink's work-list piece size follows the Triton launcher's rule (triton/multi_lora.py,
# segment_config; reasoning there, not measured): 64-token pieces (the 64 x 64 tile, each A tile
# reused over 64 tokens) only when there are at least 2 of them per SM, else 16-token pieces
# (more CTAs for the few pieces of a small batch). The expand always takes 64-token pieces: its
# CTAs come from N tiles, and a piece of <= 16 tokens is one piece in either list.
MULTI_PREFILL_PIECES_PER_SM = 2
MULTI_EXPAND_ITEM_M = 64
# The split decode shrink (multi_lora_plan.h kDecodeRowSplit): batches of at most this many tokens
# run each 16-token piece as 4 CTAs of 4 rows on CUDA cores instead of one tensor-core CTA (a
# 16-token single-adapter batch streams K on 4 SMs instead of 1). Not measured: where the
# crossover lies is for bench/multi.py's decode cases to say.
MULTI_DECODE_SPLIT_MAX_TOKENS = 64
MULTI_DECODE_ROW_SPLIT = 4
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


def shrink_row_split(num_tokens: int, item_m: int) -> int:
    """1 or MULTI_DECODE_ROW_SPLIT: how many CTAs each 16-token piece of the shrink runs on."""
    return MULTI_DECODE_ROW_SPLIT if item_m == 16 and num_tokens <= MULTI_DECODE_SPLIT_MAX_TOKENS else 1


def _ranks_int32(ranks: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read ranks as contiguous int32 (int64 ranks cost one tiny cast kernel)."""
    return None if ranks is None else ranks.to(torch.int32).contiguous()


Stacks = Union[torch.Tensor, Sequence[torch.Tensor]]


def _slice_groups(stacks: List[torch.Tensor], same) -> List[Tuple[int, int]]:
    """[start, end) runs of at most MULTI_MAX_SLICES consecutive stacks with equal `same(stack)`:
    one launch each."""
    groups, start = [], 0
    while start < len(stacks):
        end = start + 1
        while end < len(stacks) and end - start < MULTI_MAX_SLICES and same(stacks[end]) == same(stacks[start]):
            end += 1
        groups.append((start, end))
        start = end
    return groups


def _t_rows_disjoint(t: torch.Tensor) -> bool:
    """t [S, M, R] with unit column stride whose (slice, token) rows never overlap: the layout the
    shrink kernel writes (csrc/multi_lora/multi_lora.cpp t_rows_disjoint, the same rule)."""
    if t.shape[2] > 1 and t.stride(2) != 1:
        return False
    extent = t.shape[2]
    for stride, size in sorted((t.stride(d), t.shape[d]) for d in range(2) if t.shape[d] > 1):
        if stride < extent:
            return False
        extent = stride * size
    return True


def multi_lora_shrink(x: torch.Tensor, lora_a_stack: Stacks, index, scales: torch.Tensor,
                      ranks: Optional[torch.Tensor], out: Optional[torch.Tensor] = None,
                      item_m: int = 0, row_split: int = 0) -> torch.Tensor:
    """t = lora_shrink on validated inputs (see reference.lora_shrink): x [M, K] float16/bfloat16,
    lora_a_stack [L, r_max, K] (t [M, r_max] float32) or a list of S such stacks (t [S, M, r_max],
    t[s] from stack s) in x's dtype or float32, index an AdapterIndex, scales [L], ranks [L] int |
    None. Every element of t is written. One launch per MULTI_MAX_SLICES stacks that share their
    strides (all of them, for stacks made alike). `out` receives t (any strides; tests poison it);
    item_m (16 or 64) overrides the work-list choice (tests reach both tiles), row_split (1 or 4,
    the latter with item_m 16) the split decode shrink's.

    x and the stacks are read along K as contiguous runs: a stack whose last dimension is not
    unit-stride is copied on every call (keep stacks contiguous, as MultiLoRALinear does)."""
    loader.load()
    as_list = not isinstance(lora_a_stack, torch.Tensor)
    stacks = list(lora_a_stack) if as_list else [lora_a_stack]
    M, S, R = x.shape[0], len(stacks), stacks[0].shape[1]
    if out is None:
        out = torch.empty((S, M, R) if as_list else (M, R), dtype=torch.float32, device=x.device)
    t = out if as_list else out.unsqueeze(0)
    if M == 0:
        return out
    item_m = item_m or shrink_item_m(M, x.device)
    row_split = row_split or shrink_row_split(M, item_m)
    stacks = [a if a.shape[2] <= 1 or a.stride(2) == 1 else a.contiguous() for a in stacks]
    # the kernel writes t rows with unit column stride; any other buffer goes through a dense
    # copy (which keeps what rows outside the index's work lists hold: a padded view's zeros)
    target = t if _t_rows_disjoint(t) else t.contiguous()
    x, scales, ranks = unit_stride_along_k(x), scales.to(torch.float32).contiguous(), _ranks_int32(ranks)
    work = index.work(item_m)
    for start, end in _slice_groups(stacks, lambda a: a.stride()):
        torch.ops.lora_kernels.cuda_lora_shrink(x, stacks[start:end], scales, ranks, work, index.sorted_tokens,
                                                item_m, target[start:end], row_split)
    if target is not t:
        t.copy_(target)
    return out


def multi_lora_expand_(y: torch.Tensor, t: torch.Tensor, lora_b_stack: Stacks, index,
                       ranks: Optional[torch.Tensor], item_m: int = MULTI_EXPAND_ITEM_M,
                       offset: int = 0) -> torch.Tensor:
    """In place, for tokens with an adapter (see reference.lora_expand_), on validated inputs:
    y [M, N_y] float16/bfloat16 (any strides); lora_b_stack [L, N, r_max] with t [M, r_max], or a
    list of S stacks [L, N_s, r_max] with t [S, M, r_max]: y[m, col_s + n] += B_s[i, n, :rank_i]
    @ t[s, m, :rank_i], col_s = offset + N_0 + ... + N_{s-1}; t float32, stacks in y's dtype or
    float32, any strides. One launch per MULTI_MAX_SLICES stacks (each slice has its own strides
    and width: GQA's q and k/v). Rows of tokens with no adapter, and columns outside the slices,
    are never stored to."""
    loader.load()
    as_list = not isinstance(lora_b_stack, torch.Tensor)
    stacks = list(lora_b_stack) if as_list else [lora_b_stack]
    t3 = t if as_list else t.unsqueeze(0)
    ranks, work = _ranks_int32(ranks), index.work(item_m)
    col = offset
    for start in range(0, len(stacks), MULTI_MAX_SLICES):
        group = stacks[start:start + MULTI_MAX_SLICES]
        torch.ops.lora_kernels.cuda_lora_expand(y, t3[start:start + len(group)], group, ranks, work,
                                                index.sorted_tokens, item_m, col)
        col += sum(b.shape[1] for b in group)
    return y


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a_stack: torch.Tensor, lora_b_stack: torch.Tensor,
                      index, scales: torch.Tensor, bias: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                      out: Optional[torch.Tensor] = None, tile_kind: int = 0, tiles_per_cta: int = 0,
                      item_m: int = 0) -> torch.Tensor:
    """y [M, N] = x @ weight.T + bias + each token's adapter (see reference.multi_lora_linear) on
    validated inputs: x [M, K] float16/bfloat16, weight [N, K] x's dtype, stacks [L, r_max, K] and
    [L, N, r_max] in x's dtype or float32, bias [N] (x's dtype or float32) or None.

    r_max up to MULTI_MAX_R. Two launches: the segmented shrink (t [M, r_max] fp32), then the
    base GEMM over the sorted token order with each segment's t . B^T added in its epilogue (the
    rank walked 8 columns a step, t read from global memory) and y stored once
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
