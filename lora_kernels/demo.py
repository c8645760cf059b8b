"""The main job, end to end: ``python -m lora_kernels.demo`` (``--quick`` for a shorter run).

1. builds a small Llama-style model from a transformers ``LlamaConfig`` (random weights, nothing
   downloaded), adds LoRA through PEFT and fuses it (``lora_kernels.peft.fuse``);
2. times a training step and an inference forward, fused against PEFT's own path;
3. fine-tunes adapter 1 on a synthetic task (token x -> perm1[x]) until the loss clearly falls;
4. saves the adapter (PEFT's format), reloads it with PEFT and without PEFT, checks the outputs;
5. merges it (``lora_kernels.merge_`` under PEFT's ``merge_adapter``), checks merged == unmerged;
6. trains adapter 2 (x -> perm2[x]);
7. serves one batch whose rows use adapter 1, adapter 2 or none (PEFT's ``adapter_names`` on the
   fused model), checking each row against that adapter run alone;
8. serves the same batch through ``MultiLoRALinear`` (per-token adapter index), same check.

CPU: float32 on the plain-torch reference backend (correctness, not speed: the speed is the GPU
kernels'); CUDA: bfloat16 base, fp32 adapters (PEFT's default), the fused Triton kernels.
Exit code 0 when every check passed.
"""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # random weights from a config: nothing may touch the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from typing import Callable, Dict, List, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BACKEND = "auto"  # CPU tensors -> the plain-torch reference; CUDA tensors -> the Triton kernels


@dataclass
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    steps: int
    rank: int
    lr: float
    timing_reps: int


# CPU sizes: a model the 2-core CI machine trains in seconds. The GPU size: 4096 tokens a step, so
# that the projections rather than launch overhead dominate it (reasoning, not measured). The
# learning rate was seen to work on the CPU at hidden 64 (float32) and 256 (bfloat16, 80 steps:
# loss 6.9 -> 2.6); AdamW's step size does not depend on the hidden size, so 512 should follow
# (not yet run on a GPU).
SIZES = {
    "cpu": Size(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=64, batch=16, seq=16,
                steps=200, rank=8, lr=1e-2, timing_reps=5),
    "cpu-quick": Size(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=64, batch=16, seq=16,
                      steps=80, rank=8, lr=1e-2, timing_reps=3),
    "cuda": Size(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4, vocab=256, batch=16, seq=256,
                 steps=300, rank=16, lr=1e-2, timing_reps=20),
    "cuda-quick": Size(hidden=512, intermediate=1408, layers=4, heads=8, kv_heads=4, vocab=256, batch=16,
                       seq=256, steps=100, rank=16, lr=1e-2, timing_reps=5),
}
# Model-level agreement a check demands, ||a - b|| / ||b|| over the logits: float32 rounding
# through a few layers; bfloat16 rounding (merging rounds W + dW to bf16) through a few layers.
CHECK_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


class Report:
    """Collects the checks; prints each step's lines as they come."""

    def __init__(self):
        self.checks: List[tuple] = []
        self.timings: Dict[str, float] = {}

    def say(self, line: str = "") -> None:
        print(line, flush=True)

    def check(self, what: str, ok: bool, detail: str) -> bool:
        self.checks.append((what, ok, detail))
        self.say(f"    {'ok  ' if ok else 'FAIL'} {what}: {detail}")
        return ok

    @property
    def failed(self) -> List[str]:
        return [f"{w}: {d}" for w, ok, d in self.checks if not ok]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# Model, task, timing
# ---------------------------------------------------------------------------------------------

def base_model(size: Size, device, dtype, seed: int = 0) -> nn.Module:
    """The same random Llama-style model for a given seed (built on the CPU, then moved)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, vocab_size=size.vocab,
                      max_position_embeddings=max(64, size.seq), bos_token_id=0, eos_token_id=0,
                      # transformers' default std 0.02 leaves the frozen lm_head unable to produce
                      # logits larger than ~1; this std lets a LoRA-only fine-tune reach a low loss
                      initializer_range=1.6 / size.hidden ** 0.5)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


class Task:
    """Token x -> perm[x] at every position: a map only a trained adapter knows."""

    def __init__(self, size: Size, device, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(size.vocab, generator=gen).to(device)
        self.gen, self.size, self.device = gen, size, device

    def batch(self, rows: Optional[int] = None) -> torch.Tensor:
        s = self.size
        return torch.randint(0, s.vocab, (rows or s.batch, s.seq), generator=self.gen).to(self.device)

    def loss(self, model, x, **kw) -> torch.Tensor:
        return F.cross_entropy(model(input_ids=x, **kw).logits.float().flatten(0, 1), self.perm[x].flatten())

    def accuracy(self, logits: torch.Tensor, x: torch.Tensor) -> float:
        return (logits.argmax(-1) == self.perm[x]).float().mean().item()


def time_ms(fn: Callable[[], object], device, reps: int) -> float:
    """Median wall time of one call (a warm-up call first; CUDA synchronised around each)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    samples = []
    for _ in range(max(reps, 1)):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        samples.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(samples)


def logits_of(model, x, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, **kw).logits


# ---------------------------------------------------------------------------------------------
# The steps
# ---------------------------------------------------------------------------------------------

def add_lora(model, size: Size, rep: Report, backend: str):
    from peft import LoraConfig, get_peft_model

    import lora_kernels.peft as lkpeft

    cfg = LoraConfig(r=size.rank, lora_alpha=2 * size.rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)  # PEFT's default: fp32 adapters over a 16-bit base
    lkpeft.fuse(peft_model, backend=backend)
    report = lkpeft.fuse_report(peft_model)
    rep.say(f"[1] PEFT LoRA (r={size.rank}, alpha={2 * size.rank}) on {', '.join(TARGETS)}; "
            f"lora_kernels.peft.fuse: {len(report.fused)} layers fused, {len(report.kept)} kept on PEFT's path")
    return peft_model


def check_parity(peft_model, task: Task, rep: Report, tol: float) -> None:
    import lora_kernels.peft as lkpeft

    with torch.no_grad():
        for n, p in peft_model.named_parameters():  # a fresh adapter (B = 0) would compare nothing
            if "lora_B" in n:
                p.normal_(0.0, 0.02)
    x = task.batch()
    fused = logits_of(peft_model, x)
    lkpeft.unfuse(peft_model)
    ref = logits_of(peft_model, x)
    lkpeft.fuse(peft_model, backend=BACKEND)
    err = rel_err(fused, ref)
    rep.check("fused logits == PEFT logits", err <= tol, f"rel. error {err:.1e} (tolerance {tol:.0e})")
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.zero_()


def timings(peft_model, task: Task, size: Size, device, rep: Report) -> None:
    """One training step (forward, backward) and one inference forward, PEFT's path vs fused."""
    import lora_kernels.peft as lkpeft

    x = task.batch()
    backend = BACKEND

    def train_step():
        peft_model.zero_grad(set_to_none=True)
        task.loss(peft_model, x).backward()

    def infer():
        return logits_of(peft_model, x)

    peft_model.train()
    res = {}
    for path in ("peft", "fused"):
        lkpeft.unfuse(peft_model) if path == "peft" else lkpeft.fuse(peft_model, backend=backend)
        res[f"train_{path}"] = time_ms(train_step, device, size.timing_reps)
    peft_model.eval()
    for path in ("peft", "fused"):
        lkpeft.unfuse(peft_model) if path == "peft" else lkpeft.fuse(peft_model, backend=backend)
        res[f"infer_{path}"] = time_ms(infer, device, size.timing_reps)
    peft_model.merge_adapter()
    res["infer_merged"] = time_ms(infer, device, size.timing_reps)
    peft_model.unmerge_adapter()
    peft_model.zero_grad(set_to_none=True)
    rep.timings.update(res)
    tokens = size.batch * size.seq
    rep.say(f"[2] timings ({tokens} tokens; median of {size.timing_reps}; {device.type}, backend {backend}):")
    rep.say(f"    training step (fwd+bwd): PEFT {res['train_peft']:.1f} ms, fused {res['train_fused']:.1f} ms "
            f"-> {res['train_peft'] / res['train_fused']:.2f}x")
    rep.say(f"    inference forward: PEFT {res['infer_peft']:.1f} ms, fused {res['infer_fused']:.1f} ms, "
            f"merged {res['infer_merged']:.1f} ms -> fused/merged {res['infer_fused'] / res['infer_merged']:.2f}")
    if device.type == "cpu":
        rep.say("    (CPU: the fused path runs the plain-torch reference; its speed is the GPU kernels')")


def train(peft_model, task: Task, size: Size, rep: Report, name: str, steps: int) -> None:
    from tqdm.auto import tqdm

    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=size.lr)
    losses = []
    bar = tqdm(range(steps), desc=f"    training {name}", leave=False, mininterval=0.5,
               disable=None)  # None: a bar on a terminal, nothing in a log file
    for _ in bar:
        loss = task.loss(peft_model, task.batch())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    bar.close()
    peft_model.eval()
    first, last = statistics.mean(losses[:5]), statistics.mean(losses[-5:])
    x = task.batch()
    acc = task.accuracy(logits_of(peft_model, x), x)
    rep.check(f"adapter {name!r}: loss clearly falls", last < 0.5 * first,
              f"{steps} steps, loss {first:.3f} -> {last:.3f}, accuracy {100 * acc:.0f}%")


def save_and_reload(peft_model, size: Size, device, dtype, task: Task, out_dir: str, rep: Report, tol: float):
    from peft import PeftModel

    import lora_kernels
    import lora_kernels.peft as lkpeft

    path = os.path.join(out_dir, "adapter1")
    peft_model.save_pretrained(path, selected_adapters=["default"])
    files = sorted(os.listdir(path))
    rep.say(f"[4] saved adapter 1 to {path} ({', '.join(f for f in files if f != 'README.md')})")
    x = task.batch()
    want = logits_of(peft_model, x)
    reloaded = lkpeft.fuse(PeftModel.from_pretrained(base_model(size, device, dtype), path).eval(),
                           backend=BACKEND)
    err = rel_err(logits_of(reloaded, x), want)
    rep.check("reloaded with PEFT (and fused) == trained model", err <= tol, f"rel. error {err:.1e}")
    plain = lora_kernels.load_adapter(base_model(size, device, dtype), path, backend=BACKEND).eval()
    err = rel_err(logits_of(plain, x), want)
    rep.check("loaded without PEFT (lora_kernels.load_adapter) == trained model", err <= tol, f"rel. error {err:.1e}")


def merge_check(peft_model, task: Task, rep: Report, tol: float) -> None:
    x = task.batch()
    unmerged = logits_of(peft_model, x)
    peft_model.merge_adapter()
    merged = logits_of(peft_model, x)
    peft_model.unmerge_adapter()
    back = logits_of(peft_model, x)
    rep.say("[5] merge_adapter / unmerge_adapter (lora_kernels.merge_ / unmerge_ in place)")
    err = rel_err(merged, unmerged)
    agree = (merged.argmax(-1) == unmerged.argmax(-1)).float().mean().item()
    rep.check("merged == unmerged", err <= tol, f"rel. error {err:.1e}, same prediction on {100 * agree:.1f}% of tokens")
    err = rel_err(back, unmerged)
    rep.check("unmerged again == before merging", err <= tol, f"rel. error {err:.1e}")


def second_adapter(peft_model, size: Size, task2: Task, rep: Report, steps: int) -> None:
    from peft import LoraConfig

    import lora_kernels.peft as lkpeft

    cfg = LoraConfig(r=size.rank, lora_alpha=2 * size.rank, target_modules=TARGETS, lora_dropout=0.0)
    peft_model.add_adapter("task2", cfg)
    lkpeft.fuse(peft_model, backend=BACKEND)  # the layers are the same: still fused
    peft_model.set_adapter("task2")
    rep.say("[6] adapter 2 (x -> perm2[x]), a second PEFT adapter on the same fused layers")
    train(peft_model, task2, size, rep, "task2", steps)
    peft_model.set_adapter("default")


def mixed_rows(size: Size):
    """Which adapter each row of the served batch uses: adapter 1, adapter 2, none, in turn."""
    names = ["default", "task2", "__base__"]
    return [names[i % 3] for i in range(size.batch)]


def row_references(peft_model, x, names) -> torch.Tensor:
    """Each row's logits with its adapter run alone (or with adapters disabled)."""
    out = []
    for i, name in enumerate(names):
        if name == "__base__":
            with peft_model.disable_adapter():
                out.append(logits_of(peft_model, x[i:i + 1]))
        else:
            peft_model.set_adapter(name)
            out.append(logits_of(peft_model, x[i:i + 1]))
    peft_model.set_adapter("default")
    return torch.cat(out)


def serve_mixed_batch(peft_model, tasks: Dict[str, Task], size: Size, rep: Report, tol: float):
    """PEFT's mixed-batch API (adapter_names) on the fused model: one fused call per adapter."""
    names = mixed_rows(size)
    x = tasks["default"].batch()
    got = logits_of(peft_model, x, adapter_names=names)
    want = row_references(peft_model, x, names)
    rep.say(f"[7] one batch of {len(names)} rows: adapter 1 / adapter 2 / none in turn "
            f"(PEFT adapter_names, fused layers)")
    err = max(rel_err(got[i], want[i]) for i in range(len(names)))
    rep.check("every row == its adapter alone", err <= tol, f"worst row rel. error {err:.1e}")
    for name, label in (("default", "adapter 1"), ("task2", "adapter 2"), ("__base__", "none")):
        rows = [i for i, n in enumerate(names) if n == name]
        accs = {t: tasks[t].accuracy(got[rows], x[rows]) for t in ("default", "task2")}
        rep.say(f"    rows with {label:9}: accuracy on task 1 {100 * accs['default']:3.0f}%, "
                f"on task 2 {100 * accs['task2']:3.0f}%")
    return x, names, want


def serve_multi_lora(peft_model, x, names, want, size: Size, device, dtype, rep: Report, tol: float) -> None:
    """The same batch through MultiLoRALinear: every LoRA layer of a plain copy of the base model
    becomes a MultiLoRALinear holding both adapters in slots 0 and 1; the per-token adapter index
    (row i's tokens -> its adapter's slot, -1 = none) is built once for the batch."""
    rep.say("[8] the same batch through lora_kernels.MultiLoRALinear (per-token adapter index)")
    from lora_kernels import AdapterIndex, MultiLoRALinear

    import lora_kernels.peft as lkpeft

    slots = {"default": 0, "task2": 1, "__base__": -1}
    served = base_model(size, device, dtype)
    holder = {}

    class Served(nn.Module):
        def __init__(self, multi):
            super().__init__()
            self.multi = multi

        def forward(self, h):
            y = self.multi(h.reshape(-1, h.shape[-1]), holder["index"])
            return y.reshape(*h.shape[:-1], y.shape[-1])

    for name, layer in lkpeft._lora_layers(peft_model):
        path = name[len("base_model.model."):]
        multi = MultiLoRALinear(served.get_submodule(path), max_adapters=2, max_rank=size.rank)
        for adapter, slot in (("default", 0), ("task2", 1)):
            multi.load_adapter(slot, layer.lora_A[adapter].weight.detach(), layer.lora_B[adapter].weight.detach(),
                               layer.scaling[adapter])
        parent, _, child = path.rpartition(".")
        setattr(served.get_submodule(parent), child, Served(multi))
    token_adapter = torch.tensor([slots[n] for n in names], device=device, dtype=torch.int32)
    token_adapter = token_adapter[:, None].expand(-1, x.shape[1]).reshape(-1)  # row-major, as h.reshape
    holder["index"] = AdapterIndex.from_token_adapters(token_adapter, 2)
    got = logits_of(served, x)
    err = max(rel_err(got[i], want[i]) for i in range(len(names)))
    rep.check("MultiLoRALinear: every row == its adapter alone", err <= tol, f"worst row rel. error {err:.1e}")


# ---------------------------------------------------------------------------------------------

def run(quick: bool = False, device: Optional[str] = None, out_dir: Optional[str] = None,
        steps: Optional[int] = None) -> Report:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads = torch.get_num_threads()
    if device.type == "cpu":
        # The CPU model is tiny: one thread is as fast on an idle machine and avoids OpenMP
        # oversubscription on a shared one (seen here: a training step 8x faster under load).
        torch.set_num_threads(1)
    try:
        return _run(quick, device, out_dir, steps)
    finally:
        torch.set_num_threads(threads)


def _run(quick: bool, device: torch.device, out_dir: Optional[str], steps: Optional[int]) -> Report:
    size = SIZES[device.type + ("-quick" if quick else "")]
    if steps:
        size = replace(size, steps=steps)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = CHECK_TOL[dtype]
    backend = BACKEND
    from .ops.lora_linear import choose_backend
    probe = torch.empty(1, 8, device=device, dtype=dtype)
    rep = Report()
    t_start = time.perf_counter()
    rep.say(f"lora_kernels demo{' (quick)' if quick else ''} on {device.type}: Llama-style model, "
            f"{size.layers} layers, hidden {size.hidden}, vocab {size.vocab}, {str(dtype).replace('torch.', '')} base; "
            f"lora_linear backend here: {choose_backend(probe, probe[:1], backend)}")
    tasks = {"default": Task(size, device, seed=1), "task2": Task(size, device, seed=2)}

    peft_model = add_lora(base_model(size, device, dtype), size, rep, backend)
    check_parity(peft_model, tasks["default"], rep, tol)
    timings(peft_model, tasks["default"], size, device, rep)
    rep.say("[3] adapter 1 (x -> perm1[x])")
    train(peft_model, tasks["default"], size, rep, "default", size.steps)
    with tempfile.TemporaryDirectory() as tmp:
        save_and_reload(peft_model, size, device, dtype, tasks["default"], out_dir or tmp, rep, tol)
    merge_check(peft_model, tasks["default"], rep, tol)
    second_adapter(peft_model, size, tasks["task2"], rep, size.steps)
    x, names, want = serve_mixed_batch(peft_model, tasks, size, rep, tol)
    serve_multi_lora(peft_model, x, names, want, size, device, dtype, rep, tol)

    rep.say()
    n_ok = sum(ok for _, ok, _ in rep.checks)
    rep.say(f"{n_ok}/{len(rep.checks)} checks passed, {time.perf_counter() - t_start:.0f} s")
    for f in rep.failed:
        rep.say(f"FAILED: {f}")
    return rep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m lora_kernels.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer steps and timing repetitions")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--steps", type=int, default=None, help="training steps per adapter")
    p.add_argument("--out", default=None, help="directory for the saved adapter (default: a temporary one)")
    args = p.parse_args(argv)
    rep = run(args.quick, args.device, args.out, args.steps)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
