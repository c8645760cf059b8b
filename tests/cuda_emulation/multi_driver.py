"""Runs the CUDA multi-adapter shrink / expand / fused-linear source on the host emulator
(run_multi_lora.cpp).

As driver.py for the fused forward: each input is its own allocation, exactly as long as the
tensor's extent (a read past it is an out-of-bounds fault in the emulator) with NaN in the gaps
between rows; the output allocation comes back with a per-byte store count, so "each element
stored exactly once" and "rows without an adapter never stored" are checked directly.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from . import emulator


def build(out_dir: Path) -> Path:
    """Compile the emulator (about 10-20 s); returns the executable."""
    return emulator.build("run_multi_lora", out_dir, ["-Wno-maybe-uninitialized"])


def _span(t: torch.Tensor) -> int:
    return 0 if t.numel() == 0 else sum((n - 1) * s for n, s in zip(t.shape, t.stride())) + 1


def pack(t: torch.Tensor, lead: int = 0, never_read: Optional[torch.Tensor] = None) -> Tuple[bytes, bytes]:
    """(bytes of an allocation holding `t` (any dims, strides >= 0) at element offset `lead`, and a
    mask with 1 per byte that must never be read). Elements between t's own are NaN (floats) or
    -7 (ints: a token id or slot read from a gap would be out of range); they, the lead and the
    elements where `never_read` (bool, t's shape) is True are marked unreadable."""
    fill = float("nan") if t.is_floating_point() else -7
    n = lead + _span(t)
    flat = torch.full((n,), fill, dtype=t.dtype)
    readable = torch.zeros(n, dtype=torch.bool)
    if t.numel():
        flat[lead:].as_strided(t.shape, t.stride()).copy_(t)
        ok = torch.ones(t.shape, dtype=torch.bool) if never_read is None else ~never_read
        readable[lead:].as_strided(t.shape, t.stride()).copy_(ok)
    noread = (~readable).to(torch.uint8).repeat_interleave(t.element_size())
    return flat.view(torch.uint8).numpy().tobytes(), noread.numpy().tobytes()


@dataclass
class MultiRun:
    out: torch.Tensor          # t [M, R] (shrink) or y [M, N] (expand), with the launch's strides
    stores: torch.Tensor       # per element: min over its bytes of how many times it was stored
    stores_max: torch.Tensor   # per element: max over its bytes
    stray_stores: int          # stored bytes outside the output's elements (gaps, lead)
    plan: Dict[str, int]


def _run(exe: Path, params: Dict, inputs: Dict[str, torch.Tensor], never_read: Dict[str, torch.Tensor],
         out: torch.Tensor, leads: Dict[str, int]):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, t in inputs.items():
            data, noread = pack(t, leads.get(name, 0), never_read.get(name))
            (d / f"{name}.bin").write_bytes(data)
            (d / f"{name}.noread").write_bytes(noread)
            params[f"{name}_off"] = leads.get(name, 0)
        out_lead = leads.get("out", 0)
        (d / "out_init.bin").write_bytes(pack(out, out_lead)[0])
        params["out_off"] = out_lead
        plan = emulator.run(exe, d, params, timeout=900)
        flat = emulator.read(d / "out.bin", out.dtype)
        counts = emulator.read(d / "out_counts.bin", torch.uint8)
    eb = out.element_size()
    if out.numel() == 0:
        empty = torch.zeros(out.shape, dtype=torch.uint8)
        return MultiRun(out.clone(), empty, empty, int(counts.sum()), plan)
    result = flat[out_lead:].as_strided(out.shape, out.stride()).clone()
    per_byte = counts[out_lead * eb:].as_strided((*out.shape, eb), (*(s * eb for s in out.stride()), 1))
    stray = int(counts.sum()) - int(per_byte.sum())
    return MultiRun(result, per_byte.amin(-1), per_byte.amax(-1), stray, plan)


def token_ranks(index, ranks: Optional[torch.Tensor], r_max: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rank used per slot [L], rank used per token [M]) as the kernels clamp them."""
    L = index.num_adapters
    slot_rank = torch.full((L,), r_max) if ranks is None else ranks.long().clamp(0, r_max)
    ids = index.token_adapter.long()
    return slot_rank, torch.where(ids >= 0, slot_rank[ids.clamp(min=0)], 0)


def _index_inputs(index, item_m: int, ranks: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    inputs = {"work": index.work(item_m).contiguous(), "sorted": index.sorted_tokens.contiguous()}
    if ranks is not None:
        inputs["ranks"] = ranks.to(torch.int32).contiguous()
    return inputs


def _stacks(value) -> Tuple[List[torch.Tensor], bool]:
    """(stacks, given as a list)."""
    return (list(value), True) if isinstance(value, (list, tuple)) else ([value], False)


def run_shrink(exe: Path, x, lora_a, scales, ranks, index, item_m: int, *, seed=0, row_split: int = 1,
               leads: Optional[Dict[str, int]] = None, t_out: Optional[torch.Tensor] = None) -> MultiRun:
    """t = lora_shrink(x, lora_a, index, scales, ranks) by the CUDA source, one launch. x [M, K]
    16-bit with unit stride along K; lora_a [L, R, K] (x's dtype or fp32) with unit stride along
    K, or a list of 1..4 such stacks with one set of strides (t then [S, M, R]). t_out: the output
    buffer (its strides; default dense), poisoned with NaN."""
    M, K = x.shape
    stacks, as_list = _stacks(lora_a)
    L, R, _ = stacks[0].shape
    S = len(stacks)
    assert x.dtype in (torch.float16, torch.bfloat16) and (K <= 1 or x.stride(1) == 1)
    assert all(a.stride() == stacks[0].stride() for a in stacks), "one set of strides for every slice"
    if t_out is None:
        t_out = torch.full((S, M, R) if as_list else (M, R), float("nan"))
    t3 = t_out if as_list else t_out.unsqueeze(0)
    inputs = {"x": x, "scales": scales.float().contiguous(), **_index_inputs(index, item_m, ranks)}
    inputs.update({f"a{s}": a for s, a in enumerate(stacks)})
    params = {"mode": "shrink", "bf16": int(x.dtype == torch.bfloat16), "has_ranks": int(ranks is not None),
              "a_fp32": int(stacks[0].dtype == torch.float32), "S": S, "M": M, "K": K, "L": L, "R": R,
              "num_items": inputs["work"].shape[0], "item_m": item_m, "ldx": x.stride(0),
              "lda_l": stacks[0].stride(0), "lda_r": stacks[0].stride(1), "ldt_s": t3.stride(0),
              "ldt": t3.stride(1), "row_split": row_split, "seed": seed}
    slot_rank, tok_rank = token_ranks(index, ranks, R)
    # never read: x rows of tokens with no adapter (or rank 0), A rows at or past each rank
    never_read = {"x": (tok_rank == 0)[:, None].expand(M, K)}
    a_never = (torch.arange(R)[None, :] >= slot_rank[:, None])[:, :, None].expand(L, R, K)
    never_read.update({f"a{s}": a_never for s in range(S)})
    return _run(exe, params, inputs, never_read, t_out, leads or {})


def run_expand(exe: Path, y, t, lora_b, ranks, index, item_m: int, *, seed=0, offset: int = 0,
               leads: Optional[Dict[str, int]] = None) -> MultiRun:
    """lora_expand_(y, t, lora_b, index, ranks, offset) by the CUDA source, one launch; y [M, N_y]
    16-bit with its own strides (the result comes back with them); lora_b [L, N, R] with t
    [M, R], or a list of 1..4 stacks [L, N_s, R] with t [S, M, R]; fp32 t, any strides."""
    M = y.shape[0]
    stacks, as_list = _stacks(lora_b)
    L, _, R = stacks[0].shape
    S = len(stacks)
    t3 = t if as_list else t.unsqueeze(0)
    inputs = {"t": t3, **_index_inputs(index, item_m, ranks)}
    inputs.update({f"b{s}": b for s, b in enumerate(stacks)})
    params = {"mode": "expand", "bf16": int(y.dtype == torch.bfloat16), "has_ranks": int(ranks is not None),
              "b_fp32": int(stacks[0].dtype == torch.float32), "S": S, "M": M, "L": L, "R": R,
              "num_items": inputs["work"].shape[0], "item_m": item_m, "ldy_m": y.stride(0), "ldy_n": y.stride(1),
              "ldt_s": t3.stride(0), "ldt_m": t3.stride(1), "ldt_r": t3.stride(2), "offset": offset, "seed": seed}
    for s, b in enumerate(stacks):
        params.update({f"N{s}": b.shape[1], f"ldb_l{s}": b.stride(0), f"ldb_n{s}": b.stride(1),
                       f"ldb_r{s}": b.stride(2)})
    slot_rank, tok_rank = token_ranks(index, ranks, R)
    # never read: t columns at or past the token's rank (all of a no-adapter token's row), B
    # columns at or past each rank
    never_read = {"t": (torch.arange(R)[None, :] >= tok_rank[:, None])[None].expand(S, M, R)}
    for s, b in enumerate(stacks):
        never_read[f"b{s}"] = (torch.arange(R)[None, :] >= slot_rank[:, None])[:, None, :].expand(L, b.shape[1], R)
    return _run(exe, params, inputs, never_read, y, leads or {})


def run_linear(exe: Path, x, weight, lora_b, bias, t, ranks, index, *, tile_kind=0, tiles_per_cta=0,
               group_m=None, seed=0, leads: Optional[Dict[str, int]] = None, ldy: Optional[int] = None) -> MultiRun:
    """y = x @ weight.T + bias + expand(t) over the sorted token order, by the CUDA source (the
    fused kernel's part after the shrink). x [M, K] / weight [N, K] 16-bit with unit stride along
    K; lora_b [L, N, R] and t [M, R] fp32 any strides; y comes back [M, N] with row stride ldy."""
    M, K = x.shape
    N = weight.shape[0]
    L, _, R = lora_b.shape
    ldy = ldy or max(N, 1)
    y = torch.full((M, ldy), float("nan"), dtype=x.dtype)[:, :N]
    inputs = {"x": x, "w": weight, "b": lora_b, "t": t, "sorted": index.sorted_tokens.contiguous(),
              "sorted_adapter": index.sorted_adapter.contiguous(), "slot_start": index.slot_start.contiguous()}
    if ranks is not None:
        inputs["ranks"] = ranks.to(torch.int32).contiguous()
    if bias is not None:
        inputs["bias"] = bias.contiguous()
    params = {"mode": "linear", "bf16": int(x.dtype == torch.bfloat16), "has_ranks": int(ranks is not None),
              "has_bias": int(bias is not None), "b_fp32": int(lora_b.dtype == torch.float32),
              "bias_fp32": int(bias is not None and bias.dtype == torch.float32), "M": M, "N": N, "K": K, "L": L,
              "R": R, "ldx": x.stride(0), "ldw": weight.stride(0), "ldy": ldy, "ldt_m": t.stride(0),
              "ldt_r": t.stride(1), "ldb_l": lora_b.stride(0), "ldb_n": lora_b.stride(1), "ldb_r": lora_b.stride(2),
              "tile_kind": tile_kind, "tiles_per_cta": tiles_per_cta, "seed": seed}
    if group_m is not None:
        params["group_m"] = group_m
    slot_rank, tok_rank = token_ranks(index, ranks, R)
    never_read = {"t": torch.arange(R)[None, :] >= tok_rank[:, None],
                  "b": (torch.arange(R)[None, :] >= slot_rank[:, None])[:, None, :].expand(L, N, R)}
    return _run(exe, params, inputs, never_read, y, leads or {})
