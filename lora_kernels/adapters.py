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

import contextlib
import json
import os
import re
from collections import Counter
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn

from ._validation import FLOAT_DTYPES, check_probability, check_scale, fail
from .backends import BACKENDS
from .layers import FusedLoRALinear, _check_hparams, lora_scaling

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix: PeftModel.base_model (LoraModel).model
_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.(?P<which>lora_A|lora_B)\.weight$")
_16BIT = (torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------------------------
# inject
# ---------------------------------------------------------------------------------------------

ALL_LINEAR = "all-linear"  # PEFT's shorthand (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND)


def _matches(name: str, target_modules: Union[str, Sequence[str]]) -> bool:
    """PEFT's rule: a string is a regex that must match the whole module name; a list matches a
    name equal to an entry or ending in "." + entry."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_regex(op: str, what: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as e:
        fail(op, f"{what} {pattern!r} is not a valid regular expression ({e})")


def _all_linear(model: nn.Module) -> List[str]:
    """PEFT's "all-linear" (tuners_utils._maybe_include_all_linear_layers): every linear layer
    except the output head -- the module ``model.get_output_embeddings()`` returns, when the model
    has that method (transformers models). Here "linear" means exactly ``nn.Linear`` (PEFT also
    takes transformers' Conv1D and nn.Linear subclasses, which FusedLoRALinear cannot replace);
    layers that already hold an adapter are skipped."""
    head = None
    get_head = getattr(model, "get_output_embeddings", None)
    if callable(get_head):
        head = get_head()
    return [n for n, m in model.named_modules() if n and type(m) is nn.Linear and m is not head]


def _target_names(op: str, model: nn.Module, target_modules) -> List[str]:
    """The module names `target_modules` selects (PEFT's rules), after checking its type and regexes."""
    if isinstance(target_modules, str):
        if target_modules.lower() == ALL_LINEAR:
            return _all_linear(model)
        _check_regex(op, "target_modules", target_modules)
        return [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]
    if isinstance(target_modules, (bytes, dict)) or not isinstance(target_modules, Iterable):
        fail(op, f"target_modules must be a regex string, 'all-linear' or a non-empty list of names, "
                 f"got {type(target_modules).__name__}", TypeError)
    target_modules = list(target_modules)
    if not target_modules or not all(isinstance(t, str) for t in target_modules):
        fail(op, f"target_modules must be a regex string, 'all-linear' or a non-empty list of names, "
                 f"got {target_modules!r}", TypeError)
    return [n for n, _ in model.named_modules() if n and _matches(n, target_modules)]


@contextlib.contextmanager
def _restore_requires_grad_on_error(model: nn.Module):
    """Building FusedLoRALinear layers freezes the weights they share: if anything fails before
    the model is changed, every parameter gets its requires_grad back."""
    before = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in before:
            p.requires_grad_(flag)
        raise


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


def _check_target(op: str, name: str, module: nn.Module, why: str = "matches target_modules") -> None:
    if isinstance(module, FusedLoRALinear):
        fail(op, f"module {name!r} already holds a LoRA adapter (FusedLoRALinear)")
    if type(module) is not nn.Linear:  # a subclass may compute something else in its forward
        fail(op, f"module {name!r} {why} but is an instance of {type(module).__name__}, not nn.Linear")


def _new_layer(op: str, name: str, module: nn.Module, r: int, lora_alpha: float, lora_dropout: float,
               use_rslora: bool, adapter_dtype: Optional[torch.dtype], backend: str) -> FusedLoRALinear:
    _check_target(op, name, module)
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

    target_modules: PEFT's rule -- a regex string matched against the whole module name, a list
    of names matched exactly or as the name's last dotted components ("q_proj" matches
    "model.layers.0.self_attn.q_proj"), or PEFT's "all-linear": every ``nn.Linear`` except the
    output head (``model.get_output_embeddings()``). A matching module that is not an
    ``nn.Linear`` is an error, and so is matching nothing. adapter_dtype: default float32 over a
    float16/bfloat16 base (PEFT's default), else the base's dtype. Every argument and every
    matched module is checked before the model changes; on an error the model (modules,
    parameters' requires_grad) is as it was. Returns `model`.
    """
    op = "inject"
    if not isinstance(model, nn.Module):
        fail(op, f"model must be an nn.Module, got {type(model).__name__}", TypeError)
    names = _target_names(op, model, target_modules)
    if not names:
        fail(op, f"target_modules {target_modules!r} matched no module of {type(model).__name__}")
    for n in names:
        module = model.get_submodule(n)
        _check_target(op, n, module)
        _check_hparams(op, r, lora_alpha, lora_dropout, use_rslora, adapter_dtype, backend,
                       module.in_features, module.out_features)
    with _restore_requires_grad_on_error(model):  # building layers freezes their weights
        new = {n: _new_layer(op, n, model.get_submodule(n), r, lora_alpha, lora_dropout, use_rslora,
                             adapter_dtype, backend) for n in names}
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
    path = _check_path(op, path)
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


def _check_path(op: str, path) -> str:
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        fail(op, f"path must be a directory path (str or os.PathLike), got {type(path).__name__}", TypeError)
    return os.fspath(path)


def _read_config(op: str, cfg_path: str) -> Dict:
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        fail(op, f"{cfg_path} is not valid JSON ({e})")
    if not isinstance(config, dict):
        fail(op, f"{cfg_path} must hold a JSON object (PEFT's LoraConfig), got a JSON {type(config).__name__}")
    return config


def _config_value(op: str, cfg_path: str, key: str, value, kind: str):
    """One config number, checked as the layer will use it: r a positive int, lora_alpha a finite
    number, lora_dropout in [0, 1); the error names the file and the field (`key`)."""
    try:
        if kind == "r":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                fail(op, f"{key} must be a positive int, got {value!r}")
        elif kind == "alpha":
            check_scale(op, key, value)
        else:
            check_probability(op, key, value)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{op}: {cfg_path}: {str(e)[len(op) + 2:]}") from None
    return value


def _check_patterns(op: str, cfg_path: str, config: Dict, key: str, kind: str) -> Dict:
    patterns = config.get(key) or {}
    if not isinstance(patterns, dict):
        fail(op, f"{cfg_path}: {key} must be a JSON object (module pattern -> value), got {type(patterns).__name__}")
    for p, v in patterns.items():
        _check_regex(op, f"{cfg_path}: {key} key", p)
        _config_value(op, cfg_path, f"{key}[{p!r}]", v, kind)
    return patterns


def _read(path: str):
    from safetensors.torch import load_file

    op = "load_adapter"
    path = _check_path(op, path)
    cfg_path, w_path = os.path.join(path, CONFIG_NAME), os.path.join(path, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            fail(op, f"{p} not found (a PEFT adapter directory holds {CONFIG_NAME} and {WEIGHTS_NAME})",
                 FileNotFoundError)
    config = _read_config(op, cfg_path)
    if config.get("peft_type") != "LORA":
        fail(op, f"{cfg_path}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    for key in _MUST_BE_OFF:
        if config.get(key):
            fail(op, f"{cfg_path}: {key}={config[key]!r} is not supported without PEFT (load it with PEFT)")
    if config.get("bias", "none") != "none":
        fail(op, f"{cfg_path}: bias={config['bias']!r} (trained base biases) is not supported without PEFT")
    # every number the layers will take, checked now (PEFT's defaults where a field is absent)
    hp = {"r": _config_value(op, cfg_path, "r", config.get("r", 8), "r"),
          "lora_alpha": _config_value(op, cfg_path, "lora_alpha", config.get("lora_alpha", 8), "alpha"),
          "lora_dropout": float(_config_value(op, cfg_path, "lora_dropout", config.get("lora_dropout", 0.0),
                                              "dropout")),
          "rank_pattern": _check_patterns(op, cfg_path, config, "rank_pattern", "r"),
          "alpha_pattern": _check_patterns(op, cfg_path, config, "alpha_pattern", "alpha")}
    use_rslora = config.get("use_rslora", False)
    if not isinstance(use_rslora, bool):
        fail(op, f"{cfg_path}: use_rslora must be true or false, got {use_rslora!r}")
    hp["use_rslora"] = use_rslora
    try:
        tensors = load_file(w_path)
    except Exception as e:  # safetensors raises its own SafetensorError (and OSError) on bad files
        fail(op, f"{w_path} is not a readable safetensors file ({type(e).__name__}: {e})")
    per_module: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            fail(op, f"{w_path}: key {key!r} is not a plain LoRA weight "
                     f"(expected {PREFIX}<module path>.lora_A.weight / .lora_B.weight)")
        if t.dtype not in FLOAT_DTYPES:
            fail(op, f"{w_path}: {key} has dtype {str(t.dtype).replace('torch.', '')}, not a float dtype",
                 TypeError)
        per_module.setdefault(m["path"], {})[m["which"]] = t
    for name, pair in per_module.items():
        if set(pair) != {"lora_A", "lora_B"}:
            fail(op, f"{w_path}: module {name!r} has {sorted(pair)} but needs both lora_A and lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
            fail(op, f"{w_path}: module {name!r}: lora_A {list(a.shape)} and lora_B {list(b.shape)} "
                     f"are not [r, in] and [out, r]")
    if not per_module:
        fail(op, f"{w_path} holds no LoRA weights")
    return hp, per_module


def load_adapter(model: nn.Module, path: str, *, backend: str = "auto") -> nn.Module:
    """Load the PEFT LoRA adapter in directory `path` into `model`, in place.

    Each module named in the file becomes (if it is an ``nn.Linear``) or must already be (if it
    is a ``FusedLoRALinear`` of that rank) a LoRA layer, and receives the file's lora_A [r, in] and
    lora_B [out, r]; its scaling comes from the config (``lora_alpha`` / ``alpha_pattern``,
    ``use_rslora``), as PEFT computes it. As with ``inject``, only LoRA parameters train afterwards.
    Everything (the files, every config value, keys, shapes, the modules) is checked before the
    model is changed: on an error no module, adapter or requires_grad has changed. Returns `model`.
    """
    op = "load_adapter"
    if not isinstance(model, nn.Module):
        fail(op, f"model must be an nn.Module, got {type(model).__name__}", TypeError)
    if not isinstance(backend, str) or backend not in BACKENDS:
        fail(op, f"backend must be one of {BACKENDS}, got {backend!r}")
    hp, per_module = _read(path)
    use_rslora, dropout = hp["use_rslora"], hp["lora_dropout"]
    plan = {}
    for name, pair in per_module.items():
        a, b = pair["lora_A"], pair["lora_B"]
        r = a.shape[0]
        r_config = _pattern_value(hp["rank_pattern"], name, hp["r"])
        if r != r_config:
            fail(op, f"module {name!r}: the file's lora_A has rank {r} but the config says r={r_config}")
        alpha = _pattern_value(hp["alpha_pattern"], name, hp["lora_alpha"])
        try:
            module = model.get_submodule(name)
        except AttributeError:
            fail(op, f"the adapter has weights for module {name!r}, which {type(model).__name__} does not have")
        if isinstance(module, FusedLoRALinear):
            if module.merged:
                fail(op, f"module {name!r} is merged; unmerge it before loading another adapter into it")
            if module.r != r:
                fail(op, f"module {name!r} is a FusedLoRALinear of rank {module.r}, the adapter's is {r}")
        else:
            _check_target(op, name, module, "has weights in the adapter")
            _check_hparams(op, r, alpha, dropout, use_rslora, None, backend, module.in_features,
                           module.out_features)
        shape_a, shape_b = (r, module.in_features), (module.out_features, r)
        if tuple(a.shape) != shape_a or tuple(b.shape) != shape_b:
            fail(op, f"module {name!r}: the file's lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                     f"the layer ([r, in] = {list(shape_a)}, [out, r] = {list(shape_b)})")
        plan[name] = (module, a, b, alpha, lora_scaling(r, alpha, use_rslora))
    # Everything is checked: build the new layers (restoring requires_grad if that fails) ...
    with _restore_requires_grad_on_error(model):
        layers = {name: _new_layer(op, name, module, a.shape[0], alpha, dropout, use_rslora, None, backend)
                  for name, (module, a, b, alpha, _) in plan.items() if not isinstance(module, FusedLoRALinear)}
    # ... then change the model, with nothing left that can fail.
    for name, (module, a, b, alpha, scaling) in plan.items():
        if name in layers:
            module = layers[name]
            _replace(model, name, module)
        else:  # an existing layer takes the file's hyper-parameters, as PEFT's load would
            module.lora_alpha, module.use_rslora, module.lora_dropout = alpha, use_rslora, dropout
            module.scaling = scaling
        with torch.no_grad():
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    _freeze_all_but_lora(model)
    return model
