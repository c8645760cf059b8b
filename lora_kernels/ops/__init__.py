"""One module per op family: validation, backend dispatch, registered op and autograd."""
from .lora_linear import lora_linear
from .merge import MergeResidual, merge_, unmerge_

__all__ = ["MergeResidual", "lora_linear", "merge_", "unmerge_"]
