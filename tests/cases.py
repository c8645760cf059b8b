"""Input builders shared by the tests."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from lora_kernels import reference
from tolerances import assert_close, poison_, rand


@dataclass
class LoraInputs:
    x: torch.Tensor
    weight: torch.Tensor
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float
    bias: Optional[torch.Tensor]

    def args(self):
        return self.x, self.weight, self.lora_a, self.lora_b, self.scale, self.bias

    def reference64(self, **kw) -> torch.Tensor:
        """The float64 oracle."""
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return reference.lora_linear(d(self.x), d(self.weight), d(self.lora_a), d(self.lora_b),
                                     self.scale, d(self.bias), **kw)

    def torch_expression(self) -> torch.Tensor:
        """The plain-torch composition in the inputs' own dtype (the error yardstick)."""
        x = self.x
        lora = F.linear(F.linear(x.to(self.lora_a.dtype), self.lora_a), self.lora_b) * self.scale
        return F.linear(x, self.weight, self.bias) + lora.to(x.dtype)


def make_lora_inputs(M, N, K, r, dtype=torch.float32, device="cpu", *, adapter_dtype=None,
                     bias=True, lead=None, scale=0.75, x_layout="contiguous",
                     weight_layout="contiguous") -> LoraInputs:
    """Random LoRA inputs scaled so outputs are O(1) in every dtype.

    lead: leading dims of x instead of [M]; x_layout: "contiguous" | "strided" (every other column
    of a wider buffer) | "transposed" (column-major); weight_layout: "contiguous" | "transposed"."""
    adapter_dtype = adapter_dtype or dtype
    shape = tuple(lead) if lead is not None else (M,)
    if x_layout == "strided":
        x = rand(*shape, 2 * K, dtype=dtype, device=device)[..., ::2]
    elif x_layout == "transposed":
        x = rand(K, *shape, dtype=dtype, device=device).movedim(0, -1)
    else:
        x = rand(*shape, K, dtype=dtype, device=device)
    if weight_layout == "transposed":
        weight = rand(K, N, dtype=dtype, device=device, scale=K ** -0.5).t()
    else:
        weight = rand(N, K, dtype=dtype, device=device, scale=K ** -0.5)
    lora_a = rand(r, K, dtype=adapter_dtype, device=device, scale=K ** -0.5)
    lora_b = rand(N, r, dtype=adapter_dtype, device=device, scale=r ** -0.5)
    b = rand(N, dtype=dtype, device=device) if bias else None
    return LoraInputs(x, weight, lora_a, lora_b, scale, b)


MERGE_LAYOUTS = ("contiguous", "fan_in_fan_out", "row_slice", "col_slice", "column_major")


@dataclass
class MergeInputs:
    weight: torch.Tensor          # what merge_ gets: [N, K], or [K, N] when fan_in_fan_out
    lora_a: torch.Tensor          # [r, K]
    lora_b: torch.Tensor          # [N, r]
    scale: float
    fan_in_fan_out: bool
    storage: torch.Tensor         # the buffer weight views (a fused qkv weight for the slices)
    view: Callable                # storage-shaped tensor -> the same view as weight

    def outside(self) -> torch.Tensor:
        """bool, storage's shape: True where storage is not part of weight."""
        inside = torch.zeros(self.storage.shape, dtype=torch.bool, device=self.storage.device)
        self.view(inside).fill_(True)
        return ~inside

    def logical64(self, w: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.weight if w is None else w
        return (w.t() if self.fan_in_fan_out else w).double()

    def delta64(self) -> torch.Tensor:
        """scale * B @ A in float64, [N, K]."""
        return self.scale * self.lora_b.double() @ self.lora_a.double()

    def delta_bound64(self) -> torch.Tensor:
        """|scale| * |B| @ |A|: the scale of the fp32 error of forming delta, elementwise."""
        return abs(self.scale) * self.lora_b.double().abs() @ self.lora_a.double().abs()

    def peft_expression(self) -> torch.Tensor:
        """PEFT's merge, ``W + (B @ A) * s`` in the tensors' own dtypes, [N, K]."""
        w = self.weight.t() if self.fan_in_fan_out else self.weight
        return w + ((self.lora_b @ self.lora_a) * self.scale).to(w.dtype)


def make_merge_inputs(N, K, r, dtype=torch.float32, device="cpu", *, layout="contiguous",
                      adapter_dtype=None, scale=0.5, delta_ratio=0.5) -> MergeInputs:
    """Random merge inputs with |W| ~ 0.05 and |delta| ~ delta_ratio * |W| elementwise.

    layout: "contiguous" [N, K]; "fan_in_fan_out" (stored [K, N], PEFT's Conv1D); "row_slice"
    (the middle N rows of a fused [3N, K] qkv weight); "col_slice" (the middle K columns of a
    [N, 3K] buffer: strides (3K, 1)); "column_major" ([N, K] with strides (1, N))."""
    adapter_dtype = adapter_dtype or dtype
    shapes = {"fan_in_fan_out": (K, N), "row_slice": (3 * N, K), "col_slice": (N, 3 * K),
              "column_major": (K, N), "contiguous": (N, K)}
    views = {"fan_in_fan_out": lambda t: t, "row_slice": lambda t: t[N:2 * N],
             "col_slice": lambda t: t[:, K:2 * K], "column_major": lambda t: t.t(),
             "contiguous": lambda t: t}
    storage = rand(*shapes[layout], dtype=dtype, device=device, scale=0.05)
    weight = views[layout](storage)
    lora_a = rand(r, K, dtype=adapter_dtype, device=device)
    # B @ A ~ N(0, 1) elementwise; B's scale brings scale * B @ A to delta_ratio * |W|
    lora_b = rand(N, r, dtype=adapter_dtype, device=device, scale=r ** -0.5 * 0.05 * delta_ratio / scale)
    return MergeInputs(weight, lora_a, lora_b, scale, layout == "fan_in_fan_out", storage, views[layout])


# ---------------------------------------------------------------------------------------------
# Multi-adapter inputs
# ---------------------------------------------------------------------------------------------

@dataclass
class MultiInputs:
    x: torch.Tensor            # [M, K]
    weight: torch.Tensor       # [N, K]
    lora_a: torch.Tensor       # [L, r_max, K]
    lora_b: torch.Tensor       # [L, N, r_max]
    scales: torch.Tensor       # [L] float32
    ranks: Optional[torch.Tensor]  # [L] int32 | None
    bias: Optional[torch.Tensor]
    token_adapter: torch.Tensor    # [M] int32, -1 = none

    def index(self):
        from lora_kernels import AdapterIndex
        return AdapterIndex.from_token_adapters(self.token_adapter, self.lora_a.shape[0])

    def t64(self) -> torch.Tensor:
        return reference.lora_shrink(self.x.double(), self.lora_a.double(), self.token_adapter,
                                     self.scales.double(), self.ranks)

    def linear64(self) -> torch.Tensor:
        d = lambda t: None if t is None else t.double()  # noqa: E731
        return reference.multi_lora_linear(d(self.x), d(self.weight), d(self.lora_a), d(self.lora_b),
                                           self.token_adapter, d(self.scales), d(self.bias), self.ranks)

    def linear_torch_expression(self) -> torch.Tensor:
        """The PEFT-style per-adapter loop in the inputs' own dtype (the error yardstick)."""
        y = F.linear(self.x, self.weight, self.bias)
        for i in range(self.lora_a.shape[0]):
            rows = (self.token_adapter == i).nonzero().flatten()
            r = self.lora_a.shape[1] if self.ranks is None else int(self.ranks[i])
            if len(rows) and r > 0:
                xa = self.x[rows].to(self.lora_a.dtype)
                lora = F.linear(F.linear(xa, self.lora_a[i, :r]), self.lora_b[i, :, :r]) * float(self.scales[i])
                y[rows] += lora.to(y.dtype)
        return y


def make_multi_inputs(M, N, K, L, r_max, dtype=torch.float32, device="cpu", *, dist="decode", ranks=None,
                      adapter_dtype=None, bias=True, seed=0, poison_padding=True) -> MultiInputs:
    """Random multi-adapter inputs with outputs O(1) in every dtype.

    ranks: None (every slot r_max), "mixed" (random in 1..r_max), or a list of L ints.
    poison_padding: fill the stacks past each slot's rank with NaN, which no backend may read."""
    from bench.suites import token_adapters
    adapter_dtype = adapter_dtype or dtype
    gen = torch.Generator().manual_seed(seed)
    if ranks == "mixed":
        ranks = torch.randint(1, r_max + 1, (L,), generator=gen, dtype=torch.int32)
        ranks[0] = r_max
    elif ranks is not None:
        ranks = torch.tensor(ranks, dtype=torch.int32)
    x = rand(M, K, dtype=dtype, device=device)
    weight = rand(N, K, dtype=dtype, device=device, scale=K ** -0.5)
    lora_a = rand(L, r_max, K, dtype=adapter_dtype, device=device, scale=K ** -0.5)
    lora_b = rand(L, N, r_max, dtype=adapter_dtype, device=device, scale=r_max ** -0.5)
    if ranks is not None and poison_padding:
        keep = reference.rank_keep(ranks, L, r_max, "cpu").to(device)
        lora_a.masked_fill_(~keep[:, :, None], float("nan"))
        lora_b.masked_fill_(~keep[:, None, :], float("nan"))
    scales = (torch.rand(L, generator=gen, dtype=torch.float64) + 0.5).to(device=device, dtype=torch.float32)
    b = rand(N, dtype=dtype, device=device) if bias else None
    ids = token_adapters(dist, M, L, seed).to(device)
    return MultiInputs(x, weight, lora_a, lora_b, scales, None if ranks is None else ranks.to(device), b, ids)


def lora_linear_with_grads(inp: LoraInputs, dy: torch.Tensor, *, backend: str, dropout_p: float = 0.0,
                           training: bool = False, torch_seed: Optional[int] = None,
                           train_weight: bool = False):
    """(y, grads) of lora_kernels.lora_linear on fresh leaves cloned from `inp`; grads maps
    "x", "lora_a", "lora_b", "bias" (and "weight" when train_weight) to their gradients.
    torch_seed: torch.manual_seed right before the call (fixes the dropout mask)."""
    import lora_kernels
    leaves = {n: getattr(inp, n).detach().clone().requires_grad_(True)
              for n in ("x", "lora_a", "lora_b", "bias") if getattr(inp, n) is not None}
    weight = inp.weight.detach().clone().requires_grad_(train_weight)
    if torch_seed is not None:
        torch.manual_seed(torch_seed)
    y = lora_kernels.lora_linear(leaves["x"], weight, leaves["lora_a"], leaves["lora_b"], inp.scale,
                                 leaves.get("bias"), dropout_p=dropout_p, training=training, backend=backend)
    y.backward(dy)
    grads = {n: t.grad for n, t in leaves.items()}
    if train_weight:
        grads["weight"] = weight.grad
    return y, grads


def reference_with_grads(inp: LoraInputs, dy: torch.Tensor, *, dropout_p: float = 0.0,
                         dropout_mask: Optional[torch.Tensor] = None):
    """(y, grads) of the float64 reference (plain autograd) on inp's values, with every input --
    weight included -- a leaf; dropout_mask: bool like x (True = keep)."""
    leaves = {n: getattr(inp, n).detach().double().requires_grad_(True)
              for n in ("x", "weight", "lora_a", "lora_b", "bias") if getattr(inp, n) is not None}
    y = reference.lora_linear(leaves["x"], leaves["weight"], leaves["lora_a"], leaves["lora_b"], inp.scale,
                              leaves.get("bias"), dropout_p=dropout_p, dropout_mask=dropout_mask)
    y.backward(dy.double())
    return y, {n: t.grad for n, t in leaves.items()}


def make_exact_merge_inputs(N, K, r, dtype=torch.float32, device="cpu", *, layout="contiguous",
                            adapter_dtype=None, delta_ratio=0.5, b_exponent=None) -> MergeInputs:
    """make_merge_inputs, but with adapters whose delta every backend forms *exactly* in fp32:
    entries are odd multiples of 1/16 (times a power of two for B), so each product has at most 8
    significant bits and every partial sum over r <= 256 ranks fits 16 bits -- in any summation
    order, on tensor cores, in tf32 halves -- and scale is 0.5. Backends must then agree bit for
    bit (merged weights, exact codes, escape tables), which random adapters cannot show.
    b_exponent: B's entries are odd sixteenths times 2^b_exponent (default: from delta_ratio)."""
    inp = make_merge_inputs(N, K, r, dtype, device, layout=layout, adapter_dtype=adapter_dtype)
    adapter_dtype = adapter_dtype or dtype

    def odd_sixteenths(*shape):
        k = 2 * torch.randint(0, 8, shape) + 1
        sign = torch.where(torch.rand(shape) < 0.5, -1, 1)
        return (sign * k).double() / 16

    # |delta| ~ sqrt(r) * 0.58^2 * 2^e * scale (rms of an odd sixteenth is 0.58): aim at delta_ratio * 0.05
    e = b_exponent if b_exponent is not None else round(math.log2(0.05 * delta_ratio / (r ** 0.5 * 0.336 * 0.5)))
    inp.scale = 0.5
    inp.lora_a = odd_sixteenths(r, K).to(device=device, dtype=adapter_dtype)
    inp.lora_b = (odd_sixteenths(N, r) * 2.0 ** e).to(device=device, dtype=adapter_dtype)
    return inp


def assert_lora_linear_and_grads_match_float64(inp: LoraInputs, dtype: torch.dtype, backend: str = "auto") -> None:
    """lora_linear on `backend` -- y and the gradients of x, lora_a, lora_b -- equals the float64
    torch backend on the same values (y also within 2x the plain-torch expression's error)."""
    import lora_kernels
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b))
    y = lora_kernels.lora_linear(x, inp.weight, a, b, inp.scale, inp.bias, backend=backend)
    assert_close(y, inp.reference64(), dtype, torch_out=inp.torch_expression())
    dy = torch.randn_like(y)
    y.backward(dy)
    x64, a64, b64 = (t.detach().double().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b))
    bias64 = None if inp.bias is None else inp.bias.double()
    y64 = lora_kernels.lora_linear(x64, inp.weight.double(), a64, b64, inp.scale, bias64, backend="torch")
    y64.backward(dy.double())
    for g, g64, name in ((x.grad, x64.grad, "x"), (a.grad, a64.grad, "A"), (b.grad, b64.grad, "B")):
        assert_close(g, g64, dtype, what=f"grad {name}")


# (dist, M, N, K, L, r_max, ranks) for the GPU lane's multi-adapter tests (Triton and CUDA): every
# distribution, decode and prefill sizes of the bench suite, odd sizes, L = 1 and 256, ranks mixed
# -- a curated list, not a product, to keep the GPU lane's compile and run time to a minute or two.
GPU_MULTI_CASES = [
    ("decode", 1, 4096, 4096, 8, 16, None),
    ("decode", 16, 1024, 4096, 128, 16, None),
    ("decode", 64, 4096, 4096, 128, 64, "mixed"),
    ("decode", 1024, 4096, 4096, 8, 64, None),
    ("prefill", 4096, 4096, 4096, 128, 16, "mixed"),
    ("prefill", 1024, 1024, 4096, 8, 64, None),
    ("zipf", 1024, 4096, 4096, 128, 16, "mixed"),
    ("zipf", 333, 1000, 1234, 7, 7, "mixed"),
    ("one", 2048, 1024, 1024, 128, 64, None),
    ("none10", 256, 4096, 4096, 8, 16, None),
    ("none10", 200, 96, 80, 256, 4, "mixed"),
    ("none", 130, 64, 96, 1, 128, None),
]


def cuda_lora_linear_fwd(inp: LoraInputs, save_t: bool = True, **kw):
    """(y, t) from the CUDA launcher (lora_kernels.cuda.lora_linear) on `inp`'s CUDA tensors, into
    poisoned outputs (every element must be written); `kw` reaches the launcher (tile_kind, ...)."""
    from lora_kernels.cuda.lora_linear import lora_linear_fwd
    M, N, r = inp.x.shape[0], inp.weight.shape[0], inp.lora_a.shape[0]
    out = poison_(torch.empty(M, N, dtype=inp.x.dtype, device="cuda"))
    t_out = poison_(torch.empty(M if save_t else 0, r, dtype=torch.float32, device="cuda"))
    y, t = lora_linear_fwd(*inp.args(), save_t=save_t, out=out, t_out=t_out, **kw)
    torch.cuda.synchronize()
    return y, t


def assert_lora_linear_fwd_matches_float64(inp: LoraInputs, y: torch.Tensor, t: Optional[torch.Tensor] = None) -> None:
    """y (and t = x @ lora_a.T, when given) against float64, at y's dtype's tolerance."""
    dtype = inp.x.dtype
    mixed_bias = inp.bias is not None and inp.bias.dtype != dtype
    assert_close(y, inp.reference64(), dtype, torch_out=None if mixed_bias else inp.torch_expression())
    if t is not None:
        t_dtype = torch.float32 if inp.lora_a.dtype == dtype else dtype  # fp32 adapters run split
        assert_close(t, inp.x.double() @ inp.lora_a.double().t(), t_dtype, what="t")


def require_hopper_with_sm90_kernels() -> None:
    """GPU-lane guard of the sm90 test files: skip off an sm_90 GPU; fail (not skip) on one where
    the extension cannot load or was built without the sm90 kernels -- that is a broken install."""
    import pytest
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm90 kernels need an sm_90 GPU (H100/H200)")
    from lora_kernels.cuda import loader
    from lora_kernels.cuda import lora_linear as cl
    reason = loader.unavailable_reason()
    if reason is not None:
        pytest.fail(f"the CUDA extension is not usable on this GPU machine: {reason}")
    loader.load()
    if not cl.sm90_built():
        pytest.fail("the CUDA extension was built without the sm90 kernels (see lora_kernels/cuda/sources.py: "
                    "CUTLASS headers from nvidia-cutlass and a 9.0a target are needed)")


def assert_no_host_sync(step: Callable[[], None]) -> None:
    """Runs `step` once to warm up (first launches may compile or allocate), then again with
    torch's sync debug mode raising on any host synchronisation."""
    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
