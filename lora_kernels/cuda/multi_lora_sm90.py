"""The Hopper (sm_90) multi-adapter fused linear: the sm90 tail GEMM of the single-adapter forward
(``csrc/lora_linear/lora_linear_sm90.cuh``, CUTLASS 4 TMA + wgmma, persistent) with a per-slot
LoRA tail -- no new kernel, no new CUTLASS instantiation::

    y = x @ W.T + tail_x @ tail_w.T + bias          (fp32 accumulation, rounded once)

    tail_x [M, L * Wb]: token m's block of its slot l = token_adapter[m] holds
                        [ts_hi | ts_lo] (16-bit B) or [ts_hi | ts_lo | ts_hi] (fp32 B),
                        ts = t[m] = scales[l] * A[l, :rank_l] @ x[m] (zero past rank_l) split
                        into two 16-bit halves; every other block (other slots, tokens with no
                        adapter, padding rows) is zero
    tail_w [N, L * Wb]: slot l's block holds [B_l | B_l] or [B_hi_l | B_hi_l | B_lo_l], B_l's
                        columns at or past rank_l zeroed (NaN there never leaks)
    Wb = (2 or 3) * r_max rounded up to a multiple of 8 (16-byte rows for TMA), zero-padded

so token m's row of the tail product is B_l @ t[m] to fp32-like accuracy (the same hi/lo
argument as ``lora_linear.lora_tail``), and y is in token order: no sort, no scatter. t comes from
the segmented CUDA shrink (``multi_lora.multi_lora_shrink``). Everything is built on the device
with fixed-shape torch ops (shapes from M, N, L, r_max only): no host synchronisation, capturable
in a CUDA graph and replayed with a new mapping.

The price: the GEMM's K grows from K to K + L * Wb (every token multiplies every slot's block,
mostly zeros), so :func:`sm90_multi_plan` takes this path only when the tail is a small fraction
of K; otherwise the mma.sync kernel with the per-segment epilogue runs (it pays only the
token's own rank). ``tail_w`` is rebuilt on every call (about one read of the B stack and a
write of 2-3x it): caching it on the stack's data_ptr / ``_version`` would not be exact -- a
CUDA graph replays the captured tail_w after an in-place ``copy_`` of a new adapter into a slot
(serving's load path), and writes through ``.data`` or DLPack aliases bump no version counter.

A better kernel would give each 128-row tile of the sorted tokens its own list of tail k-blocks
(only the slots present): that changes the cooperative kernel's per-tile k count, i.e. a new
CUTLASS kernel, and is not written.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch

from . import lora_linear as cl

# The tail may add at most K / SM90_MULTI_TAIL_DIVISOR columns to the GEMM's K: at L * Wb <= K / 8
# the extra MACs are <= 12.5% of the base GEMM's, which the wgmma kernel's speed over mma.sync
# (issue 13: mma.sync reaches ~60-70% of wgmma's peak) should more than pay for. The threshold is
# NOT measured yet (no GPU in the session that chose it): bench/ on an H100/H200 measures it,
# suite multi, ours_linear_cuda (this path where it applies) against ours_linear_cuda_mma.
SM90_MULTI_TAIL_DIVISOR = 8
SM90_MULTI_TILE_KINDS = cl.TILE_KIND_SM90  # tile_kind 3 / 4 / 5 force 128x256 / 128x128 / 128x64 (tests)
# False sends every launch the plan would give the sm90 kernel (tile_kind 0) to the mma.sync one:
# bench/multi.py's ours_linear_cuda_mma column times that kernel on the same Hopper card.
ENABLED = True


def tail_block_width(r_max: int, b_fp32: bool) -> int:
    """Wb: the columns of one slot's block in tail_x / tail_w (2 r_max, or 3 r_max for fp32 B, up to 8)."""
    return -(-(3 if b_fp32 else 2) * r_max // 8) * 8


def tail_width(num_adapters: int, r_max: int, b_fp32: bool) -> int:
    """L * Wb: the columns the per-slot tail adds to the GEMM's K."""
    return num_adapters * tail_block_width(r_max, b_fp32)


class Sm90MultiPlan(NamedTuple):
    tile: Optional[int]    # cl.SM90_TILE_* when the sm90 path runs, else None
    reason: Optional[str]  # why not (None when it runs)


def sm90_multi_plan(M: int, N: int, K: int, num_adapters: int, r_max: int, b_fp32: bool,
                    capability: Tuple[int, int], num_sms: int, tma_ok: bool, built: bool = True) -> Sm90MultiPlan:
    """The sm90 tile for a multi-adapter linear of x [M, K], W [N, K], L = num_adapters slots of
    rank <= r_max on a device of `capability` with `num_sms` SMs -- or no tile and the reason
    the mma.sync kernel runs instead: not an sm_90 device, a build without the sm90 kernels,
    operands TMA cannot read (`tma_ok`), K or N not a multiple of 8, decode-size M (below
    lora_linear.SM90_MIN_M), or a tail of more than K / SM90_MULTI_TAIL_DIVISOR columns."""
    def no(why: str) -> Sm90MultiPlan:
        return Sm90MultiPlan(None, f"cuda: multi_lora_linear runs the mma.sync kernel, not the sm90 one: {why}")
    if capability != (9, 0):
        return no(f"the device has compute capability {capability[0]}.{capability[1]} (the sm90 kernels need 9.0)")
    if not built:
        return no("this build of lora_kernels._C has no sm90 kernels (see lora_kernels/cuda/sources.py)")
    if K < 8 or K % 8 or N % 8:
        return no(f"K = {K} and N = {N} must be positive multiples of 8 (16-byte TMA rows)")
    if not tma_ok:
        return no("x, weight or out is not TMA-readable (16-byte aligned start and row stride, unit stride along rows)")
    if M < cl.SM90_MIN_M:
        return no(f"M = {M} tokens is below {cl.SM90_MIN_M} (decode sizes keep the small mma.sync tile)")
    width = tail_width(num_adapters, r_max, b_fp32)
    if width * SM90_MULTI_TAIL_DIVISOR > K:
        return no(f"the per-slot LoRA tail would add L * Wb = {num_adapters} * "
                  f"{tail_block_width(r_max, b_fp32)} = {width} columns to K = {K}, more than K / "
                  f"{SM90_MULTI_TAIL_DIVISOR} (a threshold not measured yet)")
    tile = cl.sm90_plan(M, N, K, capability, num_sms, tma_ok, built)
    return Sm90MultiPlan(tile, None) if tile is not None else no("lora_linear.sm90_plan declined the shape")


def sm90_multi_choice(x: torch.Tensor, weight: torch.Tensor, lora_b_stack: torch.Tensor, out: Optional[torch.Tensor],
                      tile_kind: int = 0) -> Sm90MultiPlan:
    """The plan for this launch on x's device (tile_kind 1 / 2 force the mma.sync kernel, 3 / 4 / 5
    the sm90 tiles; 0 asks :func:`sm90_multi_plan`)."""
    if tile_kind in (1, 2):
        return Sm90MultiPlan(None, f"cuda: multi_lora_linear runs the mma.sync kernel: tile_kind={tile_kind} forces it")
    if tile_kind in SM90_MULTI_TILE_KINDS:
        return Sm90MultiPlan(SM90_MULTI_TILE_KINDS[tile_kind], None)
    if not ENABLED:
        return Sm90MultiPlan(None, "cuda: multi_lora_linear runs the mma.sync kernel: multi_lora_sm90.ENABLED is False")
    capability, sms = cl.device_facts(x.device.index or 0)  # CUDA tensors always carry their index
    built = capability == (9, 0) and cl.sm90_built()
    M, K = x.shape
    L, N, R = lora_b_stack.shape
    tma_ok = cl.tma_readable(x) and cl.tma_readable(weight) and (out is None or cl.tma_readable(out))
    return sm90_multi_plan(M, N, K, L, R, lora_b_stack.dtype == torch.float32, capability, sms, tma_ok, built)


# ---------------------------------------------------------------------------------------------
# The per-slot tail
# ---------------------------------------------------------------------------------------------

def multi_tail_x(t: torch.Tensor, token_adapter: torch.Tensor, num_adapters: int, dtype: torch.dtype,
                 b_fp32: bool) -> torch.Tensor:
    """tail_x [M, L * Wb] in `dtype` (see the module docstring) from t [M, r_max] float32 (the
    shrink's output: scaled, zero past each rank and for tokens with no adapter) and
    token_adapter [M] (slot of each token, -1 = none; any other value outside [0, L) matches
    no slot and gives a zero row). Fixed shapes, no host sync; about six small kernels (the
    halves are written in place: lo = t - hi computed in fp32 and rounded into its columns)."""
    M, R = t.shape
    L = num_adapters
    wb = tail_block_width(R, b_fp32)
    block = torch.empty((M, wb), dtype=dtype, device=t.device)                            # one slot's block
    hi = block[:, :R]
    hi.copy_(t)                                                 # ts_hi = t rounded (split16's hi)
    torch.sub(t, hi, out=block[:, R:2 * R])                     # ts_lo = (t - ts_hi) rounded (split16's lo)
    used = 2 * R
    if b_fp32:
        block[:, used:used + R].copy_(hi)
        used += R
    if wb > used:
        block[:, used:].zero_()
    slots = torch.arange(L, dtype=token_adapter.dtype, device=t.device)
    mine = token_adapter[:, None] == slots[None, :]                                       # [M, L]
    return torch.where(mine[:, :, None], block[:, None, :], 0.0).view(M, L * wb)  # a scalar keeps block's dtype


def multi_tail_w(lora_b_stack: torch.Tensor, ranks: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """tail_w [N, L * Wb] in `dtype` (see the module docstring) from lora_b_stack [L, N, r_max]
    (`dtype` or float32, any strides) and ranks [L] int or None (every slot r_max): slot l's
    block is [B_l | B_l] (16-bit B) or [B_hi | B_hi | B_lo] (fp32 B, split16's halves), columns
    at or past ranks[l] zero (selected with where: NaN or inf stored there cannot leak)."""
    L, N, R = lora_b_stack.shape
    b_fp32 = lora_b_stack.dtype == torch.float32
    wb = tail_block_width(R, b_fp32)
    device = lora_b_stack.device
    b = lora_b_stack.transpose(0, 1)                                                      # [N, L, R] view
    tail_w = torch.empty((N, L, wb), dtype=dtype, device=device)
    first = tail_w[:, :, :R]
    keep = None
    if ranks is not None:
        ranks = ranks.to(device=device)
        keep = torch.arange(R, dtype=ranks.dtype, device=device)[None, :] < ranks[:, None]  # [L, R]
    if not b_fp32:
        if keep is None:
            first.copy_(b)
        else:  # (where's out= form takes no scalar)
            torch.where(keep[None, :, :], b, torch.zeros((), dtype=b.dtype, device=device), out=first)
        used = 2 * R
    else:
        if keep is not None:
            b = torch.where(keep[None, :, :], b, 0.0)
        first.copy_(b)                                          # B_hi
        torch.sub(b, first, out=tail_w[:, :, 2 * R:3 * R])      # B_lo = (B - B_hi) rounded
        used = 3 * R
    tail_w[:, :, R:2 * R].copy_(first)
    if wb > used:
        tail_w[:, :, used:].zero_()
    return tail_w.view(N, L * wb)


def launch_sm90_multi(x: torch.Tensor, weight: torch.Tensor, t: torch.Tensor, lora_b_stack: torch.Tensor,
                      token_adapter: torch.Tensor, bias: Optional[torch.Tensor], ranks: Optional[torch.Tensor],
                      y: torch.Tensor, tile: int) -> torch.Tensor:
    """y = x @ weight.T + bias + the per-slot tail product (the sm90 tail GEMM), from the shrink's
    t [M, r_max] float32; x, weight and y TMA-readable (sm90_multi_plan checked)."""
    b_fp32 = lora_b_stack.dtype == torch.float32
    tail_x = multi_tail_x(t, token_adapter, lora_b_stack.shape[0], x.dtype, b_fp32)
    tail_w = multi_tail_w(lora_b_stack, ranks, x.dtype)
    if bias is not None:  # the epilogue reads an fp32, contiguous, 16-byte aligned bias (as lora_linear's)
        bias = bias.float().contiguous()
        bias = bias.clone() if bias.data_ptr() % 16 else bias
    torch.ops.lora_kernels.cuda_lora_linear_sm90_fwd(x, weight, tail_x, tail_w, bias, y, tile)
    return y
