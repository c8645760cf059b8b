"""Runs the CUDA fused-forward kernel source on the host emulator (run_lora_linear.cpp).

Each input tensor is written as its own allocation, exactly as long as the tensor's extent (so any
read past its last element is an out-of-bounds fault in the emulator), with NaN in the gaps
between rows (so a read of a gap poisons the result). Outputs are prefilled with NaN and every
byte's store count comes back, so "each output element stored exactly once" is checked.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import torch

from . import emulator
from .emulator import compiler  # noqa: F401  (the emulation tests skip when driver.compiler() is None)


def build(out_dir: Path) -> Path:
    """Compile the emulator (about 10 s); returns the executable."""
    return emulator.build("run_lora_linear", out_dir)


def _pack(t: torch.Tensor, lead: int = 0) -> tuple[bytes, int]:
    """(bytes of an allocation holding `t` at element offset `lead`, lead). 1-D or 2-D, strides >= 0."""
    if t.dim() == 1:
        t = t.unsqueeze(1)
    rows, cols = t.shape
    sr, sc = t.stride()
    span = 0 if t.numel() == 0 else (rows - 1) * sr + (cols - 1) * sc + 1
    fill = float("nan") if t.is_floating_point() else 0
    flat = torch.full((lead + span,), fill, dtype=t.dtype)
    if t.numel():
        flat[lead:].as_strided((rows, cols), (sr, sc)).copy_(t)
    return flat.view(torch.uint8).numpy().tobytes(), lead


@dataclass
class EmulatedRun:
    y: torch.Tensor
    t: torch.Tensor
    y_stores: torch.Tensor   # per y element: how many times each of its bytes was stored (min over bytes)
    y_stores_max: torch.Tensor
    t_stores: torch.Tensor
    stray_y_stores: int      # stored bytes outside the logical y (gaps between rows, lead)
    stray_t_stores: int
    plan: Dict[str, int]


def run(exe: Path, x, weight, lora_a, lora_b, scale: float, bias=None, *, a_split=False, save_t=True,
        tile_kind=0, tiles_per_cta=0, num_sms=4, seed=0, leads=None, ldy=None, ldt=None,
        group_m=None) -> EmulatedRun:
    """Emulate the kernel on launcher-ready inputs (16-bit x/weight/lora_a with unit stride along
    K; lora_a = (hi; lo) when a_split). `leads` = element offsets of the inputs in their
    allocations (misaligned starts); ldy/ldt = output row strides (default: dense)."""
    leads = leads or {}
    M, K = x.shape
    N = weight.shape[0]
    rank = lora_b.shape[1]
    dtype = x.dtype
    assert dtype in (torch.float16, torch.bfloat16) and weight.dtype == dtype and lora_a.dtype == dtype
    for name, t in (("x", x), ("weight", weight), ("lora_a", lora_a)):
        assert t.shape[1] <= 1 or t.stride(1) == 1, f"{name} needs unit stride along K"
    ldy = ldy or max(N, 1)
    ldt = ldt or max(rank, 1)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        blobs = {"x": _pack(x, leads.get("x", 0)), "w": _pack(weight, leads.get("w", 0)),
                 "a": _pack(lora_a, leads.get("a", 0)), "b": _pack(lora_b, leads.get("b", 0))}
        if bias is not None:
            blobs["bias"] = _pack(bias.contiguous(), leads.get("bias", 0))
        for name, (data, _) in blobs.items():
            (d / f"{name}.bin").write_bytes(data)
        y_lead, t_lead = leads.get("y", 0), leads.get("t", 0)
        y_len = y_lead + (0 if M == 0 else (M - 1) * ldy + N)
        t_len = t_lead + (0 if M == 0 or not save_t else (M - 1) * ldt + rank)
        (d / "y_init.bin").write_bytes(torch.full((y_len,), float("nan"), dtype=dtype).view(torch.uint8).numpy().tobytes())
        (d / "t_init.bin").write_bytes(torch.full((t_len,), float("nan"), dtype=torch.float32).view(torch.uint8).numpy().tobytes())
        params = {
            "M": M, "N": N, "K": K, "rank": rank, "a_rows": lora_a.shape[0], "bf16": int(dtype == torch.bfloat16),
            "a_split": int(a_split), "b_fp32": int(lora_b.dtype == torch.float32),
            "has_bias": int(bias is not None), "bias_fp32": int(bias is not None and bias.dtype == torch.float32),
            "save_t": int(save_t), "ldx": x.stride(0), "ldw": weight.stride(0), "lda": lora_a.stride(0),
            "ldb_n": lora_b.stride(0), "ldb_r": lora_b.stride(1), "ldy": ldy, "ldt": ldt,
            "x_off": blobs["x"][1], "w_off": blobs["w"][1], "a_off": blobs["a"][1], "b_off": blobs["b"][1],
            "bias_off": blobs["bias"][1] if bias is not None else 0, "y_off": y_lead, "t_off": t_lead,
            "scale": repr(float(scale)), "tile_kind": tile_kind, "tiles_per_cta": tiles_per_cta,
            "num_sms": num_sms, "seed": seed,
        }
        if group_m is not None:
            params["group_m"] = group_m
        plan = emulator.run(exe, d, params, timeout=600)
        y_all, t_all = emulator.read(d / "y.bin", dtype), emulator.read(d / "t.bin", torch.float32)
        yc, tc = emulator.read(d / "y_counts.bin", torch.uint8), emulator.read(d / "t_counts.bin", torch.uint8)

    def logical(flat, lead, rows, cols, ld):
        """[rows, cols] view at element offset `lead` with row stride `ld` (flat is 1-D)."""
        if rows == 0 or cols == 0:
            return flat.new_empty((rows, cols))
        return flat[lead:].as_strided((rows, cols), (ld, 1))

    def logical_counts(counts, lead, rows, cols, ld, eb):
        """Per-byte store counts of that view: [rows, cols, eb]."""
        if rows == 0 or cols == 0:
            return counts.new_empty((rows, cols, eb))
        return counts[lead * eb:].as_strided((rows, cols, eb), (ld * eb, eb, 1))

    y = logical(y_all, y_lead, M, N, ldy).clone()
    y_cnt = logical_counts(yc, y_lead, M, N, ldy, 2)
    t_rows = M if save_t else 0
    t = logical(t_all, t_lead, t_rows, rank, ldt).clone()
    t_cnt = logical_counts(tc, t_lead, t_rows, rank, ldt, 4)
    stray_y = int(yc.sum()) - int(y_cnt.sum())
    stray_t = int(tc.sum()) - int(t_cnt.sum())
    return EmulatedRun(y, t, y_cnt.amin(-1), y_cnt.amax(-1), t_cnt.amin(-1), stray_y, stray_t, plan)
