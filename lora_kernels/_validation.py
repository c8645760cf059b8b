"""The one validation layer shared by every op.

Each check raises before any kernel runs, with a message that names the op, the argument, what
was expected and what was given. Ops call these helpers instead of writing their own checks, so
that the same bad input gets the same sentence everywhere (the README's bad-input table lists them).
"""
from __future__ import annotations

import math
import weakref
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_DTYPE_SET = frozenset(FLOAT_DTYPES)  # O(1) membership on the hot path (ops validate every call)
INT_INDEX_DTYPES = (torch.int32, torch.int64)


def _fmt_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(int(s)) for s in shape) + "]"


def fail(op: str, message: str, exc: type = ValueError):
    raise exc(f"{op}: {message}")


def check_tensor(op: str, name: str, value, *, dtypes=FLOAT_DTYPES, ndim: Optional[int] = None,
                 min_ndim: Optional[int] = None) -> torch.Tensor:
    """`value` is a tensor of one of `dtypes` with the given rank."""
    if not isinstance(value, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(value).__name__}", TypeError)
    if value.dtype not in (_FLOAT_DTYPE_SET if dtypes is FLOAT_DTYPES else dtypes):
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        fail(op, f"{name} must have a dtype in ({names}), got {str(value.dtype).replace('torch.', '')}",
             TypeError)
    if ndim is not None and value.dim() != ndim:
        fail(op, f"{name} must be {ndim}-D, got {value.dim()}-D with shape {_fmt_shape(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        fail(op, f"{name} must have at least {min_ndim} dimension(s), got shape {_fmt_shape(value.shape)}")
    return value


def check_shape(op: str, name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    """`value.shape == expected`; `meaning` says where each expected size comes from."""
    if value.shape != tuple(expected):  # torch.Size is a tuple: no per-element conversion
        fail(op, f"{name} must have shape {_fmt_shape(expected)} ({meaning}), got {_fmt_shape(value.shape)}")


def check_same_device(op: str, **tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors (None entries skipped) live on one device; returns it."""
    device, first = None, None
    for name, t in tensors.items():
        if t is None:
            continue
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            fail(op, f"{name} is on {t.device} but {first} is on {device}; all tensors must be on one device")
    return device


def _as_float(op: str, name: str, value, expected: str, bound: str = "finite") -> float:
    """float(value) for a real Python number (not bool), naming `name` when it is none or too
    large for a float (10**400 is an int Python cannot convert)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        fail(op, f"{name} must be {expected}, got {type(value).__name__}", TypeError)
    try:
        return float(value)
    except OverflowError:
        fail(op, f"{name} must be {bound}, got an int too large for a float ({str(value)[:12]}...)")


def check_scale(op: str, name: str, value) -> float:
    """A finite Python number (a 0-d tensor is read once, which syncs a CUDA device)."""
    if type(value) is float and value - value == 0.0:  # the hot path: every call of every op
        return value
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            fail(op, f"{name} must be a number, got a tensor of shape {_fmt_shape(value.shape)}", TypeError)
        if value.is_meta:
            fail(op, f"{name} must be a number, got a meta tensor (it has no value to read)", TypeError)
        if value.is_complex() or value.dtype == torch.bool:
            fail(op, f"{name} must be a real number, got a {str(value.dtype).replace('torch.', '')} tensor",
                 TypeError)
        value = value.item()
    value = _as_float(op, name, value, "a float")
    # finite <=> value - value == 0 (inf and nan give nan); unlike math.isfinite this also traces
    # when torch.compile(dynamic=True) makes the float symbolic
    if not value - value == 0.0:
        fail(op, f"{name} must be finite, got {value}")
    return value


def check_probability(op: str, name: str, value) -> float:
    if type(value) is float and 0.0 <= value < 1.0:  # the hot path
        return value
    value = _as_float(op, name, value, "a float in [0, 1)", "in [0, 1)")
    if not 0.0 <= value < 1.0:  # also refuses nan
        fail(op, f"{name} must be in [0, 1), got {value}")
    return value


MAX_STORAGE_BYTES = 2 ** 63 - 1  # torch's storage sizes are int64 byte counts


def check_allocatable(op: str, name: str, value: int, shape: Sequence[int], dtype: torch.dtype,
                      meaning: str) -> None:
    """A buffer of `shape` and `dtype` (sized by the argument `name` = value) has a byte count
    torch can represent; else ValueError naming the argument, not torch's "Storage size
    calculation overflowed"."""
    nbytes = math.prod(int(s) for s in shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > MAX_STORAGE_BYTES:
        fail(op, f"{name}={value} is too large: {meaning} would need {nbytes} bytes, more than any "
                 f"tensor can hold (2**63 - 1)")


def check_adapter_dtype(op: str, name: str, adapter: torch.Tensor, x_dtype: torch.dtype,
                        base_name: str = "x") -> None:
    """Adapters are in x's dtype or float32 (PEFT keeps fp32 adapters over a 16-bit base). A 16-bit
    adapter over an fp32 input is exact too; fp16 adapters over bf16 (or the reverse) would round."""
    ok = (adapter.dtype == x_dtype or adapter.dtype == torch.float32
          or (x_dtype in (torch.float32, torch.float64) and adapter.dtype != torch.float64)
          or x_dtype == torch.float64)
    if not ok:
        fail(op, f"{name} must have {base_name}'s dtype ({str(x_dtype).replace('torch.', '')}) or float32, "
                 f"got {str(adapter.dtype).replace('torch.', '')}", TypeError)



def check_no_internal_overlap(op: str, name: str, value: torch.Tensor) -> None:
    """Every element of `value` has its own memory (no stride-0 or interleaved views), so an
    in-place kernel reads and writes each element exactly once. Sufficient test: with the dims
    sorted by stride, each stride exceeds the farthest offset the smaller dims reach."""
    reach = 0
    for stride, size in sorted((abs(st), sz) for st, sz in zip(value.stride(), value.shape) if sz > 1):
        if stride <= reach:
            fail(op, f"{name} must not overlap itself in memory (it is updated in place), got shape "
                     f"{_fmt_shape(value.shape)} with strides {_fmt_shape(value.stride())}")
        reach += stride * (size - 1)


def _byte_range(t: torch.Tensor):
    span = sum((sz - 1) * abs(st) for sz, st in zip(t.shape, t.stride())) + 1
    return t.data_ptr(), t.data_ptr() + span * t.element_size()


def check_no_shared_memory(op: str, name: str, value: torch.Tensor, other_name: str,
                           other: torch.Tensor) -> None:
    """`value` (read) and `other` (written in place) do not share memory, so no kernel program
    reads an element that another one is rewriting (and no non-coherent load, ``ld.global.nc``,
    reads a stale one). Byte ranges are compared, so disjoint slices of one buffer pass. Skipped
    while torch.compile traces and for tensors without memory (fake, meta, functorch-wrapped)."""
    if torch.compiler.is_compiling() or value.device != other.device or value.device.type == "meta":
        return
    if value.numel() == 0 or other.numel() == 0:
        return
    try:
        same_storage = value.untyped_storage().data_ptr() == other.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor with no storage of its own
        return
    if not same_storage:
        return
    (lo, hi), (olo, ohi) = _byte_range(value), _byte_range(other)
    if lo < ohi and olo < hi:
        fail(op, f"{name} shares memory with {other_name}, which is updated in place; pass a copy")


def check_no_overlap(op: str, out_name: str, out: torch.Tensor, **inputs) -> None:
    """The one aliasing check of every in-place / out= path: `out` (written) has its own memory
    for each element (check_no_internal_overlap) and shares none with any of `inputs` (read),
    given by name; an input may be None (skipped) or a list/tuple of tensors (named ``name[i]``).

        check_no_overlap("lora_expand_", "y", y, t=t, lora_b_stack=b_stacks, ranks=ranks)

    Raises ValueError naming the argument. Decides as ``check_no_shared_memory(op, name, input,
    out_name, out)`` for each input would, reading out's device, size and storage once for all of
    them. The common call (plain contiguous tensors on a CPU or CUDA device) is decided by
    _no_overlap_contiguous from data pointers alone (~2 us less per call, CPU machine)."""
    if _no_overlap_contiguous(out, inputs):
        return
    check_no_internal_overlap(op, out_name, out)
    if torch.compiler.is_compiling() or out.numel() == 0:
        return  # check_no_shared_memory skips every pair
    device = out.device
    if device.type == "meta":
        return  # an input is either on another device or meta itself: skipped
    try:
        out_ptr = out.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage of its own: every pair skipped
        return
    for name, value in inputs.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                if item is not None:
                    _check_not_in(op, f"{name}[{i}]", item, out_name, out, device, out_ptr)
        else:
            _check_not_in(op, name, value, out_name, out, device, out_ptr)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _no_overlap_contiguous(out: torch.Tensor, inputs: dict) -> bool:
    """True only where check_no_overlap(op, ..., out, **inputs) passes, decided without storage
    objects; False decides nothing (the full check runs). Holds for a plain contiguous `out` on a
    CPU or CUDA device (so no internal overlap: each dim of size > 1 has a stride beyond the
    reach of the smaller ones) outside torch.compile, each input None, an empty list or a plain
    contiguous tensor (or a list/tuple of such, None items allowed) whose bytes
    [data_ptr, data_ptr + nbytes) miss out's: that range is exactly _byte_range of a contiguous
    non-empty tensor and empty for an empty one, and the full check fails an input only where
    the two ranges meet (same storage, overlapping bytes), so disjoint ranges pass there too.
    Any input whose range meets out's, or that is anything else, returns False.
    tests/test_multi_bad_input.py compares it with the full check over a grid of views."""
    if type(out) not in _PLAIN_TENSOR_TYPES or not (out.is_cpu or out.is_cuda) or not out.is_contiguous():
        return False
    if torch.compiler.is_compiling():
        return False
    try:  # a functorch-wrapped tensor has type Tensor and no data pointer
        lo = out.data_ptr()
        hi = lo + out.nbytes
        for value in inputs.values():
            if value is None:
                continue
            for item in (value if isinstance(value, (list, tuple)) else (value,)):
                if item is None:
                    continue
                if type(item) not in _PLAIN_TENSOR_TYPES or not item.is_contiguous():
                    return False
                ilo = item.data_ptr()
                if ilo < hi and lo < ilo + item.nbytes:
                    return False
    except RuntimeError:
        return False
    return True


def _check_not_in(op: str, name: str, value: torch.Tensor, out_name: str, out: torch.Tensor,
                  device: torch.device, out_ptr: int) -> None:
    """check_no_shared_memory(op, name, value, out_name, out) given out's device and storage
    pointer (out is on a real device, non-empty, with a storage)."""
    if value.device != device or value.numel() == 0:
        return
    try:
        ptr = value.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor with no storage of its own
        return
    if ptr != out_ptr:
        return
    (lo, hi), (olo, ohi) = _byte_range(value), _byte_range(out)
    if lo < ohi and olo < hi:
        fail(op, f"{name} shares memory with {out_name}, which is updated in place; pass a copy")


def check_count(op: str, name: str, value, minimum: int = 1) -> int:
    """A Python int >= minimum (a size, a number of slots)."""
    if isinstance(value, bool) or not isinstance(value, int):
        fail(op, f"{name} must be an int, got {type(value).__name__}", TypeError)
    if value < minimum:
        fail(op, f"{name} must be >= {minimum}, got {value}")
    return value


def check_values(op: str, ok: torch.Tensor, message: str, **values) -> None:
    """Every element of the bool tensor `ok` is True, checked without a host sync.

    CPU tensors are checked at once (ValueError "op: message", message.format(**values)). Device
    tensors get ``torch._assert_async``: no synchronisation, safe inside a captured CUDA graph; a
    failure surfaces as a device-side assert at the next synchronisation. The caller must still
    make the kernels safe for bad values (clamp or mask), since the assert is only a report.
    Under torch.compile the values may be symbolic (dynamic=True makes ints such as an index's
    num_adapters symbols), which a compiled assert's message cannot hold: each {name} then reads
    as its name."""
    if ok.numel() == 0:
        return
    compiling = torch.compiler.is_compiling()
    if ok.device.type == "cpu" and not compiling:
        if not bool(ok.all()):
            fail(op, message.format(**values))
        return
    text = message.format(**({k: k for k in values} if compiling else values))
    torch._assert_async(ok.all(), f"{op}: {text}")


def check_index(op: str, index, num_tokens: int) -> None:
    """`index` is an AdapterIndex built for `num_tokens` tokens."""
    from .serving import AdapterIndex  # local: serving imports this module
    if not isinstance(index, AdapterIndex):
        fail(op, f"index must be a lora_kernels.AdapterIndex (AdapterIndex.from_token_adapters), "
                 f"got {type(index).__name__}", TypeError)
    if index.num_tokens != num_tokens:
        fail(op, f"index was built for {index.num_tokens} tokens but the input has {num_tokens} "
                 f"(rows of x / y, all leading dimensions flattened)")


# id(tensor) -> (weak reference, tensor._version, bound) of value checks already issued: a serving
# loop passes the same ranks tensor to every layer and every step, and on a GPU each check is
# ~5 tiny kernels -- several µs per call, as much as a decode-sized LoRA product itself.
_VALUES_CHECKED: dict = {}


def _version_of(t: torch.Tensor):
    """t._version, or None for an inference tensor (made under torch.inference_mode(), which
    keeps no version counter: reading it raises)."""
    return None if t.is_inference() else t._version


def _already_checked(t: torch.Tensor, bound) -> bool:
    entry = _VALUES_CHECKED.get(id(t))
    return entry is not None and entry[0]() is t and entry[1:] == (_version_of(t), bound)


def _remember_checked(t: torch.Tensor, bound) -> None:
    key = id(t)
    _VALUES_CHECKED[key] = (weakref.ref(t, lambda _, key=key: _VALUES_CHECKED.pop(key, None)), _version_of(t), bound)


def check_ranks(op: str, ranks: Optional[torch.Tensor], num_adapters: int, r_max: int) -> None:
    """ranks is None or an int tensor [L] with 0 <= ranks[i] <= r_max.

    Values are checked without a host sync (check_values), once per tensor version: the check is
    issued again only after the tensor is modified in place (its ``_version`` moves) or with
    another r_max. Two changes are not seen, since no version counter records them: writes
    through ``ranks.data`` and in-place writes to an inference tensor (made under
    ``torch.inference_mode()``; checked once per tensor). Detecting them would mean reading the
    values on every call (a few kernels per call on a GPU). Kernels clamp ranks to [0, r_max]
    besides, so such a bad value is never read out of bounds: it acts as the clamped rank."""
    if ranks is None:
        return
    check_tensor(op, "ranks", ranks, dtypes=INT_INDEX_DTYPES, ndim=1)
    check_shape(op, "ranks", ranks, (num_adapters,), "one rank per adapter slot, L = index.num_adapters")
    compiling = torch.compiler.is_compiling()
    if not compiling and _already_checked(ranks, r_max):
        return
    check_values(op, (ranks >= 0) & (ranks <= r_max),
                 "ranks must lie in [0, r_max = {r_max}] (r_max from the adapter stacks)", r_max=r_max)
    if not compiling:
        _remember_checked(ranks, r_max)
