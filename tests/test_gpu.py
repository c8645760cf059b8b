"""GPU lane (`pytest -m gpu`): the Triton kernels on the card, in every dtype."""
import pytest
import torch

import lora_kernels
from cases import assert_lora_linear_and_grads_match_float64, make_lora_inputs
from tolerances import assert_close, poison_

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = [  # (M, N, K, r): the suite's layer shapes at a few token counts, plus odd ones
    (1, 4096, 4096, 16), (16, 1024, 4096, 16), (128, 14336, 4096, 64), (1024, 4096, 14336, 16),
    (4096, 4096, 4096, 16), (333, 1000, 1234, 7), (2, 77, 65, 1), (257, 4096, 4096, 128),
]


def _fwd(inp, save_t=True):
    from lora_kernels.triton.lora_linear import lora_linear_fwd
    M, N, r = inp.x.shape[0], inp.weight.shape[0], inp.lora_a.shape[0]
    out = poison_(torch.empty(M, N, dtype=inp.x.dtype, device="cuda"))
    t_out = poison_(torch.empty(M, r, dtype=torch.float32, device="cuda"))
    return lora_linear_fwd(*inp.args(), save_t=save_t, out=out, t_out=t_out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_triton_forward_on_gpu(dtype, M, N, K, r):
    inp = make_lora_inputs(M, N, K, r, dtype, device="cuda")
    y, t = _fwd(inp)
    assert_close(y, inp.reference64(), dtype, torch_out=inp.torch_expression())
    assert_close(t, inp.x.double() @ inp.lora_a.double().t(), torch.float32 if dtype == torch.float32 else dtype, what="t")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_over_16bit_base(dtype):
    inp = make_lora_inputs(300, 512, 768, 16, dtype, device="cuda", adapter_dtype=torch.float32)
    y, _ = _fwd(inp)
    assert_close(y, inp.reference64(), dtype, torch_out=inp.torch_expression())


@pytest.mark.parametrize("dtype", DTYPES)
def test_public_op_auto_uses_triton_and_gradients(dtype):
    inp = make_lora_inputs(None, 256, 192, 8, dtype, device="cuda", lead=(3, 50), x_layout="strided")
    from lora_kernels.ops.lora_linear import choose_backend
    assert choose_backend(inp.x, inp.lora_a) == "triton"
    assert_lora_linear_and_grads_match_float64(inp, dtype, backend="auto")


def test_cuda_graph_capture_and_replay():
    inp = make_lora_inputs(64, 512, 256, 16, torch.bfloat16, device="cuda")
    static_x = inp.x.clone()
    layer = lora_kernels.FusedLoRALinear(256, 512, r=16, dtype=torch.bfloat16, device="cuda").eval()
    with torch.no_grad():
        layer.weight.copy_(inp.weight)
        layer.bias.copy_(inp.bias)
        layer.lora_A.copy_(inp.lora_a)
        layer.lora_B.copy_(inp.lora_b)
        layer.scaling = inp.scale
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            layer(static_x)  # warm-up compiles outside the capture
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            static_y = layer(static_x)
        for _ in range(3):
            new_x = torch.randn_like(static_x)
            static_x.copy_(new_x)
            poison_(static_y)
            g.replay()
            torch.cuda.synchronize()
            inp.x = new_x
            assert_close(static_y, inp.reference64(), torch.bfloat16)
