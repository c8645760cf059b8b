"""Per-batch metadata for multi-adapter serving: :class:`AdapterIndex`.

A serving batch has M tokens; token m uses adapter slot ``token_adapter[m]`` (``-1`` = no
adapter) out of ``num_adapters`` slots. The segmented kernels want the tokens grouped by adapter
and a list of fixed-size pieces of work. ``AdapterIndex.from_token_adapters`` builds all of it on
the tensors' device with plain torch ops whose output sizes depend only on M and the number of
slots -- never on the values -- so it

* never synchronises with the host (no ``.item()``, no ``nonzero``, no ``torch.unique``), and
* can be captured in a CUDA graph and replayed with a different mapping of the same M.

An id outside ``[-1, num_adapters)`` is reported with ``torch._assert_async`` (a device-side
assert on CUDA, which poisons the CUDA context as any device assert does; an immediate error on
CPU tensors) and is then treated as ``-1``, so no kernel ever indexes a stack with it, in a graph
or not.

Everything lives in one int32 tensor ``data`` (views below), so an op can take the index as a
single tensor argument and rebuild the views with :meth:`AdapterIndex.from_data`:

    token_adapter  [C]        the sanitised slot of each token (-1 = none, invalid or padding)
    sorted_tokens  [C]        token ids grouped by slot 0, 1, ..., L-1, then the no-adapter
                              tokens; stable (token order kept inside a group, so the padding
                              tokens M .. C-1 come last and positions [0, M) hold tokens [0, M))
    sorted_adapter [C]        slot of the token at each sorted position (-1 = none)
    slot_start     [L + 2]    slot s occupies sorted positions [slot_start[s], slot_start[s+1]);
                              "slot" L is the no-adapter group; slot_start[L + 1] = C
    work(T)        [I_T, 3]   for T in ITEM_SIZES: rows (adapter, start, length), one per piece of
                              at most T sorted positions of one slot (adapter -1 = the no-adapter
                              group); rows past the real number of pieces have length 0

C is the capacity: M for ``from_token_adapters``, ``max_tokens`` for ``with_capacity`` (whose
``update_`` rebuilds the same storage for any M <= C; the padding tokens are never in a work list).

The work list has a fixed number of rows, ``I_T = (C + min(L + 1, C) * (T - 1)) // T``: a group of
c tokens is cut into ceil(c / T) pieces, and at most min(L + 1, M) groups are non-empty. A kernel
grid over the work list is therefore sized by M (plus at most one partial piece per active group),
never by the number of slots, and a 1-token group costs one piece of one row, not a tile of T.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ._validation import INT_INDEX_DTYPES, check_count, check_tensor, check_values, fail

# Work-list granularities built for every batch. 16 rows is the smallest tensor-core tile
# (tl.dot needs M >= 16): decode pieces (1..16 tokens of one adapter) waste at most 15 rows.
# 64 rows is the prefill granularity: long segments reuse each adapter tile over 64 tokens.
# The launchers pick one per call (triton/multi_lora.py says when); building both costs a few
# tiny element-wise ops.
ITEM_SIZES = (16, 64)
_WORK_COLS = 3
_WORK_NAMES = {T: f"work{T}" for T in ITEM_SIZES}  # item size -> its work list's name in data
OP = "AdapterIndex.from_token_adapters"


def num_work_items(num_tokens: int, num_adapters: int, item_m: int) -> int:
    """Rows of the work list: an upper bound on sum_g ceil(count_g / item_m) over all groups."""
    groups = min(num_adapters + 1, num_tokens)
    return (num_tokens + groups * (item_m - 1)) // item_m


_LAYOUTS: Dict[Tuple[int, int], Tuple[Dict[str, Tuple[int, int]], int]] = {}


def _layout(num_tokens: int, num_adapters: int) -> Tuple[Dict[str, Tuple[int, int]], int]:
    """name -> (offset, length) into ``data``, and the total length (cached: every op call
    rebuilds the views from (capacity, L); a plain dict, which torch.compile traces)."""
    key = (num_tokens, num_adapters)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = _compute_layout(num_tokens, num_adapters)
    return _LAYOUTS[key]


def _compute_layout(num_tokens: int, num_adapters: int) -> Tuple[Dict[str, Tuple[int, int]], int]:
    M, L = num_tokens, num_adapters
    sizes = [("token_adapter", M), ("sorted_tokens", M), ("sorted_adapter", M), ("slot_start", L + 2)]
    sizes += [(f"work{T}", num_work_items(M, L, T) * _WORK_COLS) for T in ITEM_SIZES]
    layout, offset = {}, 0
    for name, n in sizes:
        layout[name] = (offset, n)
        offset += n
    return layout, offset


# Slots and positions are int32 on the device (slot_start holds L + 2 of them).
MAX_INDEX_SIZE = 2 ** 31 - 2


def _check_size(op: str, name: str, value) -> int:
    check_count(op, name, value)
    if value > MAX_INDEX_SIZE:
        fail(op, f"{name} must be at most 2**31 - 2 (int32 slot ids and positions), got {value}")
    return value


class AdapterIndex:
    """Which adapter each token of a batch uses, grouped for the segmented kernels.

    Build it once per batch with :meth:`from_token_adapters` and pass it to every LoRA layer of
    the model (``lora_shrink``, ``lora_expand_``, ``multi_lora_linear``, ``MultiLoRALinear``).
    For CUDA graphs and ``torch.compile``, allocate it once with :meth:`with_capacity` and
    rebuild it in place every step with :meth:`update_` (``data`` keeps its storage).

    Attributes: ``num_tokens`` (M of the last build: the ops take x / y of exactly M rows),
    ``capacity`` (the most tokens ``data`` has room for; = M for ``from_token_adapters``),
    ``num_adapters`` (L), ``data`` and the views listed in the module docstring, each sized by
    ``capacity``: positions past M hold the padding tokens M .. capacity-1, all with no adapter.
    ``num_tokens`` is read from a tensor shape (the live view of ``token_adapter``), so
    ``torch.compile(dynamic=True)`` treats it as symbolic: no recompile when M changes.
    """

    def __init__(self, data: torch.Tensor, num_tokens: int, num_adapters: int, capacity: Optional[int] = None,
                 *, padded: bool = False):
        capacity = num_tokens if capacity is None else capacity
        layout, total = _layout(capacity, num_adapters)
        if data.dtype != torch.int32 or data.dim() != 1 or data.numel() != total:
            fail("AdapterIndex", f"data must be a 1-D int32 tensor of {total} elements for "
                                 f"capacity={capacity}, num_adapters={num_adapters}, got "
                                 f"{str(data.dtype).replace('torch.', '')} of shape {list(data.shape)}")
        self.data = data
        self.num_adapters = int(num_adapters)
        self.capacity = int(capacity)
        self._layout = layout
        self._views: dict = {}  # _view's cache (name -> view of self._views_of)
        self._views_of = data
        self._live = self._view("token_adapter")[:num_tokens]
        # True for padded_to(): rows past the last update are not in the work lists, so the
        # shrink zeroes its output before the kernel writes the covered rows.
        self.padded = padded

    @property
    def num_tokens(self):
        return self._live.shape[0]

    def _view(self, name: str, cols: int = 0) -> torch.Tensor:
        """data's slice `name`, made once per index and data tensor in eager mode: each op reads
        three to five views, and making one costs ~2 us of host time (CPU machine). The views
        share data's storage, so update_'s in-place writes reach them. Compiled regions make
        them afresh (nothing cached across a trace)."""
        if torch.compiler.is_compiling():
            return self._make_view(name, cols)
        views = self._views
        if self._views_of is not self.data:
            views.clear()
            self._views_of = self.data
        key = (name, cols)
        view = views.get(key)
        if view is None:
            view = views[key] = self._make_view(name, cols)
        return view

    def _make_view(self, name: str, cols: int) -> torch.Tensor:
        """data's slice `name`, as rows of `cols` columns when cols > 0."""
        offset, n = self._layout[name]
        view = self.data[offset:offset + n]
        return view.view(-1, cols) if cols else view

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def token_adapter(self) -> torch.Tensor:
        """[M] the sanitised slot of each token of the last build (-1 = none)."""
        return self._live

    @property
    def sorted_tokens(self) -> torch.Tensor:
        return self._view("sorted_tokens")

    @property
    def sorted_adapter(self) -> torch.Tensor:
        return self._view("sorted_adapter")

    @property
    def slot_start(self) -> torch.Tensor:
        return self._view("slot_start")

    def work(self, item_m: int) -> torch.Tensor:
        """[I, 3] int32 rows (adapter, start, length) of pieces of at most ``item_m`` tokens."""
        if item_m not in ITEM_SIZES:
            fail("AdapterIndex.work", f"item_m must be one of {ITEM_SIZES}, got {item_m}")
        return self._view(_WORK_NAMES[item_m], _WORK_COLS)

    def launch_views(self, item_m: int = 0) -> Tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor,
                                                      torch.Tensor]:
        """(``work(item_m)``, or None for item_m = 0; ``sorted_tokens``, ``sorted_adapter``,
        ``slot_start``) in one call, for the launchers. They run only eagerly (an op's
        implementation, or its eager path after the mode checks; a compiled region calls the op,
        whose implementation runs outside the trace), so the tuple is kept per item size without
        _view's compile check: ~2 us less per multi-adapter call at M = 1 (CPU machine)."""
        if self._views_of is self.data:
            hit = self._views.get(item_m)
            if hit is not None:
                return hit
        views = (self.work(item_m) if item_m else None, self.sorted_tokens, self.sorted_adapter, self.slot_start)
        if not torch.compiler.is_compiling():
            self._views[item_m] = views  # after the properties: _view has cleared a stale cache
        return views

    @classmethod
    def from_data(cls, data: torch.Tensor, num_tokens: int, num_adapters: int,
                  capacity: Optional[int] = None) -> "AdapterIndex":
        """Rebuild the views from ``index.data`` (what the registered ops receive)."""
        return cls(data, num_tokens, num_adapters, capacity)

    @classmethod
    def with_capacity(cls, max_tokens: int, num_adapters: int, device=None) -> "AdapterIndex":
        """An index with room for up to ``max_tokens`` tokens, holding an empty batch (M = 0):
        call :meth:`update_` before each step. Allocates ``data`` once; nothing else ever does."""
        op = "AdapterIndex.with_capacity"
        _check_size(op, "max_tokens", max_tokens)
        _check_size(op, "num_adapters", num_adapters)
        _, total = _layout(max_tokens, num_adapters)
        index = cls(torch.empty(total, dtype=torch.int32, device=device), 0, num_adapters, max_tokens)
        index._build(op, torch.zeros(0, dtype=torch.int32, device=index.device))
        return index

    @classmethod
    def from_token_adapters(cls, token_adapter: torch.Tensor, num_adapters: int) -> "AdapterIndex":
        """Build the index on ``token_adapter``'s device with no host synchronisation.

        token_adapter: int32/int64 [M], the slot of each token's adapter, -1 = no adapter.
        num_adapters: the number of slots L (a Python int >= 1): valid ids are -1 .. L-1.

        Semantics (plain torch; C = capacity, here M; tokens M .. C-1 are padding with key L)::

            key = where(token_adapter >= 0, token_adapter, L)        # -1 -> group L, last
            sorted_tokens = argsort(key, stable=True)
            slot_start = [0] + cumsum(bincount(key, minlength=L + 1))  # slot_start[L + 1] = C
            work(T) = [(slot or -1, slot_start[slot] + j * T, min(T, count[slot] - j * T))
                       for slot in 0..L if count[slot] > 0 for j in range(ceil(count[slot] / T))]
                      padded with (-1, M, 0) rows to the fixed length
                      # count[L] counts the real no-adapter tokens only: padding is never work
        """
        op = OP
        check_tensor(op, "token_adapter", token_adapter, dtypes=INT_INDEX_DTYPES, ndim=1)
        check_count(op, "num_adapters", num_adapters)
        _check_size(op, "num_adapters", num_adapters)
        M = token_adapter.shape[0]
        if M >= 2 ** 31 - 1:
            fail(op, f"at most 2**31 - 2 tokens are supported (int32 positions), got {M}")
        _, total = _layout(M, num_adapters)
        index = cls(torch.empty(total, dtype=torch.int32, device=token_adapter.device), M, num_adapters)
        return index._build(op, token_adapter)

    def update_(self, token_adapter: torch.Tensor) -> "AdapterIndex":
        """Rebuild in place for a new batch of M <= capacity tokens (same rules as
        :meth:`from_token_adapters`): no allocation of ``data``, no host sync, fixed-shape work
        (every launch depends only on capacity and L), so it can run inside a captured CUDA
        graph or a compiled region. Returns self."""
        op = "AdapterIndex.update_"
        check_tensor(op, "token_adapter", token_adapter, dtypes=INT_INDEX_DTYPES, ndim=1)
        if token_adapter.shape[0] > self.capacity:
            fail(op, f"token_adapter has {token_adapter.shape[0]} tokens but the index has room for "
                     f"max_tokens = {self.capacity} (AdapterIndex.with_capacity)")
        if token_adapter.device != self.device:
            fail(op, f"token_adapter is on {token_adapter.device} but the index is on {self.device}")
        if self.padded:
            fail(op, "update the index padded_to() was called on, not the padded view")
        return self._build(op, token_adapter)

    def padded_to(self, num_rows: int) -> "AdapterIndex":
        """A view of this index for inputs of ``num_rows`` rows, M <= num_rows <= capacity: rows
        past the last update are padding with no adapter (a CUDA-graph batch padded past the
        live tokens; serving integrations use it). Shares ``data``, so a later update_ of this
        index is seen by the view (rows past the new M are again padding). The ops zero the
        shrink's padding rows and never write y's."""
        op = "AdapterIndex.padded_to"
        if not torch.compiler.is_compiling():
            if not (self.num_tokens <= num_rows <= self.capacity):
                fail(op, f"num_rows must be in [num_tokens = {self.num_tokens}, capacity = "
                         f"{self.capacity}], got {num_rows}")
        return type(self)(self.data, num_rows, self.num_adapters, self.capacity, padded=True)

    def _build(self, op: str, ids: torch.Tensor) -> "AdapterIndex":
        M, L, C = ids.shape[0], self.num_adapters, self.capacity
        valid = (ids >= -1) & (ids < L)
        check_values(op, valid, "token_adapter values must lie in [-1, {last}] (num_adapters={L})", last=L - 1, L=L)
        device = ids.device
        key_live = torch.where(valid & (ids >= 0), ids, L).to(torch.int64)  # invalid -> no adapter
        key = torch.nn.functional.pad(key_live, (0, C - M), value=L)  # padding tokens: no adapter
        order = torch.argsort(key, stable=True)
        counts = torch.zeros(L + 1, dtype=torch.int64, device=device)
        counts.scatter_add_(0, key, torch.ones_like(key))
        ends = torch.cumsum(counts, 0)
        slot_of_key = torch.where(key < L, key, -1)

        self._view("token_adapter").copy_(slot_of_key)
        self.sorted_tokens.copy_(order)
        self.sorted_adapter.copy_(slot_of_key[order])
        slot_start = self.slot_start
        slot_start[:1].zero_()
        slot_start[1:].copy_(ends)
        # padding tokens sort last and are never work: take them out of the last group's count
        pad_count = torch.nn.functional.pad(counts.new_full((1,), C - M), (L, 0))
        counts, ends = counts - pad_count, ends - pad_count
        for T in ITEM_SIZES:
            self.work(T).copy_(_work_list(counts, ends, M, L, T, num_work_items(C, L, T)))
        self._live = self._view("token_adapter")[:M]
        return self

    def __repr__(self) -> str:
        return (f"AdapterIndex(num_tokens={self.num_tokens}, capacity={self.capacity}, "
                f"num_adapters={self.num_adapters}, device={self.device})")


def _work_list(counts: torch.Tensor, ends: torch.Tensor, M: int, L: int, T: int, rows: int) -> torch.Tensor:
    """[rows, 3] (adapter, start, length): pieces of <= T positions, fixed length, no sync."""
    n_items = (counts + T - 1) // T                      # pieces per group [L + 1]
    item_end = torch.cumsum(n_items, 0)                  # inclusive
    k = torch.arange(rows, device=counts.device)
    group = torch.searchsorted(item_end, k, right=True)  # L + 1 for padding rows
    g = group.clamp(max=L)
    j = k - (item_end[g] - n_items[g])                   # piece number inside its group
    start = ends[g] - counts[g] + j * T
    length = (counts[g] - j * T).clamp(0, T)
    is_piece = group <= L
    adapter = torch.where(g < L, g, -1)
    return torch.stack([torch.where(is_piece, adapter, -1),
                        torch.where(is_piece, start, M),
                        torch.where(is_piece, length, 0)], dim=1)
