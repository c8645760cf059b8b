"""GPU lane (`pytest -m gpu`) for issue 12's paths: multi-slice shrink/expand on the card (bf16,
which the CPU interpreter cannot run; one launch for up to 4 slices on backend="cuda", counted),
ranks 256/512 on both backends, the persistent index under CUDA graphs
(capture once, replay with a new mapping and fewer live tokens), no host synchronisation, and
the vLLM wrapper (stub base class) captured and replayed."""
import types

import pytest
import torch

import lora_kernels
from lora_kernels import AdapterIndex
from tolerances import assert_close, poison_, rand
from test_serving_slices import GQA, expand64, make_slices, shrink64, _scale_of

pytestmark = pytest.mark.gpu
BACKENDS = ["triton", "cuda"]


def _cuda(*tensors):
    return [None if t is None else (t.cuda() if isinstance(t, torch.Tensor) else [s.cuda() for s in t])
            for t in tensors]


def _skip_unavailable(backend):
    reason = lora_kernels.backends.unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widths", [[64], [64, 64], [128, 32, 32], [32, 64, 32, 16]], ids=["S1", "S2", "S3", "S4"])
def test_slices_on_the_card(backend, dtype, widths):
    _skip_unavailable(backend)
    M, K, L, R = 77, 256, 5, 32
    x, a, b, ranks, ids, scales = make_slices(M, K, widths, L, R, dtype, [32, 7, 0, 16, 1], seed=len(widths))
    x, a, b, ranks, ids, scales = _cuda(x, a, b, ranks, ids, scales)
    index = AdapterIndex.from_token_adapters(ids, L)
    out = poison_(torch.empty(len(widths), M, R, device="cuda"))
    lora_kernels.lora_shrink(x, a, index, scales, ranks, out=out, backend=backend)
    t64 = shrink64(x.cpu(), [s.cpu() for s in a], ids.cpu(), _scale_of(scales.cpu()), ranks.cpu())
    assert_close(out, t64, dtype, what="t")
    y0 = rand(M, 3 + sum(widths), dtype=dtype, device="cuda")
    y = lora_kernels.lora_expand_(y0.clone(), out, b, index, ranks, 3, backend=backend)
    assert_close(y, expand64(y0.cpu(), out.cpu(), [s.cpu() for s in b], ids.cpu(), ranks.cpu(), 3), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("R", [256, 512])
def test_large_ranks_on_the_card(backend, R):
    """r_max 256 / 512 on both GPU backends: two slices (q-like and k/v-like widths) in one shrink
    and one expand launch, and multi_lora_linear; ranks R, R // 3 and 0 (NaN past each)."""
    _skip_unavailable(backend)
    M, K, N, L = 300, 512, 384, 3
    x, a, b, ranks, ids, scales = make_slices(M, K, [N, N // 4], L, R, torch.bfloat16, [R, R // 3, 0], seed=R)
    x, a, b, ranks, ids, scales = _cuda(x, a, b, ranks, ids, scales)
    index = AdapterIndex.from_token_adapters(ids, L)
    t = lora_kernels.lora_shrink(x, a, index, scales, ranks, backend=backend)
    t64 = shrink64(x.cpu(), [s.cpu() for s in a], ids.cpu(), _scale_of(scales.cpu()), ranks.cpu())
    assert_close(t, t64, torch.bfloat16, what="t")
    y0 = rand(M, 2 + N + N // 4, dtype=torch.bfloat16, device="cuda")
    y = lora_kernels.lora_expand_(y0.clone(), t, b, index, ranks, 2, backend=backend)
    assert_close(y, expand64(y0.cpu(), t.cpu(), [s.cpu() for s in b], ids.cpu(), ranks.cpu(), 2), torch.bfloat16,
                 what="expand")
    w = rand(N, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5)
    y = lora_kernels.multi_lora_linear(x, w, a[0], b[0], index, scales, None, ranks, backend=backend)
    ref = expand64(x.cpu().double() @ w.cpu().double().t(), t64[:1], [b[0].cpu()], ids.cpu(), ranks.cpu(), 0)
    assert_close(y, ref, torch.bfloat16, what="multi_lora_linear")


@pytest.mark.parametrize("widths", [[4096, 1024, 1024], [14336, 14336], [512, 512, 512, 512, 256]],
                         ids=["qkv-gqa", "gate-up", "S5"])
def test_cuda_backend_runs_all_slices_in_one_launch(widths):
    """backend='cuda': one shrink kernel and one expand kernel for up to 4 slices (a fifth takes
    one more of each), counted by the profiler; results against float64."""
    _skip_unavailable("cuda")
    M, K, L, R = 64, 4096, 4, 16
    x, a, b, ranks, ids, scales = make_slices(M, K, widths, L, R, torch.bfloat16, [16, 8, 0, 3], seed=7)
    x, a, b, ranks, ids, scales = _cuda(x, a, b, ranks, ids, scales)
    index = AdapterIndex.from_token_adapters(ids, L)
    y0 = rand(M, sum(widths), dtype=torch.bfloat16, device="cuda")
    y = y0.clone()
    lora_kernels.lora_shrink(x, a, index, scales, ranks, backend="cuda")  # loads the extension
    torch.cuda.synchronize()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        t = lora_kernels.lora_shrink(x, a, index, scales, ranks, backend="cuda")
        lora_kernels.lora_expand_(y, t, b, index, ranks, backend="cuda")
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    launches = (len(widths) + 3) // 4
    assert sum("multi_shrink_kernel" in n for n in names) == launches, names
    assert sum("multi_expand_kernel" in n for n in names) == launches, names
    t64 = shrink64(x.cpu(), [s.cpu() for s in a], ids.cpu(), _scale_of(scales.cpu()), ranks.cpu())
    assert_close(t, t64, torch.bfloat16, what="t")
    assert_close(y, expand64(y0.cpu(), t.cpu(), [s.cpu() for s in b], ids.cpu(), ranks.cpu(), 0), torch.bfloat16)


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistent_index_graph_replay_with_new_mapping_and_fewer_tokens(backend):
    """update_ runs outside the graph (as vLLM's update_metadata does); the graph holds the ops
    on the padded_to view for the captured batch size; replays with new mappings of fewer live
    tokens give the new mapping's results, padding rows untouched."""
    _skip_unavailable(backend)
    M_pad, K, L, R = 64, 256, 6, 16
    x, a, b, ranks, ids, scales = make_slices(M_pad, K, GQA * 2, L, R, torch.bfloat16, [16, 5, 0, 9, 16, 2])
    x, a, b, ranks, ids, scales = _cuda(x, a, b, ranks, ids, scales)
    index = AdapterIndex.with_capacity(256, L, device="cuda")
    view = index.update_(ids[:40]).padded_to(M_pad)
    N = sum(GQA)
    static_y = torch.zeros(M_pad, N, dtype=torch.bfloat16, device="cuda")
    a3, b3 = a[:3], b[:3]

    def step():
        static_y.zero_()
        t = lora_kernels.lora_shrink(x, a3, view, scales, ranks, backend=backend)
        lora_kernels.lora_expand_(static_y, t, b3, view, ranks, backend=backend)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for live, seed in ((40, 0), (7, 1), (64, 2), (1, 3)):
        new = torch.randint(-1, L, (live,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        index.update_(new.cuda())  # outside the graph: same storage
        torch.cuda.set_sync_debug_mode("error")
        try:
            g.replay()
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()
        slots = torch.cat([new, torch.full((M_pad - live,), -1, dtype=torch.int32)])
        t64 = shrink64(x.cpu(), [s.cpu() for s in a3], slots, _scale_of(scales.cpu()), ranks.cpu())
        expected = expand64(torch.zeros(M_pad, N), t64, [s.cpu() for s in b3], slots, ranks.cpu(), 0)
        assert_close(static_y, expected, torch.bfloat16, what=f"replay live={live}")
        assert (static_y[live:] == 0).all()


def test_update_inside_the_graph_and_no_host_sync():
    """update_ itself captured: the graph reads the static id tensor on every replay."""
    M, K, L, R = 48, 128, 4, 16
    x, a, b, ranks, ids, scales = make_slices(M, K, [64, 32], L, R, torch.bfloat16, [16, 3, 8, 0])
    x, a, b, ranks, ids, scales = _cuda(x, a, b, ranks, ids, scales)
    index = AdapterIndex.with_capacity(M, L, device="cuda")
    static_ids = ids.clone()
    static_y = torch.zeros(M, 96, dtype=torch.bfloat16, device="cuda")

    def step():
        index.update_(static_ids)
        static_y.zero_()
        t = lora_kernels.lora_shrink(x, a, index, scales, ranks, backend="triton")
        lora_kernels.lora_expand_(static_y, t, b, index, ranks, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    for seed in range(3):
        new = torch.randint(-1, L, (M,), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)
        static_ids.copy_(new.cuda())
        g.replay()
        torch.cuda.synchronize()
        t64 = shrink64(x.cpu(), [s.cpu() for s in a], new, _scale_of(scales.cpu()), ranks.cpu())
        assert_close(static_y, expand64(torch.zeros(M, 96), t64, [s.cpu() for s in b], new, ranks.cpu(), 0),
                     torch.bfloat16)


def test_vllm_wrapper_under_a_graph(monkeypatch):
    """The vLLM wrapper (stub base class) captured with add_lora_linear for a padded size, then
    update_metadata outside the graph and replay: each replay follows the new mapping."""
    import sys
    import test_integration_vllm as tv
    for name in ("vllm", "vllm.lora", "vllm.lora.punica_wrapper", "vllm.lora.punica_wrapper.punica_base"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["vllm.lora.punica_wrapper.punica_base"].PunicaWrapperBase = tv.StubPunicaWrapperBase
    from lora_kernels.integrations import vllm as integ
    monkeypatch.setattr(integ, "_CLASS", None)
    cls = integ.__getattr__("PunicaWrapperLoraKernels")
    w = cls(128, 16, torch.device("cuda"), lora_config=types.SimpleNamespace(max_loras=4))
    K, r, widths, M_pad = 256, 16, (128, 32, 32), 32
    a, b = tv._stacks(4, K, widths, r, torch.bfloat16, seed=1)
    a, b = tuple(s.cuda() for s in a), tuple(s.cuda() for s in b)
    x = rand(M_pad, K, dtype=torch.bfloat16, device="cuda")
    y = torch.zeros(M_pad, sum(widths), dtype=torch.bfloat16, device="cuda")
    w.update_metadata(tv._mapping(20, 0), tv.LORA_INDEX_TO_ID, 5, 100)

    def step():
        y.zero_()
        w.add_lora_linear(y, x, a, b, 0.5, widths)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    for live, seed in ((20, 1), (5, 2), (32, 3)):
        mapping = tv._mapping(live, seed)
        w.update_metadata(mapping, tv.LORA_INDEX_TO_ID, 5, 100)
        g.replay()
        torch.cuda.synchronize()
        slots = torch.cat([tv._slots(mapping.index_mapping), torch.full((M_pad - live,), -1)])
        expected = tv.ref_lora_linear(torch.zeros(M_pad, sum(widths)), x.cpu(), [s.cpu() for s in a],
                                      [s.cpu() for s in b], 0.5, widths, slots)
        assert_close(y, expected, torch.bfloat16, what=f"vLLM wrapper replay live={live}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_on_a_padded_view(backend):
    """multi_lora_linear (and MultiLoRALinear's path) on a persistent index's padded view: the
    padding rows get the base output only."""
    _skip_unavailable(backend)
    live, M, K, N, L, R = 50, 96, 256, 192, 4, 32
    x, a, b, ranks, ids, scales = make_slices(M, K, [N], L, R, torch.bfloat16, [32, 9, 0, 16])
    x, a, b, ranks, ids, scales = _cuda(x, a, b, ranks, ids, scales)
    w = rand(N, K, dtype=torch.bfloat16, device="cuda", scale=K ** -0.5)
    index = AdapterIndex.with_capacity(512, L, device="cuda").update_(ids[:live]).padded_to(M)
    y = lora_kernels.multi_lora_linear(x, w, a[0], b[0], index, scales, None, ranks, backend=backend)
    slots = torch.cat([ids[:live].cpu(), torch.full((M - live,), -1, dtype=torch.int32)])
    t64 = shrink64(x.cpu(), [a[0].cpu()], slots, _scale_of(scales.cpu()), ranks.cpu())
    ref = expand64(x.cpu().double() @ w.cpu().double().t(), t64, [b[0].cpu()], slots, ranks.cpu(), 0)
    assert_close(y, ref, torch.bfloat16)
