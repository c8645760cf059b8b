"""The CPU lane's fix for the Triton interpreter's bfloat16 tl.dot (applied by conftest.py).

The interpreter stores bfloat16 tensors as their uint16 bit patterns, and its ``create_dot``
(``triton/runtime/interpreter.py``, the same in triton 3.6 and 3.8) converts only 8-bit float
operands before ``np.matmul`` -- bfloat16 operands are multiplied as integers (a 16x16 dot comes
out ~1e10 off). The fix widens each bfloat16 operand to the float32 it encodes (the 16 bits are
the top half of that float32: exact, NaN and subnormals included) and calls the original.

The patched function carries ``backends.BF16_DOT_FIX_FLAG``; without it, ``lora_kernels`` refuses
bfloat16 under the interpreter with BackendUnavailable (backends.interpreter_dtype_reason).
"""
from __future__ import annotations

import numpy as np

from lora_kernels.backends import BF16_DOT_FIX_FLAG


def _bf16_as_fp32(handle, interpreter):
    """A float32 TensorHandle holding the values of a bfloat16 one (other dtypes unchanged)."""
    tl = interpreter.tl
    if handle.dtype.scalar != tl.bfloat16:
        return handle
    bits = np.ascontiguousarray(handle.data).astype(np.uint32) << np.uint32(16)
    return interpreter.TensorHandle(bits.view(np.float32), tl.float32)


def unfixed_create_dot():
    """The interpreter's create_dot as triton ships it (for tests of the refusal)."""
    from triton.runtime import interpreter
    dot = interpreter.InterpreterBuilder.create_dot
    return getattr(dot, "__wrapped__", dot)


def fix_bf16_dot() -> None:
    """Patch the loaded interpreter's create_dot (idempotent)."""
    from triton.runtime import interpreter
    original = interpreter.InterpreterBuilder.create_dot
    if getattr(original, BF16_DOT_FIX_FLAG, False):
        return

    def create_dot(self, a, b, *args, **kwargs):
        return original(self, _bf16_as_fp32(a, interpreter), _bf16_as_fp32(b, interpreter), *args, **kwargs)

    create_dot.__wrapped__ = original
    setattr(create_dot, BF16_DOT_FIX_FLAG, True)
    interpreter.InterpreterBuilder.create_dot = create_dot
