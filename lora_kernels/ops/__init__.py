"""One module per op family: validation, backend dispatch, registered op and autograd."""
from .lora_linear import lora_linear
from .merge import MergeResidual, merge_, unmerge_
from .multi_lora import lora_expand_, lora_shrink, multi_lora_linear

__all__ = ["MergeResidual", "lora_expand_", "lora_linear", "lora_shrink", "merge_", "multi_lora_linear", "unmerge_"]
