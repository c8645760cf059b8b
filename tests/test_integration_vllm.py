"""lora_kernels.integrations.vllm without vLLM: a stub PunicaWrapperBase / CudaPlatform in
sys.modules (the bookkeeping vLLM's base class does: id -> slot, -1 = none, persistent buffers),
the env-gated registration, and the wrapper's methods against a float64 restatement of vLLM's
reference semantics (PunicaWrapperCPU on vLLM's torch ops). One deliberate difference from
vLLM's CPU reference: its bgmv ops gather w[idx], so a -1 token picks the *last* slot there;
the restatement here, like vLLM's GPU kernels and its CPU tests, skips -1 rows.

An optional lane builds the class against the real vLLM when it is installed."""
import importlib
import subprocess
import sys
import types

import pytest
import torch

from tolerances import assert_close, rand

QUAL = "lora_kernels.integrations.vllm.PunicaWrapperLoraKernels"


class StubPunicaWrapperBase:
    """vLLM's PunicaWrapperBase, reduced to what the wrapper relies on."""

    def __init__(self, max_num_batched_tokens, max_batches, device, **kwargs):
        self._token_lora_indices = torch.empty(max_num_batched_tokens, dtype=torch.long, device=device)
        self._sampler_indices = torch.empty(max_num_batched_tokens, dtype=torch.long, device=device)
        self.indices_len = [None] * 4
        self.device = device

    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        def slots(ids):  # convert_mapping: LoRA id (0 = none) -> slot (-1 = none)
            return torch.tensor([lora_index_to_id.index(i) if i > 0 else -1 for i in ids], dtype=torch.long)
        base, sampler = slots(mapping.index_mapping), slots(mapping.prompt_mapping)
        self._token_lora_indices[:len(base)].copy_(base)
        self._sampler_indices[:len(sampler)].copy_(sampler)
        self.indices_len[:2] = [len(base), len(sampler)]

    @property
    def token_lora_indices(self):
        return self._token_lora_indices[:self.indices_len[0]]

    @property
    def sampler_indices(self):
        return self._sampler_indices[:self.indices_len[1]]


class StubCudaPlatform:
    @classmethod
    def get_punica_wrapper(cls):
        return "vllm.lora.punica_wrapper.punica_gpu.PunicaWrapperGPU"


class Mapping(types.SimpleNamespace):
    pass


@pytest.fixture
def vllm_stub(monkeypatch):
    mods = {}
    for name in ("vllm", "vllm.lora", "vllm.lora.punica_wrapper", "vllm.lora.punica_wrapper.punica_base",
                 "vllm.platforms", "vllm.platforms.cuda"):
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["vllm.lora.punica_wrapper.punica_base"].PunicaWrapperBase = StubPunicaWrapperBase
    platform = type("CudaPlatform", (StubCudaPlatform,), {})
    mods["vllm.platforms.cuda"].CudaPlatform = platform
    integ = importlib.import_module("lora_kernels.integrations.vllm")
    monkeypatch.setattr(integ, "_CLASS", None)
    yield types.SimpleNamespace(module=integ, platform=platform)


def test_import_does_not_import_vllm():
    code = ("import sys, lora_kernels, lora_kernels.integrations.vllm, lora_kernels.integrations.sglang; "
            "assert 'vllm' not in sys.modules and 'sglang' not in sys.modules, sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))


def test_register_only_with_the_switch(vllm_stub, monkeypatch):
    monkeypatch.delenv("LORA_KERNELS_VLLM", raising=False)
    assert vllm_stub.module.register() is False
    assert vllm_stub.platform.get_punica_wrapper() == StubCudaPlatform.get_punica_wrapper()
    monkeypatch.setenv("LORA_KERNELS_VLLM", "0")
    assert vllm_stub.module.register() is False
    monkeypatch.setenv("LORA_KERNELS_VLLM", "1")
    assert vllm_stub.module.register() is True
    qual = vllm_stub.platform.get_punica_wrapper()
    assert qual == QUAL
    # what vLLM does with it: resolve_obj_by_qualname
    module, _, name = qual.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, StubPunicaWrapperBase) and cls.__name__ == "PunicaWrapperLoraKernels"


def test_entry_point_declared():
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"]["lora_kernels"] == "lora_kernels.integrations.vllm:register"


# ---------------------------------------------------------------------------------------------
# float64 restatement of vLLM's semantics
# ---------------------------------------------------------------------------------------------

def ref_lora_linear(y, x, a_stacked, b_stacked, scale, output_slices, slots, offset=0):
    """y[:, slice i] += scale * (x @ A_i[slot]^T) @ B_i[slot]^T per token with slot >= 0."""
    y = y.double().clone()
    col = offset
    for a, b, n in zip(a_stacked, b_stacked, output_slices):
        for m, s in enumerate(slots.tolist()):
            if s < 0:
                continue
            t = scale * (a[s, 0].double() @ x[m].double())
            y[m, col:col + n] += b[s, 0].double() @ t
        col += n
    return y


def _stacks(L, K, widths, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = tuple(torch.randn(L, 1, r, K, generator=g).mul(K ** -0.5).to(dtype) for _ in widths)
    b = tuple(torch.randn(L, 1, n, r, generator=g).mul(r ** -0.5).to(dtype) for n in widths)
    return a, b


def _wrapper(vllm_stub, backend, max_loras=4, capacity=64):
    cls = vllm_stub.module.__getattr__("PunicaWrapperLoraKernels")
    w = cls(capacity, 8, "cpu", lora_config=types.SimpleNamespace(max_loras=max_loras))
    w.lk_backend = backend
    return w


LORA_INDEX_TO_ID = [7, None, 3, 12]  # slot -> LoRA id (slot 1 empty)


def _mapping(M, seed):
    g = torch.Generator().manual_seed(seed)
    ids = [7, 3, 12, 0][0:4]
    tokens = [ids[int(i)] for i in torch.randint(0, 4, (M,), generator=g)]
    return Mapping(index_mapping=tokens, prompt_mapping=tokens[::3], is_prefill=M > 8)


def _slots(ids):
    return torch.tensor([LORA_INDEX_TO_ID.index(i) if i > 0 else -1 for i in ids])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("widths", [(32, 8, 8), (24, 24), (16,)], ids=["qkv-gqa", "gate-up", "single"])
def test_add_lora_linear_matches_vllm_semantics(vllm_stub, backend, widths, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    K, r, M = 32, 16, 13
    w = _wrapper(vllm_stub, backend)
    mapping = _mapping(M, seed=len(widths))
    w.update_metadata(mapping, LORA_INDEX_TO_ID, 5, 100)  # vLLM passes lora_slots + 1
    a, b = _stacks(4, K, widths, r, torch.float32, seed=1)
    x = rand(M, K)
    y0 = rand(M, sum(widths))
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 0.5, widths)
    assert_close(y, ref_lora_linear(y0, x, a, b, 0.5, widths, _slots(mapping.index_mapping)), torch.float32)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_padded_batch_and_new_mapping(vllm_stub, backend, request):
    """x padded past the mapping's tokens (a CUDA-graph size): padding rows get nothing; a new
    mapping with fewer tokens reuses the same buffers (index.data keeps its storage)."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    K, r, widths = 16, 16, (16, 8, 8)
    w = _wrapper(vllm_stub, backend)
    a, b = _stacks(4, K, widths, r, torch.float32, seed=2)
    storage = w._lk_tokens.index.data.data_ptr()
    for M_live, seed in ((10, 0), (3, 1)):
        mapping = _mapping(M_live, seed)
        w.update_metadata(mapping, LORA_INDEX_TO_ID, 5, 100)
        x = rand(16, K)
        y0 = rand(16, sum(widths))
        y = y0.clone()
        w.add_lora_linear(y, x, a, b, 1.0, widths)
        slots = torch.cat([_slots(mapping.index_mapping), torch.full((16 - M_live,), -1)])
        assert_close(y, ref_lora_linear(y0, x, a, b, 1.0, widths, slots), torch.float32)
        assert torch.equal(y[M_live:], y0[M_live:])
        assert w._lk_tokens.index.data.data_ptr() == storage


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_shrink_then_expand_with_offset_and_add_inputs(vllm_stub, backend, request):
    """The fully sharded path: add_shrink into a caller buffer, (all-reduce), add_expand at
    offset_start; add_inputs=False writes the LoRA term alone into its columns."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    K, r, M, widths = 16, 16, 9, (8, 8)
    w = _wrapper(vllm_stub, backend)
    mapping = _mapping(M, 5)
    w.update_metadata(mapping, LORA_INDEX_TO_ID, 5, 100)
    a, b = _stacks(4, K, widths, r, torch.float32, seed=3)
    x = rand(M, K)
    buf = torch.full((2, M, r), float("nan"))
    w.add_shrink(buf, x, a, 0.25)
    slots = _slots(mapping.index_mapping)
    want = torch.zeros(2, M, r, dtype=torch.float64)
    for i in range(2):
        for m, s in enumerate(slots.tolist()):
            if s >= 0:
                want[i, m] = 0.25 * (a[i][s, 0].double() @ x[m].double())
    assert_close(buf, want, torch.float32, what="shrink buffer (overwritten, 0 for -1 rows)")
    assert (buf[:, slots < 0] == 0).all()
    y0 = rand(M, 4 + 16)
    y = y0.clone()
    w.add_expand(y, buf, b, widths, offset_start=4)
    assert_close(y, ref_lora_linear(y0, x, a, b, 0.25, widths, slots, offset=4), torch.float32)
    assert torch.equal(y[:, :4], y0[:, :4])
    y2 = y0.clone()
    w.add_expand(y2, buf, b, widths, offset_start=4, add_inputs=False)
    expected = ref_lora_linear(torch.zeros(M, 20), x, a, b, 0.25, widths, slots, offset=4)
    assert_close(y2[:, 4:], expected[:, 4:], torch.float32)
    assert torch.equal(y2[:, :4], y0[:, :4])
    with pytest.raises(ValueError, match="output_slices"):
        w.add_expand(y, buf, b, (8, 9))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_use_the_sampler_mapping_and_embedding(vllm_stub, backend, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    K, r, V, M = 16, 16, 40, 12
    w = _wrapper(vllm_stub, backend)
    mapping = _mapping(M, 7)
    w.update_metadata(mapping, LORA_INDEX_TO_ID, 5, V)
    (a,), (b,) = _stacks(4, K, (V,), r, torch.float32, seed=4)
    rows = len(mapping.prompt_mapping)
    x = rand(rows, K)
    logits0 = rand(rows, V)
    logits = logits0.clone()
    w.add_lora_logits(logits, x, a, b, 0.5)
    assert_close(logits, ref_lora_linear(logits0, x, (a,), (b,), 0.5, (V,), _slots(mapping.prompt_mapping)),
                 torch.float32)
    # embedding: y += x @ B with x the [M, r] A lookup (16-bit in vLLM)
    xa = rand(M, r, dtype=torch.float16)
    y0 = rand(M, V)
    y = y0.clone()
    w.add_lora_embedding(y, xa, b)
    slots = _slots(mapping.index_mapping)
    expected = y0.double().clone()
    for m, s in enumerate(slots.tolist()):
        if s >= 0:
            expected[m] += b[s, 0].double() @ xa[m].double()
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16bit_activations_torch_backend(vllm_stub, dtype):
    K, r, M, widths = 32, 8, 11, (16, 8, 8)
    w = _wrapper(vllm_stub, "torch")
    mapping = _mapping(M, 3)
    w.update_metadata(mapping, LORA_INDEX_TO_ID, 5, 100)
    a, b = _stacks(4, K, widths, r, dtype, seed=6)
    x, y0 = rand(M, K, dtype=dtype), rand(M, 32, dtype=dtype)
    y = y0.clone()
    w.add_lora_linear(y, x, a, b, 2.0, widths)
    assert_close(y, ref_lora_linear(y0, x, a, b, 2.0, widths, _slots(mapping.index_mapping)), dtype)


def test_moe_is_refused_and_stale_use_is_clear(vllm_stub):
    w = _wrapper(vllm_stub, "torch")
    for name in ("moe_lora_align_block_size", "add_lora_fused_moe", "add_lora_w13", "add_lora_w2"):
        with pytest.raises(NotImplementedError, match="MoE LoRA"):
            getattr(w, name)()
    # max_loras from update_metadata (slots + 1) when no lora_config was given
    cls = vllm_stub.module.__getattr__("PunicaWrapperLoraKernels")
    w2 = cls(32, 4, "cpu")
    with pytest.raises(RuntimeError, match="update_metadata was not called"):
        w2.add_shrink(torch.zeros(1, 2, 8), torch.zeros(2, 8), (torch.zeros(3, 1, 8, 8),), 1.0)
    w2.update_metadata(_mapping(2, 0), LORA_INDEX_TO_ID, 5, 10)
    assert w2._lk_tokens.index.num_adapters == 4
    with pytest.raises(ValueError, match="the LoRA stacks have 3 slots but the wrapper's index has 4"):
        w2.add_shrink(torch.zeros(1, 2, 8), torch.zeros(2, 8), (torch.zeros(3, 1, 8, 8),), 1.0)


def test_real_vllm_base_class():
    pytest.importorskip("vllm")
    from lora_kernels.integrations import vllm as integ
    cls = integ.PunicaWrapperLoraKernels
    base = integ._import_first(integ._BASE_MODULES).PunicaWrapperBase
    assert issubclass(cls, base)
    abstract = getattr(cls, "__abstractmethods__", frozenset())
    assert not abstract, f"abstract methods left unimplemented: {sorted(abstract)}"


def test_wrapper_traces_once_for_several_batch_sizes(vllm_stub):
    """vLLM compiles the model, LoRA calls included: add_lora_linear under
    torch.compile(fullgraph=True, dynamic=True) over several padded sizes and mappings, one frame."""
    import torch._dynamo.testing
    torch._dynamo.reset()
    K, r, widths = 16, 8, (16, 8, 8)
    w = _wrapper(vllm_stub, "torch")
    a, b = _stacks(4, K, widths, r, torch.float32, seed=8)

    def layer(x):
        y = torch.zeros(x.shape[0], sum(widths))
        w.add_lora_linear(y, x, a, b, 0.5, widths)
        return y
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=counter)
    # padded sizes unlike any weight dimension (duck sizing would tie a size to an equal width)
    for live, padded in ((5, 12), (11, 20), (20, 20), (2, 36)):
        mapping = _mapping(live, live)
        w.update_metadata(mapping, LORA_INDEX_TO_ID, 5, 100)
        x = rand(padded, K)
        slots = torch.cat([_slots(mapping.index_mapping), torch.full((padded - live,), -1)])
        assert_close(compiled(x), ref_lora_linear(torch.zeros(padded, 32), x, a, b, 0.5, widths, slots),
                     torch.float32)
    assert counter.frame_count == 1
