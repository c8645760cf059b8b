"""Modules. They compose ops and hold parameters; they know nothing about kernels."""
from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._validation import check_probability
from .ops.lora_linear import lora_linear
from .ops.merge import MergeResidual, merge_, unmerge_


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


def _check_hparams(op: str, r, lora_dropout) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"{op}: r must be a positive int, got {r!r}")
    check_probability(op, "lora_dropout", lora_dropout)


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
        _check_hparams("FusedLoRALinear", r, lora_dropout)
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
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, device=device, dtype=dtype))
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
        _check_hparams("FusedLoRALinear.from_linear", r, lora_dropout)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.weight = linear.weight
        self.weight.requires_grad_(False)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self._init_adapter(r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend)
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
        table; not part of the state_dict) so that ``unmerge()`` restores weight bit for bit."""
        if self.merged:
            warnings.warn("FusedLoRALinear.merge: already merged; nothing to do")
            return
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
