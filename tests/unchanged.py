"""Snapshots for bad-input tests: "nothing changed" means bit for bit.

``snapshot(obj)`` records a tensor (its bytes, shape, strides, dtype, device, requires_grad), a
module (its submodules' names and types, every parameter and buffer as a tensor, requires_grad, and
a LoRA layer's hyper-parameters), a directory (every file's bytes), or a list / tuple / dict of
those; ``assert_unchanged(obj, snap)`` compares. Bytes, not values, so NaN payloads and the sign of
zero count too.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

_LAYER_ATTRS = ("r", "lora_alpha", "lora_dropout", "use_rslora", "scaling", "merged", "backend")


def _tensor_bytes(t: torch.Tensor):
    if t.is_meta:
        return None
    return t.detach().cpu().reshape(-1).contiguous().view(torch.uint8).clone()


def snapshot(obj):
    if isinstance(obj, torch.Tensor):
        return ("tensor", _tensor_bytes(obj), tuple(obj.shape), tuple(obj.stride()), obj.dtype, obj.device,
                obj.requires_grad)
    if isinstance(obj, nn.Module):
        mods = [(n, type(m).__name__, tuple(getattr(m, a, None) for a in _LAYER_ATTRS))
                for n, m in obj.named_modules(remove_duplicate=False)]
        tensors = [(n, snapshot(t)) for n, t in obj.named_parameters(remove_duplicate=False)]
        tensors += [(n, snapshot(t)) for n, t in obj.named_buffers(remove_duplicate=False)]
        return ("module", mods, tensors)
    if isinstance(obj, (str, Path)) and os.path.isdir(obj):
        files = {}
        for root, _, names in os.walk(obj):
            for name in names:
                p = os.path.join(root, name)
                with open(p, "rb") as f:
                    files[os.path.relpath(p, obj)] = f.read()
        return ("dir", files)
    if isinstance(obj, (list, tuple)):
        return ("seq", [snapshot(o) for o in obj])
    if isinstance(obj, dict):
        return ("dict", {k: snapshot(v) for k, v in obj.items()})
    return ("value", repr(obj))


def _equal(a, b) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, float) and a != a:
        return b != b
    return a == b


def assert_unchanged(obj, snap, what: str = "input") -> None:
    now = snapshot(obj)
    assert _equal(now, snap), f"{what} changed by a call that failed"
