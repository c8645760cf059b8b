"""Loads the CUDA C++ extension ``lora_kernels._C``.

Not built yet: the CUDA backend lands with the issue "CUDA C++ backend". Until then every CUDA
request fails with a reason, and ``backend="auto"`` never picks it.
"""
from __future__ import annotations

from typing import Optional


def unavailable_reason() -> Optional[str]:
    return "cuda: the CUDA C++ extension lora_kernels._C is not part of this build yet"
