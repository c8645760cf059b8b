"""inject / save_adapter / load_adapter: LoRA without PEFT, in PEFT's on-disk format, both ways."""
import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft")
pytest.importorskip("safetensors")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_kernels  # noqa: E402
from lora_kernels import FusedLoRALinear  # noqa: E402
from lora_kernels.adapters import lora_layers  # noqa: E402
from tolerances import assert_close  # noqa: E402

VOCAB = 64


def tiny_llama(dtype=torch.float32):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).to(dtype)


def randomize_(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_A" in n:
                p.normal_(0.0, 0.3)
    return model


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def ids():
    return torch.randint(0, VOCAB, (2, 9))


def fused_count(model):
    return sum(isinstance(m, FusedLoRALinear) for m in model.modules())


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------

def test_inject_replaces_matching_linears_sharing_their_weights():
    model = tiny_llama()
    q0 = model.model.layers[0].self_attn.q_proj
    x = ids()
    before = logits(model, x)
    lora_kernels.inject(model, ["q_proj", "mlp.down_proj"], r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=True)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, FusedLoRALinear) and layer.weight is q0.weight
    assert (layer.r, layer.scaling, layer.lora_dropout) == (4, 16 / 2, 0.1)
    assert fused_count(model) == 4 and isinstance(model.model.layers[0].mlp.up_proj, nn.Linear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable) and len(trainable) == 8
    model.eval()
    assert torch.equal(logits(model, x), before)  # B = 0: the identity adapter


def test_inject_regex_and_16bit_base_gets_fp32_adapters():
    model = tiny_llama(torch.bfloat16)
    lora_kernels.inject(model, r"model\.layers\.0\.self_attn\.(q|v)_proj", r=2)
    assert set(lora_layers(model)) == {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"}
    layer = model.model.layers[0].self_attn.v_proj
    assert layer.lora_A.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16


def test_inject_errors_change_nothing():
    model = tiny_llama()
    with pytest.raises(ValueError, match="inject: target_modules .* matched no module"):
        lora_kernels.inject(model, ["nope"], r=4)
    with pytest.raises(ValueError, match="'model.embed_tokens' matches target_modules but is an instance of Embedding"):
        lora_kernels.inject(model, ["q_proj", "embed_tokens"], r=4)
    assert fused_count(model) == 0  # checked before any change
    lora_kernels.inject(model, ["q_proj"], r=4)
    with pytest.raises(ValueError, match="already holds a LoRA adapter"):
        lora_kernels.inject(model, ["q_proj"], r=4)
    with pytest.raises(ValueError, match="r must be a positive int"):
        lora_kernels.inject(tiny_llama(), ["q_proj"], r=0)


# ---------------------------------------------------------------------------------------------
# ours -> PEFT
# ---------------------------------------------------------------------------------------------

def test_saved_adapter_loads_into_peft(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    lora_kernels.inject(base, ["q_proj", "v_proj"], r=4, lora_alpha=8, use_rslora=True)
    lora_kernels.inject(base, ["down_proj"], r=6, lora_alpha=3, use_rslora=True)  # rank/alpha pattern
    randomize_(base).eval()
    lora_kernels.save_adapter(base, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["down_proj", "q_proj", "v_proj"] and config["use_rslora"] is True
    assert config["rank_pattern"] == {f"model.layers.{i}.mlp.down_proj": 6 for i in range(2)}
    peft_model = PeftModel.from_pretrained(fresh, tmp_path).eval()
    x = ids()
    assert_close(logits(peft_model, x), logits(base, x).double(), torch.float32, what="PEFT with our adapter")
    peft_layer = peft_model.base_model.model.model.layers[1].mlp.down_proj
    assert peft_layer.r["default"] == 6 and peft_layer.scaling["default"] == 3 / 6 ** 0.5


def test_partial_injection_is_written_with_full_paths(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    lora_kernels.inject(base, r"model\.layers\.1\.self_attn\.o_proj", r=3)
    randomize_(base)
    lora_kernels.save_adapter(base, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["model.layers.1.self_attn.o_proj"]  # "o_proj" would take layer 0 too
    peft_model = PeftModel.from_pretrained(fresh, tmp_path)
    assert [n for n, _ in peft_model.named_modules() if n.endswith("o_proj")] == [
        "base_model.model.model.layers.0.self_attn.o_proj", "base_model.model.model.layers.1.self_attn.o_proj"]
    assert not hasattr(peft_model.base_model.model.model.layers[0].self_attn.o_proj, "lora_A")
    x = ids()
    assert_close(logits(peft_model, x), logits(base, x).double(), torch.float32)


# ---------------------------------------------------------------------------------------------
# PEFT -> ours
# ---------------------------------------------------------------------------------------------

def peft_saved(tmp_path, **cfg):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = randomize_(get_peft_model(base, LoraConfig(**cfg))).eval()
    model.save_pretrained(tmp_path)
    return model, fresh


def test_peft_adapter_loads_without_peft(tmp_path):
    model, fresh = peft_saved(tmp_path, r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.05,
                              target_modules=["q_proj", "k_proj", "gate_proj", "down_proj"],
                              rank_pattern={"k_proj": 2}, alpha_pattern={"layers.1.mlp.down_proj": 5})
    lora_kernels.load_adapter(fresh, tmp_path)
    fresh.eval()
    assert fused_count(fresh) == 8
    layer = fresh.model.layers[1].mlp.down_proj
    assert (layer.r, layer.lora_alpha, layer.scaling, layer.lora_dropout) == (4, 5, 5 / 2, 0.05)
    assert fresh.model.layers[0].self_attn.k_proj.r == 2
    x = ids()
    assert_close(logits(fresh, x), logits(model, x).double(), torch.float32, what="our model, PEFT's adapter")


def test_load_into_injected_model_and_round_trip(tmp_path):
    model, fresh = peft_saved(tmp_path, r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    lora_kernels.inject(fresh, ["v_proj", "up_proj"], r=4, lora_alpha=1)
    layer = fresh.model.layers[0].self_attn.v_proj
    lora_kernels.load_adapter(fresh, tmp_path)
    assert fresh.model.layers[0].self_attn.v_proj is layer and layer.scaling == 2.0  # the file's alpha
    x = ids()
    assert_close(logits(fresh.eval(), x), logits(model, x).double(), torch.float32)
    # and back: our save of PEFT's adapter has PEFT's tensors under PEFT's keys
    from safetensors.torch import load_file
    lora_kernels.save_adapter(fresh, tmp_path / "again")
    theirs, ours = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in theirs)


def test_unsupported_adapters_are_refused_and_change_nothing(tmp_path):
    peft_saved(tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    model = tiny_llama()
    with pytest.raises(ValueError, match="load_adapter: .*use_dora=True is not supported without PEFT"):
        lora_kernels.load_adapter(model, tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        lora_kernels.load_adapter(model, tmp_path / "missing")
    peft_saved(tmp_path / "r4", r=4, target_modules=["q_proj", "v_proj"])
    lora_kernels.inject(model, ["v_proj"], r=2)
    with pytest.raises(ValueError, match="FusedLoRALinear of rank 2, the adapter's is 4"):
        lora_kernels.load_adapter(model, tmp_path / "r4")
    assert fused_count(model) == 2 and not isinstance(model.model.layers[0].self_attn.q_proj, FusedLoRALinear)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match="do not fit the layer"):
        lora_kernels.load_adapter(other, tmp_path / "r4")
    assert fused_count(other) == 0


def test_inject_all_linear_selects_what_peft_selects():
    """PEFT's "all-linear": every linear layer except the output head (lm_head)."""
    ours = lora_kernels.inject(tiny_llama(), "all-linear", r=2)
    theirs = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules="all-linear"))
    peft_names = {n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                  if hasattr(m, "lora_A") and isinstance(m.lora_A, nn.ModuleDict)}
    assert set(lora_layers(ours)) == peft_names
    assert "lm_head" not in peft_names and len(peft_names) == 2 * 7
