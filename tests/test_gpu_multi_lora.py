"""GPU lane (`pytest -m gpu`): the multi-adapter Triton kernels on the card, CUDA-graph capture
and replay with a new mapping, no host synchronisation, device-side reporting of bad ids."""
import subprocess
import sys

import pytest
import torch

import lora_kernels
from lora_kernels import AdapterIndex, MultiLoRALinear, reference
from bench.suites import token_adapters
from cases import GPU_MULTI_CASES, make_multi_inputs
from cases import assert_no_host_sync
from tolerances import assert_close, poison_, rand

pytestmark = pytest.mark.gpu

CASES = GPU_MULTI_CASES
FP32_CASES = [CASES[1], CASES[5], CASES[7]]


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _t_tol(dtype):
    return torch.float32 if dtype == torch.float32 else dtype


def _run_all(inp, dtype):
    index = inp.index()
    M, (L, R, K), N = inp.x.shape[0], inp.lora_a.shape, inp.weight.shape[0]
    t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend="triton")
    assert torch.isfinite(t).all()
    assert_close(t, inp.t64(), _t_tol(dtype), what="t")
    none = inp.token_adapter < 0
    y0 = rand(M, N, dtype=dtype, device="cuda")
    y0[none] = -0.0
    y = y0.clone()
    lora_kernels.lora_expand_(y, t, inp.lora_b, index, inp.ranks, backend="triton")
    expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
    assert_close(y, expected, dtype, what="expand")
    assert torch.equal(_bits(y[none]), _bits(y0[none])), "rows without an adapter were written"
    from lora_kernels.triton.multi_lora import multi_lora_linear
    for fused in (None, True, False):  # the heuristic's choice, then each path forced
        cfg = None
        if fused is not None:
            from lora_kernels.triton import multi_lora as ml
            cfg = ml.linear_config(M, N, K, R, L, inp.x.element_size(), torch.cuda.get_device_properties(0).multi_processor_count)
            cfg = ml.LinearConfig(cfg.tiles, fused, cfg.segment)
        out = poison_(torch.empty(M, N, dtype=dtype, device="cuda"))
        y_lin = multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales.float(), inp.bias,
                                  inp.ranks, cfg, out=out)
        assert_close(y_lin, inp.linear64(), dtype, torch_out=inp.linear_torch_expression(), what=f"linear fused={fused}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist,M,N,K,L,r_max,ranks", CASES)
def test_triton_multi_on_gpu(dist, M, N, K, L, r_max, ranks, dtype):
    _run_all(make_multi_inputs(M, N, K, L, r_max, dtype, "cuda", dist=dist, ranks=ranks, seed=M + L), dtype)


@pytest.mark.parametrize("dist,M,N,K,L,r_max,ranks", FP32_CASES)
def test_triton_multi_on_gpu_fp32(dist, M, N, K, L, r_max, ranks):
    dtype = torch.float32
    _run_all(make_multi_inputs(M, N, K, L, r_max, dtype, "cuda", dist=dist, ranks=ranks, seed=M + L), dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ranks_1_to_128_mixed_on_gpu(dtype):
    ranks = [1, 2, 7, 16, 33, 64, 100, 128]
    inp = make_multi_inputs(512, 2048, 1024, 8, 128, dtype, "cuda", dist="zipf", ranks=ranks)
    inp.token_adapter[:8] = torch.arange(8, dtype=torch.int32, device="cuda")
    _run_all(inp, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_over_16bit_base_on_gpu(dtype):
    inp = make_multi_inputs(300, 512, 768, 16, 16, dtype, "cuda", dist="decode", adapter_dtype=torch.float32,
                            ranks="mixed")
    _run_all(inp, dtype)


def test_auto_backend_is_triton_on_gpu():
    from lora_kernels.ops.multi_lora import choose_backend
    assert choose_backend("multi_lora_linear", torch.device("cuda"), torch.bfloat16, 64) == "triton"


def _graph_case(dtype=torch.bfloat16, M=96, N=512, K=256, L=16, r_max=32):
    inp = make_multi_inputs(M, N, K, L, r_max, dtype, "cuda", dist="decode", ranks="mixed", poison_padding=False)
    return inp, inp.token_adapter.clone()


def test_cuda_graph_capture_then_replay_with_new_mapping():
    """The index build and all three ops captured in one graph; replays with other mappings of
    the same M (copied into the static id tensor) give the new mapping's results."""
    inp, static_ids = _graph_case()
    M, N = inp.x.shape[0], inp.weight.shape[0]
    L = inp.lora_a.shape[0]
    static_y2 = torch.empty(M, N, dtype=inp.x.dtype, device="cuda")

    def step():
        index = AdapterIndex.from_token_adapters(static_ids, L)
        y = lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias,
                                           inp.ranks)
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks)
        static_y2.copy_(inp.bias.expand(M, N))
        lora_kernels.lora_expand_(static_y2, t, inp.lora_b, index, inp.ranks)
        return y, t

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y, static_t = step()
    for seed, dist in enumerate(["prefill", "zipf", "none10", "one", "decode"]):
        static_ids.copy_(token_adapters(dist, M, L, seed=100 + seed).cuda())
        poison_(static_y)
        poison_(static_t)
        g.replay()
        torch.cuda.synchronize()
        inp.token_adapter = static_ids.clone()
        assert_close(static_y, inp.linear64(), inp.x.dtype, what=f"graph replay {dist}: linear")
        assert_close(static_t, inp.t64(), inp.x.dtype, what=f"graph replay {dist}: t")
        lora_only = inp.linear64() - (inp.x.double() @ inp.weight.double().t())
        assert_close(static_y2, lora_only, inp.x.dtype, what=f"graph replay {dist}: expand")


def test_multi_lora_linear_module_in_cuda_graph():
    base = torch.nn.Linear(256, 384, device="cuda", dtype=torch.bfloat16)
    layer = MultiLoRALinear(base, max_adapters=6, max_rank=16).eval()
    for slot, r in ((0, 16), (2, 4), (5, 9)):
        layer.load_adapter(slot, rand(r, 256, device="cuda", scale=0.06), rand(384, r, device="cuda"), 2.0)
    x = rand(50, 256, dtype=torch.bfloat16, device="cuda")
    ids = torch.full((50,), -1, dtype=torch.int32, device="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(x, AdapterIndex.from_token_adapters(ids, 6))
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            y = layer(x, AdapterIndex.from_token_adapters(ids, 6))
        for seed in range(3):
            ids.copy_(token_adapters("none10", 50, 6, seed).cuda())
            g.replay()
            torch.cuda.synchronize()
            expected = reference.multi_lora_linear(x.double(), base.weight.double(), layer.lora_a_stack.double(),
                                                   layer.lora_b_stack.double(), ids, layer.scales.double(),
                                                   base.bias.double(), layer.ranks)
            assert_close(y, expected, torch.bfloat16)


def test_no_host_synchronisation():
    """Index build and ops issue no synchronising CUDA call (after the first, compiling call)."""
    inp, ids = _graph_case()
    L = inp.lora_a.shape[0]

    def step():
        index = AdapterIndex.from_token_adapters(ids, L)
        y = lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias,
                                           inp.ranks)
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks)
        lora_kernels.lora_expand_(y, t, inp.lora_b, index, inp.ranks)

    assert_no_host_sync(step)


def test_out_of_range_id_is_a_device_side_assert():
    """On the GPU an invalid id is reported by a device-side assert (which ends the CUDA context,
    hence a subprocess)."""
    code = ("import torch, lora_kernels as lk\n"
            "ids = torch.tensor([0, 1, 9], dtype=torch.int32, device='cuda')\n"
            "lk.AdapterIndex.from_token_adapters(ids, 4)\n"
            "torch.cuda.synchronize()\n"
            "print('no error')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "no error" not in out.stdout
    assert "assert" in out.stderr.lower()
