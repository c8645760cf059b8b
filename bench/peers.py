"""The baselines each case is timed against, measured in the same run (DESIGN.md section 7)."""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_kernels


def _peft_layer(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float,
                adapters_fp32: bool, lora_dropout: float = 0.0) -> nn.Module:
    """A real PEFT LoRA Linear over `weight` (shared, not copied) with the given adapter, in eval
    mode (call .train() for a training step with `lora_dropout`)."""
    from peft import LoraConfig, get_peft_model

    N, K = weight.shape
    r = lora_a.shape[0]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(K, N, bias=False, device="meta")
            self.proj.weight = nn.Parameter(weight, requires_grad=False)

        def forward(self, x):
            return self.proj(x)

    cfg = LoraConfig(r=r, lora_alpha=scale * r, target_modules=["proj"], lora_dropout=lora_dropout)
    model = get_peft_model(Net(), cfg, autocast_adapter_dtype=adapters_fp32)
    layer = model.base_model.model.proj
    dtype = torch.float32 if adapters_fp32 else weight.dtype
    with torch.no_grad():
        layer.lora_A["default"].weight = nn.Parameter(lora_a.to(dtype))
        layer.lora_B["default"].weight = nn.Parameter(lora_b.to(dtype))
    assert abs(layer.scaling["default"] - scale) < 1e-12 * max(1.0, scale)
    return layer.eval()


def forward_methods(x, weight, lora_a, lora_b, scale, backends) -> Dict[str, Callable[[], torch.Tensor]]:
    """name -> zero-argument callable computing y = x W^T + s (x A^T) B^T (base: x W^T only)."""
    methods = {
        "base": lambda: F.linear(x, weight),
        "naive": lambda: F.linear(x, weight) + scale * F.linear(F.linear(x, lora_a), lora_b),
        "skilled": lambda: F.linear(x, weight).addmm_(F.linear(x, lora_a), lora_b.t(), alpha=scale),
    }
    try:
        peft16 = _peft_layer(weight, lora_a, lora_b, scale, adapters_fp32=False)
        peft32 = _peft_layer(weight, lora_a, lora_b, scale, adapters_fp32=True)
        methods["peft"] = lambda: peft16(x)
        methods["peft_fp32"] = lambda: peft32(x)
    except ImportError:
        pass
    for b in backends:
        methods[f"ours_{b}"] = (lambda b=b: lora_kernels.lora_linear(x, weight, lora_a, lora_b, scale, backend=b))
    return methods
