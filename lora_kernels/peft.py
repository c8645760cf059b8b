"""Hugging Face PEFT interop: run an existing PEFT LoRA model on the fused ops, in one line.

    model = get_peft_model(base, LoraConfig(...))
    lora_kernels.peft.fuse(model)        # every PEFT LoRA Linear now runs lora_kernels.lora_linear
    lora_kernels.peft.unfuse(model)      # back to PEFT's own layers

``fuse`` changes the class of each covered ``peft.tuners.lora.Linear`` in place to
:class:`FusedLinear`, a subclass that overrides ``forward``, ``merge`` and ``unmerge`` and nothing
else: the module objects, their parameters, parameter names, ``state_dict`` keys, adapter
bookkeeping (active adapters, ``merged_adapters``, ``scaling``, ...) and PEFT's saving and loading
are untouched. ``unfuse`` sets the class back.

Semantics are PEFT's in every state (PEFT 0.21 ``lora.Linear.forward``)::

    disabled:            y = base(x)                       (a merged layer is unmerged first)
    adapter_names=[...]: row i of the batch gets adapter adapter_names[i] ("__base__" = none)
    merged:              y = base(x)                       (adapters folded into the weight)
    otherwise:           y = base(x) + sum_a s_a * lora_B_a(lora_A_a(dropout_a(x.to(lora_A_a.dtype))))

with ``base(x) = x @ W.T + bias`` (``x @ W + bias`` for transformers ``Conv1D``, PEFT's
``fan_in_fan_out``) and ``lora_B_a`` carrying a bias when the adapter has ``lora_bias``. The fused
path computes the same thing in one ``lora_linear`` call per layer (several active adapters without
dropout are concatenated along the rank; under ``torch.autocast`` the base runs in the autocast
dtype, as PEFT's ``nn.Linear`` would). It accumulates in fp32 and rounds once, so it differs from
PEFT only by rounding. ``merge``/``unmerge`` (and so PEFT's ``merge_adapter``, ``merge_and_unload``,
``unmerge_adapter``) use :func:`lora_kernels.merge_` / :func:`lora_kernels.unmerge_`.

Anything the fused path does not cover runs PEFT's own code, never an approximation: layer kinds
(DoRA and other LoRA variants, quantised or hooked base layers, Embedding, Conv, ...) are left
unfused and listed by ``fuse(model, verbose=True)``; a call that a fused layer cannot take (an
adapter added later with a variant, extra forward arguments, mismatched dtypes, ...) falls back to
PEFT's ``forward`` for that call.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from peft.tuners.lora import layer as _lora_layer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from transformers.pytorch_utils import Conv1D

from ._validation import check_adapter_dtype
from .backends import BACKENDS
from .ops.lora_linear import lora_linear
from .ops.merge import merge_, unmerge_

PeftLinear = _lora_layer.Linear
BASE_TYPES = (nn.Linear, Conv1D)  # exact types: a subclass may compute something else
_BACKEND_ATTR = "_lora_kernels_backend"
_PLAIN_PARAM_TYPES = (torch.Tensor, nn.Parameter)  # not a quantised / distributed tensor subclass
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# What a layer can run fused
# ---------------------------------------------------------------------------------------------

def _sharded(weight) -> bool:
    """A DTensor: FSDP2 keeps parameters sharded outside forward and hands the layers plain
    unsharded tensors during it."""
    return type(weight).__name__ == "DTensor"


def _base_reason(layer: PeftLinear, *, sharded_ok: bool = False) -> Optional[str]:
    """Why this layer's base layer cannot run fused (None when it can). `sharded_ok` (at fuse
    time): a DTensor weight passes, since each call checks again what it is given."""
    base = layer.base_layer
    if base is not layer.get_base_layer():
        return f"nested base layer ({type(base).__name__})"
    if type(base) not in BASE_TYPES:
        return f"base layer type {type(base).__module__}.{type(base).__name__}"
    weight = getattr(base, "weight", None)
    plain = type(weight) in _PLAIN_PARAM_TYPES or (sharded_ok and _sharded(weight))
    if not plain or weight.dtype not in _FLOAT:
        return f"quantised or non-float base weight ({type(weight).__name__}, {getattr(weight, 'dtype', None)})"
    if base._forward_hooks or base._forward_pre_hooks or "forward" in base.__dict__:
        return "the base layer has forward hooks (e.g. accelerate offloading)"
    return None


def _variant_reason(layer: PeftLinear, adapters) -> Optional[str]:
    for name in adapters:
        variant = layer.lora_variant.get(name)
        if variant is not None:
            kind = "DoRA" if layer.use_dora.get(name, False) else type(variant).__name__
            return f"adapter {name!r} is a LoRA variant ({kind})"
    return None


def layer_reason(module: nn.Module) -> Optional[str]:
    """None when `module` is a PEFT LoRA layer ``fuse`` covers, else why it keeps PEFT's path."""
    if isinstance(module, FusedLinear):
        return None
    if type(module) is not PeftLinear:
        return f"layer kind {type(module).__module__}.{type(module).__name__}"
    return _base_reason(module, sharded_ok=True) or _variant_reason(module, module.lora_A.keys())


@dataclass
class FuseReport:
    """What ``fuse`` did: module names fused, and the LoRA layers left on PEFT's path, with why."""
    fused: List[str] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"lora_kernels.peft.fuse: {len(self.fused)} LoRA Linear layer(s) on the fused ops, "
                 f"{len(self.kept)} kept on PEFT's own path"]
        lines += [f"  kept: {name}: {why}" for name, why in self.kept]
        return "\n".join(lines)


def _lora_layers(model: nn.Module):
    """(name, module) of every PEFT LoRA layer, outermost only (a LoRA layer's own children --
    lora_A, lora_B, base_layer -- are not layers of the model)."""
    skip: Optional[str] = None
    for name, module in model.named_modules():
        if skip is not None and name.startswith(skip):
            continue
        if isinstance(module, LoraLayer):
            skip = name + "."
            yield name, module


def fuse(model: nn.Module, verbose: bool = False, *, backend: str = "auto") -> nn.Module:
    """In place: every covered PEFT LoRA ``Linear`` of `model` runs on the fused ops.

    `model`: a ``PeftModel``, a ``LoraModel`` or any module holding PEFT LoRA layers. Covered: a
    ``peft.tuners.lora.Linear`` over a plain ``nn.Linear`` or transformers ``Conv1D`` whose
    adapters are plain LoRA (any rank/alpha per layer, rsLoRA, dropout, lora_bias, fp32 adapters
    over a 16-bit base). Other LoRA layers keep PEFT's path; ``verbose=True`` prints them with the
    reason. `backend` is passed to every op ("auto" | "triton" | "cuda" | "torch"). Calling ``fuse``
    again fuses layers added since (e.g. by ``add_adapter`` on new target modules). Returns `model`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse: model must be an nn.Module (a PeftModel or a module holding PEFT LoRA layers), "
                        f"got {type(model).__name__}")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"fuse: backend must be one of {BACKENDS}, got {backend!r}")
    report = FuseReport()
    for name, module in _lora_layers(model):
        why = layer_reason(module)
        if why is not None:
            report.kept.append((name, why))
            continue
        module.__class__ = FusedLinear
        setattr(module, _BACKEND_ATTR, backend)
        report.fused.append(name)
    model._lora_kernels_fuse_report = report
    if verbose:
        print(report)
    return model


def fuse_report(model: nn.Module) -> FuseReport:
    """The report of the last ``fuse(model)``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse_report: model must be an nn.Module, got {type(model).__name__}")
    report = model.__dict__.get("_lora_kernels_fuse_report")
    if report is None:
        raise ValueError("fuse_report: this model has not been fused (call lora_kernels.peft.fuse first)")
    return report


def unfuse(model: nn.Module) -> nn.Module:
    """In place: every fused layer of `model` is PEFT's ``lora.Linear`` again (same objects and
    parameters; merged adapters stay merged, as PEFT would keep them). Returns `model`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unfuse: model must be an nn.Module, got {type(model).__name__}")
    for _, module in _lora_layers(model):
        if isinstance(module, FusedLinear):
            module.__class__ = PeftLinear
            module.__dict__.pop(_BACKEND_ATTR, None)
    model.__dict__.pop("_lora_kernels_fuse_report", None)
    return model


# ---------------------------------------------------------------------------------------------
# The fused layer
# ---------------------------------------------------------------------------------------------

def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


@functools.lru_cache(maxsize=None)
def adapter_dtype_ok(adapter_dtype: torch.dtype, x_dtype: torch.dtype) -> bool:
    """Whether lora_linear takes adapters of `adapter_dtype` over inputs of `x_dtype` (the shared
    validation's rule, asked once per pair of dtypes)."""
    try:
        check_adapter_dtype("fuse", "lora_A", torch.empty(0, dtype=adapter_dtype), x_dtype)
    except TypeError:
        return False
    return True


def _dropout_p(module: nn.Module) -> Optional[float]:
    """PEFT's dropout module -> its probability when active (None: a module we cannot fuse)."""
    if type(module) is nn.Identity:
        return 0.0
    if type(module) is nn.Dropout:
        return float(module.p) if module.training else 0.0
    return None


class FusedLinear(PeftLinear):
    """``peft.tuners.lora.Linear`` whose forward, merge and unmerge run on lora_kernels' ops.

    Created only by :func:`fuse` (a class change of an existing PEFT layer); see the module
    docstring for the semantics. Not constructed directly."""

    # ---- eligibility of one call --------------------------------------------------------------

    def _compute_dtype(self, x: torch.Tensor) -> Optional[torch.dtype]:
        """The dtype the base GEMM runs in for this call (None: the fused path cannot take x)."""
        weight = self.base_layer.weight
        if x.dtype not in _FLOAT or x.device != weight.device or x.dim() < 1:
            return None
        autocast = _autocast_dtype(x.device.type)
        if autocast is not None:
            # what nn.Linear does under autocast: float64 is left alone
            return autocast if x.dtype != torch.float64 and weight.dtype != torch.float64 else None
        return x.dtype if weight.dtype == x.dtype else None

    def _adapters_fusable(self, names, dtype: torch.dtype, x: torch.Tensor) -> bool:
        for name in names:
            a, b = self.lora_A[name].weight, self.lora_B[name].weight
            if a.dtype != b.dtype or not adapter_dtype_ok(a.dtype, dtype) or _dropout_p(self.lora_dropout[name]) is None:
                return False
            if a.dtype != x.dtype and not getattr(self, "cast_input_dtype_enabled", True):
                return False  # PEFT would feed x uncast to lora_A; keep its behaviour (and error)
            if a.device != x.device or b.device != x.device:
                return False
            if type(a) not in _PLAIN_PARAM_TYPES or type(b) not in _PLAIN_PARAM_TYPES:
                return False  # sharded adapters (DTensors) outside FSDP2's unsharded forward
        return _variant_reason(self, names) is None

    def _fusable(self, x, args, kwargs, names) -> Optional[torch.dtype]:
        if args or any(k not in ("adapter_names", "alora_offsets") for k in kwargs):
            return None
        if kwargs.get("alora_offsets") is not None or _base_reason(self) is not None:
            return None
        dtype = self._compute_dtype(x)
        if dtype is None or x.shape[-1] != self.in_features:
            return None
        return dtype if self._adapters_fusable(names, dtype, x) else None

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.get("adapter_names")
        if self.disable_adapters or (self.merged and adapter_names is None):
            return super().forward(x, *args, **kwargs)  # the base layer alone (after an unmerge)
        if adapter_names is not None:
            names = [n for n in dict.fromkeys(adapter_names) if n in self.lora_A]
        else:
            names = [n for n in self.active_adapters if n in self.lora_A]
        dtype = self._fusable(x, args, kwargs, names)
        if dtype is None:
            return super().forward(x, *args, **kwargs)
        if adapter_names is not None:
            return self._mixed_batch(x, list(adapter_names), dtype)
        if not names:
            return self.base_layer(x)
        return self._fused(x, names, dtype)

    def _fused(self, x: torch.Tensor, names: List[str], dtype: torch.dtype) -> torch.Tensor:
        """y = base(x) + sum over `names` of each adapter's term, in as few fused calls as it takes."""
        base = self.base_layer
        weight = base.weight.t() if self.fan_in_fan_out else base.weight
        backend = getattr(self, _BACKEND_ATTR, "auto")
        autocast = torch.is_autocast_enabled(x.device.type)
        ctx = torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext()
        with ctx:
            # under autocast nn.Linear runs in the autocast dtype; so does our base GEMM
            x, weight = x.to(dtype), weight.to(dtype)
            bias = base.bias
            if bias is not None and (autocast or bias.dtype not in (dtype, torch.float32)):
                bias = bias.to(dtype)
            terms = [self._term(n) for n in names]
            for a, b, s, p, lora_bias in terms:
                if lora_bias is not None:  # lora_B's own bias, scaled as PEFT scales lora_B's output
                    bias = s * lora_bias if bias is None else bias + s * lora_bias
            if bias is not None and bias.dtype not in (dtype, torch.float32):
                bias = bias.float()
            if len(terms) == 1 or any(t[3] > 0.0 for t in terms) or len({t[0].dtype for t in terms}) > 1:
                a, b, s, p, _ = terms[0]
                # p is already 0 unless PEFT's dropout module is in training mode
                y = lora_linear(x, weight, a, b, s, bias, dropout_p=p, training=p > 0.0, backend=backend)
                # further adapters (each with its own dropout mask, as PEFT draws them): unfused terms
                for a, b, s, p, _ in terms[1:]:
                    xa = F.dropout(x.to(a.dtype), p, training=p > 0.0)
                    y = (y + F.linear(F.linear(xa, a), b) * s).to(y.dtype)
                return y
            # several adapters, no dropout: one call over the adapters stacked along the rank
            a = torch.cat([t[0] for t in terms], 0)
            b = torch.cat([t[1] * t[2] for t in terms], 1)
            return lora_linear(x, weight, a, b, 1.0, bias, backend=backend)

    def _term(self, name: str):
        """(lora_A [r, K], lora_B [N, r], scaling, active dropout p, lora_B bias or None)."""
        b_layer = self.lora_B[name]
        return (self.lora_A[name].weight, b_layer.weight, float(self.scaling[name]),
                _dropout_p(self.lora_dropout[name]), b_layer.bias if self.lora_bias.get(name) else None)

    def _mixed_batch(self, x: torch.Tensor, adapter_names: List[str], dtype: torch.dtype) -> torch.Tensor:
        """Row i of x (its first dimension) gets adapter adapter_names[i]: one fused call per
        adapter over its rows, the base layer over rows with "__base__" or an adapter this layer
        lacks. Every row is computed once."""
        groups: Dict[str, List[int]] = {}
        for i, name in enumerate(adapter_names):
            groups.setdefault(name, []).append(i)
        pieces, order = [], []
        for name, rows in groups.items():
            idx = torch.tensor(rows, device=x.device)
            xs = x.index_select(0, idx)
            pieces.append(self._fused(xs, [name], dtype) if name in self.lora_A else self.base_layer(xs))
            order.append(idx)
        y = torch.cat(pieces, 0)
        if len(pieces) == 1:
            return y
        return y.index_select(0, torch.argsort(torch.cat(order)))

    # ---- merge / unmerge ----------------------------------------------------------------------

    def _merge_fusable(self, name: str) -> bool:
        weight = self.get_base_layer().weight
        return (_variant_reason(self, [name]) is None and _base_reason(self) is None
                and self.lora_A[name].weight.dtype == self.lora_B[name].weight.dtype
                and adapter_dtype_ok(self.lora_A[name].weight.dtype, weight.dtype))

    def _merge_args(self, name: str):
        return (self.lora_A[name].weight.detach(), self.lora_B[name].weight.detach(), float(self.scaling[name]))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        """PEFT's merge (weight += s * B @ A, bias += s * lora_B.bias with lora_bias) through
        lora_kernels.merge_: in place, fp32 accumulation, one rounding per element."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        backend = getattr(self, _BACKEND_ATTR, "auto")
        for name in adapter_names:
            if name not in self.lora_A.keys():
                continue
            if not self._merge_fusable(name):
                with warnings.catch_warnings():  # PEFT's own merge of this one adapter
                    warnings.simplefilter("ignore")
                    super().merge(safe_merge=safe_merge, adapter_names=[name])
                continue
            base = self.get_base_layer()
            a, b, s = self._merge_args(name)
            new_bias = None
            if self.lora_bias[name]:
                if getattr(base, "bias", None) is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no bias.")
                new_bias = base.bias.data + self.lora_B[name].bias * s
            if safe_merge:
                merged = merge_(base.weight.data.clone(), a, b, s, fan_in_fan_out=self.fan_in_fan_out, backend=backend)
                if not torch.isfinite(merged).all() or (new_bias is not None and not torch.isfinite(new_bias).all()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                base.weight.data.copy_(merged)
            else:
                merge_(base.weight.data, a, b, s, fan_in_fan_out=self.fan_in_fan_out, backend=backend)
            if new_bias is not None:
                base.bias.data.copy_(new_bias.to(base.bias.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        """PEFT's unmerge (last merged first) through lora_kernels.unmerge_."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        backend = getattr(self, _BACKEND_ATTR, "auto")
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name not in self.lora_A.keys():
                continue
            weight = self.get_base_layer().weight
            if name in self.lora_variant:  # PEFT's variant unmerge
                weight.data = self.lora_variant[name].unmerge(self, name, weight)
            elif self._merge_fusable(name):
                unmerge_(weight.data, *self._merge_args(name), fan_in_fan_out=self.fan_in_fan_out, backend=backend)
            else:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)
            if self.lora_bias[name]:
                bias = self.get_base_layer().bias
                bias.data -= (self.lora_B[name].bias * self.scaling[name]).to(bias.dtype)
