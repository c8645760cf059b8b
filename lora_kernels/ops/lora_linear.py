"""Fused LoRA linear: validation, backend dispatch, the registered ops and their autograd formula.

Layers: kernels (``lora_kernels/triton/lora_linear.py`` forward, ``lora_linear_backward.py``
backward) -> launchers (same files) -> the custom ops here -> ``FusedLoRALinear`` (layers.py).

Registered ops (namespace ``lora_kernels``; each has a fake impl, so torch.compile traces them):

* ``lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, backend, save_t, dropout_p,
  dropout_seed) -> (y, t)`` with its autograd formula registered on it;
* ``lora_linear_bwd(...) -> (dx, dA, dB, dbias)``, what that formula calls;
* ``dropout_keep_mask(seed, rows, cols, p, backend)``: the mask the kernels draw (tests).

Eager calls with plain tensors skip the dispatcher (``_LoRALinearFunction`` runs the same
implementations and the same formula); under torch.compile, tensor subclasses, dispatch modes and
functorch transforms the public function calls the registered op.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import torch
import torch.autograd.forward_ad as _forward_ad
from torch import Tensor

from .. import backends, reference
from .._validation import (_FLOAT_DTYPE_SET, check_adapter_dtype, check_probability, check_same_device,
                           check_scale, check_shape, check_tensor, fail)

OP = "lora_linear"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_RANK = 128  # t [BLOCK_M, r] lives in registers beside the accumulator
AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what autocast may cast (not fp64)


def _fast_valid(x, weight, lora_a, lora_b, bias) -> Optional[tuple]:
    """Only for inputs that ``_validate_all`` accepts, the backend cache's facts read on the way
    (_facts: x's device and dtype, lora_a's dtype, the rank r): the common call -- tensors, x of a
    float dtype with >= 1 dimension, weight [N, K] in x's dtype, lora_a [r >= 1, K] and lora_b
    [N, r] both in x's dtype or both float32, bias None or [N] in x's dtype or float32, all on x's
    device -- tested in one pass without building a message (~2 us less per call than the full
    checks, CPU machine). None decides nothing: the full checks then accept or raise.
    tests/test_lora_linear_op.py checks "accepted here => accepted there" over a grid of inputs."""
    if not (isinstance(x, Tensor) and isinstance(weight, Tensor) and isinstance(lora_a, Tensor)
            and isinstance(lora_b, Tensor)):
        return None
    dtype, a_dtype = x.dtype, lora_a.dtype
    if (dtype not in _FLOAT_DTYPE_SET or weight.dtype != dtype or lora_b.dtype != a_dtype
            or not (a_dtype == dtype or a_dtype == torch.float32)):
        return None
    try:  # unpacking checks the rank: ValueError for a weight / adapter that is not 2-D
        N, k_w = weight.shape
        r, k_a = lora_a.shape
        n_b, r_b = lora_b.shape
        K = x.shape[-1]  # IndexError for a 0-d x
    except (ValueError, IndexError):
        return None
    if not (k_w == K and k_a == K and r >= 1 and n_b == N and r_b == r):
        return None
    device = x.device
    if not (weight.device == device and lora_a.device == device and lora_b.device == device):
        return None
    if bias is None or (isinstance(bias, Tensor) and (bias.dtype == dtype or bias.dtype == torch.float32)
                        and bias.shape == (N,) and bias.device == device):
        return device, dtype, a_dtype, r
    return None


def _facts(x: Tensor, lora_a: Tensor) -> tuple:
    """What the backend rule reads from the tensors: (x's device, x's dtype, lora_a's dtype, r)."""
    return x.device, x.dtype, lora_a.dtype, lora_a.shape[0]


def _validate(x, weight, lora_a, lora_b, scale, bias) -> Tuple[float, tuple]:
    """(The checked scale (a float), _facts(x, lora_a)); raises naming the argument for any bad input."""
    if type(scale) is float and scale - scale == 0.0:
        facts = _fast_valid(x, weight, lora_a, lora_b, bias)
        if facts is not None:
            return scale, facts  # what check_scale returns for a finite float
    return _validate_all(x, weight, lora_a, lora_b, scale, bias), _facts(x, lora_a)


def _validate_all(x, weight, lora_a, lora_b, scale, bias) -> float:
    """Every check, in the order whose first failure names the argument (the bad-input table)."""
    check_tensor(OP, "x", x, min_ndim=1)
    check_tensor(OP, "weight", weight, ndim=2)
    check_tensor(OP, "lora_a", lora_a, ndim=2)
    check_tensor(OP, "lora_b", lora_b, ndim=2)
    if bias is not None:
        check_tensor(OP, "bias", bias, ndim=1)
    device = x.device
    if not (weight.device == device and lora_a.device == device and lora_b.device == device
            and (bias is None or bias.device == device)):
        check_same_device(OP, x=x, weight=weight, lora_a=lora_a, lora_b=lora_b, bias=bias)  # raises
    K = x.shape[-1]
    N = weight.shape[0]
    r = lora_a.shape[0]
    check_shape(OP, "weight", weight, (N, K), "N outputs, K = x.shape[-1]")
    if r < 1:
        fail(OP, f"lora_a must have at least one row (rank r >= 1), got shape {list(lora_a.shape)}")
    check_shape(OP, "lora_a", lora_a, (r, K), "rank r, K = x.shape[-1]")
    check_shape(OP, "lora_b", lora_b, (N, r), "N = weight.shape[0], rank r = lora_a.shape[0]")
    if bias is not None:
        check_shape(OP, "bias", bias, (N,), "N = weight.shape[0]")
    if weight.dtype != x.dtype:
        fail(OP, f"weight must have x's dtype ({x.dtype}), got {weight.dtype}", TypeError)
    check_adapter_dtype(OP, "lora_a", lora_a, x.dtype)
    if lora_b.dtype != lora_a.dtype:
        fail(OP, f"lora_b must have lora_a's dtype ({lora_a.dtype}), got {lora_b.dtype}", TypeError)
    if bias is not None and bias.dtype not in (x.dtype, torch.float32):
        fail(OP, f"bias must have x's dtype ({x.dtype}) or float32, got {bias.dtype}", TypeError)
    return check_scale(OP, "scale", scale)


def _input_reason(x: Tensor, lora_a: Tensor, dropout: bool = False):
    def reason(backend: str) -> Optional[str]:
        if backend == "triton":
            if x.dtype not in TRITON_DTYPES:
                return f"triton: dtype {x.dtype} is not supported (float16, bfloat16, float32)"
            if lora_a.shape[0] > TRITON_MAX_RANK:
                return f"triton: rank {lora_a.shape[0]} exceeds the kernel's limit of {TRITON_MAX_RANK}"
            return backends.interpreter_dtype_reason(x.dtype)
        if backend == "cuda":
            if dropout:
                return ("cuda: the CUDA C++ kernel has no dropout (training with dropout_p > 0); "
                        "backend='triton' has it")
            from ..cuda import lora_linear as cuda_lora_linear
            return cuda_lora_linear.input_reason(x.dtype, lora_a.dtype, lora_a.shape[0])
        return None
    return reason


# Under "auto" on CUDA tensors: Triton first, the CUDA C++ kernel when Triton cannot run (e.g. a
# serving image without triton). Which of the two is faster per shape is to be measured on an
# H100/H200 (bench/, suite forward, ours_triton vs ours_cuda); no measurement exists yet, so
# this order is a default, not a result.
AUTO_PREFERENCE = ("triton", "cuda")


_BACKEND_CACHE: dict = {}


def choose_backend(x: Tensor, lora_a: Tensor, backend: str = "auto", dropout: bool = False) -> str:
    """The backend that runs these inputs (see backends.py for the rule); `dropout`: the call
    draws a dropout mask (training with dropout_p > 0).

    Eager calls memoise the answer on everything the rule reads (the requested backend, the
    device, x's and the adapters' dtypes, the rank, dropout, the two environment variables and
    whether the interpreter's bfloat16 dot is fixed),
    so a decode step does not re-derive it hundreds of times. A backend whose reasons read
    anything else must add it to the key."""
    return _choose(x, lora_a, backend, dropout, _facts(x, lora_a), torch.compiler.is_compiling())


def _choose(x: Tensor, lora_a: Tensor, backend: str, dropout: bool, facts: tuple, compiling: bool) -> str:
    """choose_backend, given _facts(x, lora_a) and torch.compiler.is_compiling() (lora_linear has
    both already)."""
    if backend == "torch":
        return backend  # always runs; nothing to look up
    if compiling or type(backend) is not str:  # resolve() names a bad backend
        return backends.resolve(OP, backend, x.device, AUTO_PREFERENCE, _input_reason(x, lora_a, dropout))
    key = (backend, *facts, dropout, backends.choice_state())
    chosen = _BACKEND_CACHE.get(key)
    if chosen is None:
        chosen = backends.resolve(OP, backend, x.device, AUTO_PREFERENCE, _input_reason(x, lora_a, dropout))
        _BACKEND_CACHE[key] = chosen
    return chosen


# ---------------------------------------------------------------------------------------------
# Dropout: a Philox seed drawn from torch's generator; the kernels regenerate the mask from it.
# ---------------------------------------------------------------------------------------------

SEED_HIGH = 2 ** 63 - 1


def draw_dropout_seed(device) -> Tensor:
    """int64 [1] on `device`: the Philox key of one dropout mask, drawn from torch's generator for
    that device (so ``torch.manual_seed`` reproduces it, checkpointing replays it, and CUDA-graph
    capture records it). ``lora_linear`` draws exactly one per training call with dropout."""
    return torch.randint(SEED_HIGH, (1,), dtype=torch.int64, device=device)


@torch.library.custom_op("lora_kernels::dropout_keep_mask", mutates_args=())
def _dropout_keep_mask_op(seed: Tensor, rows: int, cols: int, p: float, backend: str) -> Tensor:
    if backend == "triton":
        from ..triton.lora_linear import dropout_mask as launch
        return launch(seed, rows, cols, p)
    return reference.dropout_keep_mask(int(seed.item()), rows, cols, p, seed.device)


@_dropout_keep_mask_op.register_fake
def _(seed, rows, cols, p, backend):
    return seed.new_empty((rows, cols), dtype=torch.bool)


def dropout_mask(seed: Tensor, shape, p: float, backend: str = "auto") -> Tensor:
    """bool `shape` (True = keep): the dropout mask that ``lora_linear`` with this seed applies to
    an x of this shape -- for tests and debugging; the kernels never materialise it.
    Row m of the flattened [prod(shape[:-1]), shape[-1]] view is Philox counter row m (see
    ``reference.dropout_keep_mask``). seed: int64 [1] from ``draw_dropout_seed``."""
    shape = tuple(shape)
    rows, cols = math.prod(shape[:-1]), shape[-1]
    chosen = backends.resolve("dropout_mask", backend, seed.device, ("triton",))
    return torch.ops.lora_kernels.dropout_keep_mask(seed, rows, cols, float(p), chosen).reshape(shape)


# ---------------------------------------------------------------------------------------------
# The registered ops: validated inputs, a concrete backend. x may have any leading dims.
# ---------------------------------------------------------------------------------------------

def _no_autocast(x: Tensor):
    """The torch backend computes in fp32/fp64 on purpose: autocast must not re-cast inside it."""
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


def _keep_mask(x2: Tensor, p: float, seed: Optional[Tensor]) -> Optional[Tensor]:
    """The torch backend's dropout mask for x2 [M, K] (the same bits the kernels draw)."""
    if seed is None:
        return None
    return reference.dropout_keep_mask(int(seed.item()), x2.shape[0], x2.shape[1], p, x2.device)


def _reference_forward(x2: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                       bias: Optional[Tensor], dropout_p: float, dropout_seed: Optional[Tensor]):
    """The torch backend's (y, t) for a 2-D x2, outside autocast (see _no_autocast; the check is
    inlined: a nullcontext per call costs ~0.5 us, CPU machine)."""
    keep = None if dropout_seed is None else _keep_mask(x2, dropout_p, dropout_seed)
    if torch._C._is_any_autocast_enabled() and torch.is_autocast_enabled(x2.device.type):
        with torch.autocast(x2.device.type, enabled=False):
            return reference.lora_linear_forward(x2, weight, lora_a, lora_b, scale, bias, keep, dropout_p)
    return reference.lora_linear_forward(x2, weight, lora_a, lora_b, scale, bias, keep, dropout_p)


def _forward(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
             bias: Optional[Tensor], backend: str, save_t: bool, dropout_p: float,
             dropout_seed: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
    """lora_linear_fwd's (y, t) where the torch backend's t may be None when not save_t (the
    eager paths drop it; the op must return a tensor)."""
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: K may be 0
    if backend == "triton":
        y, t = backends.launcher("triton.lora_linear").lora_linear_fwd(
            x2, weight, lora_a, lora_b, scale, bias, save_t, dropout_p=dropout_p, seed=dropout_seed, want_t=save_t)
    elif backend == "cuda":
        if dropout_seed is not None:
            raise backends.BackendUnavailable(f"{OP}: {_input_reason(x, lora_a, True)('cuda')}")
        y, t = backends.launcher("cuda.lora_linear").lora_linear_fwd(x2, weight, lora_a, lora_b, scale, bias, save_t)
    else:
        y, t = _reference_forward(x2, weight, lora_a, lora_b, scale, bias, dropout_p, dropout_seed)
        if not save_t:
            t = None
    return (y if flat else y.reshape(*x.shape[:-1], weight.shape[0])), t


def lora_linear_fwd(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                    bias: Optional[Tensor], backend: str, save_t: bool, dropout_p: float = 0.0,
                    dropout_seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """(y, t): y = x @ weight.T + bias + scale * t @ lora_b.T with t = drop(x) @ lora_a.T in fp32.

    x [..., K], weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] | None; y [..., N] in
    x.dtype; t [M, r] float32 (float64 for float64 inputs, see _t_dtype; M = x.numel() // K) when
    save_t (kept for the backward), else an empty [0, r]. drop(x) = x * keep / (1 - dropout_p),
    keep drawn from dropout_seed (int64 [1]; None = no dropout)."""
    y, t = _forward(x, weight, lora_a, lora_b, scale, bias, backend, save_t, dropout_p, dropout_seed)
    if t is None:  # acc dtype: fp64 for fp64
        t = x.new_empty((0, lora_a.shape[0]), dtype=_t_dtype(x, lora_a))
    return y, t


_fwd_op = torch.library.custom_op("lora_kernels::lora_linear_fwd", mutates_args=())(lora_linear_fwd)


def _t_dtype(x: Tensor, lora_a: Tensor) -> torch.dtype:
    """t's dtype: the accumulation dtype (float32; float64 for float64 inputs, which only the torch
    backend takes), so that float64 gradients of the adapters stay float64-exact."""
    return reference.acc_dtype(x.dtype, lora_a.dtype)


@_fwd_op.register_fake
def _(x, weight, lora_a, lora_b, scale, bias, backend, save_t, dropout_p=0.0, dropout_seed=None):
    M = math.prod(x.shape[:-1])
    return (x.new_empty((*x.shape[:-1], weight.shape[0])),
            x.new_empty((M if save_t else 0, lora_a.shape[0]), dtype=_t_dtype(x, lora_a)))


def lora_linear_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor,
                    t: Optional[Tensor], scale: float, dropout_p: float, dropout_seed: Optional[Tensor],
                    bias_dtype: Optional[torch.dtype], backend: str, need_x: bool, need_a: bool,
                    need_b: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, dA, dB, dbias) of lora_linear_fwd (W's gradient is the caller's: dy^T @ x)::

        u = dy @ lora_b                                      # fp32, once
        dx = dy @ weight + scale * (u @ lora_a) * keep / (1 - p)
        dA = scale * u.T @ drop(x);  dB = scale * dy.T @ t;  dbias = dy.sum(0)

    dy [..., N] like y, x [..., K], t [M, r] fp32 or None (recomputed if dB is needed). Grads in
    x's / lora_a's / lora_b's / bias_dtype; one not needed (need_* False, bias_dtype None) comes
    back as an empty [0] tensor. backend "cuda" (a CUDA forward on Hopper, see backward_backend):
    dx from the sm90 kernel where it takes these operands, the rest from Triton (or torch)."""
    K, N = x.shape[-1], weight.shape[0]
    M = math.prod(x.shape[:-1])  # explicit, not -1: K or N may be 0
    x2, dy2 = x.reshape(M, K), dy.reshape(M, N)
    sm90_dx = u = None
    if backend == "cuda":  # a CUDA forward on Hopper (backward_backend): dx on the sm90 kernel where it runs
        from ..cuda.lora_linear import lora_linear_dx
        backend = _fallback_backward(x, lora_a)  # the rest, and any dx the sm90 kernel does not take
        got = lora_linear_dx(dy2, weight, lora_a, lora_b, scale, dropout_seed is not None) if need_x else None
        if got is not None:
            (sm90_dx, u), need_x = got, False  # u = dy @ lora_b: Triton's dA reuses it
    if need_b and t is None:  # lora_b started requiring grad after the forward: recompute t
        with _no_autocast(x):
            _, t = reference.lora_linear_forward(x2, weight, lora_a, lora_b, scale, None,
                                                 _keep_mask(x2, dropout_p, dropout_seed), dropout_p)
    if backend == "triton":
        dx, da, db, dbias = backends.launcher("triton.lora_linear_backward").lora_linear_bwd(
            dy2, x2, weight, lora_a, lora_b, t, scale, dropout_p, dropout_seed, bias_dtype, need_x, need_a, need_b, u=u)
        dx = dx if sm90_dx is None else sm90_dx
        return (dx.reshape(x.shape) if need_x or sm90_dx is not None else dx), da, db, dbias
    with _no_autocast(x):
        grads = reference.lora_linear_backward(dy2, x2, weight, lora_a, lora_b, t, scale,
                                               _keep_mask(x2, dropout_p, dropout_seed), dropout_p,
                                               need_x, need_a, need_b, bias_dtype)
    dx, da, db, dbias = (g if g is not None else x.new_empty((0,), dtype=d) for g, d in
                         zip(grads, (x.dtype, lora_a.dtype, lora_b.dtype, bias_dtype or x.dtype)))
    dx = dx if sm90_dx is None else sm90_dx
    return (dx.reshape(x.shape) if need_x or sm90_dx is not None else dx), da, db, dbias


_bwd_op = torch.library.custom_op("lora_kernels::lora_linear_bwd", mutates_args=())(lora_linear_bwd)


@_bwd_op.register_fake
def _(dy, x, weight, lora_a, lora_b, t, scale, dropout_p, dropout_seed, bias_dtype, backend, need_x,
      need_a, need_b):
    def grad(needed, like, shape, dtype=None):
        return like.new_empty(shape if needed else (0,), dtype=dtype or like.dtype)
    return (grad(need_x, x, x.shape), grad(need_a, lora_a, lora_a.shape),
            grad(need_b, lora_b, lora_b.shape),
            grad(bias_dtype is not None, dy, (weight.shape[0],), bias_dtype or x.dtype))


# ---------------------------------------------------------------------------------------------
# Autograd: one formula, registered with the op and reused by the eager fast path.
# ---------------------------------------------------------------------------------------------

def backward_backend(forward_backend: str, x: Tensor, lora_a: Tensor) -> str:
    """The backend of the backward. A CUDA C++ forward's backward: "cuda" on an sm_90 GPU with
    the sm90 dx kernels built (lora_linear_bwd takes dx from the sm90 kernel where
    ``cuda.lora_linear.sm90_dx_choice`` allows, and everything else from the fallback below);
    otherwise Triton where Triton can run these inputs, else the torch reference."""
    if forward_backend != "cuda":
        return forward_backend
    from ..cuda.lora_linear import sm90_dx_device
    return "cuda" if sm90_dx_device(x.device) else _fallback_backward(x, lora_a)


def _fallback_backward(x: Tensor, lora_a: Tensor) -> str:
    """The backward of a CUDA forward apart from an sm90 dx: Triton where it runs, else torch."""
    reason = backends.unavailable_reason("triton", x.device) or _input_reason(x, lora_a)("triton")
    return "torch" if reason else "triton"


def _save(ctx, x, weight, lora_a, lora_b, t, seed, scale, dropout_p, bias, backend) -> None:
    """Kept for the backward: x itself (never a copy or an fp32 cast), the parameters, t [M, r]
    fp32 (only when B needs a gradient) and the dropout seed (int64 [1]) -- never a mask."""
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.backend = backward_backend(backend, x, lora_a)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.save_for_backward(x, weight, lora_a, lora_b, t, seed)


def _grads(ctx, dy: Tensor, bwd) -> tuple:
    """(dx, dW, dA, dB, dbias), None where not needed; `bwd` is lora_linear_bwd or its op."""
    x, weight, lora_a, lora_b, t, seed = ctx.saved_tensors
    need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad[:6]
    dx = da = db = dbias = dw = None
    if need_x or need_a or need_b or need_bias:
        dx, da, db, dbias = bwd(dy, x, weight, lora_a, lora_b, t, ctx.scale, ctx.dropout_p, seed,
                                ctx.bias_dtype if need_bias else None, ctx.backend, need_x, need_a,
                                need_b)
    if need_w:  # a trainable base weight: one plain GEMM (the base sees x, never drop(x))
        K, N = x.shape[-1], weight.shape[0]
        M = math.prod(x.shape[:-1])
        dw = (dy.reshape(M, N).t() @ x.reshape(M, K)).to(weight.dtype)
    return (dx if need_x else None, dw, da if need_a else None, db if need_b else None,
            dbias if need_bias else None)


def _setup_context(ctx, inputs, output):
    x, weight, lora_a, lora_b, scale, bias, backend, save_t, dropout_p, dropout_seed = inputs
    _save(ctx, x, weight, lora_a, lora_b, output[1] if save_t else None, dropout_seed, scale,
          dropout_p, bias, backend)


def _backward(ctx, dy, _dt):
    dx, dw, da, db, dbias = _grads(ctx, dy, torch.ops.lora_kernels.lora_linear_bwd)
    return dx, dw, da, db, None, dbias, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


class _LoRALinearFunction(torch.autograd.Function):
    """The eager fast path: the op's implementations and formula without the dispatcher."""

    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scale, bias, backend, save_t, dropout_p, dropout_seed):
        y, t = _forward(x, weight, lora_a, lora_b, scale, bias, backend, save_t, dropout_p, dropout_seed)
        _save(ctx, x, weight, lora_a, lora_b, t if save_t else None, dropout_seed, scale, dropout_p,
              bias, backend)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        dx, dw, da, db, dbias = _grads(ctx, dy, lora_linear_bwd)
        return dx, dw, da, db, None, dbias, None, None, None, None


# ---------------------------------------------------------------------------------------------
# torch.func (grad, vmap, jvp, jacrev, hessian, ...) and forward-mode AD
# ---------------------------------------------------------------------------------------------

def _is_batched(*tensors) -> bool:
    return any(t is not None and torch._C._functorch.is_batchedtensor(t) for t in tensors)


def _transform_keep_mask(x2: Tensor, p: float, seed: Optional[Tensor]) -> Optional[Tensor]:
    if seed is None:
        return None
    if _is_batched(seed):  # vmap(randomness="different") drew one seed per sample
        fail(OP, "dropout under torch.func.vmap(randomness='different') is not supported (one Philox "
                 "key per call); use randomness='same', dropout_p=0 or training=False", NotImplementedError)
    return reference.dropout_keep_mask(int(seed.item()), x2.shape[0], x2.shape[1], p, x2.device)


class _LoRALinearTransformFunction(torch.autograd.Function):
    """lora_linear under torch.func transforms and forward-mode AD.

    forward: the chosen backend's kernel where the inputs are plain tensors (``torch.func.grad``,
    ``jvp``), else -- under ``vmap`` the inputs are batched, which no kernel takes -- the torch
    reference (plain batchable torch ops; ``generate_vmap_rule`` runs it per sample).
    backward and jvp: plain torch ops (they run on functorch-wrapped tensors), differentiable
    again, so ``vmap(grad(...))`` (per-sample gradients), ``jacrev``, ``hessian`` and ``jvp`` all
    give the true derivatives. Formulas (t = drop(x) @ lora_a.T, fp32/fp64)::

        backward: lora_linear_bwd's, and dW = dy.T @ x
        jvp:      dy = dx @ W.T + x @ dW.T + s * ((drop(dx) @ A.T + drop(x) @ dA.T) @ B.T + t @ dB.T) + dbias
    """
    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, lora_a, lora_b, scale, bias, backend, dropout_p, seed):
        if _is_batched(x, weight, lora_a, lora_b, bias):
            backend = "torch"
        if backend == "torch":
            K = x.shape[-1]
            x2 = x.reshape(math.prod(x.shape[:-1]), K)
            keep = _transform_keep_mask(x2, dropout_p, seed)
            with _no_autocast(x):
                y, _ = reference.lora_linear_forward(x2, weight, lora_a, lora_b, scale, bias, keep, dropout_p)
            return y.reshape(*x.shape[:-1], weight.shape[0])
        return lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, backend, False, dropout_p, seed)[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, lora_a, lora_b, scale, bias, _backend, dropout_p, seed = inputs
        ctx.scale, ctx.dropout_p = scale, dropout_p
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(x, weight, lora_a, lora_b, seed)
        ctx.save_for_forward(x, weight, lora_a, lora_b, seed)

    @staticmethod
    def _flat(ctx):
        x, weight, lora_a, lora_b, seed = ctx.saved_tensors
        K = x.shape[-1]
        x2 = x.reshape(math.prod(x.shape[:-1]), K)
        return x, x2, weight, lora_a, lora_b, _transform_keep_mask(x2, ctx.dropout_p, seed)

    @staticmethod
    def backward(ctx, dy):
        x, x2, weight, lora_a, lora_b, keep = _LoRALinearTransformFunction._flat(ctx)
        need_x, need_w, need_a, need_b, _, need_bias = ctx.needs_input_grad[:6]
        N = weight.shape[0]
        dy2 = dy.reshape(x2.shape[0], N)
        t = None
        if need_b:
            acc = reference.acc_dtype(x.dtype, lora_a.dtype)
            t = reference.lora_input(x2, ctx.dropout_p, dropout_mask=keep).to(acc) @ lora_a.to(acc).t()
        dx, da, db, dbias = reference.lora_linear_backward(
            dy2, x2, weight, lora_a, lora_b, t, ctx.scale, keep, ctx.dropout_p, need_x, need_a, need_b,
            ctx.bias_dtype if need_bias else None)
        dw = (dy2.t() @ x2).to(weight.dtype) if need_w else None
        return (dx.reshape(x.shape) if need_x else None), dw, da, db, None, dbias, None, None, None

    @staticmethod
    def jvp(ctx, dx, dw, da, db, _dscale, dbias, *_):
        x, x2, weight, lora_a, lora_b, keep = _LoRALinearTransformFunction._flat(ctx)
        acc = reference.acc_dtype(x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
        M, N = x2.shape[0], weight.shape[0]
        drop = (lambda v: reference.lora_input(v.to(acc), ctx.dropout_p, dropout_mask=keep))
        out = torch.zeros((M, N), dtype=acc, device=x.device)
        dt = None  # tangent of t = drop(x) @ A.T
        if dx is not None:
            dx2 = dx.reshape(M, x2.shape[1]).to(acc)
            out = out + dx2 @ weight.to(acc).t()
            dt = drop(dx2) @ lora_a.to(acc).t()
        if dw is not None:
            out = out + x2.to(acc) @ dw.to(acc).t()
        if da is not None:
            term = drop(x2) @ da.to(acc).t()
            dt = term if dt is None else dt + term
        if dt is not None:
            out = out + ctx.scale * (dt @ lora_b.to(acc).t())
        if db is not None:
            t = drop(x2) @ lora_a.to(acc).t()
            out = out + ctx.scale * (t @ db.to(acc).t())
        if dbias is not None:
            out = out + dbias.to(acc)
        return out.to(x.dtype).reshape(*x.shape[:-1], N)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _eager_fast_path(x, weight, lora_a, lora_b, bias, compiling: bool) -> bool:
    """True when calling the implementations directly is indistinguishable from calling the op:
    eager mode (`compiling`: torch.compiler.is_compiling()), no dispatch modes or functorch
    transforms, plain tensors on a real device, and no profiler running (so that a trace shows the
    op by its name)."""
    if compiling or torch.autograd._profiler_enabled():
        return False
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    if x.is_meta or type(x) not in _PLAIN_TENSOR_TYPES or type(weight) not in _PLAIN_TENSOR_TYPES:
        return False
    if type(lora_a) not in _PLAIN_TENSOR_TYPES or type(lora_b) not in _PLAIN_TENSOR_TYPES:
        return False
    return bias is None or type(bias) in _PLAIN_TENSOR_TYPES


# ---------------------------------------------------------------------------------------------
# Autocast
# ---------------------------------------------------------------------------------------------

def _autocast_dtype(x, compiling: bool) -> Optional[torch.dtype]:
    """The autocast dtype active for x's device, or None (`compiling`: torch.compiler.is_compiling())."""
    if not isinstance(x, Tensor):
        return None
    if not compiling and not torch._C._is_any_autocast_enabled():
        return None  # the common eager case, in ~0.1 us
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def _autocast_inputs(dtype, x, weight, lora_a, lora_b, bias):
    """What autocast does to lora_linear (as it does to F.linear, plus PEFT's adapters):
    x and weight are cast to the autocast dtype; a float32 bias and float32 adapters stay float32
    (the kernels add the bias and run the fp32 adapter in fp32 -- PEFT's default fp32 adapters
    keep their precision and get fp32 gradients, with no cast copies of A and B); any other
    16-bit bias or adapter is cast to the autocast dtype. float64 x is left alone."""
    def cast(t, keep_fp32):
        if not isinstance(t, Tensor) or t.dtype not in AUTOCAST_DTYPES or t.dtype == dtype:
            return t
        return t if (keep_fp32 and t.dtype == torch.float32) else t.to(dtype)
    if not isinstance(x, Tensor) or x.dtype not in AUTOCAST_DTYPES:
        return x, weight, lora_a, lora_b, bias
    return (cast(x, False), cast(weight, False), cast(lora_a, True), cast(lora_b, True),
            None if bias is None else cast(bias, True))


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------

def lora_linear(x: Tensor, weight: Tensor, lora_a: Tensor, lora_b: Tensor, scale: float,
                bias: Optional[Tensor] = None, *, dropout_p: float = 0.0, training: bool = False,
                backend: str = "auto") -> Tensor:
    """LoRA linear layer in one fused pass (forward and backward).

    Semantics (plain torch; dropout on the LoRA input only, as PEFT)::

        y = x @ weight.T + bias + scale * (dropout(x, dropout_p, training) @ lora_a.T) @ lora_b.T

    Args:
        x: [..., K] float16 / bfloat16 / float32 (float64 on the torch backend), any strides.
        weight: [N, K], x's dtype.
        lora_a: [r, K], x's dtype or float32. lora_b: [N, r], lora_a's dtype.
        scale: finite float (``lora_alpha / r``, or ``/ sqrt(r)`` for rsLoRA).
        bias: [N] or None.
        dropout_p, training: LoRA dropout probability, applied only when ``training``: each
            element of x is kept with probability 1 - p and scaled by 1 / (1 - p) on the LoRA
            branch. The mask comes from a Philox key drawn from torch's generator
            (``draw_dropout_seed``): ``torch.manual_seed`` reproduces it, and the backward
            regenerates it instead of storing it (``dropout_mask`` materialises it for tests).
        backend: "auto" | "triton" | "cuda" | "torch" (see ``lora_kernels.backends``).

    Under ``torch.autocast`` x and weight are cast to the autocast dtype, and float32 adapters and
    bias stay float32 (see ``_autocast_inputs``). Saved for the backward: x, the parameters,
    t = drop(x) @ lora_a.T [M, r] in fp32 (fp64 for fp64 inputs; when lora_b requires grad) and the
    dropout seed.

    Returns: y [..., N] in x's dtype. Differentiable in x, lora_a, lora_b, bias (and weight when
    it requires grad); each gradient in its tensor's dtype.
    """
    compiling = torch.compiler.is_compiling()  # read once: ~0.1 us per read (CPU machine)
    autocast = _autocast_dtype(x, compiling)
    if autocast is not None:
        x, weight, lora_a, lora_b, bias = _autocast_inputs(autocast, x, weight, lora_a, lora_b, bias)
    scale, facts = _validate(x, weight, lora_a, lora_b, scale, bias)
    dropout_p = check_probability(OP, "dropout_p", dropout_p)
    if not training:
        dropout_p = 0.0
    chosen = _choose(x, lora_a, backend, dropout_p > 0.0, facts, compiling)
    seed = draw_dropout_seed(x.device) if dropout_p > 0.0 else None
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or lora_a.requires_grad
                                        or lora_b.requires_grad or (bias is not None and bias.requires_grad))
    save_t = grad and lora_b.requires_grad
    if _eager_fast_path(x, weight, lora_a, lora_b, bias, compiling):
        if _forward_ad._current_level >= 0:  # inside forward_ad.dual_level(): the formula with a jvp
            return _LoRALinearTransformFunction.apply(x, weight, lora_a, lora_b, scale, bias, chosen,
                                                      dropout_p, seed)
        if grad:
            return _LoRALinearFunction.apply(x, weight, lora_a, lora_b, scale, bias, chosen, save_t,
                                             dropout_p, seed)
        return _forward(x, weight, lora_a, lora_b, scale, bias, chosen, False, dropout_p, seed)[0]
    if not compiling and (torch._C._are_functorch_transforms_active() or _forward_ad._current_level >= 0):
        return _LoRALinearTransformFunction.apply(x, weight, lora_a, lora_b, scale, bias, chosen, dropout_p, seed)
    return torch.ops.lora_kernels.lora_linear_fwd(x, weight, lora_a, lora_b, scale, bias, chosen, save_t,
                                                  dropout_p, seed)[0]
