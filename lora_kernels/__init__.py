"""lora_kernels: fused LoRA kernels (Triton and CUDA C++) behind torch ops and drop-in modules.

Importing this package compiles nothing, imports no kernel module and queries no device: Triton
kernels are imported on their first use, the CUDA extension is loaded on its first use.
"""
from .backends import BackendUnavailable, explain
from .layers import FusedLoRALinear, MultiLoRALinear
from .ops import lora_expand_, lora_linear, lora_shrink, merge_, multi_lora_linear, unmerge_
from .serving import AdapterIndex

__version__ = "0.1.0"

__all__ = ["AdapterIndex", "BackendUnavailable", "FusedLoRALinear", "MultiLoRALinear", "explain", "lora_expand_",
           "lora_linear", "lora_shrink", "merge_", "multi_lora_linear", "unmerge_"]
