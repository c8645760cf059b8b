"""Beyond one device, on the CPU: two processes in a gloo group on 127.0.0.1.

One launch of two worker processes (this file run as a script) runs every check below, each rank
comparing the distributed model with an unsharded copy of it that it builds itself from the same
seed, in fp32:

* tensor parallelism (ColwiseLoRAParallel / RowwiseLoRAParallel over an up/down MLP of
  FusedLoRALinear, uneven N): outputs, dx and every parameter's full gradient equal the
  unsharded model's; gradients are DTensors with their parameters' placements; names and
  requires_grad unchanged; forward and backward ran through lora_linear on the local shards; the
  adapter saved from rank 0 is the unsharded one; a merge / exact unmerge / safe merge on the
  shards matches; LoRA dropout;
* TP composed with FSDP2 on a (dp, tp) mesh (dp = 1 with two processes): gradients, merge;
* FSDP2 (fully_shard per block and at the root) and DDP, with activation checkpointing, over an
  injected model and a PEFT-fused tiny Llama: two optimizer steps on a batch split over the
  ranks equal one process on the whole batch; the adapter saved from rank 0 in PEFT's format
  holds the trained values.

The tests read the workers' results. Bounded: the workers are killed after WORKER_TIMEOUT_S, and
always reaped.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest

WORLD = 2
WORKER_TIMEOUT_S = 150   # the whole launch: measured 36-41 s on the 2-core CPU machine at load ~8
GLOO_TIMEOUT_S = 60      # a rank stuck in a collective fails instead of hanging
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# =============================================================================================
# The tests (main process)
# =============================================================================================

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """{rank: {check: {"errors": {what: rel_error}, "facts": {what: bool}} | {"failed": traceback}}}"""
    out = tmp_path_factory.mktemp("distributed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", TRITON_INTERPRET="1")
    port = _free_port()
    procs, logs = [], []
    try:
        for rank in range(WORLD):
            log = open(out / f"rank{rank}.log", "w")
            logs.append(log)
            procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), str(rank), str(WORLD),
                                           str(port), str(out)], cwd=ROOT, env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + WORKER_TIMEOUT_S
        # until all exit, one fails (the others would wait for it in a collective), or time is up
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    found = {}
    for rank in range(WORLD):
        path = out / f"rank{rank}.json"
        if not path.exists():
            text = (out / f"rank{rank}.log").read_text()[-4000:]
            pytest.fail(f"distributed worker {rank} wrote no results (exit {procs[rank].returncode}; "
                        f"killed after {WORKER_TIMEOUT_S} s if -9):\n{text}")
        found[rank] = json.loads(path.read_text())
    return found


def _check(results, name):
    from tolerances import REL_TOL
    import torch
    for rank, checks in results.items():
        res = checks.get(name)
        assert res is not None, f"rank {rank}: check {name!r} did not run"
        assert "failed" not in res, f"rank {rank}: {name} raised:\n{res['failed']}"
        assert res["errors"], f"rank {rank}: {name} compared nothing"
        for what, err in res["errors"].items():
            assert err <= REL_TOL[torch.float32], f"rank {rank}: {name}: {what}: relative error {err:.3e}"
        for what, ok in res["facts"].items():
            assert ok, f"rank {rank}: {name}: {what} does not hold"


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensor_parallel_matches_unsharded(results, backend):
    _check(results, f"tp_{backend}")


def test_tensor_parallel_merge_on_shards(results):
    _check(results, "tp_merge")


def test_tensor_parallel_dropout(results):
    _check(results, "tp_dropout")


def test_tensor_parallel_under_fsdp2_2d_mesh(results):
    _check(results, "tp_fsdp2")


def test_fsdp2_injected_two_steps_and_saved_adapter(results):
    _check(results, "fsdp2_inject")


def test_fsdp2_fused_peft_llama_two_steps_and_saved_adapter(results):
    _check(results, "fsdp2_llama")


def test_ddp_injected_two_steps_and_saved_adapter(results):
    _check(results, "ddp_inject")


def test_ddp_fused_peft_llama_two_steps(results):
    _check(results, "ddp_llama")


# =============================================================================================
# The worker (this file run as a script): rank, world size, port, output directory
# =============================================================================================

def _rel(a, b) -> float:
    from tolerances import rel_error
    return rel_error(a, b)


def _full(t):
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


class _OpCounter:
    """Counts calls of the fused op's forward and backward implementations (the eager path's
    ``_forward``, which the registered op's forward also calls, and ``lora_linear_bwd``)."""

    def __init__(self):
        import importlib
        mod = importlib.import_module("lora_kernels.ops.lora_linear")  # the module, not the function
        self.mod, self.fwd, self.bwd = mod, 0, 0
        self.orig = (mod._forward, mod.lora_linear_bwd)

        def fwd(*a, **k):
            self.fwd += 1
            return self.orig[0](*a, **k)

        def bwd(*a, **k):
            self.bwd += 1
            return self.orig[1](*a, **k)
        mod._forward, mod.lora_linear_bwd = fwd, bwd

    def close(self):
        self.mod._forward, self.mod.lora_linear_bwd = self.orig


def _mlp(backend, lora_dropout=0.0):
    import torch
    import torch.nn as nn
    from lora_kernels import FusedLoRALinear

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            # N = 9 of the up layer splits 5 + 4 over two ranks: uneven shards on both layers
            self.up = FusedLoRALinear(12, 9, r=3, lora_alpha=6, lora_dropout=lora_dropout, backend=backend)
            self.down = FusedLoRALinear(9, 7, r=3, lora_alpha=6, lora_dropout=lora_dropout, backend=backend)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    model = MLP()
    with torch.no_grad():
        for layer in (model.up, model.down):
            layer.lora_B.normal_()  # a trained-looking adapter: every gradient non-trivial
            layer.weight.requires_grad_(True)  # so that every parameter's gradient is checked
            layer.bias.requires_grad_(True)
    return model


def check_tp(mesh, backend, out):
    import copy
    import torch
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_kernels.distributed import ColwiseLoRAParallel, RowwiseLoRAParallel

    torch.manual_seed(1)
    model = _mlp(backend)
    ref = copy.deepcopy(model)
    x = torch.randn(2, 5, 12)
    g = torch.randn(2, 5, 7)
    x_ref = x.clone().requires_grad_(True)
    y_ref = ref(x_ref)
    (y_ref * g).sum().backward()

    before = {n: p.requires_grad for n, p in model.named_parameters()}
    parallelize_module(model, mesh, {"up": ColwiseLoRAParallel(), "down": RowwiseLoRAParallel()})
    x_tp = x.clone().requires_grad_(True)
    counter = _OpCounter()
    try:
        y = model(x_tp)
        (y * g).sum().backward()
    finally:
        counter.close()
    errors = {"output": _rel(y, y_ref), "dx": _rel(x_tp.grad, x_ref.grad)}
    facts = {"output is a local tensor": type(y) is torch.Tensor,
             "names unchanged": list(before) == [n for n, _ in model.named_parameters()],
             "requires_grad unchanged": before == {n: p.requires_grad for n, p in model.named_parameters()},
             "two fused forwards and two fused backwards": (counter.fwd, counter.bwd) == (2, 2)}
    rank, size = mesh.get_local_rank(), mesh.size()
    want = {"up": {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)},
            "down": {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()}}
    for name, p in model.named_parameters():
        layer, pname = name.split(".")
        p_ref = ref.get_parameter(name)
        placement = want[layer][pname]
        errors[f"grad {name}"] = _rel(_full(p.grad), p_ref.grad)
        block = (p_ref.detach().tensor_split(size, dim=placement.dim)[rank] if isinstance(placement, Shard)
                 else p_ref.detach())
        facts[f"{name} is a DTensor {placement}"] = isinstance(p, DTensor) and tuple(p.placements) == (placement,)
        facts[f"{name}'s local part is this rank's block"] = torch.equal(p.to_local(), block)
        facts[f"{name}.grad is a DTensor with its placement"] = (isinstance(p.grad, DTensor)
                                                                and tuple(p.grad.placements) == (placement,))
    errors.update(_save_tp_adapter(model, ref, rank, os.path.join(out, f"tp_{backend}_adapter")))
    return {"errors": errors, "facts": facts}


def _save_tp_adapter(model, ref, rank, path):
    """The TP model's adapter, gathered on every rank and saved from rank 0, is the unsharded one."""
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    import lora_kernels
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    errors = {}
    if rank == 0:
        lora_kernels.save_adapter(model, path, state_dict=sd)
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        for layer in ("up", "down"):
            for which in ("lora_A", "lora_B"):
                errors[f"saved {layer}.{which}"] = _rel(tensors[f"base_model.model.{layer}.{which}.weight"],
                                                        ref.get_parameter(f"{layer}.{which}"))
    dist.barrier()
    return errors


def check_tp_merge(mesh):
    import copy
    import torch
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_kernels.distributed import ColwiseLoRAParallel, RowwiseLoRAParallel

    torch.manual_seed(2)
    model = _mlp("torch")
    ref = copy.deepcopy(model)
    parallelize_module(model, mesh, {"up": ColwiseLoRAParallel(), "down": RowwiseLoRAParallel()})
    x = torch.randn(6, 12)
    with torch.no_grad():
        y_unmerged = model(x)
        weights = {n: _full(model.get_parameter(n)).clone() for n in ("up.weight", "down.weight")}
        for m in (model.up, model.down, ref.up, ref.down):
            m.merge(exact_unmerge=True)
        y, y_ref = model(x), ref(x)
        merged_weights = {n: _full(model.get_parameter(n)) for n in weights}
        for m in (model.up, model.down):
            m.unmerge()
        restored = {n: _full(model.get_parameter(n)) for n in weights}
    errors = {"merged output": _rel(y, y_ref), "merged vs unmerged output": _rel(y, y_unmerged)}
    errors.update({f"merged {n}": _rel(merged_weights[n], ref.get_parameter(n)) for n in weights})
    facts = {f"{n} restored bit for bit": torch.equal(restored[n], weights[n]) for n in weights}

    # safe_merge where only rank 0's block would overflow: every rank raises, nothing changes
    with torch.no_grad():
        w, b = model.up.weight.to_local(), model.up.lora_B.to_local()
        if mesh.get_local_rank() == 0:
            w[0], b[0] = 3.3e38, 1e38  # row 0 of W + s * B @ A overflows float32 for some column
        before = w.clone()
        try:
            model.up.merge(safe_merge=True)
            facts["safe_merge raises on every rank"] = False
        except ValueError:
            facts["safe_merge raises on every rank"] = True
    facts["safe_merge leaves the shard bit for bit and unmerged"] = torch.equal(w, before) and not model.up.merged
    return {"errors": errors, "facts": facts}


def check_tp_fsdp2(world):
    """Tensor parallelism composed with FSDP2 on a 2-D (dp, tp) = (1, 2) mesh (parameters become
    DTensors over both dims, FSDP2's _StridedShard on the column-wise rows): gradients and the
    merged output equal the unsharded model's; the exact unmerge restores every shard."""
    import copy
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_kernels.distributed import ColwiseLoRAParallel, RowwiseLoRAParallel

    torch.manual_seed(9)
    model = _mlp("torch")
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    parallelize_module(model, mesh["tp"], {"up": ColwiseLoRAParallel(), "down": RowwiseLoRAParallel()})
    fully_shard(model, mesh=mesh["dp"])
    x, g = torch.randn(2, 5, 12), torch.randn(2, 5, 7)
    y, y_ref = model(x), ref(x)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    errors = {"output": _rel(y, y_ref)}
    errors.update({f"grad {n}": _rel(_full(p.grad), ref.get_parameter(n).grad) for n, p in model.named_parameters()})
    layers, ref_layers = (model.up, model.down), (ref.up, ref.down)
    with torch.no_grad():
        shards = [m.weight.to_local().clone() for m in layers]
        for m in layers + ref_layers:
            m.merge(exact_unmerge=True)
        errors["merged output"] = _rel(model(x), ref(x))
        model.reshard()  # the root keeps its parameters unsharded after a forward: merge state lives in the shards
        for m in layers:
            m.unmerge()
    facts = {f"{n} shard restored bit for bit": torch.equal(m.weight.to_local(), w)
             for n, m, w in zip(("up", "down"), layers, shards)}
    return {"errors": errors, "facts": facts}


def check_tp_dropout(mesh):
    """Training with LoRA dropout: the column-wise layer draws the one mask of its replicated input
    (its output block is the unsharded layer's, from the same generator state); row-wise rank i
    draws the i-th of ws seeds for its column block; the generators stay in step."""
    import copy
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor.parallel import parallelize_module
    from lora_kernels.distributed import ColwiseLoRAParallel, RowwiseLoRAParallel
    from lora_kernels.ops.lora_linear import draw_dropout_seed, dropout_mask

    torch.manual_seed(8)
    model = _mlp("torch", lora_dropout=0.5).train()
    ref = copy.deepcopy(model)
    parallelize_module(model, mesh, {"up": ColwiseLoRAParallel(), "down": RowwiseLoRAParallel()})
    rank, size = mesh.get_local_rank(), mesh.size()
    x = torch.randn(6, 12)
    state = torch.get_rng_state()
    up_ref = ref.up(x)
    torch.set_rng_state(state)
    up = model.up(x)
    errors = {"colwise output with dropout": _rel(up, up_ref.tensor_split(size, -1)[rank])}

    h = torch.randn(6, 9).tensor_split(size, -1)[rank]  # this rank's block of the row-wise input
    state = torch.get_rng_state()
    seeds = [draw_dropout_seed(h.device) for _ in range(size)]
    torch.set_rng_state(state)
    y = model.down(h)
    after = torch.randint(1 << 62, (1,))
    d = model.down
    keep = dropout_mask(seeds[rank], h.shape, 0.5).to(h.dtype) / 0.5
    a, w = d.lora_A.to_local(), d.weight.to_local()
    partial = h @ w.T + d.scaling * ((h * keep) @ a.T) @ d.lora_B.to_local().T
    dist.all_reduce(partial)
    errors["rowwise output with per-rank dropout seeds"] = _rel(y, partial + d.bias.to_local())
    gathered = [torch.zeros_like(after) for _ in range(size)]
    dist.all_gather(gathered, after)
    facts = {"generators in step after a row-wise dropout": all(torch.equal(g, after) for g in gathered),
             "row-wise ranks drew distinct seeds": len({int(s) for s in seeds}) == size}
    (model(x).square().sum()).backward()  # the backward regenerates each rank's mask
    facts["dropout gradients finite"] = all(torch.isfinite(p.grad.full_tensor()).all() for p in model.parameters())
    return {"errors": errors, "facts": facts}


def _injected_model():
    import torch
    import torch.nn as nn
    import lora_kernels

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.q = nn.Linear(d, d)
            self.v = nn.Linear(d, d, bias=False)
            self.out = nn.Linear(d, d)

        def forward(self, x):
            h = self.norm(x)
            return x + self.out(torch.tanh(self.q(h)) * self.v(h))

    class Model(nn.Module):
        def __init__(self, d=16, blocks=2):
            super().__init__()
            self.blocks = nn.ModuleList(Block(d) for _ in range(blocks))
            self.head = nn.Linear(d, 5)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    model = lora_kernels.inject(Model(), ["q", "v"], r=4, lora_alpha=8)
    with torch.no_grad():
        for m in lora_kernels.adapters.lora_layers(model).values():
            m.lora_B.normal_(std=0.1)
    return model


def _llama(fuse=True):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    import lora_kernels.peft

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    base = LlamaForCausalLM(config)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))  # random B: non-trivial first step
    if fuse:
        _fuse_all(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def _fuse_all(model):
    import lora_kernels.peft
    lora_kernels.peft.fuse(model)
    report = lora_kernels.peft.fuse_report(model)
    assert len(report.fused) == 6 and not report.kept, str(report)


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _steps(model, batches, loss_fn, steps=2):
    import torch
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(steps):
        loss = loss_fn(model, batches[step])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    return losses


def _mse(model, batch):
    x, target = batch
    return ((model(x) - target) ** 2).mean()


def _lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def _compare_training(ref, model, ref_losses, losses, strip=""):
    import torch.distributed as dist
    import torch
    errors = {}
    for i, (a, b) in enumerate(zip(losses, ref_losses)):
        full = a.clone()
        dist.all_reduce(full)  # this rank's half-batch mean; the mean of the halves is the whole batch's
        errors[f"loss step {i + 1}"] = _rel(full / dist.get_world_size(), b)
    ref_params = _trainable(ref)
    params = {n.replace(strip, ""): p for n, p in _trainable(model).items()}
    for name, p in params.items():
        errors[f"{name} after 2 steps"] = _rel(_full(p.detach()), ref_params[name].detach())
    return errors, {"same trainable parameters": set(params) == set(ref_params) and bool(params)}


def _split(rank, world, *tensors):
    return tuple(t.chunk(world, 0)[rank] for t in tensors)


def _inject_data():
    import torch
    return [(torch.randn(8, 3, 16), torch.randn(8, 3, 5)) for _ in range(2)]


def _checkpoint_blocks(model):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for i, block in enumerate(model.blocks):
        model.blocks[i] = checkpoint_wrapper(block)  # non-reentrant by default


def _saved_adapter_errors(path, ref):
    """The adapter files (rank 0 wrote them) hold the reference's trained LoRA tensors, and load."""
    import copy
    import torch
    from safetensors.torch import load_file
    import lora_kernels
    tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
    errors = {}
    for name, p in _trainable(ref).items():
        errors[f"saved {name}"] = _rel(tensors[f"base_model.model.{name}.weight"], p)
    fresh = copy.deepcopy(ref)
    with torch.no_grad():
        for p in _trainable(fresh).values():
            p.normal_()
    lora_kernels.load_adapter(fresh, path)
    x = torch.randn(4, 3, 16)
    errors["reloaded adapter output"] = _rel(fresh(x), ref(x))
    return errors, len(tensors)


def _train_injected(rank, world, seed, wrap):
    """An injected model and its unsharded copy: the copy trains two steps on the whole batch,
    the model (checkpointed blocks, then `wrap`) on this rank's half."""
    import copy
    import torch
    torch.manual_seed(seed)
    model = _injected_model()
    ref = copy.deepcopy(model)
    data = _inject_data()
    ref_losses = _steps(ref, data, _mse)
    _checkpoint_blocks(model)
    wrapped, facts = wrap(model)
    losses = _steps(wrapped, [_split(rank, world, *b) for b in data], _mse)
    errors, more = _compare_training(ref, model, ref_losses, losses, strip="_checkpoint_wrapped_module.")
    facts.update(more)
    return wrapped, ref, errors, facts


def _save_on_rank0(rank, path, ref, errors, facts, save):
    """Rank 0 writes the adapter (save(path)); its files hold the reference's trained tensors."""
    import torch.distributed as dist
    if rank == 0:
        save(path)
        saved, count = _saved_adapter_errors(path, ref)
        errors.update(saved)
        facts["saved 4 layers x (A, B)"] = count == 8
    dist.barrier()
    return {"errors": errors, "facts": facts}


def check_fsdp2_inject(rank, world, out):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    import lora_kernels

    def shard(model):
        for block in model.blocks:
            fully_shard(block)
        fully_shard(model)
        facts = {"LoRA parameters sharded (DTensor)": all(isinstance(p, DTensor) for p in _trainable(model).values())}
        try:
            lora_kernels.save_adapter(model, os.path.join(out, "never"))
            facts["save_adapter refuses DTensors without state_dict"] = False
        except ValueError as e:
            facts["save_adapter refuses DTensors without state_dict"] = "state_dict=" in str(e)
        return model, facts

    model, ref, errors, facts = _train_injected(rank, world, 3, shard)
    merge_errors, merge_facts = _fsdp2_merge(model, ref)
    errors.update(merge_errors)
    facts.update(merge_facts)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return _save_on_rank0(rank, os.path.join(out, "fsdp2_inject_adapter"), ref, errors, facts,
                          lambda path: lora_kernels.save_adapter(model, path, state_dict=sd))


def _fsdp2_merge(model, ref):
    """Merge (exact) every sharded layer: the merged model's output is the reference's merged
    output, and the unmerge restores each rank's weight shard bit for bit."""
    import torch
    import lora_kernels
    layers, ref_layers = lora_kernels.adapters.lora_layers(model), lora_kernels.adapters.lora_layers(ref)
    x = torch.randn(4, 3, 16)
    with torch.no_grad():
        shards = {n: m.weight.to_local().clone() for n, m in layers.items()}
        for m in list(layers.values()) + list(ref_layers.values()):
            m.merge(exact_unmerge=True)
        y, y_ref = model(x), ref(x)
        merged = {n: m.weight.full_tensor() for n, m in layers.items()}
        ref_merged = {n: m.weight.clone() for n, m in ref_layers.items()}
        for m in list(layers.values()) + list(ref_layers.values()):
            m.unmerge()
    errors = {"merged output": _rel(y, y_ref)}
    errors.update({f"merged {n}.weight": _rel(merged[n], ref_merged[n]) for n in layers})
    facts = {f"{n}.weight shard restored bit for bit": torch.equal(m.weight.to_local(), shards[n])
             for n, m in layers.items()}
    return errors, facts


def check_ddp_inject(rank, world, out):
    from torch.nn.parallel import DistributedDataParallel as DDP
    import lora_kernels

    ddp, ref, errors, facts = _train_injected(rank, world, 4, lambda model: (DDP(model), {}))
    # the DDP wrapper itself: PEFT's names, without "module." or the checkpoint wrapper's component
    return _save_on_rank0(rank, os.path.join(out, "ddp_inject_adapter"), ref, errors, facts,
                          lambda path: lora_kernels.save_adapter(ddp, path))


def _llama_data():
    import torch
    return [torch.randint(0, 64, (4, 12)) for _ in range(2)]


def check_fsdp2_llama(rank, world, out):
    import copy
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(5)
    model = _llama(fuse=False)
    ref = copy.deepcopy(model)
    _fuse_all(ref)
    data = _llama_data()
    ref_losses = _steps(ref, data, _lm_loss)
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    _fuse_all(model)  # after sharding: the weights are DTensors now, plain again inside forward
    losses = _steps(model, [_split(rank, world, b)[0] for b in data], _lm_loss)
    errors, facts = _compare_training(ref, model, ref_losses, losses)
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    path = os.path.join(out, "fsdp2_llama_adapter")
    if rank == 0:
        model.save_pretrained(path, state_dict=sd)  # PEFT's own writer, from the gathered tensors
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        for name, p in _trainable(ref).items():
            errors[f"saved {name}"] = _rel(tensors[name.replace(".default", "")], p)
        facts["saved 6 layers x (A, B)"] = len(tensors) == 12
    dist.barrier()
    return {"errors": errors, "facts": facts}


def check_ddp_llama(rank, world, out):
    import copy
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(6)
    model = _llama()
    ref = copy.deepcopy(model)
    data = _llama_data()
    ref_losses = _steps(ref, data, _lm_loss)
    ddp = DDP(model)
    losses = _steps(ddp, [_split(rank, world, b)[0] for b in data], _lm_loss)
    return dict(zip(("errors", "facts"), _compare_training(ref, model, ref_losses, losses)))


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import datetime
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
    mesh = init_device_mesh("cpu", (world,))
    checks = {
        "tp_torch": lambda: check_tp(mesh, "torch", out),
        "tp_triton": lambda: check_tp(mesh, "triton", out),
        "tp_merge": lambda: check_tp_merge(mesh),
        "tp_dropout": lambda: check_tp_dropout(mesh),
        "tp_fsdp2": lambda: check_tp_fsdp2(world),
        "fsdp2_inject": lambda: check_fsdp2_inject(rank, world, out),
        "ddp_inject": lambda: check_ddp_inject(rank, world, out),
        "fsdp2_llama": lambda: check_fsdp2_llama(rank, world, out),
        "ddp_llama": lambda: check_ddp_llama(rank, world, out),
    }
    only = os.environ.get("LORA_KERNELS_DIST_CHECKS")  # debugging: a comma-separated subset
    found = {}
    for name, run in checks.items():
        if only and name not in only.split(","):
            continue
        start = time.perf_counter()
        try:
            found[name] = run()
        except Exception:
            found[name] = {"failed": traceback.format_exc()}
        found[name]["seconds"] = round(time.perf_counter() - start, 2)
        print(f"rank {rank}: {name}: {found[name]['seconds']} s", flush=True)
        dist.barrier()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(found, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tolerances.py
    _worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
