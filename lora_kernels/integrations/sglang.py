"""SGLang runs its LoRA layers on lora_kernels: ``--lora-backend lora_kernels``.

``register()`` is the ``sglang.srt.plugins`` entry point (pyproject.toml): SGLang's
``load_plugins()`` runs it in every process; it registers ``LoraKernelsLoRABackend`` under the
name ``"lora_kernels"`` with SGLang's ``register_lora_backend`` registry and adds the name to the
``--lora-backend`` choices. Selecting another backend leaves SGLang untouched. SGLang is imported
only by ``register()`` and when the class is first resolved (module ``__getattr__``).

Semantics (SGLang's BaseLoRABackend, restated; s tokens, per-request ``weight_indices`` into
``max_loras_per_batch`` slots, per-slot ``lora_ranks`` and ``scalings``; a base-only request has
a slot of rank 0, so there is no -1):

    prepare_lora_batch  token slots = repeat_interleave(weight_indices, seq lens) on the device;
                        ranks / scalings copied into persistent per-slot tensors; the index
                        rebuilt in place (the CUDA-graph one) or built for the batch (eager).
    run_lora_a_sgemm    [s, c*r] = scalings[slot] * x @ A[slot, :, :]^T, each of the c stacked
                        slices bounded by the slot's rank (c from ``stack_num`` / ``num_slices``).
    run_lora_b_sgemm    [s, N]   = (base_output or 0) + x @ B[slot]^T, rows of rank-0 slots untouched.
    run_qkv_lora        q/k/v in one shrink and one expand launch: A [L, 3r, K] as three r-row
                        slices, B [L, Nq + 2 Nkv, r] cut at ``output_offset_cpu`` (or (q, kv)).
    run_gate_up_lora    the same with two slices of B [L, 2N, r].

Everything a replayed CUDA graph reads (the index, ranks, scalings) lives in tensors allocated
once (``init_cuda_graph_batch_info`` / ``init_decode_cuda_graph_batch_info``); rows past the
live tokens of a padded graph batch have no adapter.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from ..ops.multi_lora import lora_expand_, lora_shrink
from ..serving import AdapterIndex
from ._common import PersistentTokens

NAME = "lora_kernels"
_BASE_MODULE = "sglang.srt.lora.backend.base_backend"
_REGISTRY_MODULES = ("sglang.srt.lora.backend.lora_registry", "sglang.srt.lora.lora_registry")


class _EagerTokens:
    """An index built for one eager batch (no graph: a fresh one costs nothing to keep valid)."""

    def __init__(self, index: AdapterIndex):
        self.index = index

    def rows(self, num_rows: int) -> AdapterIndex:
        return self.index.padded_to(num_rows)


class LoraKernelsBackendMixin:
    """The backend's methods, framework-free; the SGLang base class is added in _build_class."""

    lk_backend = "auto"

    def _lk_setup(self, max_loras_per_batch: int, device) -> None:
        self._lk_num_slots = int(max_loras_per_batch)
        self._lk_device = torch.device(device)
        self._lk_ranks = torch.zeros(self._lk_num_slots, dtype=torch.int32, device=self._lk_device)
        self._lk_scalings = torch.zeros(self._lk_num_slots, dtype=torch.float32, device=self._lk_device)
        self._lk_graph: Optional[PersistentTokens] = None
        self._lk_active = None

    # -- CUDA-graph buffers and per-batch metadata ------------------------------------------------

    def _lk_graph_tokens(self, capacity: int) -> None:
        if self._lk_graph is None or self._lk_graph.index.capacity < capacity:
            self._lk_graph = PersistentTokens(capacity, self._lk_num_slots, self._lk_device)

    def init_cuda_graph_batch_info(self, cuda_graph_batch_info=None, max_bs_in_cuda_graph: int = 1, *args, **kwargs):
        self._lk_graph_tokens(int(max_bs_in_cuda_graph) * int(kwargs.get("num_tokens_per_bs", 1)))

    def init_decode_cuda_graph_batch_info(self, max_bs_in_cuda_graph: int, num_tokens_per_req: int = 1, **kwargs):
        self._lk_graph_tokens(int(max_bs_in_cuda_graph) * int(num_tokens_per_req))

    def init_prefill_cuda_graph_batch_info(self, max_num_tokens: int, max_num_requests: int = 0, **kwargs):
        self._lk_graph_tokens(int(max_num_tokens))

    def prepare_lora_batch(self, forward_batch, weight_indices: Sequence[int], lora_ranks: Sequence[int],
                           scalings: Sequence[float], *args, **kwargs) -> None:
        """Token slots, ranks and scalings for the batch; no kernel reads host values later."""
        use_graph = bool(kwargs.get("use_cuda_graph", False) or kwargs.get("use_decode_cuda_graph", False)
                         or kwargs.get("use_prefill_cuda_graph", False)
                         or (len(args) > 0 and isinstance(args[0], bool) and args[0]))
        if len(lora_ranks) != self._lk_num_slots or len(scalings) != self._lk_num_slots:
            raise ValueError(f"LoraKernelsLoRABackend.prepare_lora_batch: lora_ranks and scalings need one entry "
                             f"per slot ({self._lk_num_slots}), got {len(lora_ranks)} and {len(scalings)}")
        self._lk_ranks.copy_(torch.tensor(list(lora_ranks), dtype=torch.int32), non_blocking=True)
        self._lk_scalings.copy_(torch.tensor(list(scalings), dtype=torch.float32), non_blocking=True)
        slots = torch.tensor(list(weight_indices), dtype=torch.int64).to(self._lk_device, non_blocking=True)
        seg_lens, num_tokens = _segment_lengths(forward_batch, len(weight_indices), self._lk_device)
        ids = slots if seg_lens is None else torch.repeat_interleave(slots, seg_lens, output_size=num_tokens)
        if use_graph:
            if self._lk_graph is None or ids.shape[0] > self._lk_graph.index.capacity:
                raise ValueError("LoraKernelsLoRABackend.prepare_lora_batch: a CUDA-graph batch of "
                                 f"{ids.shape[0]} tokens exceeds the graph buffers (init_*cuda_graph_batch_info)")
            self._lk_graph.update_(ids)
            self._lk_active = self._lk_graph
        else:
            self._lk_active = _EagerTokens(AdapterIndex.from_token_adapters(ids, self._lk_num_slots))

    def _lk_index(self, num_rows: int) -> AdapterIndex:
        if self._lk_active is None:
            raise RuntimeError("LoraKernelsLoRABackend: prepare_lora_batch was not called before the first LoRA op")
        return self._lk_active.rows(num_rows)

    # -- the ops ---------------------------------------------------------------------------------

    def _lk_shrink(self, x: torch.Tensor, a_stack: torch.Tensor, num_slices: int) -> torch.Tensor:
        """t [S, s, r] fp32: the S r-row slices of a stacked A [L, S*r, K], scaled per slot."""
        r = a_stack.shape[1] // num_slices
        slices = [a_stack[:, i * r:(i + 1) * r] for i in range(num_slices)]
        return lora_shrink(x, slices, self._lk_index(x.shape[0]), self._lk_scalings, self._lk_ranks,
                           backend=self.lk_backend)

    def _lk_output(self, x: torch.Tensor, width: int, base_output: Optional[torch.Tensor], dtype) -> torch.Tensor:
        if base_output is not None:
            return base_output
        return torch.zeros((x.shape[0], width), dtype=dtype, device=x.device)

    def run_lora_a_sgemm(self, x: torch.Tensor, weights: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        num_slices = int(kwargs.get("stack_num", kwargs.get("num_slices", 1)))
        t = self._lk_shrink(x, weights, num_slices)
        return t.permute(1, 0, 2).reshape(x.shape[0], -1)

    def run_lora_b_sgemm(self, x: torch.Tensor, weights: torch.Tensor, *args, base_output=None, **kwargs):
        y = self._lk_output(x, weights.shape[1], base_output, weights.dtype)
        lora_expand_(y, x.float(), weights, self._lk_index(x.shape[0]), self._lk_ranks, backend=self.lk_backend)
        return y

    def _lk_sliced(self, x, a_stack, b_slices: List[torch.Tensor], base_output):
        t = self._lk_shrink(x, a_stack, len(b_slices))
        y = self._lk_output(x, sum(b.shape[1] for b in b_slices), base_output, x.dtype)
        lora_expand_(y, t, b_slices, self._lk_index(x.shape[0]), self._lk_ranks, backend=self.lk_backend)
        return y

    def run_qkv_lora(self, x: torch.Tensor, qkv_lora_a: torch.Tensor, qkv_lora_b, *args, output_offset=None,
                     output_offset_cpu=None, base_output=None, **kwargs):
        if isinstance(qkv_lora_b, (tuple, list)):  # (q [L, Nq, r], kv [L, 2 Nkv, r])
            q, kv = qkv_lora_b
            half = kv.shape[1] // 2
            b_slices = [q, kv[:, :half], kv[:, half:]]
        else:
            offsets = output_offset_cpu if output_offset_cpu is not None else output_offset
            if offsets is None:
                raise ValueError("LoraKernelsLoRABackend.run_qkv_lora: output_offset(_cpu) is needed to cut the "
                                 "stacked q/k/v B")
            # a device tensor here costs one host read; SGLang passes output_offset_cpu
            offsets = [int(v) for v in (offsets.tolist() if isinstance(offsets, torch.Tensor) else offsets)]
            b_slices = [qkv_lora_b[:, offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]
        return self._lk_sliced(x, qkv_lora_a, b_slices, base_output)

    def run_gate_up_lora(self, x: torch.Tensor, gate_up_lora_a: torch.Tensor, gate_up_lora_b: torch.Tensor, *args,
                         base_output=None, **kwargs):
        n = gate_up_lora_b.shape[1] // 2
        return self._lk_sliced(x, gate_up_lora_a, [gate_up_lora_b[:, :n], gate_up_lora_b[:, n:]], base_output)

    def run_lora_a_embedding(self, *args, **kwargs):
        raise NotImplementedError("LoraKernelsLoRABackend: embedding LoRA is not implemented by lora_kernels; "
                                  "use another --lora-backend for adapters that train the embeddings")

    def run_extra_token_embedding(self, *args, **kwargs):
        raise NotImplementedError("LoraKernelsLoRABackend: extra-token embeddings are not implemented by lora_kernels")


def _segment_lengths(forward_batch, num_requests: int, device):
    """(seg_lens on the device or None for one token per request, total tokens as a host int).
    Prefill ("extend") batches carry extend_seq_lens; decode has one token per request."""
    mode = getattr(forward_batch, "forward_mode", None)
    is_extend = bool(mode.is_extend()) if mode is not None and hasattr(mode, "is_extend") else False
    lens = getattr(forward_batch, "extend_seq_lens", None) if is_extend else None
    if lens is None:
        return None, num_requests
    total = getattr(forward_batch, "extend_num_tokens", None)
    if total is None:
        lens_cpu = getattr(forward_batch, "extend_seq_lens_cpu", None)
        total = int(sum(lens_cpu)) if lens_cpu is not None else int(lens.sum())  # the last reads the device
    return lens.to(device), int(total)


_CLASS = None


def _build_class():
    import importlib
    base = importlib.import_module(_BASE_MODULE).BaseLoRABackend

    class LoraKernelsLoRABackend(LoraKernelsBackendMixin, base):
        """SGLang's BaseLoRABackend on lora_kernels' multi-adapter ops (see the module docstring)."""

        name = NAME

        def __init__(self, max_loras_per_batch: int, device, *args, **kwargs):
            base.__init__(self, max_loras_per_batch, device, *args, **kwargs)
            self._lk_setup(max_loras_per_batch, device)

    LoraKernelsLoRABackend.__module__ = __name__
    LoraKernelsLoRABackend.__qualname__ = "LoraKernelsLoRABackend"
    return LoraKernelsLoRABackend


def __getattr__(name: str):
    global _CLASS
    if name == "LoraKernelsLoRABackend":
        if _CLASS is None:
            _CLASS = _build_class()
        return _CLASS
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """The ``sglang.srt.plugins`` entry point: register the backend as "lora_kernels" and make
    ``--lora-backend lora_kernels`` an accepted choice."""
    import importlib
    registry = None
    for name in _REGISTRY_MODULES:
        try:
            registry = importlib.import_module(name)
            break
        except ImportError:
            continue
    if registry is None or not hasattr(registry, "register_lora_backend"):
        raise ImportError("lora_kernels.integrations.sglang needs SGLang's LoRA backend registry "
                          f"(register_lora_backend in one of {_REGISTRY_MODULES})")

    def create_lora_kernels_backend():
        return __getattr__("LoraKernelsLoRABackend")

    registry.register_lora_backend(NAME)(create_lora_kernels_backend)
    try:
        server_args = importlib.import_module("sglang.srt.server_args")
    except ImportError:
        return
    choices = getattr(server_args, "LORA_BACKEND_CHOICES", None)
    if isinstance(choices, list) and NAME not in choices:
        choices.append(NAME)
