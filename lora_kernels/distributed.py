"""Tensor parallelism for ``FusedLoRALinear``: torch ``ParallelStyle``s that keep the fused op.

    from torch.distributed.tensor.parallel import parallelize_module
    parallelize_module(model, tp_mesh, {"up": ColwiseLoRAParallel(), "down": RowwiseLoRAParallel()})

Semantics are those of torch's ``ColwiseParallel`` / ``RowwiseParallel`` defaults, with the adapter
sharded so that every rank runs ``lora_kernels.lora_linear`` once, on its own blocks (W [N, K],
A [r, K], B [N, r]; ws ranks; rank i holds block i of each sharded dimension)::

    colwise: W, bias, B  Shard(0) (rows of N);  A Replicate
             x replicated [..., K]  ->  y_i = x @ W_i.T + b_i + s * (x @ A.T) @ B_i.T    [..., N/ws]
             the output stays sharded on its last dim (a local tensor by default): no
             communication at all in the forward.
    rowwise: W, A  Shard(1) (columns of K);  B, bias Replicate
             x sharded on its last dim, x_i [..., K/ws]  ->
             y = allreduce_i(x_i @ W_i.T + s * (x_i @ A_i.T) @ B.T) + bias          [..., N]
               = allreduce_i(x_i @ W_i.T) + s * allreduce_i(x_i @ A_i.T) @ B.T + bias

Design of the row-wise layer. The LoRA partial t_i = x_i @ A_i.T [M, r] must be summed over the
ranks before it meets B. We sum it *inside the all-reduce the base layer needs anyway*: each rank
runs the fused op on its shards, ``lora_linear(x_i, W_i, A_i, B, s)`` = x_i W_iᵀ + s t_i Bᵀ, and
one all-reduce of that [M, N] partial gives the layer's output, because t ↦ t Bᵀ is linear (the
sum of the ranks' t_i Bᵀ is (Σ t_i) Bᵀ; only rounding differs, as for any change of summation
order). Compared with all-reducing t [M, r] separately and expanding after it:

* the forward has one collective, the [M, N] all-reduce that torch's RowwiseParallel issues for
  the base layer, instead of two (the extra [M, r] one is latency-bound: r is 8..128);
* the work per rank is the same (x_i A_iᵀ and t Bᵀ are computed on every rank either way), in one
  kernel: the fused op's single pass over x_i and W_i;
* the price is in the backward: dB = s dyᵀ t needs the full t, and each rank's fused backward
  gives s dyᵀ t_i, so the [N, r] dB is all-reduced (N·r values, against the M·r the separate
  scheme would move in its forward). dx_i = dy W_i + s (dy B) A_i and dA_i = s (dy B)ᵀ x_i are
  this rank's blocks of the full gradients with no communication;
* and it runs through the fused op as it is: ``lora_linear`` has no entry point taking a
  precomputed t, so the separate scheme would compute the base partial and the expand outside
  the fused kernel.

Column-wise needs no communication in the forward; its backward all-reduces what a replicated
input and a replicated A imply: dx (the [M, K] all-reduce torch's ColwiseParallel issues too) and
dA [r, K] (each rank's fused backward gives the part of s (dy B)ᵀ x from its own N-block).

Gradients come back as DTensors with their parameters' placements (the sums above are done before
``DTensor.to_local``'s backward wraps them), so an optimizer steps each parameter on its own
shard. Parameter names, ``requires_grad``, ``scaling``, ``r``, ``in_features`` / ``out_features``
(the full sizes) are unchanged; the module's class becomes :class:`ColwiseFusedLoRALinear` /
:class:`RowwiseFusedLoRALinear`, subclasses of ``FusedLoRALinear`` that override ``forward`` only.
``merge()`` / ``unmerge()`` are local (``merge_sharded``): W_i += s B_i A (colwise) and
W_i += s B A_i (rowwise) are exactly this rank's block of W + s B A, with no communication; the
merged forward is the base layer's (one all-reduce for the row-wise one).

Dropout (``lora_dropout > 0`` in training) is drawn by each rank's fused op from torch's
generator, as on one device. Give every rank of the mesh the same seed (as torch's tensor
parallelism requires for any replicated dropout): column-wise ranks then all draw the one mask of
the replicated x; row-wise ranks draw distinct masks for their distinct column blocks (rank i takes
the i-th of ws seeds drawn, so the generators stay in step).

Limits: a 1-D device mesh; module type exactly ``FusedLoRALinear`` (a subclass may compute
something else); parameters not already DTensors. ``input_layouts`` / ``output_layouts`` are taken
as torch's styles take them (e.g. sequence-parallel ``Shard(1)``), but only the defaults are
tested (tests/test_distributed.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle
from torch.distributed.tensor.placement_types import Partial, Placement

from .layers import FusedLoRALinear
from .ops.lora_linear import draw_dropout_seed, lora_linear
from .ops.merge import MergeResidual, merge_, unmerge_

__all__ = ["ColwiseLoRAParallel", "RowwiseLoRAParallel", "ColwiseFusedLoRALinear", "RowwiseFusedLoRALinear",
           "merge_sharded", "unmerge_sharded"]


# ---------------------------------------------------------------------------------------------
# One collective of our own: the gradient of a tensor every rank uses whole (replicated).
# ---------------------------------------------------------------------------------------------

class _SumGradOverRanks(torch.autograd.Function):
    """Identity in the forward; the backward sums the gradient over the mesh's ranks.

    For a replicated tensor each rank's backward sees only its own share of the gradient (the part
    of it that flows through this rank's shard of the layer); the full gradient is their sum."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        ctx.mesh = mesh
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        import torch.distributed._functional_collectives as funcol
        return funcol.wait_tensor(funcol.all_reduce(grad.contiguous(), "sum", ctx.mesh)), None


def _sum_grad_over_ranks(t: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return _SumGradOverRanks.apply(t, mesh) if t.requires_grad and torch.is_grad_enabled() else t


# ---------------------------------------------------------------------------------------------
# Merge / unmerge of a sharded FusedLoRALinear (FSDP2, tensor parallelism, both): each rank updates
# its own block of W in place, W_blk += s * B_rows @ A_cols. FusedLoRALinear.merge/unmerge call these
# when its parameters are DTensors.
# ---------------------------------------------------------------------------------------------

def _local_merge_operands(layer: FusedLoRALinear):
    """(W_local, A_cols, B_rows): this rank's block of W (a view of its shard: written in place)
    and the A columns / B rows that block needs. A and B are redistributed to W's sharding --
    along K for A, along N for B, replicated elsewhere -- which is a no-op for this package's
    tensor-parallel styles (their shards already match) and an all-gather of A [r, K] under FSDP2
    (which shards A along r)."""
    w, a, b = layer.weight, layer.lora_A, layer.lora_B
    name = type(layer).__name__
    if not all(isinstance(t, DTensor) for t in (w, a, b)):
        raise TypeError(f"{name}: weight, lora_A and lora_B must all be DTensors or none, got "
                        f"{type(w).__name__}, {type(a).__name__}, {type(b).__name__}")
    mesh = w.device_mesh
    if a.device_mesh != mesh or b.device_mesh != mesh:
        raise ValueError(f"{name}: weight, lora_A and lora_B must live on one device mesh to merge")
    dims = [_sharded_dim(p) for p in w.placements]
    if not all(p.is_replicate() or d in (0, 1) for p, d in zip(w.placements, dims)):
        raise ValueError(f"{name}: cannot merge into a weight with placements {w.placements}")
    # B keeps W's row sharding and A its column sharding (same placement objects, so the same
    # rows / columns land on this rank: Shard or FSDP2-over-TP's _StridedShard alike)
    a_cols = a.redistribute(mesh, [p if d == 1 else Replicate() for p, d in zip(w.placements, dims)]).to_local()
    b_rows = b.redistribute(mesh, [p if d == 0 else Replicate() for p, d in zip(w.placements, dims)]).to_local()
    return w.to_local(), a_cols, b_rows


def _sharded_dim(p: Placement) -> Optional[int]:
    """The tensor dim a Shard-like placement splits (Shard, _StridedShard), else None."""
    return None if p.is_replicate() or p.is_partial() else getattr(p, "dim", None)


def _any_rank(flag: bool, mesh: DeviceMesh) -> bool:
    """Whether `flag` holds on any rank of `mesh` (one small all-reduce per mesh dimension)."""
    t = torch.tensor([float(flag)], device=mesh.device_type)
    for dim in range(mesh.ndim):
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX, group=mesh.get_group(dim))
    return bool(t.item() > 0)


@torch.no_grad()
def merge_sharded(layer: FusedLoRALinear, *, safe_merge: bool = False, exact_unmerge: bool = False) -> None:
    """``FusedLoRALinear.merge`` for DTensor parameters; every rank of the mesh calls it (SPMD).
    Under FSDP2 the parameters must be in their sharded state (the shards are what persists;
    ``model.reshard()`` after a forward that left the root unsharded).
    With ``safe_merge`` the ranks agree (one all-reduced flag): if any block would hold inf/NaN,
    every rank raises ValueError with its weight unchanged."""
    w, a, b = _local_merge_operands(layer)
    # safe_merge: a rank that merged while another could not takes its merge back, exactly where
    # the dtype has exact unmerges (float64 weights: a plain unmerge)
    exact_rollback = safe_merge and w.dtype in (torch.float16, torch.bfloat16, torch.float32)
    residual = MergeResidual() if (exact_unmerge or exact_rollback) else None
    failed = False
    try:
        merge_(w, a, b, layer.scaling, safe_merge=safe_merge, residual=residual, backend=layer.backend)
    except ValueError:
        if not safe_merge:
            raise
        failed = True
    if safe_merge and _any_rank(failed, layer.weight.device_mesh):
        if not failed:  # this rank merged: take it back
            if residual is not None:
                unmerge_(w, a, b, layer.scaling, residual=residual)
            else:
                unmerge_(w, a, b, layer.scaling, backend=layer.backend)
        raise ValueError(f"{type(layer).__name__}.merge: safe_merge: the merged weight would hold inf or NaN "
                         f"on at least one rank; weight unchanged on every rank")
    layer._merge_residual = residual if exact_unmerge else None
    # the residual recognises the adapter by its tensors: keep the operands merge_ saw (gathered
    # copies under FSDP2, r x K and N x r) so that the exact unmerge can pass the same ones
    layer._merge_operands = (a, b) if exact_unmerge else None
    layer.merged = True


@torch.no_grad()
def unmerge_sharded(layer: FusedLoRALinear, *, exact: Optional[bool] = None) -> None:
    """``FusedLoRALinear.unmerge`` for DTensor parameters (every rank of the mesh calls it)."""
    name = type(layer).__name__
    w, a, b = _local_merge_operands(layer)
    residual = getattr(layer, "_merge_residual", None)
    kept = layer.__dict__.pop("_merge_operands", None)
    if exact and residual is None:
        raise RuntimeError(f"{name}.unmerge: exact=True needs merge(exact_unmerge=True)")
    if residual is not None and exact is not False:
        if kept is not None and torch.equal(kept[0], a) and torch.equal(kept[1], b):
            a, b = kept  # the adapter is unchanged: the very tensors the residual recorded
        reason = residual.mismatch(w, a, b, layer.scaling)
        if reason is not None:
            layer._merge_operands = kept
            raise RuntimeError(f"{name}.unmerge: cannot restore the weight exactly: {reason}; "
                               f"unmerge(exact=False) subtracts the current adapter instead")
        unmerge_(w, a, b, layer.scaling, residual=residual)
    else:
        unmerge_(w, a, b, layer.scaling, backend=layer.backend)
    layer._merge_residual = None
    layer.merged = False


# ---------------------------------------------------------------------------------------------
# The parallelised layers
# ---------------------------------------------------------------------------------------------

def _last_dim_shard(ndim: int) -> Tuple[Placement, ...]:
    return (Shard(ndim - 1),)


def _normalized(placements: Tuple[Placement, ...], ndim: int) -> Tuple[Placement, ...]:
    """Shard(-1) and friends as DTensor stores them (non-negative dims)."""
    return tuple(Shard(p.dim % ndim) if isinstance(p, Shard) and p.dim < 0 else p for p in placements)


def _contiguous_stride(shape) -> Tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= max(int(size), 1)
    return tuple(reversed(stride))


class _TensorParallelLoRA(FusedLoRALinear):
    """What the two styles share: the mesh and layouts, the input and output conversions."""

    _tp_mesh: DeviceMesh
    _tp_input_layouts: Tuple[Placement, ...]
    _tp_output_layouts: Tuple[Placement, ...]
    _tp_use_local_output: bool

    def _input_dtensor(self, x: torch.Tensor) -> DTensor:
        """x as a DTensor in this style's input layout (a plain tensor is this rank's local part;
        a last-dim shard gets its global size from in_features, so uneven K splits work)."""
        if isinstance(x, DTensor):
            return x
        layouts = _normalized(self._tp_input_layouts, x.dim())
        if layouts != _last_dim_shard(x.dim()):
            return DTensor.from_local(x, self._tp_mesh, layouts, run_check=False)
        shape = (*x.shape[:-1], self.in_features)
        return DTensor.from_local(x, self._tp_mesh, layouts, run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))

    def _output(self, y: DTensor):
        ndim = y.dim()
        wanted = _normalized(self._tp_output_layouts, ndim)
        if y.placements != wanted:
            y = y.redistribute(self._tp_mesh, wanted)
        return y.to_local() if self._tp_use_local_output else y

    def _dropout(self) -> float:
        return self.lora_dropout if self.training else 0.0

    def _local(self):
        """(W_i, A_i, B_i): this rank's blocks, as plain tensors whose gradients come back as
        DTensors with the parameters' placements."""
        return self.weight.to_local(), self.lora_A.to_local(), self.lora_B.to_local()


class ColwiseFusedLoRALinear(_TensorParallelLoRA):
    """A ``FusedLoRALinear`` parallelised by :class:`ColwiseLoRAParallel` (see the module docs)."""

    def forward(self, x: torch.Tensor):
        mesh = self._tp_mesh
        x = self._input_dtensor(x)
        replicate = (Replicate(),)
        if x.placements != replicate:
            x = x.redistribute(mesh, replicate)
        # each rank's dx covers its own N-block only: a partial sum, all-reduced by the backward of
        # the DTensor conversion that produced x (as for torch's ColwiseParallel)
        x_local = x.to_local(grad_placements=(Partial(),))
        w, a, b = self._local()
        bias = None if self.bias is None else self.bias.to_local()
        if self.merged:
            y = F.linear(x_local, w, bias)
        else:
            y = lora_linear(x_local, w, _sum_grad_over_ranks(a, mesh), b, self.scaling, bias,
                            dropout_p=self._dropout(), training=self.training, backend=self.backend)
        if self._tp_use_local_output and _normalized(self._tp_output_layouts, y.dim()) == _last_dim_shard(y.dim()):
            return y  # the default: this rank's [..., N_i] block, nothing to convert
        shape = (*y.shape[:-1], self.out_features)
        return self._output(DTensor.from_local(y, mesh, _last_dim_shard(y.dim()), run_check=False,
                                               shape=torch.Size(shape), stride=_contiguous_stride(shape)))


class RowwiseFusedLoRALinear(_TensorParallelLoRA):
    """A ``FusedLoRALinear`` parallelised by :class:`RowwiseLoRAParallel` (see the module docs)."""

    def forward(self, x: torch.Tensor):
        mesh = self._tp_mesh
        x = self._input_dtensor(x)
        sharded = _last_dim_shard(x.dim())
        if x.placements != sharded:
            x = x.redistribute(mesh, sharded)
        x_local = x.to_local()  # dx_i = dy W_i + s (dy B) A_i: this rank's block of dx, exact
        w, a, b = self._local()
        if self.merged:
            y = F.linear(x_local, w)
        else:
            p = self._dropout()
            rest = self._skip_dropout_seeds(x_local.device) if p > 0.0 else None
            y = lora_linear(x_local, w, a, _sum_grad_over_ranks(b, mesh), self.scaling, None,
                            dropout_p=p, training=self.training, backend=self.backend)
            if rest is not None:
                rest()
        shape = (*y.shape[:-1], self.out_features)
        y = DTensor.from_local(y, mesh, (Partial(),), run_check=False, shape=torch.Size(shape),
                               stride=_contiguous_stride(shape))
        wanted = _normalized(self._tp_output_layouts, y.dim())
        y = y.redistribute(mesh, wanted)  # the one all-reduce (or reduce-scatter) of the layer
        if self.bias is not None:
            y = y + self.bias
        return y.to_local() if self._tp_use_local_output else y

    def _skip_dropout_seeds(self, device):
        """Rank i's fused op draws the i-th of ws dropout seeds: the draws before it happen now,
        the ones after it in the returned callable, so every rank's generator ends in step."""
        rank, size = self._tp_mesh.get_local_rank(), self._tp_mesh.size()
        for _ in range(rank):
            draw_dropout_seed(device)

        def after():
            for _ in range(size - 1 - rank):
                draw_dropout_seed(device)
        return after


# ---------------------------------------------------------------------------------------------
# The styles
# ---------------------------------------------------------------------------------------------

class _LoRAParallelStyle(ParallelStyle):
    _layer_class: type
    _placements: dict  # parameter name -> placement

    def __init__(self, *, input_layouts: Optional[Placement] = None,
                 output_layouts: Optional[Placement] = None, use_local_output: bool = True):
        super().__init__()
        self.input_layouts = (input_layouts or self._default_input,)
        self.output_layouts = (output_layouts or self._default_output,)
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        name = type(self).__name__
        if type(module) is not FusedLoRALinear:
            raise NotImplementedError(f"{name} parallelises lora_kernels.FusedLoRALinear modules, got "
                                      f"{type(module).__name__} (use torch's ColwiseParallel / "
                                      f"RowwiseParallel for plain nn.Linear)")
        if device_mesh.ndim != 1:
            raise ValueError(f"{name}: needs a 1-D device mesh (the tensor-parallel dimension, e.g. "
                             f"mesh['tp']), got a {device_mesh.ndim}-D mesh")
        if module.merged:
            raise ValueError(f"{name}: unmerge the layer before parallelising it")
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(param, DTensor):
                raise ValueError(f"{name}: parameter {pname!r} is already a DTensor (parallelised twice?)")
        src = getattr(self, "src_data_rank", 0)
        kwargs = {} if src == 0 else {"src_data_rank": src}  # torch < 2.7 has no src_data_rank
        for pname, param in list(module.named_parameters(recurse=False)):
            dt = distribute_tensor(param.detach(), device_mesh, [self._placements[pname]], **kwargs)
            module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))
        module.__class__ = self._layer_class
        module._tp_mesh = device_mesh
        module._tp_input_layouts = self.input_layouts
        module._tp_output_layouts = self.output_layouts
        module._tp_use_local_output = self.use_local_output
        return module

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(input_layouts={self.input_layouts}, "
                f"output_layouts={self.output_layouts}, use_local_output={self.use_local_output})")


class ColwiseLoRAParallel(_LoRAParallelStyle):
    """Column-wise tensor parallelism for a ``FusedLoRALinear`` (torch's ``ColwiseParallel``
    defaults): weight [N, K], bias [N] and lora_B [N, r] sharded along N (``Shard(0)``), lora_A
    [r, K] replicated; the input replicated, the output sharded on its last dim::

        y_i = x @ weight_i.T + bias_i + scaling * (dropout(x) @ lora_A.T) @ lora_B_i.T   # [..., N/ws]

    One ``lora_linear`` call per rank on its blocks, no communication in the forward; the backward
    all-reduces dx [M, K] and dA [r, K] (see the module docstring). Keyword arguments as torch's
    ``ColwiseParallel``: ``input_layouts`` (default ``Replicate()``: a plain tensor input is the
    whole x), ``output_layouts`` (default ``Shard(-1)``), ``use_local_output`` (default True)."""

    _default_input, _default_output = Replicate(), Shard(-1)
    _placements = {"weight": Shard(0), "bias": Shard(0), "lora_A": Replicate(), "lora_B": Shard(0)}
    _layer_class = ColwiseFusedLoRALinear


class RowwiseLoRAParallel(_LoRAParallelStyle):
    """Row-wise tensor parallelism for a ``FusedLoRALinear`` (torch's ``RowwiseParallel``
    defaults): weight [N, K] and lora_A [r, K] sharded along K (``Shard(1)``), lora_B [N, r] and
    bias [N] replicated; the input sharded on its last dim, the output replicated::

        y = allreduce_i(x_i @ weight_i.T + scaling * (dropout(x_i) @ lora_A_i.T) @ lora_B.T) + bias

    i.e. the LoRA partial t_i = x_i @ lora_A_i.T is summed over the ranks in the same all-reduce as
    the base partial (one collective per forward; the backward all-reduces dB [N, r]; see the
    module docstring). Keyword arguments as torch's ``RowwiseParallel``: ``input_layouts``
    (default ``Shard(-1)``: a plain tensor input is this rank's block of x's last dim),
    ``output_layouts`` (default ``Replicate()``), ``use_local_output`` (default True)."""

    _default_input, _default_output = Shard(-1), Replicate()
    _placements = {"weight": Shard(1), "bias": Replicate(), "lora_A": Shard(1), "lora_B": Replicate()}
    _layer_class = RowwiseFusedLoRALinear
