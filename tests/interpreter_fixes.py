"""The CPU lane's fixes for the Triton interpreter's bfloat16 arithmetic (applied by conftest.py).

The interpreter stores bfloat16 tensors as their uint16 bit patterns, and two of its builder
methods (``triton/runtime/interpreter.py``, the same in triton 3.6 and 3.8) get them wrong:

* ``create_dot`` converts only 8-bit float operands before ``np.matmul``: bfloat16 operands are
  multiplied as integers (a 16x16 dot comes out ~1e10 off);
* ``cast_impl`` truncates float32 -> bfloat16 (its ``_convert_float`` rounds only when asked for
  RTNE, and casts ask for nothing), where the GPU rounds to nearest even: every bfloat16 store
  carried twice the rounding error (multi_lora_linear, no-adapter rows: 3.3e-3 vs 1.6e-3); and
  bfloat16 <-> any type other than float32 is a plain integer ``astype`` of the bit patterns.

The fixes widen bfloat16 to the float32 it encodes (the 16 bits are the top half of that float32:
exact, NaN and subnormals included), and round float32 to bfloat16 to nearest even (NaN stays
NaN), everything else going through the original methods.

The patched create_dot carries ``backends.BF16_FIX_FLAG``; without it, ``lora_kernels`` refuses
bfloat16 under the interpreter with BackendUnavailable (backends.interpreter_dtype_reason).
"""
from __future__ import annotations

import numpy as np

from lora_kernels.backends import BF16_FIX_FLAG


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    return (np.ascontiguousarray(bits).astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round to nearest even, as the GPU's cvt.rn.bf16.f32; NaN -> a quiet NaN of the same sign."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = np.isnan(values)
    rounded = np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x0040), rounded)
    return rounded.astype(np.uint16)


def unfixed(name: str):
    """The interpreter's builder method `name` as triton ships it (for tests of the refusal)."""
    from triton.runtime import interpreter
    method = getattr(interpreter.InterpreterBuilder, name)
    return getattr(method, "__wrapped__", method)


def fix_bf16() -> None:
    """Patch the loaded interpreter's create_dot and cast_impl (idempotent)."""
    from triton.runtime import interpreter
    builder, tl, Handle = interpreter.InterpreterBuilder, interpreter.tl, interpreter.TensorHandle
    if getattr(builder.create_dot, BF16_FIX_FLAG, False):
        return
    original_dot, original_cast = builder.create_dot, builder.cast_impl

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return Handle(bf16_bits_to_fp32(handle.data), tl.float32)

    def create_dot(self, a, b, *args, **kwargs):
        return original_dot(self, widen(a), widen(b), *args, **kwargs)

    def cast_impl(self, src, dst_type):
        src_bf16, dst_bf16 = src.dtype.scalar == tl.bfloat16, dst_type.scalar == tl.bfloat16
        if src_bf16 == dst_bf16:
            return original_cast(self, src, dst_type)
        if src_bf16:
            wide = widen(src)
            return wide if dst_type.scalar == tl.float32 else original_cast(self, wide, dst_type)
        wide = src if src.dtype.scalar == tl.float32 else original_cast(self, src, tl.float32)
        return Handle(fp32_to_bf16_bits(wide.data), tl.bfloat16)

    create_dot.__wrapped__, cast_impl.__wrapped__ = original_dot, original_cast
    setattr(create_dot, BF16_FIX_FLAG, True)
    builder.create_dot, builder.cast_impl = create_dot, cast_impl
