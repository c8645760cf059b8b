"""vLLM runs its LoRA layers on lora_kernels: ``PunicaWrapperLoraKernels``.

Switch: install lora_kernels next to vLLM and set ``LORA_KERNELS_VLLM=1``. vLLM's plugin loader
runs ``register()`` (the ``vllm.general_plugins`` entry point ``lora_kernels``) in every vLLM
process; with the variable set it points ``CudaPlatform.get_punica_wrapper`` at
``"lora_kernels.integrations.vllm.PunicaWrapperLoraKernels"``, which vLLM resolves by qualname
when it builds its LoRA model manager. Without the variable nothing changes. vLLM has no LoRA
registry (../shared/SERVING_INTERFACES.md 1.1-1.2), so this replacement of one classmethod is
the plug-in point; an out-of-tree platform (vllm-ascend, TPU) that defines its own wrapper is
left alone.

vLLM is imported only here, and only when vLLM itself resolves the class (module
``__getattr__``) or ``register()`` runs: importing lora_kernels never imports vLLM.

What the wrapper does (vLLM's ``PunicaWrapperBase`` semantics, layouts ``[max_loras, 1, r, K]``
and ``[max_loras, 1, N, r]`` per slice, slot -1 = no adapter):

    update_metadata  vLLM's own bookkeeping (super()), then the two persistent AdapterIndex
                     objects rebuilt in place: tokens (``token_lora_indices``) and sampled rows
                     (``sampler_indices``) -- no host sync, no allocation, outside any graph.
    add_shrink       y[i] = scale * x @ A_i^T for every slice in one launch (y [S, M, r] fp32,
                     overwritten, as vLLM's GPU op does).
    add_expand       y[:, off_i:off_i + N_i] += x[i] @ B_i^T, one launch; add_inputs=False
                     writes the LoRA term alone (the slices' columns are zeroed first).
    add_lora_linear  add_shrink into an fp32 buffer, then add_expand.
    add_lora_embedding  y += x @ B (x is the embedding's A lookup; cast to fp32 for the expand).
    add_lora_logits  the same on the sampler's mapping (rows = sampled rows).
    MoE methods      raise NotImplementedError: MoE LoRA runs on vLLM's kernels only.

Rows past the mapping's live tokens (a CUDA-graph batch padded to a captured size) have no
adapter. The kernels' grids depend on max_num_batched_tokens and max_loras only, so a graph
captured once replays correctly with any later mapping.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch

from ..ops.multi_lora import lora_expand_, lora_shrink
from ._common import PersistentTokens, squeeze_stack

ENV_SWITCH = "LORA_KERNELS_VLLM"
QUALNAME = "lora_kernels.integrations.vllm.PunicaWrapperLoraKernels"
# Where PunicaWrapperBase lives: the current tree first, then the pre-move path (the old path is
# a compatibility shim in new trees; SERVING_INTERFACES.md, preamble).
_BASE_MODULES = ("vllm.runtime.modeling.lora.punica_wrapper.punica_base", "vllm.lora.punica_wrapper.punica_base")
_CUDA_PLATFORM_MODULES = ("vllm.backends.platform.cuda", "vllm.platforms.cuda")
_MOE_REFUSAL = ("lora_kernels: MoE LoRA (fused_moe_lora, moe_lora_align_block_size, add_lora_w13/w2) is not "
                "implemented by lora_kernels; serve MoE-LoRA models without LORA_KERNELS_VLLM=1")


def _import_first(names: Sequence[str]):
    import importlib
    errors = []
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError as err:
            errors.append(f"{name}: {err}")
    raise ImportError("lora_kernels.integrations.vllm needs vLLM: " + "; ".join(errors))


class PunicaLoraKernelsMixin:
    """The wrapper's methods, framework-free (the vLLM base class supplies the bookkeeping:
    ``token_lora_indices``, ``sampler_indices``). ``lk_backend`` picks the kernels' backend."""

    lk_backend = "auto"

    def _lk_setup(self, max_num_batched_tokens: int, device, lora_config=None) -> None:
        self._lk_capacity = int(max_num_batched_tokens)
        self._lk_device = device
        self._lk_tokens: Optional[PersistentTokens] = None
        self._lk_sampler: Optional[PersistentTokens] = None
        if lora_config is not None and getattr(lora_config, "max_loras", None):
            self._lk_allocate(int(lora_config.max_loras))

    def _lk_allocate(self, num_slots: int) -> None:
        self._lk_tokens = PersistentTokens(self._lk_capacity, num_slots, self._lk_device)
        self._lk_sampler = PersistentTokens(self._lk_capacity, num_slots, self._lk_device)

    # -- metadata -------------------------------------------------------------------------------

    def update_metadata(self, mapping, lora_index_to_id, max_loras: int, vocab_size: int, *args, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, *args, **kwargs)
        if self._lk_tokens is None:
            # vLLM passes lora_slots + 1 here (model_manager._set_adapter_mapping); the stacks have
            # lora_slots entries, which is what the index must say.
            self._lk_allocate(max(1, int(max_loras) - 1))
        self._lk_tokens.update_(self.token_lora_indices)
        self._lk_sampler.update_(self.sampler_indices)

    def _lk_index(self, sampler: bool, num_rows: int, num_slots: int):
        holder = self._lk_sampler if sampler else self._lk_tokens
        if holder is None:
            raise RuntimeError("PunicaWrapperLoraKernels: update_metadata was not called before the first LoRA op")
        if holder.index.num_adapters != num_slots:
            raise ValueError(f"PunicaWrapperLoraKernels: the LoRA stacks have {num_slots} slots but the wrapper's "
                             f"index has {holder.index.num_adapters} (lora_config.max_loras)")
        return holder.rows(num_rows)

    # -- the ops ---------------------------------------------------------------------------------

    def add_shrink(self, y, x: torch.Tensor, lora_a_stacked: Tuple[torch.Tensor, ...], scale: float, **kwargs):
        """y[i] = scale * x @ A_i^T for every slice (overwrites y; fp32)."""
        x = x.reshape(-1, x.shape[-1])
        a = [squeeze_stack(s, f"lora_a_stacked[{i}]") for i, s in enumerate(lora_a_stacked)]
        index = self._lk_index(kwargs.pop("_lk_sampler", False), x.shape[0], a[0].shape[0])
        if isinstance(y, torch.Tensor):
            lora_shrink(x, a, index, float(scale), out=y, backend=self.lk_backend)
        else:  # a tuple of per-slice [M, r] buffers
            for ai, yi in zip(a, y):
                lora_shrink(x, ai, index, float(scale), out=yi, backend=self.lk_backend)

    def add_expand(self, y: torch.Tensor, x, lora_b_stacked: Tuple[torch.Tensor, ...], output_slices: Tuple[int, ...],
                   offset_start: int = 0, add_inputs: bool = True, **kwargs):
        """y[:, off_i:off_i + output_slices[i]] += x[i] @ B_i^T, off_0 = offset_start."""
        b = [squeeze_stack(s, f"lora_b_stacked[{i}]") for i, s in enumerate(lora_b_stacked)]
        if len(output_slices) != len(b) or any(bi.shape[1] != n for bi, n in zip(b, output_slices)):
            raise ValueError(f"PunicaWrapperLoraKernels.add_expand: output_slices {tuple(output_slices)} do not "
                             f"match the B stacks' widths {[bi.shape[1] for bi in b]}")
        y2 = y.view(-1, y.shape[-1])
        t = x if isinstance(x, torch.Tensor) else torch.stack(tuple(x))
        if not add_inputs:
            y2[:, offset_start:offset_start + sum(output_slices)].zero_()
        index = self._lk_index(kwargs.pop("_lk_sampler", False), y2.shape[0], b[0].shape[0])
        lora_expand_(y2, t, b, index, None, int(offset_start), backend=self.lk_backend)

    def add_lora_embedding(self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor,
                           add_inputs: bool = True, **kwargs):
        """y += x @ B per token (x: the layer's lookup of A, in the activation dtype)."""
        b = squeeze_stack(lora_b_stacked, "lora_b_stacked")
        self.add_expand(y, x.reshape(1, -1, x.shape[-1]).float(), (b,), (b.shape[1],), 0, add_inputs)

    def add_lora_linear(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: Tuple[torch.Tensor, ...],
                        lora_b_stacked: Tuple[torch.Tensor, ...], scale: float, output_slices: Tuple[int, ...], *,
                        buffer=None, **kwargs):
        """y[:, slice i] += scale * (x @ A_i^T) @ B_i^T per token's slot, one shrink + one expand."""
        if len(lora_a_stacked) != len(lora_b_stacked) or len(lora_a_stacked) != len(output_slices):
            raise ValueError("PunicaWrapperLoraKernels.add_lora_linear: lora_a_stacked, lora_b_stacked and "
                             "output_slices must have one entry per slice")
        x2 = x.reshape(-1, x.shape[-1])
        r = lora_b_stacked[0].shape[-1]
        if buffer is None:
            buffer = torch.empty((len(output_slices), x2.shape[0], r), dtype=torch.float32, device=x.device)
        self.add_shrink(buffer, x2, lora_a_stacked, scale)
        self.add_expand(y, buffer, lora_b_stacked, output_slices, add_inputs=kwargs.pop("add_inputs", True))

    def add_lora_logits(self, y: torch.Tensor, x: torch.Tensor, lora_a_stacked: torch.Tensor,
                        lora_b_stacked: torch.Tensor, scale, *, buffer=None, **kwargs):
        """y += (scale * x @ A^T) @ B^T by the sampler's mapping (rows = sampled rows)."""
        x2 = x.reshape(-1, x.shape[-1])
        y2 = y.view(-1, y.shape[-1])
        a = squeeze_stack(lora_a_stacked, "lora_a_stacked")
        b = squeeze_stack(lora_b_stacked, "lora_b_stacked")
        if buffer is None:
            buffer = torch.empty((1, x2.shape[0], b.shape[-1]), dtype=torch.float32, device=x.device)
        self.add_shrink(buffer.view(1, x2.shape[0], -1), x2, (a,), scale, _lk_sampler=True)
        self.add_expand(y2, buffer.view(1, x2.shape[0], -1), (b,), (b.shape[1],), 0, True, _lk_sampler=True)

    # -- refused ----------------------------------------------------------------------------------

    def moe_lora_align_block_size(self, *args, **kwargs):
        raise NotImplementedError(_MOE_REFUSAL)

    def add_lora_fused_moe(self, *args, **kwargs):
        raise NotImplementedError(_MOE_REFUSAL)

    def add_lora_w13(self, *args, **kwargs):
        raise NotImplementedError(_MOE_REFUSAL)

    def add_lora_w2(self, *args, **kwargs):
        raise NotImplementedError(_MOE_REFUSAL)


_CLASS = None


def _build_class():
    base = _import_first(_BASE_MODULES).PunicaWrapperBase

    class PunicaWrapperLoraKernels(PunicaLoraKernelsMixin, base):
        """vLLM's PunicaWrapperBase on lora_kernels' multi-adapter ops (see the module docstring)."""

        def __init__(self, max_num_batched_tokens: int, max_batches: int, device, **kwargs):
            base.__init__(self, max_num_batched_tokens, max_batches, device, **kwargs)
            self._lk_setup(max_num_batched_tokens, device, kwargs.get("lora_config"))

    PunicaWrapperLoraKernels.__module__ = __name__
    PunicaWrapperLoraKernels.__qualname__ = "PunicaWrapperLoraKernels"
    return PunicaWrapperLoraKernels


def __getattr__(name: str):
    """``PunicaWrapperLoraKernels`` is built on first access (that is when vLLM is imported)."""
    global _CLASS
    if name == "PunicaWrapperLoraKernels":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> bool:
    """The ``vllm.general_plugins`` entry point. With ``LORA_KERNELS_VLLM=1``: vLLM's CUDA
    platform returns this package's wrapper from ``get_punica_wrapper``; returns True. Otherwise
    (variable unset or not "1"): does nothing, returns False."""
    if os.environ.get(ENV_SWITCH, "") != "1":
        return False
    platform = _import_first(_CUDA_PLATFORM_MODULES).CudaPlatform
    platform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
    return True
