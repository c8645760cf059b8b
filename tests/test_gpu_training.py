"""GPU lane (`pytest -m gpu`): training on the card -- the fused Triton backward in bf16/fp16/fp32,
dropout bits, determinism, memory kept for the backward, autocast and torch.compile (inductor)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import lora_kernels
from lora_kernels import FusedLoRALinear, reference
from lora_kernels.ops.lora_linear import draw_dropout_seed, dropout_mask
from cases import lora_linear_with_grads, make_lora_inputs, reference_with_grads
from tolerances import assert_close, rand

pytestmark = pytest.mark.gpu

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
# (M, N, K, r): decode, odd sizes, a training-size layer, rank 128. Few on purpose: every shape
# regime x dtype x dropout compiles its own kernels; the training benchmark checks the suite's
# layer shapes against float64 before timing them.
SHAPES = [(1, 4096, 4096, 16), (333, 1000, 1234, 7), (2, 77, 65, 1), (4096, 4096, 4096, 64),
          (257, 1024, 4096, 128)]
GRAD_NAMES = ("x", "lora_a", "lora_b", "bias")


def _mask_for(torch_seed, shape, p):
    torch.manual_seed(torch_seed)
    return dropout_mask(draw_dropout_seed("cuda"), shape, p, backend="triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M,N,K,r", SHAPES)
def test_triton_training_step_matches_float64(dtype, p, M, N, K, r):
    inp = make_lora_inputs(M, N, K, r, dtype, device="cuda")
    dy = rand(M, N, dtype=dtype, device="cuda")
    y, grads = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=p, training=True, torch_seed=5)
    mask = _mask_for(5, inp.x.shape, p) if p else None
    y_ref, ref = reference_with_grads(inp, dy, dropout_p=p, dropout_mask=mask)
    assert_close(y, y_ref, dtype)
    for name in GRAD_NAMES:
        assert grads[name].dtype == dtype
        assert_close(grads[name], ref[name], dtype, what=f"grad {name}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_over_16bit_base(dtype):
    inp = make_lora_inputs(None, 1024, 768, 16, dtype, device="cuda", adapter_dtype=torch.float32, lead=(3, 100))
    dy = rand(3, 100, 1024, dtype=dtype, device="cuda")
    y, grads = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.05, training=True, torch_seed=2)
    y_ref, ref = reference_with_grads(inp, dy, dropout_p=0.05, dropout_mask=_mask_for(2, inp.x.shape, 0.05))
    assert_close(y, y_ref, dtype, torch_out=inp.torch_expression())
    for name in GRAD_NAMES:
        assert grads[name].dtype == getattr(inp, name).dtype
        assert_close(grads[name], ref[name], dtype, what=f"grad {name}")


@pytest.mark.parametrize("rows,cols", [(1, 3), (1000, 4097), (4096, 4096)])
def test_mask_bits_on_the_gpu_equal_the_reference(rows, cols):
    seed = draw_dropout_seed("cuda")
    got = dropout_mask(seed, (rows, cols), 0.1, backend="triton")
    assert torch.equal(got, reference.dropout_keep_mask(int(seed.item()), rows, cols, 0.1, "cuda"))
    assert torch.equal(got, dropout_mask(seed, (rows, cols), 0.1, backend="torch"))


def test_backward_is_deterministic_with_split_rows():
    inp = make_lora_inputs(16384, 4096, 4096, 16, torch.bfloat16, device="cuda")
    dy = rand(16384, 4096, dtype=torch.bfloat16, device="cuda")
    first = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.1, training=True, torch_seed=1)[1]
    second = lora_linear_with_grads(inp, dy, backend="triton", dropout_p=0.1, training=True, torch_seed=1)[1]
    for name in GRAD_NAMES:
        assert torch.equal(first[name], second[name]), name


def _kept_bytes(fn) -> int:
    """Bytes still allocated after fn() returns, beyond its output: what autograd keeps."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    y = fn()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    return kept - ((y.numel() * y.element_size() + 511) // 512) * 512


@pytest.mark.parametrize("p", [0.0, 0.1])
@pytest.mark.parametrize("M,r", [(4096, 16), (1024, 64)])
def test_memory_kept_for_backward_is_base_plus_t(p, M, r):
    """<= the base layer's (x requires grad, W frozen) + M*r*4 bytes (+ one 512-byte allocation
    for the dropout seed)."""
    K = N = 4096
    layer = FusedLoRALinear(K, N, r, lora_dropout=p, dtype=torch.bfloat16, device="cuda", adapter_dtype=torch.float32)
    x = rand(M, K, dtype=torch.bfloat16, device="cuda").requires_grad_(True)
    base = _kept_bytes(lambda: F.linear(x, layer.weight, layer.bias))
    ours = _kept_bytes(lambda: layer(x))
    assert ours <= base + M * r * 4 + (512 if p else 0), (ours, base)


def test_autocast_bf16_fp32_layer():
    layer = FusedLoRALinear(1024, 768, 16, lora_dropout=0.1, device="cuda")  # fp32 weights, PEFT-style
    nn.init.normal_(layer.lora_B, std=0.05)
    x = rand(4, 300, 1024, device="cuda").requires_grad_(True)
    torch.manual_seed(3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    dy = rand(4, 300, 768, dtype=torch.bfloat16, device="cuda")
    y.backward(dy)
    assert x.grad.dtype == layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    ref_inp = make_lora_inputs(None, 768, 1024, 16, device="cuda", lead=(4, 300))
    ref_inp.x, ref_inp.weight = x.detach().bfloat16(), layer.weight.detach().bfloat16()
    ref_inp.lora_a, ref_inp.lora_b, ref_inp.bias = layer.lora_A.detach(), layer.lora_B.detach(), layer.bias.detach()
    ref_inp.scale = layer.scaling
    y_ref, ref = reference_with_grads(ref_inp, dy, dropout_p=0.1, dropout_mask=_mask_for(3, x.shape, 0.1))
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(x.grad, ref["x"], torch.bfloat16, what="grad x")
    assert_close(layer.lora_A.grad, ref["lora_a"], torch.bfloat16, what="grad A")
    assert_close(layer.lora_B.grad, ref["lora_b"], torch.bfloat16, what="grad B")


def test_compile_inductor_fullgraph_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(FusedLoRALinear(512, 1024, 16, dtype=torch.bfloat16, device="cuda"), nn.GELU(),
                          FusedLoRALinear(1024, 512, 16, dtype=torch.bfloat16, device="cuda")).eval()
    for m in model:
        if isinstance(m, FusedLoRALinear):
            nn.init.normal_(m.lora_B, std=0.05)
    x = rand(8, 64, 512, dtype=torch.bfloat16, device="cuda")

    def step(fn):
        for prm in model.parameters():
            prm.grad = None
        xi = x.clone().requires_grad_(True)
        y = fn(xi)
        y.float().square().mean().backward()
        return [y, xi.grad] + [prm.grad for prm in model.parameters() if prm.requires_grad]
    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for a, b in zip(eager, compiled):
        assert_close(b, a.double(), torch.bfloat16)


def test_checkpointed_training_step_matches():
    from torch.utils.checkpoint import checkpoint
    layer = FusedLoRALinear(768, 1024, 16, lora_dropout=0.1, dtype=torch.bfloat16, device="cuda")
    nn.init.normal_(layer.lora_B, std=0.05)
    x = rand(512, 768, dtype=torch.bfloat16, device="cuda")

    def grads(ckpt):
        layer.lora_A.grad = layer.lora_B.grad = None
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(4)
        y = checkpoint(layer, xi, use_reentrant=False) if ckpt else layer(xi)
        y.float().square().sum().backward()
        return xi.grad, layer.lora_A.grad, layer.lora_B.grad
    for a, b in zip(grads(False), grads(True)):
        assert torch.equal(a, b)


def test_cuda_forward_trains_with_the_triton_backward():
    from lora_kernels.backends import unavailable_reason
    reason = unavailable_reason("cuda", torch.device("cuda"))
    if reason is not None:
        pytest.skip(reason)
    inp = make_lora_inputs(None, 1024, 768, 16, torch.bfloat16, device="cuda", lead=(2, 150))
    dy = rand(2, 150, 1024, dtype=torch.bfloat16, device="cuda")
    y, grads = lora_linear_with_grads(inp, dy, backend="cuda")
    y_ref, ref = reference_with_grads(inp, dy)
    assert_close(y, y_ref, torch.bfloat16)
    for name in GRAD_NAMES:
        assert_close(grads[name], ref[name], torch.bfloat16, what=f"grad {name}")
    with pytest.raises(lora_kernels.BackendUnavailable, match="no dropout"):
        lora_kernels.lora_linear(*inp.args(), dropout_p=0.1, training=True, backend="cuda")
