"""lora_kernels.integrations.sglang without SGLang: stub BaseLoRABackend, registry and
server_args in sys.modules; the plugin registration; the backend's methods against a float64
restatement of SGLang's torch_native backend (per-request segments, per-slot scalings applied
in the shrink, rank-bounded slices of the stacked q/k/v and gate/up A, B cut at the output
offsets, base-only requests on a rank-0 slot). Its intermediate is rounded to the activation
dtype; the restatement keeps float64, the stricter oracle.

An optional lane builds the class against the real SGLang when it is installed."""
import importlib
import sys
import types

import pytest
import torch

from tolerances import assert_close, rand


class StubBaseLoRABackend:
    def __init__(self, max_loras_per_batch, device):
        self.max_loras_per_batch = max_loras_per_batch
        self.device = device


@pytest.fixture
def sglang_stub(monkeypatch):
    names = ("sglang", "sglang.srt", "sglang.srt.lora", "sglang.srt.lora.backend",
             "sglang.srt.lora.backend.base_backend", "sglang.srt.lora.backend.lora_registry", "sglang.srt.server_args")
    mods = {}
    for name in names:
        mods[name] = types.ModuleType(name)
        monkeypatch.setitem(sys.modules, name, mods[name])
    mods["sglang.srt.lora.backend.base_backend"].BaseLoRABackend = StubBaseLoRABackend
    registry = mods["sglang.srt.lora.backend.lora_registry"]
    registry.LORA_SUPPORTED_BACKENDS = {}

    def register_lora_backend(name):
        def decorator(fn):
            registry.LORA_SUPPORTED_BACKENDS[name] = fn
            return fn
        return decorator

    def get_backend_from_name(name):
        if name not in registry.LORA_SUPPORTED_BACKENDS:
            raise ValueError(f"Invalid backend: {name}")
        return registry.LORA_SUPPORTED_BACKENDS[name]()
    registry.register_lora_backend = register_lora_backend
    registry.get_backend_from_name = get_backend_from_name
    mods["sglang.srt.server_args"].LORA_BACKEND_CHOICES = ["triton", "csgmv", "torch_native"]
    integ = importlib.import_module("lora_kernels.integrations.sglang")
    monkeypatch.setattr(integ, "_CLASS", None)
    return types.SimpleNamespace(module=integ, registry=registry, server_args=mods["sglang.srt.server_args"])


def test_plugin_registers_the_backend_name(sglang_stub):
    sglang_stub.module.register()
    cls = sglang_stub.registry.get_backend_from_name("lora_kernels")
    assert issubclass(cls, StubBaseLoRABackend) and cls.__name__ == "LoraKernelsLoRABackend"
    assert sglang_stub.server_args.LORA_BACKEND_CHOICES.count("lora_kernels") == 1
    sglang_stub.module.register()  # a second load_plugins() adds nothing twice
    assert sglang_stub.server_args.LORA_BACKEND_CHOICES.count("lora_kernels") == 1


def test_entry_point_declared():
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["sglang.srt.plugins"]["lora_kernels"] == "lora_kernels.integrations.sglang:register"


class Mode:
    def __init__(self, extend):
        self.extend = extend

    def is_extend(self):
        return self.extend


def _batch(seg_lens):
    if seg_lens is None:
        return types.SimpleNamespace(forward_mode=Mode(False), extend_seq_lens=None)
    lens = torch.tensor(seg_lens)
    return types.SimpleNamespace(forward_mode=Mode(True), extend_seq_lens=lens, extend_seq_lens_cpu=list(seg_lens),
                                 extend_num_tokens=sum(seg_lens))


L, R, K = 4, 8, 32
RANKS = [8, 3, 0, 6]          # slot 2: a base-only request's slot (rank 0, scaling 0)
SCALINGS = [0.5, 2.0, 0.0, 1.25]


def _stacked(c, widths, dtype, seed):
    """A [L, c*R, K] (NaN past each slot's rank in each slice), B [L, sum(widths), R] (NaN past rank)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(L, c * R, K, generator=g).mul(K ** -0.5)
    b = torch.randn(L, sum(widths), R, generator=g).mul(R ** -0.5)
    for s, r in enumerate(RANKS):
        for i in range(c):
            a[s, i * R + r:(i + 1) * R] = float("nan")
        b[s, :, r:] = float("nan")
    return a.to(dtype), b.to(dtype)


def ref_sliced(x, a, b, offsets, token_slots, base):
    """torch_native restated in float64: t_i = scaling * x @ A[slot, i*R : i*R + rank]^T,
    y[:, off_i:off_{i+1}] += t_i @ B[slot, off_i:off_{i+1}, :rank]^T."""
    y = base.double().clone()
    for m, s in enumerate(token_slots.tolist()):
        r = RANKS[s]
        if r == 0:
            continue
        for i in range(len(offsets) - 1):
            t = SCALINGS[s] * (a[s, i * R:i * R + r].double() @ x[m].double())
            y[m, offsets[i]:offsets[i + 1]] += b[s, offsets[i]:offsets[i + 1], :r].double() @ t
    return y


def _backend(sglang_stub, backend):
    cls = sglang_stub.module.__getattr__("LoraKernelsLoRABackend")
    be = cls(L, "cpu")
    be.lk_backend = backend
    return be


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_qkv_and_gate_up_match_torch_native(sglang_stub, backend, phase, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    be = _backend(sglang_stub, backend)
    weight_indices = [1, 0, 2, 3, 1]
    seg_lens = [3, 1, 4, 2, 5] if phase == "prefill" else None
    be.prepare_lora_batch(_batch(seg_lens), weight_indices, RANKS, SCALINGS)
    token_slots = torch.repeat_interleave(torch.tensor(weight_indices), torch.tensor(seg_lens or [1] * 5))
    s = token_slots.shape[0]
    x = rand(s, K)
    # q/k/v under GQA: Nq = 32, Nkv = 8
    offsets = [0, 32, 40, 48]
    a, b = _stacked(3, [32, 8, 8], torch.float32, seed=1)
    base = rand(s, 48)
    y = be.run_qkv_lora(x, a, b, output_offset=torch.tensor(offsets, dtype=torch.int32),
                        output_offset_cpu=torch.tensor(offsets), max_qkv_out_dim=32, base_output=base.clone())
    assert_close(y, ref_sliced(x, a, b, offsets, token_slots, base), torch.float32, what="qkv")
    # the (q, kv) form of B
    y2 = be.run_qkv_lora(x, a, (b[:, :32], b[:, 32:]), base_output=base.clone())
    assert_close(y2, ref_sliced(x, a, b, offsets, token_slots, base), torch.float32, what="qkv (q, kv)")
    # gate/up
    a2, b2 = _stacked(2, [24, 24], torch.float32, seed=2)
    y3 = be.run_gate_up_lora(x, a2, b2, base_output=None)
    assert_close(y3, ref_sliced(x, a2, b2, [0, 24, 48], token_slots, torch.zeros(s, 48)), torch.float32,
                 what="gate_up")
    # a plain layer: shrink then expand (what o_proj / down_proj do, with the all-reduce between)
    a1, b1 = _stacked(1, [16], torch.float32, seed=3)
    t = be.run_lora_a_sgemm(x, a1)
    assert t.shape == (s, R)
    y4 = be.run_lora_b_sgemm(t, b1, base_output=base[:, :16].clone())
    assert_close(y4, ref_sliced(x, a1, b1, [0, 16], token_slots, base[:, :16]), torch.float32, what="a/b sgemm")
    # rank-0 slot (the base-only request): rows untouched, bitwise
    rows = token_slots == 2
    assert torch.equal(y[rows], base[rows]) and torch.equal(y4[rows], base[rows, :16])


def test_stacked_shrink_bounds_every_slice_by_the_rank(sglang_stub):
    be = _backend(sglang_stub, "torch")
    be.prepare_lora_batch(_batch(None), [0, 1, 3], RANKS, SCALINGS)
    a, _ = _stacked(3, [8, 8, 8], torch.float32, seed=4)
    x = rand(3, K)
    t = be.run_lora_a_sgemm(x, a, stack_num=3)
    assert t.shape == (3, 3 * R) and torch.isfinite(t).all()
    for m, slot in enumerate([0, 1, 3]):
        r = RANKS[slot]
        for i in range(3):
            want = SCALINGS[slot] * (a[slot, i * R:i * R + r].double() @ x[m].double())
            assert_close(t[m, i * R:i * R + r], want, torch.float32)
            assert (t[m, i * R + r:(i + 1) * R] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_cuda_graph_buffers_are_persistent(sglang_stub, backend, request):
    """The graph path rebuilds one persistent index in place; a padded graph batch's extra rows
    get nothing; batches past the buffers are refused."""
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    be = _backend(sglang_stub, backend)
    be.init_decode_cuda_graph_batch_info(8, 1)
    storage = be._lk_graph.index.data.data_ptr()
    a, b = _stacked(2, [16, 16], torch.float32, seed=5)
    for wi in ([3, 1, 0], [1, 1, 0, 3, 2, 0]):
        be.prepare_lora_batch(_batch(None), wi, RANKS, SCALINGS, use_cuda_graph=True)
        x = rand(8, K)  # padded to the captured batch size
        base = rand(8, 32)
        y = be.run_gate_up_lora(x, a, b, base_output=base.clone())
        slots = torch.tensor(wi)
        expected = ref_sliced(x[:len(wi)], a, b, [0, 16, 32], slots, base[:len(wi)])
        assert_close(y[:len(wi)], expected, torch.float32)
        assert torch.equal(y[len(wi):], base[len(wi):])
        assert be._lk_graph.index.data.data_ptr() == storage
    with pytest.raises(ValueError, match="exceeds the graph buffers"):
        be.prepare_lora_batch(_batch(None), [0] * 9, RANKS, SCALINGS, use_cuda_graph=True)
    with pytest.raises(ValueError, match="one entry per slot"):
        be.prepare_lora_batch(_batch(None), [0], RANKS[:2], SCALINGS)


def test_real_sglang_base_class():
    pytest.importorskip("sglang")
    from lora_kernels.integrations import sglang as integ
    base = importlib.import_module(integ._BASE_MODULE).BaseLoRABackend
    assert issubclass(integ.LoraKernelsLoRABackend, base)


def test_embedding_lora_is_refused(sglang_stub):
    be = _backend(sglang_stub, "torch")
    for name in ("run_lora_a_embedding", "run_extra_token_embedding"):
        with pytest.raises(NotImplementedError, match="not implemented by lora_kernels"):
            getattr(be, name)(torch.zeros(2, dtype=torch.long), torch.zeros(4, 8, 10), 10)
    with pytest.raises(RuntimeError, match="prepare_lora_batch was not called"):
        be.run_lora_a_sgemm(torch.zeros(2, K), torch.zeros(L, R, K))
