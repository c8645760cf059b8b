"""lora_kernels.peft.fuse / unfuse: PEFT's semantics in every state, on tiny transformers models.

Each test builds a real PEFT model (random LoRA B, never zero), fuses a deep copy, and compares
both against a float64 copy of the unfused PEFT model (the oracle), forward and gradients.
"""
import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny configs only: nothing may touch the network

import pytest
import torch
import torch.nn as nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import lora_kernels.peft as lkpeft  # noqa: E402
from tolerances import REL_TOL, TORCH_ERROR_FACTOR, assert_close, rand, rel_error  # noqa: E402

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 64


def tiny_llama(bias=True):
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
                      attention_bias=bias, mlp_bias=bias)
    return LlamaForCausalLM(cfg)


def tiny_gpt2():
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
                     eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # deterministic
    return GPT2LMHeadModel(cfg)


def randomize_adapters_(model, adapter=None):
    """LoRA B (and lora_bias) random: a fresh adapter is the identity and would test nothing."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name and (adapter is None or f".{adapter}." in name):
                p.normal_(0.0, 0.2)
    return model


def make_peft(base=None, **cfg):
    cfg.setdefault("target_modules", LLAMA_TARGETS)
    model = get_peft_model(base if base is not None else tiny_llama(), LoraConfig(**cfg))
    return randomize_adapters_(model)


def fused_copy(model, backend="torch"):
    return lkpeft.fuse(copy.deepcopy(model), backend=backend)


def oracle(model):
    return copy.deepcopy(model).double()


def ids(batch=3, seq=7):
    return torch.randint(0, VOCAB, (batch, seq))


def logits(model, x, **kw):
    return model(input_ids=x, **kw).logits


def lora_grads(model, x, weight):
    model.zero_grad()
    (logits(model, x) * weight).sum().backward()
    return {n: p.grad for n, p in model.named_parameters() if "lora_" in n and p.grad is not None}


def check_parity(peft_model, fused, x, grads=True, **kw):
    """fused matches the float64 oracle within fp32 tolerance, and within 2x PEFT's own error."""
    ref = oracle(peft_model)
    out64 = logits(ref, x, **kw)
    assert_close(logits(fused, x, **kw), out64, torch.float32, torch_out=logits(peft_model, x, **kw))
    if grads:
        weight = rand(*out64.shape)
        got, want, theirs = lora_grads(fused, x, weight), lora_grads(ref, x, weight.double()), lora_grads(peft_model, x, weight)
        assert got.keys() == want.keys() and got
        for name in want:
            assert_grad_close(got[name], want[name], torch.float32, theirs[name], what=f"grad {name}")


def assert_grad_close(got, want, dtype, theirs, what):
    """A gradient deep in a model can be ill-conditioned (a small result of cancelling terms) so
    that PEFT's own error exceeds the dtype's tolerance: then ours must be within
    TORCH_ERROR_FACTOR of PEFT's error. NaN never passes."""
    assert got.shape == want.shape and torch.isfinite(got).all(), what
    err, peft_err = rel_error(got, want), rel_error(theirs, want)
    bound = max(REL_TOL[dtype], TORCH_ERROR_FACTOR * peft_err)
    assert err <= bound, f"{what}: relative error {err:.3e} > {bound:.3e} (PEFT's own: {peft_err:.3e})"


def count_calls(monkeypatch, name):
    calls = []
    original = getattr(lkpeft, name)
    monkeypatch.setattr(lkpeft, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


# ---------------------------------------------------------------------------------------------
# Unmerged forward and gradients
# ---------------------------------------------------------------------------------------------

CONFIGS = {
    "plain": dict(r=4, lora_alpha=8),
    "rank_alpha_patterns_rslora": dict(r=4, lora_alpha=8, use_rslora=True,
                                       rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 7},
                                       alpha_pattern={"v_proj": 3, "up_proj": 32}),
    "lora_bias": dict(r=3, lora_alpha=6, lora_bias=True),
    "dropout_in_eval": dict(r=4, lora_alpha=8, lora_dropout=0.3),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_unmerged_parity_forward_and_grads(name, monkeypatch):
    model = make_peft(**CONFIGS[name])
    if name == "lora_bias":
        randomize_bias_(model)
    if name == "dropout_in_eval":
        model.eval()  # dropout off: PEFT's output is deterministic (training dropout: tests below)
    fused = fused_copy(model)
    calls = count_calls(monkeypatch, "lora_linear")
    check_parity(model, fused, ids())
    assert calls, "the fused model never called lora_linear"


def randomize_bias_(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n and n.endswith(".bias"):
                p.normal_()


def test_per_layer_ranks_are_peft_s():
    model = make_peft(**CONFIGS["rank_alpha_patterns_rslora"])
    fused = fused_copy(model)
    layers = dict(lkpeft._lora_layers(fused))
    q = layers["base_model.model.model.layers.0.self_attn.q_proj"]
    down1 = layers["base_model.model.model.layers.1.mlp.down_proj"]
    assert q.r["default"] == 2 and down1.r["default"] == 7
    assert layers["base_model.model.model.layers.0.mlp.down_proj"].r["default"] == 4
    assert layers["base_model.model.model.layers.0.mlp.up_proj"].scaling["default"] == 32 / 2  # rsLoRA: alpha/sqrt(r)


def test_conv1d_fan_in_fan_out_parity():
    model = make_peft(tiny_gpt2(), r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"],
                      fan_in_fan_out=True)
    fused = fused_copy(model)
    assert len(lkpeft.fuse_report(fused).fused) == 8 and not lkpeft.fuse_report(fused).kept  # 4 per block
    check_parity(model, fused, ids())
    x = ids()
    unmerged = logits(fused, x)
    fused.merge_adapter()  # merge_ with fan_in_fan_out: the weight is [in, out]
    model.merge_adapter()
    assert_close(logits(fused, x), unmerged.double(), torch.float32, what="Conv1D merged vs unmerged")
    for (n, p), (_, q) in zip(fused.named_parameters(), model.named_parameters()):
        if "base_layer" in n:
            assert_close(p, q.double(), torch.float32, what=n)


def test_triton_backend_parity(interpreter_device):
    """The Triton kernels (interpreter here, the card in the GPU lane) under a fused PEFT model."""
    model = make_peft(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    check_parity(model, fused_copy(model, backend="triton"), ids(2, 5))


# ---------------------------------------------------------------------------------------------
# Merged, disabled, several adapters, mixed batches
# ---------------------------------------------------------------------------------------------

def base_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}


@pytest.mark.parametrize("safe_merge", [False, True])
def test_merge_unmerge_use_our_ops_and_match_peft(safe_merge, monkeypatch):
    model = make_peft(r=4, lora_alpha=8, lora_bias=True)
    randomize_bias_(model)
    fused = fused_copy(model)
    x = ids()
    before = base_weights(fused)
    unmerged = logits(fused, x)
    merges, unmerges = count_calls(monkeypatch, "merge_"), count_calls(monkeypatch, "unmerge_")

    fused.merge_adapter(safe_merge=safe_merge)
    model.merge_adapter(safe_merge=safe_merge)
    assert len(merges) == 14 and all(m.merged for _, m in lkpeft._lora_layers(fused))
    merged_weights, peft_weights = base_weights(fused), base_weights(model)
    for n in before:
        assert_close(merged_weights[n], peft_weights[n].double(), torch.float32, what=n)
    assert_close(logits(fused, x), unmerged.double(), torch.float32, what="merged vs unmerged")

    fused.unmerge_adapter()
    assert len(unmerges) == 14 and not any(m.merged for _, m in lkpeft._lora_layers(fused))
    for n, w in base_weights(fused).items():
        assert_close(w, before[n].double(), torch.float32, what=f"unmerged {n}")


def test_merge_and_unload_gives_peft_s_merged_model():
    model = make_peft(r=4, lora_alpha=8)
    x = ids()
    want = logits(model, x)
    plain = fused_copy(model).merge_and_unload()
    assert not any(isinstance(m, lkpeft.LoraLayer) for m in plain.modules())
    assert_close(logits(plain, x), want.double(), torch.float32)


def test_disabled_adapters_run_the_base_model():
    model = make_peft(r=4, lora_alpha=8)
    fused = fused_copy(model)
    x = ids()
    with model.disable_adapter():
        want = logits(model, x)
    with fused.disable_adapter():
        got = logits(fused, x)
    assert torch.equal(got, want)
    fused.merge_adapter()  # PEFT: a disabled layer unmerges before running the base
    with fused.disable_adapter():
        assert_close(logits(fused, x), want.double(), torch.float32, what="disabled after merge")
    assert not any(m.merged for _, m in lkpeft._lora_layers(fused))
    assert not torch.allclose(logits(fused, x), want)  # enabled again: the adapter is back


def two_adapters(**second):
    model = make_peft(r=4, lora_alpha=8)
    model.add_adapter("other", LoraConfig(target_modules=["q_proj", "v_proj", "up_proj"], **second))
    return randomize_adapters_(model, "other")


def test_several_active_adapters_parity():
    model = two_adapters(r=6, lora_alpha=3, use_rslora=True)
    model.base_model.set_adapter(["default", "other"])
    fused = fused_copy(model)
    check_parity(model, fused, ids())


def test_mixed_batch_adapter_names_parity():
    model = two_adapters(r=2, lora_alpha=4).eval()
    fused = fused_copy(model).eval()
    names = ["other", "__base__", "default", "other", "default"]
    x = ids(len(names), 6)
    check_parity(model, fused, x, grads=False, adapter_names=names)
    # each row is that adapter alone
    got = logits(fused, x, adapter_names=names)
    for i, name in enumerate(names):
        ctx = fused.disable_adapter() if name == "__base__" else _active(fused, name)
        with ctx:
            assert_close(got[i], logits(fused, x[i:i + 1])[0].double(), torch.float32, what=f"row {i} ({name})")


class _active:
    def __init__(self, model, name):
        self.model, self.name = model, name

    def __enter__(self):
        self.model.set_adapter(self.name)

    def __exit__(self, *exc):
        self.model.set_adapter("default")


# ---------------------------------------------------------------------------------------------
# 16-bit bases with fp32 adapters (PEFT's default), autocast, dropout: one layer, exact oracle
# ---------------------------------------------------------------------------------------------

class OneLayer(nn.Module):
    def __init__(self, k=40, n=24, bias=True, dtype=torch.float32):
        super().__init__()
        self.proj = nn.Linear(k, n, bias=bias, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


def one_layer_peft(dtype=torch.float32, **cfg):
    cfg.setdefault("r", 4)
    cfg.setdefault("lora_alpha", 8)
    with torch.no_grad():
        net = OneLayer(dtype=torch.float32)
        net.proj.weight.normal_(0.0, 40 ** -0.5)
        net.proj.bias.normal_()
    model = get_peft_model(net.to(dtype), LoraConfig(target_modules=["proj"], **cfg))  # fp32 adapters
    return randomize_adapters_(model)


def adapter_grads(model, x, dy):
    model.zero_grad()
    model(x).backward(dy)
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_adapters_over_16bit_base(dtype):
    model = one_layer_peft(dtype, lora_bias=True)
    randomize_bias_(model)
    layer = model.base_model.model.proj
    assert layer.lora_A["default"].weight.dtype == torch.float32 and layer.base_layer.weight.dtype == dtype
    fused, ref = fused_copy(model), oracle(model)
    x, dy = rand(3, 5, 40, dtype=dtype), rand(3, 5, 24, dtype=dtype)
    y = fused(x)
    assert y.dtype == dtype
    assert_close(y, ref(x.double()), dtype, torch_out=model(x))
    got, want = adapter_grads(fused, x, dy), adapter_grads(ref, x.double(), dy.double())
    theirs = adapter_grads(model, x, dy)
    assert got.keys() == want.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for n in want:
        assert got[n].dtype == torch.float32
        assert_close(got[n], want[n], dtype, torch_out=theirs[n], what=f"grad {n}")


def test_autocast_runs_the_base_in_the_autocast_dtype():
    model = one_layer_peft(torch.float32)
    fused, ref = fused_copy(model), oracle(model)
    x = rand(4, 40)
    # the oracle of what autocast computes: x and the base weight and bias rounded to bf16, then exact
    with torch.no_grad():
        for p in ref.base_model.model.proj.base_layer.parameters():
            p.copy_(p.to(torch.bfloat16).double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_peft = fused(x), model(x)
    assert y.dtype == y_peft.dtype == torch.bfloat16
    assert_close(y, ref(x.to(torch.bfloat16).double()), torch.bfloat16, torch_out=y_peft)


def test_torch_compile_fullgraph_through_a_fused_peft_layer():
    model = one_layer_peft(torch.float32, lora_bias=True)
    randomize_bias_(model)
    fused = fused_copy(model)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x, dy = rand(6, 40), rand(6, 24)
    y = compiled(x)
    assert_close(y, oracle(model)(x.double()), torch.float32, torch_out=model(x))
    y.backward(dy)
    want = adapter_grads(oracle(model), x.double(), dy.double())
    got = {n: p.grad for n, p in fused.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for n in want:
        assert_close(got[n], want[n], torch.float32, what=f"compiled grad {n}")


def identity_adapters_(layer, names, scales):
    """lora_A = lora_B = I, so that (y - base(x)) / x reveals each element's dropout mask."""
    with torch.no_grad():
        for name, s in zip(names, scales):
            layer.lora_A[name].weight.copy_(torch.eye(layer.lora_A[name].weight.shape[0]))
            layer.lora_B[name].weight.copy_(torch.eye(layer.lora_B[name].weight.shape[0]))
            layer.scaling[name] = s


def square_dropout_model(p, second=None):
    net = OneLayer(k=16, n=16)
    model = get_peft_model(net, LoraConfig(r=16, lora_alpha=16, lora_dropout=p, target_modules=["proj"]))
    if second is not None:
        model.add_adapter("other", LoraConfig(r=16, lora_alpha=16, lora_dropout=second, target_modules=["proj"]))
    return model.train()


def test_dropout_training_masks_the_lora_input_only():
    p, s = 0.25, 1.5
    fused = lkpeft.fuse(square_dropout_model(p), backend="torch")
    layer = fused.base_model.model.proj
    identity_adapters_(layer, ["default"], [s])
    x = rand(64, 16).requires_grad_(True)
    y = fused(x)
    base = layer.base_layer(x.detach())
    ratio = ((y - base) / (s * x / (1 - p))).detach()
    mask = ratio > 0.5
    assert torch.allclose(ratio, mask.float(), atol=1e-4), "lora term is not s * mask * x / (1 - p)"
    assert 0.6 < mask.float().mean() < 0.9  # keep probability 0.75 over 1024 draws
    # the backward uses the forward's mask: dA = s * B^T dy^T (mask*x/(1-p)) with B = I
    dy = rand(64, 16)
    y.backward(dy)
    x_drop = mask * x.detach() / (1 - p)
    assert torch.allclose(layer.lora_A["default"].weight.grad, s * dy.t() @ x_drop, atol=1e-4)
    assert torch.allclose(layer.lora_B["default"].weight.grad, s * dy.t() @ x_drop, atol=1e-4)
    assert torch.allclose(x.grad, dy @ layer.base_layer.weight + s * dy * mask / (1 - p), atol=1e-4)


def test_dropout_several_adapters_draw_their_own_masks():
    fused = lkpeft.fuse(square_dropout_model(0.5, second=0.2), backend="torch")
    fused.base_model.set_adapter(["default", "other"])
    layer = fused.base_model.model.proj
    s1, s2 = 1.0, 3.0
    identity_adapters_(layer, ["default", "other"], [s1, s2])
    x = rand(64, 16)
    with torch.no_grad():
        ratio = (fused(x) - layer.base_layer(x)) / x
    c1, c2 = s1 / 0.5, s2 / 0.8
    levels = torch.tensor([0.0, c1, c2, c1 + c2])
    nearest = (ratio[..., None] - levels).abs().argmin(-1)
    assert torch.allclose(ratio, levels[nearest], atol=1e-3), "lora term is not a sum of masked adapters"
    counts = torch.bincount(nearest.flatten(), minlength=4).float() / nearest.numel()
    assert (counts > 0.03).all(), f"masks are not independent per adapter: level frequencies {counts.tolist()}"


# ---------------------------------------------------------------------------------------------
# Bookkeeping: what is fused, what is kept, unfuse, saving and loading
# ---------------------------------------------------------------------------------------------

def test_unfuse_restores_peft_modules_exactly():
    model = make_peft(r=4, lora_alpha=8)
    classes = {n: type(m) for n, m in model.named_modules()}
    params = {n: p for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    lkpeft.fuse(model)
    lkpeft.fuse(model)  # idempotent
    assert {n: p for n, p in model.named_parameters()} == params and list(model.state_dict()) == keys
    assert sum(isinstance(m, lkpeft.FusedLinear) for m in model.modules()) == 14
    lkpeft.unfuse(model)
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(p is params[n] for n, p in model.named_parameters()) and len(params) == len(list(model.parameters()))
    assert list(model.state_dict()) == keys
    assert not any(hasattr(m, "_lora_kernels_backend") for m in model.modules())


def test_saving_and_loading_stay_peft_s(tmp_path):
    base = tiny_llama()
    fresh = copy.deepcopy(base)
    model = make_peft(base, r=4, lora_alpha=8, rank_pattern={"o_proj": 2})
    fused = fused_copy(model)
    fused.save_pretrained(tmp_path)
    x = ids()
    want = logits(model, x).double()
    reloaded = PeftModel.from_pretrained(fresh, tmp_path)
    assert_close(logits(reloaded, x), want, torch.float32, what="PEFT reloading a fused model's adapter")
    # a fused model loads an adapter through PEFT's own API; fuse() again covers its new layers
    fused.load_adapter(tmp_path, adapter_name="again")
    fused.set_adapter("again")
    assert_close(logits(lkpeft.fuse(fused), x), want, torch.float32, what="fused model, adapter reloaded")


class NotQuiteLinear(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_uncovered_layers_keep_peft_s_path_and_are_reported(capsys):
    base = tiny_llama()
    base.model.layers[0].mlp.up_proj = NotQuiteLinear(32, 48)
    model = make_peft(base, r=4, lora_alpha=8, target_modules=["q_proj", "up_proj", "embed_tokens"])
    dora = make_peft(r=4, lora_alpha=8, target_modules=["v_proj"], use_dora=True)
    fused = lkpeft.fuse(copy.deepcopy(model), verbose=True, backend="torch")
    out = capsys.readouterr().out
    kept = dict(lkpeft.fuse_report(fused).kept)
    assert len(lkpeft.fuse_report(fused).fused) == 3  # 2 q_proj + layer 1's up_proj
    assert "Embedding" in kept["base_model.model.model.embed_tokens"]
    assert "NotQuiteLinear" in kept["base_model.model.model.layers.0.mlp.up_proj"]
    assert "embed_tokens" in out and "NotQuiteLinear" in out
    check_parity(model, fused, ids())
    fused_dora = lkpeft.fuse(copy.deepcopy(dora))
    assert not lkpeft.fuse_report(fused_dora).fused
    assert all("DoRA" in why for _, why in lkpeft.fuse_report(fused_dora).kept)
    check_parity(dora, fused_dora, ids())


class ConvThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.proj = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.proj(self.conv(x).flatten(1))


def test_conv_layers_keep_peft_s_path():
    model = randomize_adapters_(get_peft_model(ConvThenLinear(), LoraConfig(r=2, target_modules=["conv", "proj"])))
    fused = lkpeft.fuse(copy.deepcopy(model))
    report = lkpeft.fuse_report(fused)
    assert report.fused == ["base_model.model.proj"] and "Conv2d" in dict(report.kept)["base_model.model.conv"]
    x = rand(2, 3, 8, 8)
    assert_close(fused(x), oracle(model)(x.double()), torch.float32, torch_out=model(x))


def test_adapter_added_after_fuse_with_a_variant_falls_back_to_peft():
    model = make_peft(r=4, lora_alpha=8, target_modules=["v_proj"])
    fused = fused_copy(model)
    for m in (model, fused):
        m.add_adapter("dora", LoraConfig(r=2, target_modules=["v_proj"], use_dora=True))
        randomize_adapters_(m, "dora")
        m.set_adapter("dora")
    fused.load_state_dict(model.state_dict())
    check_parity(model, fused, ids())


# ---------------------------------------------------------------------------------------------
# GPU lane
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_peft_layer_on_gpu(dtype):
    model = one_layer_peft(dtype, lora_bias=True).cuda()
    randomize_bias_(model)
    fused, ref = lkpeft.fuse(copy.deepcopy(model)), oracle(model)
    x, dy = rand(300, 40, dtype=dtype, device="cuda"), rand(300, 24, dtype=dtype, device="cuda")
    assert_close(fused(x), ref(x.double()), dtype, torch_out=model(x))
    got, want = adapter_grads(fused, x, dy), adapter_grads(ref, x.double(), dy.double())
    theirs = adapter_grads(model, x, dy)
    for n in want:
        assert_close(got[n], want[n], dtype, torch_out=theirs[n], what=f"grad {n}")


@pytest.mark.gpu
def test_fused_llama_training_step_on_gpu():
    model = make_peft(r=8, lora_alpha=16).cuda()
    fused = lkpeft.fuse(copy.deepcopy(model))
    check_parity(model, fused, ids().cuda())


# ---------------------------------------------------------------------------------------------
# The benchmark suite `model` (GPU numbers only on a GPU; here a tiny stack checks its plumbing)
# ---------------------------------------------------------------------------------------------

def test_model_bench_suite_checks_every_method_on_cpu(tmp_path):
    import json

    from bench.run import main

    assert main(["--suite", "model", "--quick", "--device", "cpu", "--backends", "torch",
                 "--rep-ms", "5", "--out", str(tmp_path)]) == 0
    (path,) = tmp_path.glob("*model*.json")
    result = json.loads(path.read_text())
    kinds = {c["kind"]: c for c in result["cases"]}
    assert set(kinds) == {"train", "prefill", "decode"} and not any(c["failed"] for c in result["cases"])
    assert set(kinds["train"]["times_us"]) == {"peft", "ours_torch"}
    assert set(kinds["decode"]["times_us"]) == {"peft", "merged", "ours_torch"}
    assert all(err < 1e-5 for c in result["cases"] for err in c["errors"].values())  # fp32 here
    from bench.model import brief
    assert len(brief(result)) == 1 + len(result["cases"])
