"""Suite `model`: a stack of Llama-3-8B-size transformer blocks with PEFT LoRA on every projection.

One PEFT model (transformers ``LlamaModel``: q/k/v/o, gate/up/down of Llama-3-8B sizes, RMSNorm,
rotary, SDPA attention; bf16 base with PEFT's default fp32 adapters), switched between PEFT's own
layers, ``lora_kernels.peft.fuse`` (per backend) and PEFT's ``merge_adapter``:

* ``train``:   forward + backward of the stack (LoRA parameters get gradients), baseline ``peft``;
* ``prefill``: an inference forward over long sequences, baseline ``merged`` (the LoRA-free cost);
* ``decode``:  an inference forward of one new token per sequence (no KV cache: the projections
  and the MLP are what LoRA changes), baseline ``merged``; timed under CUDA graphs when the
  forward can be captured, else eagerly (the case's ``timer`` says which).

Each method is checked before it is timed, against a float32 copy of the unfused PEFT model (train:
the gradient of the first block's q_proj lora_A, the deepest one): an error above the bench's
tolerance, or above twice PEFT's own error when that is larger, is a failure and is not timed.
"""
from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch

from .common import CHECK_TOL, geomean, rel_error, time_us

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # configs only, never a download

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KEY_COLUMNS = ["kind", "blocks", "batch", "seq", "r"]
NOTE = ("On a GPU, a stack of Llama-3-8B blocks (hidden 4096, MLP 14336, 32 heads, 8 KV heads; a tiny "
        "fp32 stack on a CPU, see `stack` in the JSON) with PEFT LoRA on all seven projections (bf16 "
        "base, fp32 adapters). Time of each method / the baseline's: "
        "`peft` for the training step (forward + backward), `merged` for inference (prefill; decode "
        "= one token per sequence, no KV cache). `ours_*` = the same PEFT model after "
        "`lora_kernels.peft.fuse(model, backend=*)`.")


@dataclass(frozen=True)
class Stack:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    blocks: int


LLAMA3_8B = Stack(hidden=4096, intermediate=14336, heads=32, kv_heads=8, blocks=2)
TINY = Stack(hidden=128, intermediate=256, heads=4, kv_heads=2, blocks=2)  # a CPU smoke run

# (kind, batch, seq). Train and prefill: 4096 tokens; decode: a small and a large serving batch.
GPU_CASES = [("train", 2, 2048), ("prefill", 2, 2048), ("decode", 16, 1), ("decode", 128, 1)]
GPU_QUICK_CASES = [("train", 2, 2048), ("prefill", 2, 2048), ("decode", 16, 1)]
CPU_CASES = [("train", 2, 32), ("prefill", 2, 32), ("decode", 4, 1)]


def build(stack: Stack, r: int, device, dtype, seed: int = 0):
    """A PEFT LoraModel over a random LlamaModel of `stack`'s sizes; LoRA B random (never zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaModel

    cfg = LlamaConfig(hidden_size=stack.hidden, intermediate_size=stack.intermediate,
                      num_attention_heads=stack.heads, num_key_value_heads=stack.kv_heads,
                      num_hidden_layers=stack.blocks, vocab_size=128, max_position_embeddings=8192,
                      attn_implementation="sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        base = LlamaModel(cfg).to(dtype)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5 / r)
    return model.eval()


def _probe(model) -> torch.nn.Parameter:
    """The first block's q_proj lora_A: its gradient has passed through the whole stack."""
    return model.base_model.model.layers[0].self_attn.q_proj.lora_A["default"].weight


@contextlib.contextmanager
def state(model, method: str):
    """The PEFT model as `method` runs it: peft (PEFT's layers), ours_<backend>, merged."""
    import lora_kernels.peft as lkpeft

    if method.startswith("ours_"):
        lkpeft.fuse(model, backend=method[len("ours_"):])
    elif method == "merged":
        model.merge_adapter()
    try:
        yield
    finally:
        if method == "merged":
            model.unmerge_adapter()
        lkpeft.unfuse(model)


def case_fns(model, kind: str, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], torch.Tensor]:
    if kind == "train":
        params = [p for p in model.parameters() if p.requires_grad]
        probe = _probe(model)

        def step():
            for p in params:
                p.grad = None
            model(inputs_embeds=x, use_cache=False).last_hidden_state.backward(dy)
            return probe.grad
        return step

    def forward():
        with torch.inference_mode():
            return model(inputs_embeds=x, use_cache=False).last_hidden_state
    return forward


def _time(fn, device, kind: str, rep_ms: int, case: Dict, name: str) -> float:
    if kind == "decode" and device.type == "cuda":
        try:
            t = time_us(fn, device.type, cuda_graph=True, rep_ms=rep_ms)
            case.setdefault("timer", {})[name] = "cuda graph"
            return t
        except Exception as e:  # a forward that cannot be captured is timed eagerly, and says so
            case.setdefault("timer", {})[name] = f"eager ({type(e).__name__})"
            torch.cuda.synchronize()
    return time_us(fn, device.type, rep_ms=rep_ms)


def run_case(model, reference, stack: Stack, kind: str, batch: int, seq: int, r: int, dtype, device,
             backends: List[str], rep_ms: int) -> Dict:
    gen = torch.Generator(device="cpu").manual_seed(batch * 7919 + seq)
    x = torch.randn(batch, seq, stack.hidden, generator=gen).to(device=device, dtype=dtype)
    dy = torch.randn(batch, seq, stack.hidden, generator=gen).to(device=device, dtype=dtype)
    ref = case_fns(reference, kind, x.float(), dy.float())().detach().clone()
    methods = ["peft"] + ([] if kind == "train" else ["merged"]) + [f"ours_{b}" for b in backends]
    case = {"kind": kind, "blocks": stack.blocks, "batch": batch, "seq": seq, "r": r,
            "dtype": str(dtype).replace("torch.", ""), "times_us": {}, "errors": {}, "failed": []}
    for name in methods:
        with state(model, name):
            fn = case_fns(model, kind, x, dy)
            try:
                err = rel_error(fn(), ref)
            except Exception as e:
                case["failed"].append(f"{name}: {type(e).__name__}: {str(e)[:200]}")
                continue
            case["errors"][name] = err
            bound = max(CHECK_TOL[dtype], 2.0 * case["errors"].get("peft", 0.0))
            if not err <= bound:  # NaN fails too
                case["failed"].append(f"{name}: relative error {err:.2e} > {bound:.2e}")
                continue
            case["times_us"][name] = _time(fn, device, kind, rep_ms, case, name)
    case["baseline"] = "peft" if kind == "train" else "merged"
    base = case["times_us"].get(case["baseline"])
    case["ratios"] = {k: v / base for k, v in case["times_us"].items()} if base else {}
    return case


def summarize(cases: List[Dict], backends: List[str]) -> Dict:
    """The issue's acceptance numbers: PEFT / fused for the training step (target >= 1.3), and
    fused / merged for inference (target <= 1.10)."""
    out = {}
    for b in backends:
        key = f"ours_{b}"
        ratio = lambda kind: geomean(c["ratios"][key] for c in cases if c["kind"] == kind and key in c["ratios"])  # noqa: E731
        train = ratio("train")
        out[key] = {"train_speedup_vs_peft": None if not train else 1.0 / train,
                    "prefill_over_merged": ratio("prefill"), "decode_over_merged": ratio("decode"),
                    "failures": sum(any(f.startswith(key) for f in c["failed"]) for c in cases)}
    out["peft_inference_over_merged"] = geomean(
        c["ratios"]["peft"] for c in cases if c["kind"] != "train" and "peft" in c["ratios"])
    return out


def run(args, device, dtype, backends, rep_ms, log) -> Dict:
    on_gpu = device.type == "cuda"
    stack = LLAMA3_8B if on_gpu else TINY
    if args.quick and on_gpu:
        stack = Stack(**{**stack.__dict__, "blocks": 1})
    grid = (GPU_QUICK_CASES if args.quick else GPU_CASES) if on_gpu else CPU_CASES
    if args.tokens:  # --tokens: the decode batch sizes
        grid = [c for c in grid if c[0] != "decode"] + [("decode", m, 1) for m in args.tokens]
    cases = []
    for r in (args.ranks or [16]):
        model = build(stack, r, device, dtype)
        reference = copy.deepcopy(model).float()  # the unfused PEFT model in fp32 (tf32 off)
        for kind, batch, seq in grid:
            cases.append(run_case(model, reference, stack, kind, batch, seq, r, dtype, device, backends, rep_ms))
            log(cases[-1])
        del model, reference
        if on_gpu:
            torch.cuda.empty_cache()
    return {"cases": cases, "summary": summarize(cases, backends), "stack": stack.__dict__}


def brief(result: Dict) -> List[str]:
    """Short lines for ``python -m bench.summarize``: each case's baseline and ratios to it."""
    cols = ("peft", "merged", "ours_triton", "ours_cuda")
    lines = [f"  {'kind':>8} {'batch':>5} {'seq':>5} {'r':>3} {'baseline':>8} {'us':>10} "
             + " ".join(f"{m:>11}" for m in cols)]
    for c in result["cases"]:
        rt = c.get("ratios", {})
        cells = " ".join(f"{rt[m]:>11.2f}" if m in rt else f"{'-':>11}" for m in cols)
        lines.append(f"  {c['kind']:>8} {c['batch']:>5} {c['seq']:>5} {c['r']:>3} {c['baseline']:>8} "
                     f"{c['times_us'].get(c['baseline'], float('nan')):>10.1f} {cells}"
                     + ("  FAILED " + "; ".join(c["failed"]) if c["failed"] else ""))
    return lines
