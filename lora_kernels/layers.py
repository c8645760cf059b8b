"""Modules. They compose ops and hold parameters; they know nothing about kernels."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validation import (FLOAT_DTYPES, check_allocatable, check_count, check_probability, check_scale, check_shape,
                          check_tensor, fail)
from .backends import BACKENDS
from .ops.lora_linear import lora_linear
from .ops.merge import MergeResidual, merge_, unmerge_
from .ops.multi_lora import multi_lora_linear
from .serving import MAX_INDEX_SIZE, AdapterIndex


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_hparams(op: str, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend,
                   in_features: int, out_features: int) -> None:
    """Every hyper-parameter of a FusedLoRALinear, checked before anything is built or changed, so
    a bad one fails here, naming the argument, and not at the first forward."""
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{op}: r must be a positive int, got {r!r}")
    check_scale(op, "lora_alpha", lora_alpha)  # a finite real number (not a string, bool or nan)
    check_probability(op, "lora_dropout", lora_dropout)
    if not isinstance(use_rslora, bool):
        fail(op, f"use_rslora must be a bool, got {type(use_rslora).__name__}", TypeError)
    if adapter_dtype is not None and adapter_dtype not in FLOAT_DTYPES:
        fail(op, f"adapter_dtype must be None or one of "
                 f"({', '.join(str(d).replace('torch.', '') for d in FLOAT_DTYPES)}), got {adapter_dtype!r}",
             TypeError)
    if not isinstance(backend, str) or backend not in BACKENDS:
        fail(op, f"backend must be one of {BACKENDS}, got {backend!r}")
    dtype = adapter_dtype or torch.float32
    check_allocatable(op, "r", r, (r, in_features), dtype, f"lora_A [r, in_features = {in_features}]")
    check_allocatable(op, "r", r, (out_features, r), dtype, f"lora_B [out_features = {out_features}, r]")


def _is_dtensor(t) -> bool:
    """A DTensor parameter (FSDP2 or tensor parallelism), without importing torch.distributed for
    plain tensors."""
    if type(t) in (torch.Tensor, nn.Parameter) or not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


class FusedLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable LoRA adapter, computed by the fused kernels::

        y = x @ weight.T + bias + scaling * (dropout(x) @ lora_A.T) @ lora_B.T

    weight [out, in] and bias [out] are frozen; lora_A [r, in] (kaiming-uniform, as PEFT) and
    lora_B [out, r] (zeros, so a new adapter starts as the identity) are trainable;
    ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``). ``merge()`` folds the adapter
    into weight (inference then costs one GEMM); ``unmerge()`` takes it out again.

    ``adapter_dtype`` (default: the weight's dtype) may be float32 over a 16-bit base, as PEFT keeps
    adapters by default. ``backend`` is passed to every op ("auto" | "triton" | "cuda" | "torch").
    """

    def __init__(self, in_features: int, out_features: int, r: int, lora_alpha: float = 8,
                 lora_dropout: float = 0.0, bias: bool = True, use_rslora: bool = False,
                 device=None, dtype=None, *, adapter_dtype: Optional[torch.dtype] = None,
                 backend: str = "auto"):
        super().__init__()
        op = "FusedLoRALinear"
        check_count(op, "in_features", in_features, 0)
        check_count(op, "out_features", out_features, 0)
        _check_hparams(op, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend, in_features,
                       out_features)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend)

    def _init_adapter(self, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend):
        self.in_features = self.weight.shape[1]
        self.out_features = self.weight.shape[0]
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = float(lora_dropout)
        self.use_rslora = use_rslora
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.backend = backend
        self.merged = False
        self._merge_residual = None
        dtype = adapter_dtype or self.weight.dtype
        device = self.weight.device
        try:
            self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
            self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
        except RuntimeError as e:  # out of memory: say which argument sized the request
            raise type(e)(f"FusedLoRALinear: allocating lora_A [r={r}, {self.in_features}] and lora_B "
                          f"[{self.out_features}, r={r}] ({dtype}, {device}) failed: {e}") from e
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's init: A kaiming-uniform(a=sqrt(5)), B zeros."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, lora_alpha: float = 8, lora_dropout: float = 0.0,
                    use_rslora: bool = False, *, adapter_dtype: Optional[torch.dtype] = None,
                    backend: str = "auto") -> "FusedLoRALinear":
        """Wrap an existing ``nn.Linear``: shares (does not copy) its weight and bias, and freezes
        them as PEFT does."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"FusedLoRALinear.from_linear: linear must be an nn.Linear, got {type(linear).__name__}")
        _check_hparams("FusedLoRALinear.from_linear", r, lora_alpha, lora_dropout, use_rslora, adapter_dtype,
                       backend, linear.in_features, linear.out_features)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend)
        # frozen last: if anything above fails (an allocation), linear is left as it was
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return F.linear(x, self.weight, self.bias)
        return lora_linear(x, self.weight, self.lora_A, self.lora_B, self.scaling, self.bias,
                           dropout_p=self.lora_dropout, training=self.training, backend=self.backend)

    @torch.no_grad()
    def merge(self, *, safe_merge: bool = False, exact_unmerge: bool = False) -> None:
        """weight += scaling * lora_B @ lora_A, in place (one pass, one rounding per element).

        safe_merge: raise ValueError, weight unchanged, if the result would hold inf or NaN.
        exact_unmerge: keep a ``MergeResidual`` (1 byte per weight element plus a small escape
        table; not part of the state_dict) so that ``unmerge()`` restores weight bit for bit.
        Sharded parameters (DTensors: FSDP2, lora_kernels.distributed): every rank calls this and
        merges its own block of the weight (``lora_kernels.distributed.merge_sharded``)."""
        if self.merged:
            warnings.warn("FusedLoRALinear.merge: already merged; nothing to do")
            return
        if _is_dtensor(self.weight):  # FSDP2 / tensor parallelism: each rank merges its own block
            from .distributed import merge_sharded
            return merge_sharded(self, safe_merge=safe_merge, exact_unmerge=exact_unmerge)
        residual = MergeResidual() if exact_unmerge else None
        merge_(self.weight, self.lora_A, self.lora_B, self.scaling, safe_merge=safe_merge,
               residual=residual, backend=self.backend)
        self._merge_residual = residual
        self.merged = True

    @torch.no_grad()
    def unmerge(self, *, exact: Optional[bool] = None) -> None:
        """weight -= scaling * lora_B @ lora_A, in place.

        After ``merge(exact_unmerge=True)`` (and with ``exact`` None or True) the weight is
        restored bit for bit instead; that needs the adapter and weight unchanged since the merge,
        else RuntimeError (layer left merged): ``unmerge(exact=False)`` then subtracts the current
        adapter, as PEFT does."""
        if not self.merged:
            warnings.warn("FusedLoRALinear.unmerge: not merged; nothing to do")
            return
        if _is_dtensor(self.weight):
            from .distributed import unmerge_sharded
            return unmerge_sharded(self, exact=exact)
        residual = getattr(self, "_merge_residual", None)
        if exact and residual is None:
            raise RuntimeError("FusedLoRALinear.unmerge: exact=True needs merge(exact_unmerge=True)")
        if residual is not None and exact is not False:
            reason = residual.mismatch(self.weight, self.lora_A, self.lora_B, self.scaling)
            if reason is not None:
                raise RuntimeError(f"FusedLoRALinear.unmerge: cannot restore the weight exactly: {reason}; "
                                   f"unmerge(exact=False) subtracts the current adapter instead")
            unmerge_(self.weight, self.lora_A, self.lora_B, self.scaling, residual=residual)
        else:
            unmerge_(self.weight, self.lora_A, self.lora_B, self.scaling, backend=self.backend)
        self._merge_residual = None
        self.merged = False

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"lora_alpha={self.lora_alpha}, scaling={self.scaling:g}, lora_dropout={self.lora_dropout}, "
                f"bias={self.bias is not None}, merged={self.merged}, backend={self.backend!r}")


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a pool of LoRA adapter slots; every token picks its own slot::

        y[m] = x[m] @ weight.T + bias + scales[i] * lora_b_stack[i, :, :r_i] @ (lora_a_stack[i, :r_i] @ x[m])
        # i = index.token_adapter[m]; tokens with i = -1 get the base output only

    Buffers (not parameters -- this is the serving layer): ``lora_a_stack [max_adapters,
    max_rank, in]``, ``lora_b_stack [max_adapters, out, max_rank]`` (``adapter_dtype``, default
    the base weight's dtype), ``scales [max_adapters]`` float32, ``ranks [max_adapters]`` int32.
    ``load_adapter`` fills a slot with an adapter of any rank up to ``max_rank``;
    ``unload_adapter`` empties it (rank 0: tokens still mapped to it get the base output).
    ``forward(x, index)`` takes x [..., in] and the batch's ``AdapterIndex`` (built once per batch
    and shared by every layer); it runs ``multi_lora_linear`` with ``backend``.
    """

    def __init__(self, base: nn.Linear, max_adapters: int, max_rank: int, *,
                 adapter_dtype: Optional[torch.dtype] = None, backend: str = "auto"):
        super().__init__()
        op = "MultiLoRALinear"
        if not isinstance(base, nn.Linear):
            fail(op, f"base must be an nn.Linear, got {type(base).__name__}", TypeError)
        check_count(op, "max_adapters", max_adapters)
        check_count(op, "max_rank", max_rank)
        if max_adapters > MAX_INDEX_SIZE:  # AdapterIndex slots are int32
            fail(op, f"max_adapters must be at most 2**31 - 2 (int32 slot ids), got {max_adapters}")
        if max_rank > MAX_INDEX_SIZE:
            fail(op, f"max_rank must be at most 2**31 - 2, got {max_rank}")
        stack_elems = max_adapters * max_rank * max(base.in_features, base.out_features)
        if stack_elems >= 2 ** 48:  # 256 TiB of bf16: past any device, and past torch's size arithmetic soon after
            fail(op, f"max_adapters * max_rank * max(in_features, out_features) = {stack_elems} elements is too "
                     f"large for one adapter stack (max_adapters={max_adapters}, max_rank={max_rank})")
        self.base_layer = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.max_adapters, self.max_rank = max_adapters, max_rank
        self.backend = backend
        dtype = adapter_dtype or base.weight.dtype
        device = base.weight.device
        self.register_buffer("lora_a_stack", torch.zeros(max_adapters, max_rank, self.in_features,
                                                         dtype=dtype, device=device))
        self.register_buffer("lora_b_stack", torch.zeros(max_adapters, self.out_features, max_rank,
                                                         dtype=dtype, device=device))
        self.register_buffer("scales", torch.zeros(max_adapters, dtype=torch.float32, device=device))
        self.register_buffer("ranks", torch.zeros(max_adapters, dtype=torch.int32, device=device))

    def _check_slot(self, op: str, slot) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int):
            fail(op, f"slot must be an int, got {type(slot).__name__}", TypeError)
        if not 0 <= slot < self.max_adapters:
            fail(op, f"slot must be in [0, {self.max_adapters - 1}] (max_adapters={self.max_adapters}), got {slot}")
        return slot

    @torch.no_grad()
    def load_adapter(self, slot: int, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> None:
        """Copy an adapter into `slot`: lora_a [r, in], lora_b [out, r] (1 <= r <= max_rank, any
        float dtype and device; stored in the stacks' dtype), scale a finite float
        (lora_alpha / r). The slot's entries past r are zeroed."""
        op = "MultiLoRALinear.load_adapter"
        slot = self._check_slot(op, slot)
        check_tensor(op, "lora_a", lora_a, ndim=2)
        check_tensor(op, "lora_b", lora_b, ndim=2)
        r = lora_a.shape[0]
        if not 1 <= r <= self.max_rank:
            fail(op, f"lora_a must have 1 to max_rank = {self.max_rank} rows (its rank), got shape {list(lora_a.shape)}")
        check_shape(op, "lora_a", lora_a, (r, self.in_features), "rank r, in_features")
        check_shape(op, "lora_b", lora_b, (self.out_features, r), "out_features, rank r = lora_a.shape[0]")
        scale = check_scale(op, "scale", scale)
        # Convert before touching the slot: a copy that fails (a meta tensor, a device that
        # cannot be reached) must leave the adapter that was there intact.
        converted = {}
        for name, value, stack in (("lora_a", lora_a, self.lora_a_stack), ("lora_b", lora_b, self.lora_b_stack)):
            try:
                converted[name] = value.to(device=stack.device, dtype=stack.dtype)
            except (RuntimeError, NotImplementedError) as err:
                fail(op, f"{name} cannot be copied to the stacks' {stack.device} / "
                         f"{str(stack.dtype).replace('torch.', '')}: {err}")
        self.lora_a_stack[slot].zero_()
        self.lora_b_stack[slot].zero_()
        self.lora_a_stack[slot, :r].copy_(converted["lora_a"])
        self.lora_b_stack[slot, :, :r].copy_(converted["lora_b"])
        self.scales[slot] = scale
        self.ranks[slot] = r

    @torch.no_grad()
    def unload_adapter(self, slot: int) -> None:
        """Empty `slot` (rank 0, zeros): tokens still mapped to it get the base output."""
        slot = self._check_slot("MultiLoRALinear.unload_adapter", slot)
        self.lora_a_stack[slot].zero_()
        self.lora_b_stack[slot].zero_()
        self.scales[slot] = 0.0
        self.ranks[slot] = 0

    def forward(self, x: torch.Tensor, index: AdapterIndex) -> torch.Tensor:
        return multi_lora_linear(x, self.base_layer.weight, self.lora_a_stack, self.lora_b_stack, index,
                                 self.scales, self.base_layer.bias, self.ranks, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"max_adapters={self.max_adapters}, max_rank={self.max_rank}, "
                f"adapter_dtype={str(self.lora_a_stack.dtype).replace('torch.', '')}, backend={self.backend!r}")
