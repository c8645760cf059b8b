"""Plain-torch implementation of every op: the CPU backend and the test oracle.

Numerics follow DESIGN.md section 4: everything is computed in float32 (float64 for float64
inputs) and rounded once to the output dtype. Called with float64 tensors these functions are the
float64 oracle the tests compare against.

No input validation here: the public ops in ``lora_kernels.ops`` validate before dispatching.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F


def acc_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation dtype."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# ---------------------------------------------------------------------------------------------
# Dropout mask from a Philox key (the same bits as the Triton kernels draw, see triton/lora_linear.py)
# ---------------------------------------------------------------------------------------------

_M32 = 0xFFFFFFFF
PHILOX_ROUNDS = 10  # Philox4x32-10, as cuRAND, torch and Triton use
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_BUMP = (0x9E3779B9, 0xBB67AE85)


def _mulhilo32(a: int, b: torch.Tensor):
    """(hi, lo) 32-bit halves of the 64-bit product a * b, for a constant a < 2**32 and an int64
    tensor b of uint32 values. Split into 16-bit halves so that no int64 product overflows."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    p_lo = a_lo * b                      # < 2**48
    s = a_hi * b + (p_lo >> 16)          # < 2**49;  a * b = s * 2**16 + (p_lo & 0xFFFF)
    return s >> 16, ((s & 0xFFFF) << 16) | (p_lo & 0xFFFF)


def philox4x32(c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor, k0: int,
               k1: int, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 (Salmon et al., SC'11) on int64 tensors holding uint32 counters; key (k0, k1).
    Returns the four uint32 output words as int64 tensors."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _PHILOX_BUMP[0]) & _M32, (k1 + _PHILOX_BUMP[1]) & _M32
    return c0, c1, c2, c3


def dropout_threshold(p: float) -> int:
    """Element (m, k) is kept iff (its 32 random bits >> 1) >= dropout_threshold(p): P(keep) = 1 - p
    to within 2**-31."""
    return min(round(p * 2.0 ** 31), 2 ** 31 - 1)


def dropout_keep_mask(seed: int, rows: int, cols: int, p: float, device=None) -> torch.Tensor:
    """bool [rows, cols], True = keep, for the 63-bit Philox key `seed`::

        words = philox4x32(counter=(k // 4, m, 0, 0), key=(seed & 0xFFFFFFFF, seed >> 32))
        keep[m, k] = (words[k % 4] >> 1) >= dropout_threshold(p)

    One Philox call covers four adjacent columns; the counter never depends on strides or tiles,
    so every kernel (forward, backward, this function) regenerates the same mask."""
    groups = (cols + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64, device=device).expand(rows, groups)
    c1 = torch.arange(rows, dtype=torch.int64, device=device)[:, None].expand(rows, groups)
    zero = torch.zeros((), dtype=torch.int64, device=device)
    words = philox4x32(c0, c1, zero, zero, seed & _M32, (seed >> 32) & _M32)
    bits = torch.stack(words, dim=-1).reshape(rows, 4 * groups)[:, :cols]
    return (bits >> 1) >= dropout_threshold(p)


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call where it would return t itself (same dtype): a no-op
    ``.to`` costs ~1 us of host time, and the eager torch backend makes six per call."""
    return t if t.dtype == dtype else t.to(dtype)


def lora_input(x: torch.Tensor, dropout_p: float = 0.0, training: bool = False,
               dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """PEFT's dropout placement: the LoRA branch sees ``dropout(x)``, the base sees ``x``.

    dropout_mask: bool [..., K] (True = keep), used instead of drawing one; scaled by 1/(1-p)."""
    if dropout_mask is not None:
        return x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    if training and dropout_p > 0.0:
        return F.dropout(x, dropout_p, training=True)
    return x


def lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                scale: float, bias: Optional[torch.Tensor] = None, *, dropout_p: float = 0.0,
                training: bool = False, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ weight.T + bias + scale * (dropout(x) @ lora_a.T) @ lora_b.T

    x [..., K], weight [N, K], lora_a [r, K], lora_b [N, r], bias [N] | None -> y [..., N] in
    x.dtype. Differentiable (plain torch autograd)."""
    acc = acc_dtype(x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
    xa = x.to(acc)
    y = F.linear(xa, weight.to(acc), None if bias is None else bias.to(acc))
    t = lora_input(x, dropout_p, training, dropout_mask).to(acc) @ lora_a.to(acc).t()
    y = y + scale * (t @ lora_b.to(acc).t())
    return y.to(x.dtype)


def lora_linear_forward(x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        scale: float, bias: Optional[torch.Tensor] = None, keep: Optional[torch.Tensor] = None,
                        dropout_p: float = 0.0):
    """(y, t) for a 2-D x [M, K] -- the torch backend of the op ``lora_linear_fwd``::

        t = (x * keep / (1 - dropout_p)) @ lora_a.T        # [M, r], accumulation dtype
        y = x @ weight.T + bias + scale * t @ lora_b.T     # [M, N], x.dtype

    keep: bool [M, K] (True = keep) or None for no dropout."""
    acc = acc_dtype(x.dtype, weight.dtype, lora_a.dtype, lora_b.dtype)
    xa = _as(x, acc)
    t = (xa if keep is None else _as(lora_input(x, dropout_p, dropout_mask=keep), acc)) @ _as(lora_a, acc).t()
    y = torch.addmm(xa @ _as(weight, acc).t(), t, _as(lora_b, acc).t(), alpha=scale)
    if bias is not None:
        y += _as(bias, acc)
    return _as(y, x.dtype), t


def lora_linear_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, lora_a: torch.Tensor,
                         lora_b: torch.Tensor, t: Optional[torch.Tensor], scale: float,
                         keep: Optional[torch.Tensor] = None, dropout_p: float = 0.0, need_x: bool = True,
                         need_a: bool = True, need_b: bool = True,
                         bias_dtype: Optional[torch.dtype] = None):
    """(dx, dA, dB, dbias) of ``lora_linear_forward`` for 2-D dy [M, N], x [M, K], t [M, r]::

        u = dy @ lora_b
        dx = dy @ weight + scale * (u @ lora_a) * keep / (1 - p)
        dA = scale * u.T @ drop(x);   dB = scale * dy.T @ t;   dbias = dy.sum(0)

    computed in the accumulation dtype, each returned in its tensor's dtype (dbias in bias_dtype);
    None for a gradient not needed (dbias: bias_dtype None)."""
    acc = acc_dtype(dy.dtype, x.dtype, lora_a.dtype, lora_b.dtype)
    dya = dy.to(acc)
    dx = da = db = dbias = None
    if need_x or need_a:
        u = dya @ lora_b.to(acc)
    if need_x:
        lora = scale * (u @ lora_a.to(acc))
        if keep is not None:
            lora = lora * keep / (1.0 - dropout_p)
        dx = (dya @ weight.to(acc) + lora).to(x.dtype)
    if need_a:
        da = (scale * (u.t() @ lora_input(x, dropout_p, dropout_mask=keep).to(acc))).to(lora_a.dtype)
    if need_b:
        db = (scale * (dya.t() @ t.to(acc))).to(lora_b.dtype)
    if bias_dtype is not None:
        dbias = dya.sum(0).to(bias_dtype)
    return dx, da, db, dbias


def _as_lists(lora_a, lora_b, scale):
    if isinstance(lora_a, torch.Tensor):
        return [lora_a], [lora_b], [scale]
    return list(lora_a), list(lora_b), list(scale)


def lora_delta(weight: torch.Tensor, lora_a, lora_b, scale, fan_in_fan_out: bool = False) -> torch.Tensor:
    """sum_i scale_i * lora_b_i @ lora_a_i in the accumulation dtype, laid out like `weight`
    ([N, K], or [K, N] when fan_in_fan_out)."""
    a_list, b_list, s_list = _as_lists(lora_a, lora_b, scale)
    acc = acc_dtype(weight.dtype, *(a.dtype for a in a_list), *(b.dtype for b in b_list))
    delta = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for a, b, s in zip(a_list, b_list, s_list):
        d = float(s) * (b.to(acc) @ a.to(acc))
        delta += d.t() if fan_in_fan_out else d
    return delta


def logical_weight(weight: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The [N, K] view of a weight stored [N, K], or [K, N] when fan_in_fan_out (PEFT's Conv1D)."""
    return weight.t() if fan_in_fan_out else weight


def merged_weight(weight: torch.Tensor, lora_a, lora_b, scale, *, subtract: bool = False,
                  fan_in_fan_out: bool = False) -> torch.Tensor:
    """round(weight ± sum_i scale_i * lora_b_i @ lora_a_i) as a new tensor in weight's dtype and
    layout: the sum is formed in the accumulation dtype and rounded once."""
    delta = lora_delta(weight, lora_a, lora_b, scale, fan_in_fan_out)
    w = weight.to(delta.dtype)
    return (w - delta if subtract else w + delta).to(weight.dtype)


@torch.no_grad()
def apply_(weight: torch.Tensor, lora_a, lora_b, scale, *, subtract: bool = False,
           fan_in_fan_out: bool = False, status: Optional[torch.Tensor] = None,
           gated: bool = False) -> torch.Tensor:
    """In place: weight = round(weight ± sum_i scale_i * lora_b_i @ lora_a_i).

    gated: do nothing if ``status[1] != 0`` (a safe merge's count pass found non-finite results);
    the same contract as the compiled backends' kernels (ops/merge.py)."""
    if gated and int(status[1]) != 0:
        return weight
    weight.copy_(merged_weight(weight, lora_a, lora_b, scale, subtract=subtract, fan_in_fan_out=fan_in_fan_out))
    return weight


@torch.no_grad()
def count_nonfinite_(weight: torch.Tensor, lora_a, lora_b, scale, *, subtract: bool = False,
                     fan_in_fan_out: bool = False, status: torch.Tensor) -> None:
    """status[1] += number of elements of round(weight ± delta) that are inf or NaN. weight is
    only read (the first pass of a safe merge)."""
    new = merged_weight(weight, lora_a, lora_b, scale, subtract=subtract, fan_in_fan_out=fan_in_fan_out)
    status[1] += (~torch.isfinite(new)).sum().to(status.dtype)


@torch.no_grad()
def merge_(weight: torch.Tensor, lora_a: Union[torch.Tensor, Sequence[torch.Tensor]],
           lora_b: Union[torch.Tensor, Sequence[torch.Tensor]], scale, *,
           fan_in_fan_out: bool = False) -> torch.Tensor:
    """In place: weight += sum_i scale_i * lora_b_i @ lora_a_i, one rounding per element.

    weight [N, K] ([K, N] if fan_in_fan_out), lora_a [r, K], lora_b [N, r]; lists merge several."""
    return apply_(weight, lora_a, lora_b, scale, fan_in_fan_out=fan_in_fan_out)


@torch.no_grad()
def unmerge_(weight: torch.Tensor, lora_a, lora_b, scale, *, fan_in_fan_out: bool = False) -> torch.Tensor:
    """In place: weight -= sum_i scale_i * lora_b_i @ lora_a_i (the inverse of merge_, up to rounding)."""
    return apply_(weight, lora_a, lora_b, scale, subtract=True, fan_in_fan_out=fan_in_fan_out)


# ---------------------------------------------------------------------------------------------
# Exact unmerge: one int8 code per weight element, plus an escape table (see ops/merge.py for
# the design and its proof). Every backend writes and reads the same codes.
# ---------------------------------------------------------------------------------------------

CODE_ESCAPE = -128    # W0 is in the escape table (flat logical index n * K + k, exact value)
CODE_PENDING = -127   # the escape table was full: the element was left unmerged (W1 = W0)
CODE_POS_ZERO = -126  # W0 is +0.0
CODE_NEG_ZERO = -125  # W0 is -0.0
CODE_MIN = -124       # codes CODE_MIN..CODE_MAX: W0 = U shifted by `code` representable values
CODE_MAX = 127
CODE_MIN_RESTORED = CODE_POS_ZERO  # codes >= this are restored by the unmerge pass itself
EXACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """int64 keys in the order of the float values, one key per bit pattern: +0 -> 0, -0 -> -1,
    consecutive representable values -> consecutive integers (NaNs land beyond +-inf)."""
    if x.dtype == torch.float32:
        bits = x.view(torch.int32).to(torch.int64)
        mag = bits & 0x7FFFFFFF
    else:
        bits = x.view(torch.int16).to(torch.int64)
        mag = bits & 0x7FFF
    return torch.where(bits < 0, -mag - 1, mag)


def from_ordered_bits(key: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ordered_bits (keys outside the dtype's range wrap; callers mask them out)."""
    neg = key < 0
    mag = torch.where(neg, -key - 1, key)
    if dtype == torch.float32:
        return torch.where(neg, mag - 2 ** 31, mag).to(torch.int32).view(dtype)
    return torch.where(neg, mag - 2 ** 15, mag).to(torch.int16).view(dtype)


def _exact_delta_and_views(weight, lora_a, lora_b, scale, fan_in_fan_out, codes):
    w = logical_weight(weight, fan_in_fan_out)
    c = logical_weight(codes, fan_in_fan_out)
    return w, c, lora_delta(w, lora_a, lora_b, scale)


@torch.no_grad()
def merge_exact_(weight: torch.Tensor, lora_a, lora_b, scale, *, fan_in_fan_out: bool = False,
                 codes: torch.Tensor, escape_index: torch.Tensor, escape_value: torch.Tensor,
                 status: torch.Tensor, gated: bool = False) -> None:
    """In place: W1 = round(W0 + delta), and for each element the code that lets unmerge_exact_
    restore W0 from W1 bit for bit (U = round(W1 - delta); code = key(W0) - key(U) when it fits
    in CODE_MIN..CODE_MAX, a zero code for +-0, else an escape-table entry).

    codes int8 shaped like weight; escape_index int64 [C] / escape_value [C] (weight's dtype):
    the escape table, filled from slot status[0] on; status int32 [2]: status[0] += number of
    escapes (also those past the table's end, which are left unmerged with CODE_PENDING).
    gated: do nothing if status[1] != 0."""
    if gated and int(status[1]) != 0:
        return
    w, c, delta = _exact_delta_and_views(weight, lora_a, lora_b, scale, fan_in_fan_out, codes)
    w0 = w.clone(memory_format=torch.contiguous_format)  # logical row-major: flat index n*K + k
    w1 = (w0.to(delta.dtype) + delta).to(w.dtype)
    u = (w1.to(delta.dtype) - delta).to(w.dtype)
    key0 = ordered_bits(w0)
    q = key0 - ordered_bits(u)
    # A NaN W0 always escapes: float conversions need not keep a NaN's payload bits (torch's CPU
    # float->half turns NaN into 0x7E00 or 0x7FFF depending on the loop taken).
    fits = (q >= CODE_MIN) & (q <= CODE_MAX) & ~torch.isnan(w0)
    code = torch.where(fits, q, torch.where(key0 == 0, CODE_POS_ZERO,
                                            torch.where(key0 == -1, CODE_NEG_ZERO, CODE_ESCAPE)))
    flat = (code == CODE_ESCAPE).flatten().nonzero().squeeze(1)  # logical row-major order
    first, capacity = int(status[0]), escape_index.numel()
    slots = first + torch.arange(flat.numel(), device=flat.device)
    kept = slots < capacity
    escape_index[slots[kept]] = flat[kept]
    escape_value[slots[kept]] = w0.flatten()[flat[kept]]
    pending = flat[~kept]
    code.view(-1)[pending] = CODE_PENDING
    w1.view(-1)[pending] = w0.view(-1)[pending]
    status[0] += flat.numel()
    w.copy_(w1)
    c.copy_(code.to(torch.int8))


def scatter_escapes_(weight: torch.Tensor, escape_index: torch.Tensor, escape_value: torch.Tensor,
                     num_escapes: int, fan_in_fan_out: bool = False) -> None:
    """weight[n, k] = value for the first num_escapes (index = n * K + k, value) table entries."""
    if num_escapes == 0:
        return
    w = logical_weight(weight, fan_in_fan_out)
    index = escape_index[:num_escapes]
    w[index // w.shape[1], index % w.shape[1]] = escape_value[:num_escapes]


@torch.no_grad()
def unmerge_exact_(weight: torch.Tensor, lora_a, lora_b, scale, *, fan_in_fan_out: bool = False,
                   codes: torch.Tensor, escape_index: torch.Tensor, escape_value: torch.Tensor,
                   num_escapes: int) -> None:
    """In place: restore W0 from W1 and the codes merge_exact_ wrote (elements coded PENDING were
    never merged and are left alone); then the escape table's first num_escapes entries."""
    w, c, delta = _exact_delta_and_views(weight, lora_a, lora_b, scale, fan_in_fan_out, codes)
    u = (w.to(delta.dtype) - delta).to(w.dtype)
    code = c.to(torch.int64)
    key = torch.where(code >= CODE_MIN, ordered_bits(u) + code,
                      torch.where(code == CODE_POS_ZERO, 0, -1))
    w.copy_(torch.where(code >= CODE_MIN_RESTORED, from_ordered_bits(key, w.dtype), w))
    scatter_escapes_(weight, escape_index, escape_value, num_escapes, fan_in_fan_out)


# ---------------------------------------------------------------------------------------------
# Multi-adapter (segmented) ops. `token_adapter` [M] holds each token's slot, -1 = no adapter
# (AdapterIndex.token_adapter: already sanitised). Written without host synchronisation
# (gathers and torch.where over fixed shapes), so the torch backend stays graph-capturable, and
# in row chunks so that the per-token gathered adapters stay within a bounded buffer.
# ---------------------------------------------------------------------------------------------

_GATHER_ELEMENTS = 1 << 22  # per chunk: rows * max(r*K, N*r) gathered adapter elements


def rank_keep(ranks: Optional[torch.Tensor], num_adapters: int, r_max: int, device) -> torch.Tensor:
    """bool [L, r_max]: column j of slot i is used (j < ranks[i], clamped to [0, r_max])."""
    if ranks is None:
        return torch.ones(num_adapters, r_max, dtype=torch.bool, device=device)
    cols = torch.arange(r_max, device=device)
    return cols[None, :] < ranks.to(device=device, dtype=torch.int64).clamp(0, r_max)[:, None]


def _row_chunks(M: int, per_row: int):
    step = max(1, _GATHER_ELEMENTS // max(1, per_row))
    return [(s, min(s + step, M)) for s in range(0, M, step)]


def lora_shrink(x: torch.Tensor, lora_a_stack: torch.Tensor, token_adapter: torch.Tensor,
                scales: torch.Tensor, ranks: Optional[torch.Tensor] = None,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """t[m] = scales[i] * lora_a_stack[i, :rank_i] @ x[m] (zero past rank_i), i = token_adapter[m];
    t[m] = 0 where i = -1.

    x [M, K], lora_a_stack [L, r_max, K], token_adapter [M] int, scales [L], ranks [L] int | None
    -> t [M, r_max] in the accumulation dtype (float32; float64 for float64 inputs), written
    into `out` when given (an [M, r_max] tensor of that dtype sharing no memory with the inputs:
    the same arithmetic, no copy of t)."""
    acc = acc_dtype(x.dtype, lora_a_stack.dtype)
    M, (L, R, K) = x.shape[0], lora_a_stack.shape
    keep = rank_keep(ranks, L, R, x.device)
    ids = token_adapter.to(device=x.device, dtype=torch.int64)
    has = ids >= 0
    sel = ids.clamp(min=0)
    t = torch.zeros(M, R, dtype=acc, device=x.device) if out is None else out.zero_()
    for s, e in _row_chunks(M, R * K):
        a_tok = lora_a_stack[sel[s:e]].to(acc)                                  # [m, R, K]
        prod = torch.bmm(a_tok, x[s:e].to(acc).unsqueeze(-1)).squeeze(-1)       # [m, R]
        prod = prod * scales.to(device=x.device, dtype=acc)[sel[s:e]].unsqueeze(-1)
        use = keep[sel[s:e]] & has[s:e].unsqueeze(-1)
        t[s:e] = torch.where(use, prod, torch.zeros((), dtype=acc, device=x.device))
    return t


def lora_expand_delta(t: torch.Tensor, lora_b_stack: torch.Tensor, token_adapter: torch.Tensor,
                      ranks: Optional[torch.Tensor] = None, acc: Optional[torch.dtype] = None) -> torch.Tensor:
    """delta[m] = lora_b_stack[i, :, :rank_i] @ t[m, :rank_i] (0 where i = -1), in `acc`.

    t [M, r_max], lora_b_stack [L, N, r_max] -> delta [M, N]. Entries of t and of the stack at or
    past rank_i are never used (masked with where, so even NaN there cannot leak)."""
    acc = acc or acc_dtype(t.dtype, lora_b_stack.dtype)
    M, (L, N, R) = t.shape[0], lora_b_stack.shape
    keep = rank_keep(ranks, L, R, t.device)
    ids = token_adapter.to(device=t.device, dtype=torch.int64)
    has = ids >= 0
    sel = ids.clamp(min=0)
    zero = torch.zeros((), dtype=acc, device=t.device)
    delta = torch.zeros(M, N, dtype=acc, device=t.device)
    for s, e in _row_chunks(M, N * R):
        use = keep[sel[s:e]] & has[s:e].unsqueeze(-1)                          # [m, R]
        t_use = torch.where(use, t[s:e].to(acc), zero)
        b_tok = torch.where(use.unsqueeze(1), lora_b_stack[sel[s:e]].to(acc), zero)  # [m, N, R]
        delta[s:e] = torch.bmm(b_tok, t_use.unsqueeze(-1)).squeeze(-1)
    return delta


@torch.no_grad()
def lora_expand_(y: torch.Tensor, t: torch.Tensor, lora_b_stack: torch.Tensor,
                 token_adapter: torch.Tensor, ranks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In place: y[m] += lora_b_stack[i, :, :rank_i] @ t[m, :rank_i] for tokens with an adapter
    (one rounding per element); rows with i = -1 keep their exact bits.

    y [M, N], t [M, r_max] float, lora_b_stack [L, N, r_max] -> y."""
    acc = acc_dtype(y.dtype, t.dtype, lora_b_stack.dtype)
    delta = lora_expand_delta(t, lora_b_stack, token_adapter, ranks, acc)
    has = (token_adapter.to(device=y.device) >= 0).unsqueeze(-1)
    y.copy_(torch.where(has, (y.to(acc) + delta).to(y.dtype), y))
    return y


def multi_lora_linear(x: torch.Tensor, weight: torch.Tensor, lora_a_stack: torch.Tensor,
                      lora_b_stack: torch.Tensor, token_adapter: torch.Tensor, scales: torch.Tensor,
                      bias: Optional[torch.Tensor] = None, ranks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ weight.T + bias + lora_expand_delta(lora_shrink(x, ...), ...), rounded once.

    x [M, K], weight [N, K], lora_a_stack [L, r_max, K], lora_b_stack [L, N, r_max],
    token_adapter [M], scales [L], bias [N] | None, ranks [L] | None -> y [M, N] in x.dtype."""
    acc = acc_dtype(x.dtype, weight.dtype, lora_a_stack.dtype, lora_b_stack.dtype)
    y = F.linear(x.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    t = lora_shrink(x, lora_a_stack, token_adapter, scales, ranks).to(acc)
    y = y + lora_expand_delta(t, lora_b_stack, token_adapter, ranks, acc)
    return y.to(x.dtype)
