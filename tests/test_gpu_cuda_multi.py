"""GPU lane (`pytest -m gpu`): the CUDA C++ multi-adapter shrink / expand / multi_lora_linear on the
card against the float64 reference (one stack, several slices in one launch, ranks to 512), CUDA-graph capture and replay with a new mapping,
determinism, no host sync.

The extension must be there (bench/device_check.sh builds it); if it is not, these tests fail
with the reason instead of skipping, since this lane exists to run them."""
import pytest
import torch

import lora_kernels
from lora_kernels import AdapterIndex, reference
from bench.suites import token_adapters
from cases import GPU_MULTI_CASES, make_multi_inputs
from cases import assert_no_host_sync
from tolerances import assert_close, poison_, rand

pytestmark = pytest.mark.gpu

CASES = GPU_MULTI_CASES


@pytest.fixture(scope="module", autouse=True)
def extension():
    from lora_kernels.cuda import loader as cuda
    reason = cuda.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the CUDA extension is not usable on this GPU machine: {reason}")
    cuda.load()


def _bits(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def _untouched(inp):
    none = inp.token_adapter < 0
    if inp.ranks is None:
        return none
    return none | (inp.ranks[inp.token_adapter.clamp(min=0).long()] == 0)


def _check(inp, item_ms=(0,)):
    from lora_kernels.cuda.multi_lora import multi_lora_expand_, multi_lora_linear, multi_lora_shrink
    dtype = inp.x.dtype
    index = inp.index()
    M, R, N = inp.x.shape[0], inp.lora_a.shape[1], inp.lora_b.shape[1]
    t_tol = torch.float32 if inp.lora_a.dtype == dtype else dtype  # fp32 A: split into 16-bit halves
    t = None
    for item_m in item_ms:
        t = multi_lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks,
                              out=poison_(torch.empty(M, R, device="cuda")), item_m=item_m)
        assert_close(t, inp.t64(), t_tol, what=f"t (item_m={item_m})")
    untouched = _untouched(inp)
    y0 = rand(M, N, dtype=dtype, device="cuda")
    y0[untouched] = -0.0
    for item_m in (16, 64):
        y = y0.clone()
        multi_lora_expand_(y, t, inp.lora_b, index, inp.ranks, item_m=item_m)
        expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
        assert_close(y, expected, dtype, what=f"expand (item_m={item_m})")
        assert torch.equal(_bits(y[untouched]), _bits(y0[untouched])), "rows without an adapter were written"
    fp32_adapters = inp.lora_a.dtype != dtype
    for tile_kind in (0, 1, 2):  # the heuristic's tile, then each forced
        out = poison_(torch.empty(M, N, dtype=dtype, device="cuda"))
        y = multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias, inp.ranks,
                              out=out, tile_kind=tile_kind)
        assert_close(y, inp.linear64(), dtype, torch_out=None if fp32_adapters else inp.linear_torch_expression(),
                     what=f"multi_lora_linear (tile_kind={tile_kind})")
    return t


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dist,M,N,K,L,r_max,ranks", CASES)
def test_cuda_multi_on_gpu(dist, M, N, K, L, r_max, ranks, dtype):
    _check(make_multi_inputs(M, N, K, L, r_max, dtype, "cuda", dist=dist, ranks=ranks, seed=M + L), (0, 16, 64))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ranks_1_to_128_mixed_on_gpu(dtype):
    ranks = [1, 2, 7, 16, 33, 64, 100, 128]
    inp = make_multi_inputs(512, 2048, 1024, 8, 128, dtype, "cuda", dist="zipf", ranks=ranks)
    inp.token_adapter[:8] = torch.arange(8, dtype=torch.int32, device="cuda")
    _check(inp, (16, 64))


@pytest.mark.parametrize("r_max,ranks", [(256, [256, 129, 0, 100, 255, 1]), (512, [512, 300, 128, 0, 17, 511])],
                         ids=["r256", "r512"])
@pytest.mark.parametrize("dist", ["zipf", "decode"])
def test_ranks_past_128_on_gpu(dist, r_max, ranks):
    """The shrink's rank chunks, the expand's 128-wide chunks of t (partial last chunks), the fused
    linear's epilogue over 256 / 512 ranks; decode (CUDA-core) and zipf (tensor-core) pieces."""
    inp = make_multi_inputs(200, 1024, 1024, 6, r_max, torch.bfloat16, "cuda", dist=dist, ranks=ranks, seed=r_max)
    inp.token_adapter[:6] = torch.arange(6, dtype=torch.int32, device="cuda")
    _check(inp, (16, 64))


@pytest.mark.parametrize("M,dist", [(16, "one"), (64, "zipf"), (500, "zipf")])
@pytest.mark.parametrize("r_max", [16, 64])
def test_split_decode_shrink_on_gpu(M, dist, r_max):
    """row_split 4 (each 16-token piece as 4 CTAs on CUDA cores; the default up to 64 tokens) and
    1 (one tensor-core CTA per piece) both against float64, at sizes either default takes."""
    from lora_kernels.cuda.multi_lora import multi_lora_shrink
    inp = make_multi_inputs(M, 64, 4096, 4, r_max, torch.bfloat16, "cuda", dist=dist, ranks="mixed", seed=M)
    if dist == "one":
        inp.token_adapter[:] = 0
    for row_split in (1, 4):
        t = multi_lora_shrink(inp.x, inp.lora_a, inp.index(), inp.scales, inp.ranks,
                              out=poison_(torch.empty(M, r_max, device="cuda")), item_m=16, row_split=row_split)
        assert_close(t, inp.t64(), torch.float32, what=f"t (row_split={row_split})")


def test_slices_in_one_launch_with_fp32_adapters_on_gpu():
    """GQA q/k/v (4096 / 1024 / 1024) through the launchers with fp32 adapters (the split A and
    3xTF32 expand per slice), into a column-major y at an offset; every other column untouched."""
    from lora_kernels.cuda.multi_lora import multi_lora_expand_, multi_lora_shrink
    M, K, L, R, widths, offset = 96, 2048, 4, 32, [4096, 1024, 1024], 8
    inp = make_multi_inputs(M, 8, K, L, R, torch.float16, "cuda", dist="zipf", ranks="mixed")
    keep = reference.rank_keep(inp.ranks, L, R, "cuda")
    a_stacks = [rand(L, R, K, device="cuda", scale=K ** -0.5).masked_fill(~keep[:, :, None], float("nan"))
                for _ in widths]
    b_stacks = [rand(L, n, R, device="cuda", scale=R ** -0.5).masked_fill(~keep[:, None, :], float("nan"))
                for n in widths]
    index = inp.index()
    t = multi_lora_shrink(inp.x, a_stacks, index, inp.scales, inp.ranks,
                          out=poison_(torch.empty(3, M, R, device="cuda")))
    y0 = rand(sum(widths) + offset + 3, M, dtype=torch.float16, device="cuda").t()
    y = y0.clone().t().contiguous().t()
    multi_lora_expand_(y, t, b_stacks, index, inp.ranks, offset=offset)
    col = offset
    for s, (a, b) in enumerate(zip(a_stacks, b_stacks)):
        t64 = reference.lora_shrink(inp.x.double(), a.double(), inp.token_adapter, inp.scales.double(), inp.ranks)
        assert_close(t[s], t64, torch.float16, what=f"t[{s}]")
        expected = reference.lora_expand_(y0[:, col:col + b.shape[1]].double(), t[s].double(), b.double(),
                                          inp.token_adapter, inp.ranks)
        assert_close(y[:, col:col + b.shape[1]], expected, torch.float16, what=f"slice {s}")
        col += b.shape[1]
    assert torch.equal(_bits(y[:, :offset]), _bits(y0[:, :offset]))
    assert torch.equal(_bits(y[:, col:]), _bits(y0[:, col:]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_over_16bit_base_on_gpu(dtype):
    inp = make_multi_inputs(300, 512, 768, 16, 16, dtype, "cuda", dist="decode", adapter_dtype=torch.float32,
                            ranks="mixed")
    _check(inp, (16, 64))


def test_public_ops_with_backend_cuda_and_layouts():
    """Through the public ops: int64 ranks, an expand in place into a column-major y, 3-D x and an
    fp32 bias for the fused op."""
    inp = make_multi_inputs(257, 300, 264, 12, 32, torch.bfloat16, "cuda", dist="zipf", ranks="mixed")
    inp.ranks = inp.ranks.long()
    index = inp.index()
    t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend="cuda")
    assert_close(t, inp.t64(), torch.float32, what="t")
    y0 = rand(300, 257, dtype=torch.bfloat16, device="cuda").t()
    y = y0.clone().t().contiguous().t()  # column-major, in place
    assert lora_kernels.lora_expand_(y, t, inp.lora_b, index, inp.ranks, backend="cuda") is y
    expected = reference.lora_expand_(y0.double(), t.double(), inp.lora_b.double(), inp.token_adapter, inp.ranks)
    assert_close(y, expected, torch.bfloat16, what="expand into a column-major y")
    x3 = inp.x.reshape(1, 257, 264)
    y3 = lora_kernels.multi_lora_linear(x3, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias.float(),
                                        inp.ranks, backend="cuda")
    assert y3.shape == (1, 257, 300)
    assert_close(y3[0], inp.linear64(), torch.bfloat16, what="multi_lora_linear, 3-D x, fp32 bias")


def test_deterministic():
    inp = make_multi_inputs(1024, 1024, 2048, 16, 64, torch.bfloat16, "cuda", dist="zipf", ranks="mixed")
    index = inp.index()
    from lora_kernels.cuda.multi_lora import multi_lora_expand_, multi_lora_linear, multi_lora_shrink
    runs = []
    for _ in range(3):
        t = multi_lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks)
        y = inp.x.new_ones(1024, 1024)
        multi_lora_expand_(y, t, inp.lora_b, index, inp.ranks)
        y_lin = multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias, inp.ranks)
        runs.append((t, y, y_lin))
    for run in runs[1:]:
        assert all(torch.equal(_bits(a), _bits(b)) for a, b in zip(run, runs[0]))


def test_cuda_graph_capture_then_replay_with_new_mapping():
    """Index build, cuda shrink and cuda expand captured in one graph; replays with other mappings
    of the same M (copied into the static id tensor) give the new mapping's results."""
    M, N, K, L, r_max = 96, 512, 256, 16, 32
    inp = make_multi_inputs(M, N, K, L, r_max, torch.bfloat16, "cuda", dist="decode", ranks="mixed",
                            poison_padding=False)
    static_ids = inp.token_adapter.clone()
    static_y = torch.empty(M, N, dtype=torch.bfloat16, device="cuda")
    y_init = rand(M, N, dtype=torch.bfloat16, device="cuda")

    def step():
        index = AdapterIndex.from_token_adapters(static_ids, L)
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend="cuda")
        static_y.copy_(y_init)
        lora_kernels.lora_expand_(static_y, t, inp.lora_b, index, inp.ranks, backend="cuda")
        y_lin = lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales,
                                               inp.bias, inp.ranks, backend="cuda")
        return t, y_lin

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # loads the extension outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_t, static_lin = step()
    for seed, dist in enumerate(["prefill", "zipf", "none10", "one", "decode"]):
        static_ids.copy_(token_adapters(dist, M, L, seed=100 + seed).cuda())
        poison_(static_t)
        poison_(static_y)
        poison_(static_lin)
        g.replay()
        torch.cuda.synchronize()
        inp.token_adapter = static_ids.clone()
        assert_close(static_t, inp.t64(), torch.float32, what=f"graph replay {dist}: t")
        expected = reference.lora_expand_(y_init.double(), static_t.double(), inp.lora_b.double(), inp.token_adapter,
                                          inp.ranks)
        assert_close(static_y, expected, torch.bfloat16, what=f"graph replay {dist}: expand")
        assert_close(static_lin, inp.linear64(), torch.bfloat16, what=f"graph replay {dist}: linear")


def test_no_host_synchronisation():
    inp = make_multi_inputs(96, 512, 256, 16, 32, torch.float16, "cuda", dist="decode", ranks="mixed")
    y = rand(96, 512, dtype=torch.float16, device="cuda")

    def step():
        index = AdapterIndex.from_token_adapters(inp.token_adapter, 16)
        t = lora_kernels.lora_shrink(inp.x, inp.lora_a, index, inp.scales, inp.ranks, backend="cuda")
        lora_kernels.lora_expand_(y, t, inp.lora_b, index, inp.ranks, backend="cuda")
        lora_kernels.multi_lora_linear(inp.x, inp.weight, inp.lora_a, inp.lora_b, index, inp.scales, inp.bias,
                                       inp.ranks, backend="cuda")

    assert_no_host_sync(step)


def test_multi_lora_linear_module_on_cuda_backend():
    from lora_kernels import MultiLoRALinear
    base = torch.nn.Linear(256, 384, device="cuda", dtype=torch.bfloat16)
    layer = MultiLoRALinear(base, max_adapters=6, max_rank=16, backend="cuda").eval()
    for slot, r in ((0, 16), (2, 4), (5, 9)):
        layer.load_adapter(slot, rand(r, 256, device="cuda", scale=0.06), rand(384, r, device="cuda"), 2.0)
    x = rand(2, 25, 256, dtype=torch.bfloat16, device="cuda")
    ids = token_adapters("none10", 50, 6, seed=4).cuda()
    with torch.no_grad():
        y = layer(x, AdapterIndex.from_token_adapters(ids, 6))
    expected = reference.multi_lora_linear(x.reshape(50, 256).double(), base.weight.double(),
                                           layer.lora_a_stack.double(), layer.lora_b_stack.double(), ids,
                                           layer.scales.double(), base.bias.double(), layer.ranks)
    assert y.shape == (2, 25, 384)
    assert_close(y.reshape(50, 384), expected, torch.bfloat16)
