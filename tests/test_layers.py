"""FusedLoRALinear: PEFT's initialisation and scaling, parity with a real PEFT layer, merge."""
import math

import pytest
import torch
import torch.nn as nn

from lora_kernels import FusedLoRALinear
from tolerances import assert_close, rand

peft = pytest.importorskip("peft")


def test_init_matches_peft_conventions():
    layer = FusedLoRALinear(64, 32, r=8, lora_alpha=16)
    assert layer.scaling == 2.0
    assert torch.equal(layer.lora_B, torch.zeros(32, 8))
    bound = 1.0 / math.sqrt(64)  # kaiming_uniform(a=sqrt(5)) on [r, in] -> U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > 0.3 * bound
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    assert FusedLoRALinear(64, 32, r=16, lora_alpha=8, use_rslora=True).scaling == 8 / 4
    assert FusedLoRALinear(8, 4, r=2, bias=False).bias is None


def test_from_linear_shares_and_freezes_base():
    linear = nn.Linear(20, 10)
    layer = FusedLoRALinear.from_linear(linear, r=4, lora_alpha=8)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert not linear.weight.requires_grad
    x = rand(3, 20)
    assert_close(layer(x), linear(x).double(), torch.float32)  # B = 0: the identity adapter


def _peft_pair(in_f, out_f, r, alpha, use_rslora, dtype, bias=True):
    """A PEFT LoRA layer (from get_peft_model) and a FusedLoRALinear with the same weights."""
    from peft import LoraConfig, get_peft_model

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0,
                     use_rslora=use_rslora)
    model = get_peft_model(net, cfg, autocast_adapter_dtype=False)
    peft_layer = model.base_model.model.proj
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()  # never test with B = 0
    fused = FusedLoRALinear(in_f, out_f, r, lora_alpha=alpha, use_rslora=use_rslora, bias=bias, dtype=dtype)
    with torch.no_grad():
        fused.weight.copy_(peft_layer.base_layer.weight)
        if bias:
            fused.bias.copy_(peft_layer.base_layer.bias)
        fused.lora_A.copy_(peft_layer.lora_A["default"].weight)
        fused.lora_B.copy_(peft_layer.lora_B["default"].weight)
    assert fused.scaling == peft_layer.scaling["default"]
    return peft_layer, fused


@pytest.mark.parametrize("use_rslora", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_parity_with_peft_forward_and_gradients(backend, use_rslora, request):
    if backend == "triton":
        request.getfixturevalue("interpreter_device")
    peft_layer, fused = _peft_pair(24, 18, 4, 16, use_rslora, torch.float32)
    fused.backend = backend
    x = rand(2, 5, 24)
    xp, xf = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    yp, yf = peft_layer(xp), fused(xf)
    assert_close(yf, yp.double(), torch.float32)
    dy = rand(2, 5, 18)
    yp.backward(dy)
    yf.backward(dy)
    assert_close(xf.grad, xp.grad.double(), torch.float32, what="grad x")
    assert_close(fused.lora_A.grad, peft_layer.lora_A["default"].weight.grad.double(), torch.float32, what="grad A")
    assert_close(fused.lora_B.grad, peft_layer.lora_B["default"].weight.grad.double(), torch.float32, what="grad B")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_then_forward_equals_unmerged(dtype):
    layer = FusedLoRALinear(48, 40, r=8, lora_alpha=16, dtype=dtype)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = rand(6, 48, dtype=dtype)
    w0 = layer.weight.detach().clone()
    unmerged = layer(x)
    layer.merge()
    assert layer.merged
    merged = layer(x)
    assert_close(merged, unmerged.double(), dtype, what="merged vs unmerged")
    layer.unmerge()
    assert not layer.merged
    assert_close(layer.weight, w0.double(), dtype, what="weight after unmerge")


def test_merge_twice_warns_and_does_nothing():
    layer = FusedLoRALinear(8, 8, r=2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.merge()
    w = layer.weight.clone()
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()
    assert torch.equal(layer.weight, w)


def test_dropout_module_train_vs_eval():
    layer = FusedLoRALinear(32, 16, r=4, lora_dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = rand(8, 32)
    layer.eval()
    a, b = layer(x), layer(x)
    assert torch.equal(a, b)
    layer.train()
    assert not torch.allclose(layer(x), a)
