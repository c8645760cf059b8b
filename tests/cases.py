"""Input builders shared by the tests."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from lora_kernels import reference
from tolerances import rand


@dataclass
class LoraInputs:
    x: torch.Tensor
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    bias: Optional[torch.Tensor]

    def args(self):
        return self.x, self.weight, self.lora_a, self.lora_b, self.scale, self.bias

    def reference64(self, **kw) -> torch.Tensor:
        """The float64 oracle."""
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return reference.lora_linear(d(self.x), d(self.weight), d(self.lora_a), d(self.lora_b),
                                     self.scale, d(self.bias), **kw)

    def torch_expression(self) -> torch.Tensor:
        """The plain-torch composition in the inputs' own dtype (the error yardstick)."""
        x = self.x
        lora = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return F.linear(x, self.weight, self.bias) + lora.to(x.dtype)


def make_lora_inputs(M, N, K, r, dtype=torch.float32, device="cpu", *, adapter_dtype=None,
                     bias=True, lead=None, scale=0.75, x_layout="contiguous",
                     weight_layout="contiguous") -> LoraInputs:
    """Random LoRA inputs scaled so outputs are O(1) in every dtype.

    lead: leading dims of x instead of [M]; x_layout: "contiguous" | "strided" (every other column
    of a wider buffer) | "transposed" (column-major); weight_layout: "contiguous" | "transposed"."""
    adapter_dtype = adapter_dtype or dtype
    shape = tuple(lead) if lead is not None else (M,)
    if x_layout == "strided":
        x = rand(*shape, 2 * K, dtype=dtype, device=device)[..., ::2]
    elif x_layout == "transposed":
        x = rand(K, *shape, dtype=dtype, device=device).movedim(0, -1)
    else:
        x = rand(*shape, K, dtype=dtype, device=device)
    if weight_layout == "transposed":
        weight = rand(K, N, dtype=dtype, device=device, scale=K ** -0.5).t()
    else:
        weight = rand(N, K, dtype=dtype, device=device, scale=K ** -0.5)
    lora_a = rand(r, K, dtype=adapter_dtype, device=device, scale=K ** -0.5)
    lora_b = rand(N, r, dtype=adapter_dtype, device=device, scale=r ** -0.5)
    b = rand(N, dtype=dtype, device=device) if bias else None
    return LoraInputs(x, weight, lora_a, lora_b, scale, b)
