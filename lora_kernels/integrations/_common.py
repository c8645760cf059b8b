"""Framework-free pieces shared by the vLLM and SGLang integrations."""
from __future__ import annotations

from typing import List, Sequence

import torch

from ..serving import AdapterIndex


class PersistentTokens:
    """One capacity-sized AdapterIndex, rebuilt in place per step (outside any graph) and viewed
    per layer call for the call's row count: a CUDA-graph batch is padded past the live tokens,
    and those rows have no adapter (AdapterIndex.padded_to). Created eagerly, so a graph or a
    compiled region only ever reads ``index.data``."""

    def __init__(self, capacity: int, num_adapters: int, device):
        self.index = AdapterIndex.with_capacity(capacity, num_adapters, device=device)

    def update_(self, token_slots: torch.Tensor) -> None:
        self.index.update_(token_slots)

    def rows(self, num_rows: int) -> AdapterIndex:
        """The index for inputs of num_rows rows (>= the live tokens). Always the padded view,
        even when num_rows equals the live count: a traced or captured call must not depend on
        whether it did at trace time (the view zeroes the shrink's padding rows: one memset)."""
        return self.index.padded_to(num_rows)


def squeeze_stack(stack: torch.Tensor, name: str) -> torch.Tensor:
    """vLLM keeps stacks as [L, 1, r, K] / [L, 1, N, r]: the [L, r, K] / [L, N, r] view."""
    if stack.dim() == 4:
        if stack.shape[1] != 1:
            raise ValueError(f"{name} must be [max_loras, 1, ...] (vLLM's layout), got {list(stack.shape)}")
        return stack[:, 0]
    if stack.dim() != 3:
        raise ValueError(f"{name} must be 3-D or [max_loras, 1, ...], got {list(stack.shape)}")
    return stack


def column_slices(stack: torch.Tensor, offsets: Sequence[int]) -> List[torch.Tensor]:
    """[L, N_total, r] -> views [L, offsets[i+1] - offsets[i], r] (one stack, so one launch)."""
    return [stack[:, offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
