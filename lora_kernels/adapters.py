"""LoRA without PEFT: put FusedLoRALinear into any model, and read/write PEFT's adapter files.

    lora_kernels.inject(model, ["q_proj", "v_proj"], r=16, lora_alpha=32)
    lora_kernels.save_adapter(model, "out/")      # adapter_config.json + adapter_model.safetensors
    lora_kernels.load_adapter(other_model, "out/")

The files are PEFT's on-disk format (PEFT 0.21 ``save_pretrained`` of a LoRA model), so an adapter
saved here loads with ``PeftModel.from_pretrained(base, "out/")`` and one saved by PEFT loads here:
tensors ``base_model.model.<module path>.lora_A.weight`` [r, in] and ``...lora_B.weight`` [out, r]
in ``adapter_model.safetensors``; ``r``, ``lora_alpha``, ``rank_pattern``, ``alpha_pattern``,
``use_rslora``, ``lora_dropout`` and ``target_modules`` in ``adapter_config.json``. Module paths
are relative to the model given (PEFT's are relative to the model it wrapped: use the same model
class on both sides).

Covered: plain LoRA on ``nn.Linear``. Adapters that need more (DoRA, lora_bias, Conv1D /
fan_in_fan_out, modules_to_save, layers_to_transform, other PEFT methods) are refused with the
reason, never loaded partially.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._validation import fail
from .layers import FusedLoRALinear, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_16BIT = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------

def _matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a
    name equal to an entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _default_adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """PEFT's default (autocast_adapter_dtype=True): fp32 adapters over a 16-bit base."""
    return torch.float32 if weight.dtype in _16BIT else weight.dtype


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def _freeze_all_but_lora(model: nn.Module) -> None:
    """As PEFT: only the adapters train."""
    lora = {id(p) for m in model.modules() if isinstance(m, FusedLoRALinear) for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)


def _new_layer(op: str, name: str, module: nn.Module, r: int, lora_alpha: float, lora_dropout: float,
               use_rslora: bool, adapter_dtype: Optional[torch.dtype], backend: str) -> FusedLoRALinear:
    if isinstance(module, FusedLoRALinear):
        fail(op, f"module {name!r} already holds a LoRA adapter (FusedLoRALinear)")
    if type(module) is not nn.Linear:  # a subclass may compute something else in its forward
        fail(op, f"module {name!r} matches target_modules but is an instance of {type(module).__name__}, not nn.Linear")
    return FusedLoRALinear.from_linear(module, r, lora_alpha, lora_dropout, use_rslora,
                                       adapter_dtype=adapter_dtype or _default_adapter_dtype(module.weight),
                                       backend=backend)


def inject(model: nn.Module, target_modules: Union[str, Sequence[str]], r: int, lora_alpha: float = 8,
           lora_dropout: float = 0.0, use_rslora: bool = False, *,
           adapter_dtype: Optional[torch.dtype] = None, backend: str = "auto") -> nn.Module:
    """In place: every ``nn.Linear`` of `model` whose name matches `target_modules` becomes a
    ``FusedLoRALinear`` sharing its weight and bias; then, as PEFT, only the LoRA parameters train.

    Per matched layer (weight [N, K] frozen; lora_A [r, K] kaiming-uniform, lora_B [N, r] zeros)::

        y = x @ weight.T + bias + s * (dropout(x) @ lora_A.T) @ lora_B.T
        s = lora_alpha / r                 (lora_alpha / sqrt(r) with use_rslora)

    target_modules: PEFT's rule -- a regex string matched against the whole module name, or a
    list of names matched exactly or as the name's last dotted components ("q_proj" matches
    "model.layers.0.self_attn.q_proj"). A matching module that is not an ``nn.Linear`` is an
    error, and so is matching nothing. adapter_dtype: default float32 over a float16/bfloat16 base
    (PEFT's default), else the base's dtype. Returns `model`.
    """
    op = "inject"
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
        if not target_modules or not all(isinstance(t, str) for t in target_modules):
            fail(op, f"target_modules must be a regex string or a non-empty list of names, got {target_modules!r}", TypeError)
    names = [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]
    if not names:
        fail(op, f"target_modules {target_modules!r} matched no module of {type(model).__name__}")
    new = {n: _new_layer(op, n, model.get_submodule(n), r, lora_alpha, lora_dropout, use_rslora,
                         adapter_dtype, backend) for n in names}  # every check before any change
    for n, layer in new.items():
        _replace(model, n, layer)
    _freeze_all_but_lora(model)
    return model


# Module-path components that wrappers insert and that PEFT's (and torch's state_dict) names omit:
# torch's checkpoint_wrapper (activation checkpointing) and torch.compile's OptimizedModule.
_WRAPPER_COMPONENTS = ("_checkpoint_wrapped_module.", "_orig_mod.")


def _clean_path(name: str) -> str:
    for component in _WRAPPER_COMPONENTS:
        name = name.replace(component, "")
    return name


def _unwrap(model: nn.Module) -> nn.Module:
    """The model a DistributedDataParallel (or DataParallel) wrapper holds, else `model`."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def lora_layers(model: nn.Module) -> Dict[str, FusedLoRALinear]:
    """Module path -> FusedLoRALinear, for every adapter layer of `model` (paths as PEFT and
    ``state_dict`` name them: without DDP's ``module.``, checkpoint_wrapper's or torch.compile's
    components)."""
    return {_clean_path(n): m for n, m in _unwrap(model).named_modules() if isinstance(m, FusedLoRALinear)}


# ---------------------------------------------------------------------------------------------
# save
# ---------------------------------------------------------------------------------------------

def _one(op: str, what: str, values: Iterable):
    found = set(values)
    if len(found) > 1:
        fail(op, f"all LoRA layers must share one {what} to be written as a PEFT config, found {sorted(found)}")
    return found.pop()


def _target_modules(model: nn.Module, layers: Sequence[str]) -> List[str]:
    """The layers' last name components, when those select exactly these layers in PEFT's
    matching; the full paths otherwise."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    selected = {_clean_path(n) for n, _ in _unwrap(model).named_modules() if n and _matches(n, leaves)}
    return leaves if selected == set(layers) else sorted(layers)


def peft_config(model: nn.Module) -> Dict:
    """The adapter_config.json PEFT writes for the LoRA layers of `model` (most common rank and
    alpha as r / lora_alpha, the others in rank_pattern / alpha_pattern by full module path)."""
    op = "save_adapter"
    layers = lora_layers(model)
    if not layers:
        fail(op, f"{type(model).__name__} holds no FusedLoRALinear layer (use lora_kernels.inject first)")
    r = Counter(m.r for m in layers.values()).most_common(1)[0][0]
    alpha = Counter(m.lora_alpha for m in layers.values()).most_common(1)[0][0]
    return {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": None,
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {n: m.r for n, m in layers.items() if m.r != r},
        "alpha_pattern": {n: m.lora_alpha for n, m in layers.items() if m.lora_alpha != alpha},
        "lora_dropout": _one(op, "lora_dropout", (m.lora_dropout for m in layers.values())),
        "use_rslora": _one(op, "use_rslora", (bool(m.use_rslora) for m in layers.values())),
        "target_modules": _target_modules(model, list(layers)),
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "use_dora": False,
        "lora_bias": False,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
    }


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor"  # no torch.distributed import for the common case


def _adapter_tensor(op: str, key: str, param: torch.Tensor, state_dict: Optional[Mapping]) -> torch.Tensor:
    if state_dict is not None:
        if key not in state_dict:
            fail(op, f"state_dict has no entry {key!r} (pass the model's full state dict, e.g. "
                     f"torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                     f"options=StateDictOptions(full_state_dict=True, cpu_offload=True)))", KeyError)
        t = state_dict[key]
        if _is_dtensor(t):
            fail(op, f"state_dict[{key!r}] is a sharded DTensor; pass a full state dict "
                     f"(StateDictOptions(full_state_dict=True))")
        if tuple(t.shape) != tuple(param.shape):
            fail(op, f"state_dict[{key!r}] has shape {list(t.shape)}, the layer's parameter {list(param.shape)}")
        return t.detach().contiguous().cpu()
    if _is_dtensor(param):
        fail(op, f"{key} is a DTensor (sharded by FSDP2 or tensor parallelism): gather it on every rank with "
                 f"sd = torch.distributed.checkpoint.state_dict.get_model_state_dict(model, "
                 f"options=StateDictOptions(full_state_dict=True, cpu_offload=True)), then call "
                 f"save_adapter(model, path, state_dict=sd) on rank 0")
    return param.detach().contiguous().cpu()


def save_adapter(model: nn.Module, path: str, *, state_dict: Optional[Mapping[str, torch.Tensor]] = None) -> None:
    """Write the LoRA layers of `model` to directory `path` in PEFT's format: ``adapter_config.json``
    and ``adapter_model.safetensors`` with keys ``base_model.model.<module path>.lora_A.weight``
    ([r, in]) and ``...lora_B.weight`` ([out, r]), in the adapters' dtype.

    `model` may be wrapped (DDP, activation checkpointing, torch.compile: PEFT's paths omit the
    wrappers). Its parameters may be sharded (FSDP2, tensor parallelism): then pass `state_dict`, the
    model's full state dict (keys ``<module path>.lora_A`` / ``.lora_B``, as ``state_dict()`` and
    torch's ``get_model_state_dict`` name them), gathered on every rank, and call this on one rank::

        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            lora_kernels.save_adapter(model, "out/", state_dict=sd)
    """
    from safetensors.torch import save_file

    op = "save_adapter"
    config = peft_config(model)
    tensors = {}
    for name, m in lora_layers(model).items():
        for which in ("lora_A", "lora_B"):
            tensors[f"{PREFIX}{name}.{which}.weight"] = _adapter_tensor(op, f"{name}.{which}", getattr(m, which),
                                                                        state_dict)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------

# PEFT config fields that change what an adapter computes or holds: loadable only when off
# (None / False / empty). Anything else is refused with the field named.
_MUST_BE_OFF = ("use_dora", "lora_bias", "fan_in_fan_out", "modules_to_save", "layers_to_transform",
                "trainable_token_indices", "target_parameters", "layer_replication",
                "alora_invocation_tokens", "use_bdlora", "arrow_config", "velora_config",
                "monteclora_config", "kasa_config", "use_qalora")


def _pattern_value(patterns: Dict, name: str, default):
    """PEFT's get_pattern_key: the first pattern p with re.match(rf"(.*\\.)?({p})$", name)."""
    for p, value in patterns.items():
        if re.match(rf"(.*\.)?({p})$", name):
            return value
    return default


def _read(path: str):
    from safetensors.torch import load_file

    op = "load_adapter"
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            fail(op, f"{p} not found (a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})",
                 FileNotFoundError)
    with open(cfg_path) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        fail(op, f"{cfg_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key in _MUST_BE_OFF:
        if config.get(key):
            fail(op, f"{cfg_path}: {key}={config[key]!r} is not supported without PEFT (load it with PEFT)")
    if config.get("bias", "none") != "none":
        fail(op, f"{cfg_path}: bias={config['bias']!r} (trained base biases) is not supported without PEFT")
    tensors = load_file(w_path)
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            fail(op, f"{w_path}: key {key!r} is not a plain LoRA weight "
                     f"(expected {PREFIX}<module path>.lora_A.weight / .lora_B.weight)")
        per_module.setdefault(m["path"], {})[m["which"]] = t
    for name, pair in per_module.items():
        if set(pair) != {"lora_A", "lora_B"}:
            fail(op, f"{w_path}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            fail(op, f"{w_path}: module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                     f"are not [r, in] and [out, r]")
    return config, per_module


def load_adapter(model: nn.Module, path: str, *, backend: str = "auto") -> nn.Module:
    """Load the PEFT LoRA adapter in directory `path` into `model`, in place.

    Each module named in the file becomes (if it is an ``nn.Linear``) or must already be (if it
    is a ``FusedLoRALinear`` of that rank) a LoRA layer, and receives the file's lora_A [r, in] and
    lora_B [out, r]; its scaling comes from the config (``lora_alpha`` / ``alpha_pattern``,
    ``use_rslora``), as PEFT computes it. As with ``inject``, only LoRA parameters train afterwards.
    Everything is checked (keys, shapes, config) before the model is changed. Returns `model`.
    """
    op = "load_adapter"
    config, per_module = _read(path)
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    use_rslora, dropout = bool(config.get("use_rslora", False)), float(config.get("lora_dropout", 0.0))
    plan = {}
    for name, pair in per_module.items():
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[0]
        r_config = _pattern_value(config.get("rank_pattern") or {}, name, r_default)
        if r != r_config:
            fail(op, f"module {name!r}: the file's lora_A has rank {r} but the config says r={r_config}")
        alpha = _pattern_value(config.get("alpha_pattern") or {}, name, alpha_default)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            fail(op, f"the adapter has weights for module {name!r}, which {type(model).__name__} does not have")
        if isinstance(module, FusedLoRALinear):
            if module.merged:
                fail(op, f"module {name!r} is merged; unmerge it before loading another adapter into it")
            if module.r != r:
                fail(op, f"module {name!r} is a FusedLoRALinear of rank {module.r}, the adapter's is {r}")
            layer = None
        else:
            layer = _new_layer(op, name, module, r, alpha, dropout, use_rslora, None, backend)
            module = layer
        shape_a, shape_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != shape_a or tuple(b.shape) != shape_b:
            fail(op, f"module {name!r}: the file's lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                     f"the layer ([r, in] = {list(shape_a)}, [out, r] = {list(shape_b)})")
        plan[name] = (module, layer, a, b, alpha)
    for name, (module, layer, a, b, alpha) in plan.items():
        if layer is not None:
            _replace(model, name, layer)
        else:  # an existing layer takes the file's hyper-parameters, as PEFT's load would
            module.lora_alpha, module.use_rslora, module.lora_dropout = alpha, use_rslora, dropout
            module.scaling = lora_scaling(module.r, alpha, use_rslora)
        with torch.no_grad():
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    _freeze_all_but_lora(model)
    return model
