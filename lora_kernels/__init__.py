"""lora_kernels: fused LoRA kernels (Triton and CUDA C++) behind torch ops and drop-in modules.

Importing this package compiles nothing, imports no kernel module and queries no device: Triton
kernels are imported on their first use, the CUDA extension is loaded on its first use.
"""
from .backends import BackendUnavailable, explain
from .layers import FusedLoRALinear
from .ops import MergeResidual, lora_linear, merge_, unmerge_

__version__ = "0.1.0"

__all__ = ["BackendUnavailable", "FusedLoRALinear", "MergeResidual", "explain", "lora_linear", "merge_",
           "unmerge_"]
