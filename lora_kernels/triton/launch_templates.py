"""Launch templates: one call signature's allocations and kernel launches, recorded from a real
call of a launcher and replayed by the next calls with that signature (issue 16 point 6).

At decode (M = 1) a launcher's host work is mostly deciding and gathering: reading shapes,
strides and dtypes, looking up its records, building ~35 launch arguments. For one signature --
everything those decisions read: the shapes, strides, dtypes and device of the tensors, the
Python scalars and flags -- the outcome is always the same: the same allocations, then the same
launches with the same ints, constexprs and grids, only the tensors differ. So a launcher records
one call and keeps, under its signature, what it did::

    allocs: [(torch.empty | torch.zeros, shape, dtype, device), ...]
    steps:  [(kernel, grid, which tensors (input i / allocation j), the other arguments, kwargs), ...]
    result: which tensors it returned

and a call with that signature replays it: the allocations, then each launch with this call's
tensors. The launcher's path is written once (the recording is a real call of it); the templates
live in lora_linear's launch cache (_LAUNCHES) and are cleared with it.

What a launcher must keep to (checked at the end of each recording, so a slip costs a template,
never a wrong replay):

* every tensor it allocates comes from ``empty`` / ``zeros`` here, every kernel it launches goes
  through ``launch`` here, with the tensor arguments first (our kernels' convention: pointers,
  then sizes, strides, constexprs);
* every other tensor operation on the launch path (a view handed to a kernel, ``zero_``, a torch
  reduction), and every decision read from anything but the signature (a data pointer's
  alignment, a global flag), calls ``not_replayable()`` first;
* every tensor a kernel receives or the launcher returns is one of the inputs it names or one of
  its allocations; the inputs are distinct tensors.

A recording that breaks one of the last rules is dropped (no template; the next call records
again). tests/test_triton_launch_templates.py compares every replayed launch with the launch the
launcher makes itself, over the launchers' paths.
"""
from __future__ import annotations

import threading
from operator import itemgetter
from typing import Callable, Optional, Sequence, Tuple

import torch

# False: the launchers never record nor replay (tests compare both; bench A/B timing)
ENABLED = True


class _State(threading.local):
    recording: Optional["Recording"] = None  # the recording in progress on this thread


_STATE = _State()


class Recording:
    """What one launcher call allocated and launched, in order."""
    __slots__ = ("allocs", "launches", "replayable")

    def __init__(self):
        self.allocs, self.launches, self.replayable = [], [], True

    def template(self, inputs: Sequence[Optional[torch.Tensor]], result) -> Optional["Template"]:
        """The Template of this call, whose `inputs` are the tensors a replay is handed (None for
        an absent one) and `result` the tuple the launcher returned; None if it cannot be replayed."""
        if not self.replayable:
            return None
        slots = {}
        for i, t in enumerate(inputs, 1):  # slot 0 holds None
            if t is not None:
                if id(t) in slots:
                    return None  # one tensor as two inputs: a replay could not tell which it passed
                slots[id(t)] = i
        allocs = []
        for j, (zeroed, t) in enumerate(self.allocs):
            slots[id(t)] = len(inputs) + 1 + j
            allocs.append((zeroed, tuple(t.shape), t.dtype, t.device))
        steps = []
        for kernel, grid, args, kw in self.launches:
            n = 0
            while n < len(args) and isinstance(args[n], torch.Tensor):
                n += 1
            picked = [slots.get(id(a)) for a in args[:n]]
            rest = args[n:]
            if (n < 2 or None in picked or any(isinstance(a, torch.Tensor) for a in rest)
                    or any(isinstance(v, torch.Tensor) for v in kw.values())):
                return None
            steps.append((kernel, grid, itemgetter(*picked), rest, kw))
        picked = [0 if r is None else slots.get(id(r)) for r in result]
        if None in picked:
            return None  # it returned a tensor made some other way
        return Template(tuple(allocs), tuple(steps), itemgetter(*picked), len(result))


class Template:
    """A recorded call's allocations and launches (see the module docstring). `meta`: what the
    launcher needs to gather a replay's inputs (e.g. which of an index's work lists), its own."""
    __slots__ = ("allocs", "steps", "result", "n_result", "meta")

    def __init__(self, allocs, steps, result, n_result: int):
        self.allocs, self.steps, self.result, self.n_result = allocs, steps, result, n_result
        self.meta = None

    def replay(self, inputs: tuple) -> tuple:
        """The launcher's result for these inputs (the tensors of the recording's `inputs`, in
        its order): its allocations, then its launches with these tensors."""
        env = [None, *inputs]
        for zeroed, shape, dtype, device in self.allocs:
            # torch's functions read at each call (bench/overhead.py counts allocations by
            # replacing them)
            env.append((torch.zeros if zeroed else torch.empty)(shape, dtype=dtype, device=device))
        for kernel, grid, pick, rest, kw in self.steps:
            kernel[grid](*pick(env), *rest, **kw)
        out = self.result(env)
        return out if self.n_result > 1 else (out,)


def empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.empty(shape, dtype=dtype, device=device), noted by a recording in progress."""
    return _noted(torch.empty(shape, dtype=dtype, device=device), False)


def zeros(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """torch.zeros(shape, dtype=dtype, device=device), noted by a recording in progress."""
    return _noted(torch.zeros(shape, dtype=dtype, device=device), True)


def _noted(out: torch.Tensor, zeroed: bool) -> torch.Tensor:
    rec = _STATE.recording
    if rec is not None:
        rec.allocs.append((zeroed, out))
    return out


def launch(kernel, grid, args: tuple, kw: dict) -> None:
    """kernel[grid](*args, **kw), noted by a recording in progress."""
    kernel[grid](*args, **kw)
    rec = _STATE.recording
    if rec is not None:
        rec.launches.append((kernel, grid, args, kw))


def not_replayable() -> None:
    """The call in progress does something a template cannot replay (see the module docstring)."""
    rec = _STATE.recording
    if rec is not None:
        rec.replayable = False


def record(inputs: Tuple[Optional[torch.Tensor], ...], fn: Callable, *args, **kw):
    """(fn(*args, **kw), its Template or None): fn is a launcher's own path, returning a tuple of
    tensors (or None for an absent one), recorded as it runs; `inputs` are the tensors fn may hand
    to a kernel or return, as Template.replay will be given them. The caller remembers the
    template under the call's signature. A recording inside another one (a launcher calling a
    recorded launcher) is also the outer one's."""
    outer = _STATE.recording
    rec = _STATE.recording = Recording()
    try:
        result = fn(*args, **kw)
    finally:
        _STATE.recording = outer
    if outer is not None:
        outer.allocs += rec.allocs
        outer.launches += rec.launches
        outer.replayable = outer.replayable and rec.replayable
    return result, rec.template(inputs, result)
