"""Backend choice: ``"auto" | "triton" | "cuda" | "torch"``.

The rule is small enough to state here in full:

* ``backend="torch"`` always runs (the plain-torch reference in ``reference.py``).
* ``backend="triton"`` runs on CUDA tensors, and on CPU tensors only under the Triton interpreter
  (``TRITON_INTERPRET=1`` set before the first Triton kernel is imported) -- that is how the CPU
  test lane exercises the kernels.
* ``backend="cuda"`` runs the C++ extension ``lora_kernels._C`` on CUDA tensors.
* ``backend="auto"``: CPU tensors -> ``"torch"``; CUDA tensors -> the op's preferred compiled
  backend for that input (each op passes its own ``prefer`` order), skipping backends that cannot
  run. ``LORA_KERNELS_BACKEND`` replaces ``"auto"`` (not an explicit choice) when set.

A backend that cannot run raises :class:`BackendUnavailable` with the reason; :func:`explain`
returns the same reasons without raising.

Facts about the process (is triton installed, is the extension loadable, is the interpreter's
bfloat16 arithmetic fixed) are computed in plain Python, never traced: under ``torch.compile`` the
functions that compute them are marked as ``torch.compiler.assume_constant_result`` marks them
(:func:`_never_traced`), so dynamo calls them at trace time and bakes the answer into the graph.
torch 2.11's dynamo cannot trace ``importlib.util.find_spec`` (fullgraph=True raised
``Unsupported``); torch 2.14's can, but nothing here should depend on what a torch release's
dynamo happens to trace.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from typing import Callable, Optional, Sequence

import torch

from .errors import BackendUnavailable

__all__ = ["BACKENDS", "BackendUnavailable", "explain", "interpreter_dtype_reason", "resolve",
           "unavailable_reason"]

BACKENDS = ("auto", "triton", "cuda", "torch")
ENV_VAR = "LORA_KERNELS_BACKEND"


def _never_traced(fn):
    """Mark `fn` the way ``torch.compiler.assume_constant_result`` does (the attribute its
    torch._dynamo implementation sets; read in torch 2.11 and 2.14), without calling it: that
    would import torch._dynamo at ``import lora_kernels`` (3.6 s on the CPU machine).
    tests/test_versions.py checks that torch's decorator still sets this attribute."""
    fn._dynamo_marked_constant = True
    return fn


_ENVIRON = os.environ  # the process's os._Environ, as imported
_ENV_DATA = getattr(_ENVIRON, "_data", None)  # its own mapping: what os.environ.get reads
_ENV_KEYS: dict = {}  # variable name -> its key in _ENV_DATA


def getenv(name: str) -> Optional[str]:
    """``os.environ.get(name)``, read without the KeyError that ``Mapping.get`` raises and catches
    for an unset variable (1.6 us of a read, CPU machine; lora_linear reads two per eager call to
    key its backend cache). It reads the mapping that ``os.environ.get`` itself reads
    (``os.environ._data`` under the key ``os.environ.encodekey(name)``), which every write
    through ``os.environ`` updates (``monkeypatch.setenv``, ``mock.patch.dict``, ``del``), so it
    is never stale; a replaced ``os.environ`` (or an interpreter without ``_data``) is read with
    ``.get``. tests/test_lora_linear_op.py checks it against ``os.environ.get``."""
    environ = os.environ
    if environ is not _ENVIRON or type(_ENV_DATA) is not dict:
        return environ.get(name)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = environ.encodekey(name)
    raw = _ENV_DATA.get(key)
    return None if raw is None else environ.decodevalue(raw)


_INTERPRET_VAR = "TRITON_INTERPRET"


def choice_state() -> tuple:
    """What the backend rule reads from the process, as one hashable value for the ops' backend
    caches: the raw values of ENV_VAR and TRITON_INTERPRET (as getenv reads them, undecoded) and,
    when TRITON_INTERPRET is set, whether the interpreter's bfloat16 dot is fixed (it decides
    nothing otherwise). One call instead of three (getenv twice, interpreter_bf16_fixed): ~0.6 us
    less per eager call, CPU machine. Two calls return equal values exactly when those three
    facts are equal (tests/test_lora_linear_op.py)."""
    environ = os.environ
    if environ is not _ENVIRON or type(_ENV_DATA) is not dict:
        interpret = environ.get(_INTERPRET_VAR)
        return environ.get(ENV_VAR), interpret, interpret is not None and interpreter_bf16_fixed()
    keys = _ENV_KEYS
    backend_key, interpret_key = keys.get(ENV_VAR), keys.get(_INTERPRET_VAR)
    if backend_key is None or interpret_key is None:
        backend_key = keys[ENV_VAR] = environ.encodekey(ENV_VAR)
        interpret_key = keys[_INTERPRET_VAR] = environ.encodekey(_INTERPRET_VAR)
    interpret = _ENV_DATA.get(interpret_key)
    return _ENV_DATA.get(backend_key), interpret, interpret is not None and interpreter_bf16_fixed()


_LAUNCHERS: dict = {}  # "triton.multi_lora" -> the module lora_kernels.triton.multi_lora


def launcher(name: str):
    """The launcher module ``lora_kernels.<name>`` (e.g. "triton.lora_linear", "cuda.merge"),
    imported on first use -- so the torch backend never imports triton or the extension -- and a
    dict hit after that: an import statement inside an op costs ~1.5 us per call (CPU machine).
    Callers read the launcher off the module per call, so a monkeypatched launcher takes effect."""
    mod = _LAUNCHERS.get(name)
    if mod is None:
        mod = _LAUNCHERS[name] = importlib.import_module(f"lora_kernels.{name}")
    return mod


def _interpreter_requested() -> bool:
    return getenv(_INTERPRET_VAR) == "1"


_triton_installed: Optional[bool] = None  # looked up once (find_spec costs ~0.4 ms, CPU machine)


def triton_installed() -> bool:
    global _triton_installed
    if _triton_installed is None:
        _triton_installed = importlib.util.find_spec("triton") is not None
    return _triton_installed


def triton_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when Triton can run on `device`, else a sentence saying why not."""
    if not triton_installed():
        return "triton: the triton package is not installed (pip install triton)"
    if device.type == "cuda":
        if _interpreter_requested():
            return ("triton: TRITON_INTERPRET=1 is set, so kernels run in the interpreter, which "
                    "needs CPU tensors; unset it to run on the GPU")
        return None
    if device.type == "cpu":
        if not _interpreter_requested():
            return ("triton: CPU tensors run only under the Triton interpreter; set TRITON_INTERPRET=1 "
                    "before importing lora_kernels, or use backend='torch'")
        return None
    return f"triton: unsupported device type {device.type!r}"


# The Triton interpreter keeps bfloat16 values as their uint16 bit patterns, and its tl.dot
# (InterpreterBuilder.create_dot, triton 3.6 and 3.8) hands them to np.matmul as integers: a 16x16
# bfloat16 dot comes out ~1e10 off; its float32 -> bfloat16 cast truncates where a GPU rounds to
# nearest even. A patch that fixes both (the test lane's, tests/interpreter_fixes.py) marks its
# create_dot with this attribute; without it, bfloat16 is refused under the interpreter.
BF16_FIX_FLAG = "lora_kernels_bf16_fixed"


@_never_traced  # a fact about the process (module docstring)
def interpreter_bf16_fixed() -> bool:
    """True when the loaded Triton interpreter's bfloat16 dot and casts have been fixed."""
    interpreter = sys.modules.get("triton.runtime.interpreter")
    create_dot = getattr(getattr(interpreter, "InterpreterBuilder", None), "create_dot", None)
    return bool(getattr(create_dot, BF16_FIX_FLAG, False))


def interpreter_dtype_reason(dtype: torch.dtype) -> Optional[str]:
    """Why backend="triton" cannot take `dtype` under the interpreter (None if it can, or if the
    interpreter is not in use): bfloat16 while the interpreter is unfixed. The ops whose kernels
    hand bfloat16 operands to tl.dot (lora_linear, the multi-adapter ops) call it with x's dtype,
    which bfloat16 adapters share; the merge kernels widen the adapters to fp32 before their dot
    and round to bfloat16 themselves, and pass in bfloat16 under the unfixed interpreter
    (tests/test_merge.py, measured)."""
    if dtype != torch.bfloat16 or not _interpreter_requested() or interpreter_bf16_fixed():
        return None
    return ("triton: bfloat16 is refused under the Triton interpreter (TRITON_INTERPRET=1): its tl.dot "
            "multiplies bfloat16 bit patterns as integers (and its casts to bfloat16 truncate), so the "
            "results would be wrong; use float16 or float32 there, or backend='torch' (the test lane "
            "patches the interpreter: tests/interpreter_fixes.py)")


def cuda_unavailable_reason(device: torch.device) -> Optional[str]:
    """None when the C++ extension can run on `device`, else why not."""
    if device.type != "cuda":
        return f"cuda: the CUDA C++ kernels need CUDA tensors, got tensors on {device}"
    from .cuda import loader  # local: loading the extension is not free
    return loader.unavailable_reason()


@_never_traced  # a fact about the process (module docstring)
def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when `backend` can run on `device` at all (whatever the inputs), else why not."""
    if backend == "torch":
        return None
    if backend == "triton":
        return triton_unavailable_reason(device)
    if backend == "cuda":
        return cuda_unavailable_reason(device)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


InputReason = Callable[[str], Optional[str]]


def _reason(backend: str, device: torch.device, input_reason: Optional[InputReason]) -> Optional[str]:
    reason = unavailable_reason(backend, device)
    if reason is None and input_reason is not None:
        reason = input_reason(backend)
    return reason


def resolve(op: str, backend: str, device: torch.device, prefer: Sequence[str] = ("triton",),
            input_reason: Optional[InputReason] = None) -> str:
    """The concrete backend (``"triton"``, ``"cuda"`` or ``"torch"``) that runs `op` on `device`.

    `prefer` is the op's order of compiled backends for this input under ``"auto"``;
    `input_reason(backend)` says why a backend cannot take these particular inputs (a dtype or a
    rank it does not support), or None."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = getenv(ENV_VAR) or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"{op}: {ENV_VAR} must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = _reason(backend, device, input_reason)
        if reason is not None:
            raise BackendUnavailable(f"{op}: {reason}")
        return backend
    if device.type != "cuda":
        return "torch"
    for candidate in prefer:
        if _reason(candidate, device, input_reason) is None:
            return candidate
    return "torch"


def explain(op: str, device: torch.device, prefer: Sequence[str] = ("triton",),
            input_reason: Optional[InputReason] = None) -> str:
    """A human-readable account of what ``backend="auto"`` picks for `op` on `device` (a
    ``torch.device`` or a string such as ``"cuda:0"`` / ``"cpu"``), and why."""
    if not isinstance(op, str):
        raise TypeError(f"explain: op must be an op name (str), got {type(op).__name__}")
    if not isinstance(device, torch.device):
        if not isinstance(device, (str, int)) or isinstance(device, bool):
            raise TypeError(f"explain: device must be a torch.device or a device string, got {type(device).__name__}")
        try:
            device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"explain: device {device!r} is not a device ({e})") from None
    lines = [f"{op} on {device}: auto -> {resolve(op, 'auto', device, prefer, input_reason)}"]
    for b in ("triton", "cuda", "torch"):
        reason = _reason(b, device, input_reason)
        lines.append(f"  {b}: {'available' if reason is None else reason}")
    return "\n".join(lines)
