"""lora_kernels: fused LoRA kernels (Triton and CUDA C++) behind torch ops and drop-in modules.

Importing this package compiles nothing, imports no kernel module and queries no device: Triton
kernels are imported on their first use, the CUDA extension is loaded on its first use.
"""
from .adapters import inject, load_adapter, save_adapter
from .backends import BackendUnavailable, explain
from .layers import FusedLoRALinear, MultiLoRALinear
from .ops import MergeResidual, lora_expand_, lora_linear, lora_shrink, merge_, multi_lora_linear, unmerge_
from .serving import AdapterIndex

__version__ = "0.1.0"


def __getattr__(name):
    # lora_kernels.peft imports PEFT and transformers, lora_kernels.distributed torch's DTensor
    # and tensor-parallel modules: loaded on first use, not with the package
    if name in ("peft", "distributed"):
        import importlib
        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["AdapterIndex", "BackendUnavailable", "FusedLoRALinear", "MergeResidual", "MultiLoRALinear", "explain",
           "inject", "load_adapter", "lora_expand_", "lora_linear", "lora_shrink", "merge_", "multi_lora_linear",
           "save_adapter", "unmerge_"]
