"""Runs the CUDA in-place merge kernel source (csrc/merge/merge.cuh) on the host emulator (run_merge.cpp).

Each tensor is written as its own allocation, exactly as long as the tensor's extent (a read or
write past it is a fault in the emulator), with NaN (int8: 0) in the gaps between rows. The
emulator counts, per byte, the stores into every writable allocation and the streaming reads of
W and the codes, so "each element read once and written once, nothing else touched" is checked.
The launch parameters come from the launcher's own make_merge_params (csrc/merge/merge_plan.h).
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch

from . import emulator
from .driver import _pack

MODE_APPLY, MODE_COUNT_NONFINITE, MODE_MERGE_EXACT, MODE_UNMERGE_EXACT = 0, 1, 2, 3  # csrc/merge/merge_plan.h
WTYPE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def build(out_dir: Path) -> Path:
    """Compile the emulator (about 10 s); returns the executable. -ffp-contract=off: the host
    compiler must not fuse what the kernel rounds separately (the GPU code uses _rn intrinsics)."""
    return emulator.build("run_merge", out_dir, ["-ffp-contract=off"])


@dataclass
class Counts:
    """Per element of a 2-D view: min and max over its bytes of how often each byte was touched,
    and the touches of bytes outside the view's elements (gaps between rows, lead)."""
    min: torch.Tensor
    max: torch.Tensor
    stray: int

    def exactly(self, n: int) -> bool:
        return self.min.numel() == 0 or (int(self.min.min()) == n and int(self.max.max()) == n)


@dataclass
class MergeRun:
    weight: torch.Tensor                  # the weight after the launch, as given (same shape, strides)
    codes: Optional[torch.Tensor]
    escape_index: Optional[torch.Tensor]
    escape_value: Optional[torch.Tensor]
    status: Optional[torch.Tensor]
    w_stores: Counts
    w_reads: Counts
    code_stores: Optional[Counts]
    code_reads: Optional[Counts]
    plan: Dict[str, int]


def _view(flat: torch.Tensor, lead: int, like: torch.Tensor) -> torch.Tensor:
    if like.numel() == 0:
        return flat.new_empty(like.shape)
    return flat[lead:].as_strided(like.shape, like.stride()).clone()


def _counts(raw: torch.Tensor, lead: int, like: torch.Tensor) -> Counts:
    eb = like.element_size()
    if like.numel() == 0:
        empty = raw.new_empty((*like.shape,))
        return Counts(empty, empty, int(raw.sum()))
    per_byte = raw[lead * eb:].as_strided((*like.shape, eb), (like.stride(0) * eb, like.stride(1) * eb, 1))
    return Counts(per_byte.amin(-1), per_byte.amax(-1), int(raw.sum()) - int(per_byte.sum()))


def run(exe: Path, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, *,
        mode: int = MODE_APPLY, fan_in_fan_out: bool = False, subtract: bool = False, gated: bool = False,
        status: Optional[torch.Tensor] = None, codes: Optional[torch.Tensor] = None,
        escape_index: Optional[torch.Tensor] = None, escape_value: Optional[torch.Tensor] = None,
        num_sms: int = 2, ctas_per_sm: int = 2, seed: int = 0, leads: Optional[Dict[str, int]] = None) -> MergeRun:
    """Emulate one launch of the merge kernel on CPU tensors (any strides, as the op passes them).
    `leads` = element offsets of weight ("w"), lora_a ("a"), lora_b ("b"), codes ("c") in their
    allocations (misaligned starts). num_sms x ctas_per_sm is the grid's wave (fewer CTAs than
    tiles: each CTA walks a range of tiles)."""
    leads = leads or {}
    assert weight.dtype in WTYPE and lora_a.dtype == lora_b.dtype
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        blobs = {"w": _pack(weight, leads.get("w", 0)), "a": _pack(lora_a, leads.get("a", 0)),
                 "b": _pack(lora_b, leads.get("b", 0))}
        if codes is not None:
            blobs["codes"] = _pack(codes, leads.get("c", 0))
        for name, t in (("esc_index", escape_index), ("esc_value", escape_value), ("status", status)):
            if t is not None:
                blobs[name] = (t.contiguous().view(torch.uint8).numpy().tobytes(), 0)
        for name, (data, _) in blobs.items():
            (d / f"{name}.bin").write_bytes(data)
        params = {
            "wtype": WTYPE[weight.dtype], "adapter_fp32": int(lora_a.dtype == torch.float32),
            "rows": weight.shape[0], "cols": weight.shape[1], "s0": weight.stride(0), "s1": weight.stride(1),
            "fan_in_fan_out": int(fan_in_fan_out), "w_off": blobs["w"][1],
            "a_s0": lora_a.stride(0), "a_s1": lora_a.stride(1), "a_off": blobs["a"][1],
            "b_s0": lora_b.stride(0), "b_s1": lora_b.stride(1), "b_off": blobs["b"][1], "rank": lora_a.shape[0],
            "has_codes": int(codes is not None),
            "c_s0": codes.stride(0) if codes is not None else 0, "c_s1": codes.stride(1) if codes is not None else 0,
            "c_off": blobs["codes"][1] if codes is not None else 0,
            "has_escapes": int(escape_index is not None), "has_status": int(status is not None),
            "scale": repr(float(scale)), "mode": mode, "subtract": int(subtract), "gated": int(gated),
            "num_sms": num_sms, "ctas_per_sm": ctas_per_sm, "seed": seed,
        }
        plan = emulator.run(exe, d, params, timeout=600)
        w_lead = blobs["w"][1]
        out_weight = _view(emulator.read(d / "w_out.bin", weight.dtype), w_lead, weight)
        w_stores = _counts(emulator.read(d / "w_stores.bin", torch.uint8), w_lead, weight)
        w_reads = _counts(emulator.read(d / "w_reads.bin", torch.uint8), w_lead, weight)
        out_codes = code_stores = code_reads = None
        if codes is not None:
            c_lead = blobs["codes"][1]
            out_codes = _view(emulator.read(d / "codes_out.bin", torch.int8), c_lead, codes)
            code_stores = _counts(emulator.read(d / "codes_stores.bin", torch.uint8), c_lead, codes)
            code_reads = _counts(emulator.read(d / "codes_reads.bin", torch.uint8), c_lead, codes)
        out_index = emulator.read(d / "esc_index_out.bin", torch.int64) if escape_index is not None else None
        out_value = emulator.read(d / "esc_value_out.bin", weight.dtype) if escape_value is not None else None
        out_status = emulator.read(d / "status_out.bin", torch.int32) if status is not None else None
    return MergeRun(out_weight, out_codes, out_index, out_value, out_status, w_stores, w_reads,
                    code_stores, code_reads, plan)
