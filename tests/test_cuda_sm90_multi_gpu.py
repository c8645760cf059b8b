"""GPU lane (`pytest -m gpu`, an H100/H200): the Hopper multi-adapter linear -- backend="cuda"
multi_lora_linear through the sm90 tail GEMM with a per-slot LoRA tail
(lora_kernels/cuda/multi_lora_sm90.py on csrc/lora_linear/lora_linear_sm90.cuh) -- on the card
against the float64 reference: the three tiles, bf16 and fp16, fp32 adapters, bias dtypes, mixed
ranks with NaN past each rank, a rank-0 slot, tokens without adapter, every element written
(poisoned outputs), CUDA graph capture and replay with a new mapping on a padded capacity index,
no host sync, determinism -- and the dispatch: sm_90 takes it where sm90_multi_plan says, the
rest keeps the mma.sync kernel (whose own tests, tests/test_gpu_cuda_multi.py, also run here).

Skipped on other GPUs; on an sm_90 GPU an extension without the sm90 kernels fails here with
the reason. The host side (tail layout and numerics, the plan) is tests/test_cuda_sm90_multi_plan.py.
"""
import pytest
import torch

import lora_kernels
from bench.suites import token_adapters
from cases import assert_no_host_sync, make_multi_inputs, require_hopper_with_sm90_kernels
from lora_kernels import AdapterIndex
from tolerances import assert_close, poison_

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def hopper():
    require_hopper_with_sm90_kernels()


@pytest.fixture
def sm90_calls(monkeypatch):
    """The tiles of the sm90 multi-adapter launches made while the test runs."""
    from lora_kernels.cuda import multi_lora_sm90 as sm
    used = []
    real = sm.launch_sm90_multi
    monkeypatch.setattr(sm, "launch_sm90_multi", lambda *a: used.append(a[-1]) or real(*a))
    return used


def _run(inp, tile_kind=0, index=None):
    from lora_kernels.cuda.multi_lora import multi_lora_linear
    M, N = inp.x.shape[0], inp.weight.shape[0]
    out = poison_(torch.empty(M, N, dtype=inp.x.dtype, device="cuda"))
    return multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index or inp.index(), inp.scales, inp.bias,
                             inp.ranks, out=out, tile_kind=tile_kind)


SHAPES = [  # (dist, M, N, K, L, r_max, ranks, auto takes sm90): tails of M % 128, N % 256, K % 64
    ("prefill", 4096, 4096, 4096, 8, 16, "mixed", True),     # tail 256 = K / 16
    ("zipf", 1024, 4096, 4096, 16, 16, "mixed", True),       # tail 512 = K / 8, the limit
    ("one", 512, 14336, 4096, 4, 64, None, True),
    ("none10", 333, 1000, 1232, 4, 7, "mixed", True),        # Wb = 16 > 2r
    ("decode", 130, 264, 136, 2, 4, [4, 0], True),           # rank-0 slot, one partial k-block of tail
    ("decode", 64, 8, 8, 3, 1, None, False),                 # K = 8: forced tiles only
    ("zipf", 257, 4104, 4096, 32, 64, "mixed", False),       # tail 4096 = K: forced tiles only
    ("none", 200, 96, 80, 4, 4, None, False),                # no token has an adapter
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dist,M,N,K,L,r_max,ranks,auto", SHAPES)
def test_sm90_multi_lora_linear(dist, M, N, K, L, r_max, ranks, auto, dtype, sm90_calls):
    inp = make_multi_inputs(M, N, K, L, r_max, dtype, "cuda", dist=dist, ranks=ranks, seed=M + L)
    expected, torch_out = inp.linear64(), inp.linear_torch_expression()
    for tile_kind in ((0,) if auto else ()) + (3, 4, 5):
        sm90_calls.clear()
        y = _run(inp, tile_kind)
        assert len(sm90_calls) == 1, (tile_kind, sm90_calls)
        assert_close(y, expected, dtype, torch_out=torch_out, what=f"multi_lora_linear sm90 (tile_kind={tile_kind})")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["none", "same", "fp32"])
def test_sm90_multi_fp32_adapters_and_bias(dtype, bias, sm90_calls):
    inp = make_multi_inputs(300, 520, 768, 4, 8, dtype, "cuda", dist="none10", ranks="mixed",
                            adapter_dtype=torch.float32, bias=bias != "none")  # tail 4 * 24 = 96 <= 768 / 8
    if bias == "fp32":
        inp.bias = inp.bias.float()
    y = _run(inp)
    from lora_kernels.cuda import lora_linear as cl
    assert sm90_calls == [cl.sm90_plan(300, 520, 768, *cl.device_facts(torch.cuda.current_device()), True)]
    assert_close(y, inp.linear64(), dtype)


def test_sm90_multi_lora_term_is_fp32_accurate(sm90_calls):
    """Every token on slot 2 and W ~ -scale * B_2 @ A_2, so that x @ W.T cancels most of the LoRA
    term and y is ~1% of it: t rounded to bf16 once would be off by ~2^-9 of the term, ~20% of
    y; the hi/lo tail keeps it to ~2^-16 of the term."""
    inp = make_multi_inputs(256, 512, 512, 4, 16, torch.bfloat16, "cuda", dist="one", bias=False)
    inp.token_adapter.fill_(2)
    cancel = -float(inp.scales[2]) * inp.lora_b[2].double() @ inp.lora_a[2].double()
    inp.weight = (cancel + 0.01 * torch.randn_like(cancel) * 512 ** -0.5).to(torch.bfloat16)
    y = _run(inp, tile_kind=4)
    ref = inp.linear64()
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 2 ** -5, err


def test_dispatch_picks_sm90_where_the_tail_is_small(sm90_calls):
    for M, K, L, r_max, expect in ((512, 4096, 8, 16, True), (16, 4096, 8, 16, False),  # decode M
                                   (512, 1024, 8, 16, False),                           # tail 256 > K / 8
                                   (512, 4096, 64, 16, False)):                         # tail 2048 > K / 8
        sm90_calls.clear()
        inp = make_multi_inputs(M, 1024, K, L, r_max, torch.bfloat16, "cuda", dist="zipf", ranks="mixed")
        y = _run(inp)
        assert bool(sm90_calls) == expect, (M, K, L, r_max, sm90_calls)
        assert_close(y, inp.linear64(), torch.bfloat16)
    # through the public op
    sm90_calls.clear()
    inp = make_multi_inputs(512, 1024, 4096, 8, 16, torch.bfloat16, "cuda", dist="prefill", ranks="mixed")
    y = lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, inp.index(), inp.scales, inp.bias,
                                       inp.ranks, backend="cuda")
    assert len(sm90_calls) == 1
    assert_close(y, inp.linear64(), torch.bfloat16)


def test_misaligned_x_falls_back(sm90_calls):
    inp = make_multi_inputs(256, 512, 1024, 4, 16, torch.float16, "cuda", dist="zipf", ranks="mixed")
    inp.x = torch.cat([inp.x.new_zeros(1), inp.x.flatten()])[1:].view(256, 1024)
    y = _run(inp)
    assert sm90_calls == []
    assert_close(y, inp.linear64(), torch.float16)


def test_sm90_multi_deterministic():
    inp = make_multi_inputs(1024, 1024, 2048, 4, 32, torch.bfloat16, "cuda", dist="zipf", ranks="mixed")
    index = inp.index()
    runs = [_run(inp, 0, index) for _ in range(3)]
    assert all(torch.equal(r.view(torch.int16), runs[0].view(torch.int16)) for r in runs[1:])


def test_sm90_multi_cuda_graph_capture_then_replay_with_new_mapping(sm90_calls):
    """A with_capacity index updated in the graph with 200 tokens and viewed for 256 rows (a padded
    CUDA-graph batch); replays with other mappings (copied into the static ids) give the new
    mapping's results, rows 200..255 the base layer's."""
    M, live, N, K, L, r_max = 256, 200, 1024, 2048, 4, 16   # tail 128 <= K / 8
    inp = make_multi_inputs(M, N, K, L, r_max, torch.bfloat16, "cuda", dist="decode", ranks="mixed",
                            poison_padding=False)
    static_ids = inp.token_adapter[:live].clone()
    index = AdapterIndex.with_capacity(320, L, device="cuda")

    def step():
        index.update_(static_ids)
        return lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index.padded_to(M),
                                              inp.scales, inp.bias, inp.ranks, backend="cuda")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # loads the extension, reads the device facts, outside the capture
    torch.cuda.current_stream().wait_stream(s)
    sm90_calls.clear()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_y = step()
    assert len(sm90_calls) == 1, "the captured launch is not the sm90 one"
    for seed, dist in enumerate(["prefill", "zipf", "none10", "one", "decode"]):
        static_ids.copy_(token_adapters(dist, live, L, seed=100 + seed).cuda())
        poison_(static_y)
        g.replay()
        torch.cuda.synchronize()
        inp.token_adapter = torch.cat([static_ids, static_ids.new_full((M - live,), -1)])
        assert_close(static_y, inp.linear64(), torch.bfloat16, what=f"graph replay {dist}")


def test_sm90_multi_no_host_synchronisation(sm90_calls):
    inp = make_multi_inputs(256, 512, 1024, 4, 16, torch.float16, "cuda", dist="decode", ranks="mixed")

    def step():
        index = AdapterIndex.from_token_adapters(inp.token_adapter, 4)
        lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias,
                                       inp.ranks, backend="cuda")

    assert_no_host_sync(step)
    assert len(sm90_calls) == 2
