"""GPU lane (`pytest -m gpu`): the CUDA C++ fused forward on the card, against the float64 reference.

The extension must be there (bench/device_check.sh builds it with `pip install -e .`); if it is
not, these tests fail with the reason instead of skipping, since this lane exists to run them.
"""
import pytest
import torch

import lora_kernels
from cases import assert_lora_linear_and_grads_match_float64, make_lora_inputs
from cases import assert_lora_linear_fwd_matches_float64 as _check
from cases import cuda_lora_linear_fwd as _fwd
from tolerances import assert_close, poison_, rand

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16]
SHAPES = [  # (M, N, K, r): the suite's layer shapes at a few token counts, plus odd ones
    (1, 4096, 4096, 16), (16, 1024, 4096, 16), (128, 14336, 4096, 64), (1024, 4096, 14336, 16),
    (4096, 4096, 4096, 16), (333, 1000, 1234, 7), (2, 77, 65, 1), (257, 4096, 4096, 128),
    (31, 4095, 1001, 33), (1, 1, 1, 1), (40, 24, 8, 2),
]


@pytest.fixture(scope="module", autouse=True)
def extension():
    from lora_kernels.cuda import loader as cuda
    reason = cuda.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the CUDA extension is not usable on this GPU machine: {reason}")
    cuda.load()
    return cuda




@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_cuda_forward(dtype, M, N, K, r):
    inp = make_lora_inputs(M, N, K, r, dtype, device="cuda")
    y, t = _fwd(inp)
    _check(inp, y, t)


@pytest.mark.parametrize("tile_kind", [1, 2])
@pytest.mark.parametrize("M,N,K,r,tiles", [(40, 700, 264, 16, 3), (150, 520, 100, 5, 2), (9, 300, 136, 64, 4)])
def test_both_tiles_and_multi_tile_ctas(tile_kind, M, N, K, r, tiles):
    inp = make_lora_inputs(M, N, K, r, torch.bfloat16, device="cuda")
    y, t = _fwd(inp, tile_kind=tile_kind, tiles_per_cta=tiles)
    _check(inp, y, t)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,r", [(3, 16), (300, 64), (64, 9)])
def test_fp32_adapters_and_bias(dtype, M, r):
    inp = make_lora_inputs(M, 512, 768, r, dtype, device="cuda", adapter_dtype=torch.float32)
    inp.bias = inp.bias.float()
    y, t = _fwd(inp)
    _check(inp, y, t)


@pytest.mark.parametrize("layout", ["x_strided", "x_transposed", "w_transposed", "x_rows_padded",
                                    "b_transposed", "x_misaligned"])
def test_layouts(layout):
    dtype = torch.float16
    inp = make_lora_inputs(70, 200, 136, 8, dtype, device="cuda",
                           x_layout={"x_strided": "strided", "x_transposed": "transposed"}.get(layout, "contiguous"),
                           weight_layout="transposed" if layout == "w_transposed" else "contiguous")
    if layout == "x_rows_padded":
        inp.x = rand(70, 144, dtype=dtype, device="cuda")[:, :136]
    if layout == "b_transposed":
        inp.lora_b = inp.lora_b.t().contiguous().t()
    if layout == "x_misaligned":  # starts 2 bytes into an allocation: element loads, no cp.async
        inp.x = rand(70 * 136 + 1, dtype=dtype, device="cuda")[1:].view(70, 136)
    y, t = _fwd(inp)
    _check(inp, y, t)


def test_without_t_and_without_bias():
    inp = make_lora_inputs(100, 300, 256, 16, torch.bfloat16, device="cuda", bias=False)
    y, t = _fwd(inp, save_t=False)
    assert t.shape == (0, 16)
    _check(inp, y)


def test_empty_shapes():
    from lora_kernels.cuda.lora_linear import lora_linear_fwd
    inp = make_lora_inputs(0, 64, 32, 4, torch.bfloat16, device="cuda")
    y, t = lora_linear_fwd(*inp.args(), save_t=True)
    assert y.shape == (0, 64) and t.shape == (0, 4)
    inp = make_lora_inputs(5, 1, 32, 4, torch.bfloat16, device="cuda")
    inp.weight, inp.lora_b, inp.bias = inp.weight[:0], inp.lora_b[:0], inp.bias[:0]
    y, t = lora_linear_fwd(*inp.args(), save_t=True)
    assert y.shape == (5, 0)
    assert_close(t, inp.x.double() @ inp.lora_a.double().t(), torch.float32, what="t")


def test_public_op_with_gradients_and_opcheck():
    dtype = torch.bfloat16
    inp = make_lora_inputs(None, 256, 192, 8, dtype, device="cuda", lead=(3, 50), x_layout="strided")
    assert_lora_linear_and_grads_match_float64(inp, dtype, backend="cuda")
    for save_t in (False, True):
        args = (inp.x.reshape(-1, 192), inp.weight, inp.lora_a.requires_grad_(save_t),
                inp.lora_b.requires_grad_(save_t), inp.scale, inp.bias, "cuda", save_t)
        torch.library.opcheck(torch.ops.lora_kernels.lora_linear_fwd.default, args)


def test_backend_choice(monkeypatch):
    from lora_kernels.ops.lora_linear import choose_backend
    x = torch.empty(4, 8, device="cuda", dtype=torch.bfloat16)
    assert choose_backend(x, x[:2], "cuda") == "cuda"
    monkeypatch.setenv("LORA_KERNELS_BACKEND", "cuda")
    assert choose_backend(x, x[:2], "auto") == "cuda"
    with pytest.raises(lora_kernels.BackendUnavailable, match="cuda: dtype float32 is not supported"):
        choose_backend(x.float(), x[:2].float(), "cuda")
    with pytest.raises(lora_kernels.BackendUnavailable, match="limit of 64 for float32 adapters"):
        choose_backend(x, torch.empty(65, 8, device="cuda"), "cuda")


def test_cuda_graph_capture_and_replay():
    inp = make_lora_inputs(64, 512, 256, 16, torch.bfloat16, device="cuda", adapter_dtype=torch.float32)
    static_x = inp.x.clone()
    run = lambda: lora_kernels.lora_linear(static_x, inp.weight, inp.lora_a, inp.lora_b, inp.scale, inp.bias,  # noqa: E731
                                           backend="cuda")
    with torch.no_grad():
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            run()  # warm-up (library load, shared-memory opt-in) outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = run()
        for _ in range(3):
            new_x = torch.randn_like(static_x)
            static_x.copy_(new_x)
            poison_(static_y)
            g.replay()
            torch.cuda.synchronize()
            inp.x = new_x
            _check(inp, static_y)
