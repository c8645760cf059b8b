"""One module per op family: validation, backend dispatch, registered op and autograd."""
from .lora_linear import lora_linear
from .merge import merge_, unmerge_

__all__ = ["lora_linear", "merge_", "unmerge_"]
