"""Collectives as autograd functions over an explicit :class:`AxisGroup` (design §4).

Every forward collective comes with its adjoint:

* ``all_gather`` — concatenate every rank's rows. Backward ``"reduce_scatter"``: consumers
  computed different parts, so sum the grads over the group and keep own rows (then all-reduce
  over ``grad_sum_group`` if given); backward ``"own_rows"``: every consumer computed the same
  thing, take own rows.
* ``reduce_scatter`` — sum over the group, keep own rows; backward all-gather.
* ``all_reduce`` — sum of partials; backward identity.
* ``copy_to_region`` — identity; backward all-reduce.
* ``take_own_rows`` — this rank's rows of a replicated tensor; backward all-gather (whole grads,
  never a zero-padded identity).
* ``all_to_all`` — variable-split exchange along dim 0; backward the reverse exchange.

Rules shared by every function:

* A trivial (one-rank) group returns the input unchanged and records nothing.
* ``sizes`` (optional) gives every group rank's length along ``dim`` (group-rank order); ``None``
  means equal lengths. **Variable sizes rule:** pad every rank's piece to ``max(sizes)``, run the
  equal-size collective, strip the padding. One collective, no size exchange (sizes are known to
  every rank: they come from a ``TokenLayout`` built once per forward).
* Backend: NCCL uses the native ``all_gather_single`` / ``reduce_scatter_single`` (or their older
  ``*_into_tensor`` / ``*_tensor`` names); gloo uses ``all_gather`` on a list and implements
  reduce-scatter as all-reduce + own slice (gloo builds without a native reduce-scatter exist).
* Every collective is logged through :func:`megatron_ext.parallel.comm_counter.record` with the
  group's axis name (``nbytes`` includes the padding of variable-size pieces).
* Bad shapes/sizes raise ``ValueError`` before any collective is issued (no hang).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_ext.communication.raw import (all_reduce_, gather_single, reduce_scatter_single,
                                           summed_slice)
from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import AxisGroup

BACKWARD_MODES = ("reduce_scatter", "own_rows")



# ---------------------------------------------------------------------------------------- checks
def _check_group(group: AxisGroup) -> None:
    if not isinstance(group, AxisGroup):
        raise TypeError(f"group must be an AxisGroup, got {type(group).__name__}")
    if group.group is None and not group.is_trivial:
        raise ValueError(f"axis {group.name} has {group.size} ranks but no process group")


def _check_sizes(sizes: Optional[Sequence[int]], group: AxisGroup) -> Optional[tuple[int, ...]]:
    if sizes is None:
        return None
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != group.size:
        raise ValueError(f"sizes={sizes} has {len(sizes)} entries but axis {group.name} has "
                         f"{group.size} ranks")
    if any(s < 0 for s in sizes):
        raise ValueError(f"sizes={sizes} must be non-negative")
    return sizes


def _own_range(n_total: int, group: AxisGroup, sizes: Optional[tuple[int, ...]],
               what: str) -> tuple[int, int]:
    """(start, length) of this rank's rows in a tensor of ``n_total`` rows split over the group."""
    if sizes is None:
        if n_total % group.size:
            raise ValueError(f"{what}: {n_total} rows do not split evenly over axis {group.name} "
                             f"({group.size} ranks); pass sizes= for uneven splits")
        n = n_total // group.size
        return group.rank * n, n
    if sum(sizes) != n_total:
        raise ValueError(f"{what}: sizes={sizes} sum to {sum(sizes)} but the tensor has "
                         f"{n_total} rows along the split dim (axis {group.name})")
    return sum(sizes[:group.rank]), sizes[group.rank]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _is_nccl(group: AxisGroup) -> bool:
    return dist.get_backend(group.group) == "nccl"


def _use_native(group: AxisGroup) -> bool:
    """Single-tensor all-gather / reduce-scatter (NCCL); gloo takes the portable path. Tests
    force the native path on gloo (torch >= 2.6 gloo has both ops) to cover its padding logic."""
    return _is_nccl(group)


def _fast(group: AxisGroup, x: torch.Tensor, phase: str,
          sizes: Optional[tuple[int, ...]] = None, chunks: int = 1, total: bool = False):
    """The group's symmetric-memory collectives (``AxisGroup.fast``) when they serve this forward
    call (equal pieces, CUDA, within a slot; sums of floating point), else ``None`` (NCCL /
    gloo)."""
    fast = group.fast
    if fast is None or phase != "forward" or (sizes is not None and len(set(sizes)) > 1):
        return None
    return fast if fast.serves(x, chunks, total) else None


# ------------------------------------------------------------------------------ raw collectives
# All raw ops work along dim 0 of a contiguous tensor; the autograd wrappers move ``dim`` there.
def _to_dim0(x: torch.Tensor, dim: int) -> torch.Tensor:
    return (x if dim == 0 else x.movedim(dim, 0)).contiguous()


def _from_dim0(x: torch.Tensor, dim: int) -> torch.Tensor:
    return x if dim == 0 else x.movedim(0, dim)


def _raw_all_gather(x0: torch.Tensor, group: AxisGroup, sizes: Optional[tuple[int, ...]],
                    phase: str) -> torch.Tensor:
    n = group.size
    rows = x0.shape[0] if sizes is None else max(sizes)
    if sizes is not None and x0.shape[0] != sizes[group.rank]:
        raise ValueError(f"all_gather over {group.name}: this rank (group rank {group.rank}) has "
                         f"{x0.shape[0]} rows but sizes={sizes} says {sizes[group.rank]}")
    fast = _fast(group, x0, phase, sizes)
    if fast is not None:
        record("all_gather", group.name, _nbytes(x0) * n, phase)
        return fast.all_gather(x0)
    if x0.shape[0] < rows:  # pad to the longest piece
        x0 = torch.cat([x0, x0.new_zeros((rows - x0.shape[0],) + tuple(x0.shape[1:]))])
    out = x0.new_empty((n * rows,) + tuple(x0.shape[1:]))
    record("all_gather", group.name, _nbytes(out), phase)
    if out.numel():
        if _use_native(group):
            gather_single(out, x0, group=group.group)
        else:
            dist.all_gather(list(out.chunk(n)), x0, group=group.group)
    if sizes is None or all(s == rows for s in sizes):
        return out
    return torch.cat([out[i * rows:i * rows + s] for i, s in enumerate(sizes)])


def _raw_reduce_scatter(x0: torch.Tensor, group: AxisGroup, sizes: Optional[tuple[int, ...]],
                        phase: str) -> torch.Tensor:
    start, length = _own_range(x0.shape[0], group, sizes, f"reduce_scatter over {group.name}")
    record("reduce_scatter", group.name, _nbytes(x0), phase)
    fast = _fast(group, x0, phase, sizes, group.size, total=True)
    if fast is not None:
        return fast.reduce_scatter(x0)
    if not _use_native(group):  # gloo: all-reduce + own slice
        return summed_slice(x0, group, start, length)
    n = group.size
    rows = length if sizes is None else max(sizes)
    if sizes is not None and any(s != rows for s in sizes):  # pad every piece to the longest
        padded = x0.new_zeros((n * rows,) + tuple(x0.shape[1:]))
        offset = 0
        for i, s in enumerate(sizes):
            padded[i * rows:i * rows + s] = x0[offset:offset + s]
            offset += s
        x0 = padded
    out = x0.new_empty((rows,) + tuple(x0.shape[1:]))
    if out.numel():
        reduce_scatter_single(out, x0, group=group.group)
    return out[:length]


def _raw_all_reduce(x: torch.Tensor, group: AxisGroup, phase: str) -> torch.Tensor:
    fast = _fast(group, x, phase, total=True)
    if fast is not None:
        record("all_reduce", group.name, _nbytes(x), phase)
        return fast.all_reduce(x)
    out = x.contiguous().clone()
    all_reduce_(out, group, phase=phase)
    return out


def _raw_all_to_all(x: torch.Tensor, group: AxisGroup, output_split_sizes: list[int],
                    input_split_sizes: list[int], phase: str) -> torch.Tensor:
    x = x.contiguous()
    record("all_to_all", group.name, _nbytes(x), phase)
    equal = len(set(output_split_sizes + input_split_sizes)) == 1
    fast = _fast(group, x, phase, None, group.size) if equal else None
    if fast is not None:
        return fast.all_to_all(x)
    out = x.new_empty((sum(output_split_sizes),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x, output_split_sizes, input_split_sizes, group=group.group)
    return out


# ------------------------------------------------------------------------- autograd functions
class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes, backward_mode, grad_sum_group):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        ctx.backward_mode, ctx.grad_sum_group = backward_mode, grad_sum_group
        return _from_dim0(_raw_all_gather(_to_dim0(x, dim), group, sizes, "forward"), dim)

    @staticmethod
    def backward(ctx, grad):
        g0 = _to_dim0(grad, ctx.dim)
        if ctx.backward_mode == "reduce_scatter":
            g0 = _raw_reduce_scatter(g0, ctx.group, ctx.sizes, "backward")
        else:
            start, length = _own_range(g0.shape[0], ctx.group, ctx.sizes, "all_gather backward")
            g0 = g0[start:start + length]
        if ctx.grad_sum_group is not None and not ctx.grad_sum_group.is_trivial:
            g0 = _raw_all_reduce(g0, ctx.grad_sum_group, "backward")
        return _from_dim0(g0, ctx.dim), None, None, None, None, None


class _ReduceScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        return _from_dim0(_raw_reduce_scatter(_to_dim0(x, dim), group, sizes, "forward"), dim)

    @staticmethod
    def backward(ctx, grad):
        g0 = _raw_all_gather(_to_dim0(grad, ctx.dim), ctx.group, ctx.sizes, "backward")
        return _from_dim0(g0, ctx.dim), None, None, None


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _raw_all_reduce(x, group, "forward")

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _CopyToRegion(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _raw_all_reduce(grad, ctx.group, "backward"), None


class _TakeOwnRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, dim, sizes):
        ctx.group, ctx.dim, ctx.sizes = group, dim, sizes
        start, length = _own_range(x.shape[dim], group, sizes, f"take_own_rows over {group.name}")
        return x.narrow(dim, start, length).clone()

    @staticmethod
    def backward(ctx, grad):
        g0 = _raw_all_gather(_to_dim0(grad, ctx.dim), ctx.group, ctx.sizes, "backward")
        return _from_dim0(g0, ctx.dim), None, None, None


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, output_split_sizes, input_split_sizes):
        ctx.group, ctx.out_splits, ctx.in_splits = group, output_split_sizes, input_split_sizes
        return _raw_all_to_all(x, group, output_split_sizes, input_split_sizes, "forward")

    @staticmethod
    def backward(ctx, grad):
        g = _raw_all_to_all(grad, ctx.group, ctx.in_splits, ctx.out_splits, "backward")
        return g, None, None, None


# ------------------------------------------------------------------------------ public functions
def _norm_dim(x: torch.Tensor, dim: int) -> int:
    if x.dim() == 0 or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def all_gather(x: torch.Tensor, group: AxisGroup, dim: int = 0,
               sizes: Optional[Sequence[int]] = None, backward: str = "reduce_scatter",
               grad_sum_group: Optional[AxisGroup] = None) -> torch.Tensor:
    """Concatenate every group rank's ``x`` along ``dim`` (group-rank order).

    ``backward`` says who consumes the result:

    * ``"reduce_scatter"`` — consuming ranks compute different parts (experts, column-parallel
      weights), so the input grads are partial: sum them over the group and keep own rows.
    * ``"own_rows"`` — every consumer computes the same thing: the grad is already whole, take
      own rows (no collective).

    ``grad_sum_group`` — the consumers are sharded over a larger set than ``group`` (design §4
    worked case: a ``TP_ATTN_FULL → MOE_FULL`` gather over the token group ``moe_cp`` feeding a
    MoE sharded over the whole shard = ``moe_cp × attn_tp``): after the reduce-scatter over
    ``group`` the grads are still partial over ``grad_sum_group`` (``attn_tp``), so they are
    all-reduced there too. Backward = reduce-scatter over ``group`` + all-reduce over
    ``grad_sum_group``.
    """
    _check_group(group)
    if backward not in BACKWARD_MODES:
        raise ValueError(f"backward={backward!r} must be one of {BACKWARD_MODES}")
    if grad_sum_group is not None:
        _check_group(grad_sum_group)
    if group.is_trivial:
        if grad_sum_group is not None and not grad_sum_group.is_trivial:
            return copy_to_region(x, grad_sum_group)
        return x
    dim = _norm_dim(x, dim)
    sizes = _check_sizes(sizes, group)
    if sizes is not None and x.shape[dim] != sizes[group.rank]:
        raise ValueError(f"all_gather over {group.name}: this rank (group rank {group.rank}) has "
                         f"{x.shape[dim]} rows along dim {dim} but sizes={sizes} says "
                         f"{sizes[group.rank]}")
    return _AllGather.apply(x, group, dim, sizes, backward, grad_sum_group)


def reduce_scatter(x: torch.Tensor, group: AxisGroup, dim: int = 0,
                   sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Sum ``x`` over the group and keep this rank's rows along ``dim`` (``sizes[rank]`` of them,
    or ``1/size`` when ``sizes`` is None). Adjoint: all-gather."""
    _check_group(group)
    if group.is_trivial:
        return x
    dim = _norm_dim(x, dim)
    sizes = _check_sizes(sizes, group)
    _own_range(x.shape[dim], group, sizes, f"reduce_scatter over {group.name}")
    return _ReduceScatter.apply(x, group, dim, sizes)


def all_reduce(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Sum of partials over the group; every rank gets the whole. Adjoint: identity (the result
    feeds computations that are identical on every rank)."""
    _check_group(group)
    if group.is_trivial:
        return x
    return _AllReduce.apply(x, group)


def copy_to_region(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """Identity whose backward all-reduces the grad: the input of layers sharded over ``group``
    (Megatron's ``copy_to_tensor_model_parallel_region``)."""
    _check_group(group)
    if group.is_trivial:
        return x
    return _CopyToRegion.apply(x, group)


def take_own_rows(x: torch.Tensor, group: AxisGroup, dim: int = 0,
                  sizes: Optional[Sequence[int]] = None) -> torch.Tensor:
    """This rank's rows of a tensor identical on every group rank. Adjoint: all-gather (the grads
    of the other rows live on the other ranks; no zero-padded identity)."""
    _check_group(group)
    if group.is_trivial:
        return x
    dim = _norm_dim(x, dim)
    sizes = _check_sizes(sizes, group)
    _own_range(x.shape[dim], group, sizes, f"take_own_rows over {group.name}")
    return _TakeOwnRows.apply(x, group, dim, sizes)


def all_to_all(x: torch.Tensor, group: AxisGroup, output_split_sizes: Sequence[int],
               input_split_sizes: Sequence[int]) -> torch.Tensor:
    """Exchange rows along dim 0: ``input_split_sizes[i]`` rows go to group rank ``i``,
    ``output_split_sizes[i]`` rows come from it. Adjoint: the reverse exchange."""
    _check_group(group)
    if group.is_trivial:
        return x
    out_splits = [int(s) for s in output_split_sizes]
    in_splits = [int(s) for s in input_split_sizes]
    for name, splits in (("output_split_sizes", out_splits), ("input_split_sizes", in_splits)):
        if len(splits) != group.size or any(s < 0 for s in splits):
            raise ValueError(f"all_to_all over {group.name}: {name}={splits} must have "
                             f"{group.size} non-negative entries")
    if sum(in_splits) != x.shape[0]:
        raise ValueError(f"all_to_all over {group.name}: input_split_sizes={in_splits} sum to "
                         f"{sum(in_splits)} but x has {x.shape[0]} rows")
    return _AllToAll.apply(x, group, out_splits, in_splits)


# ------------------------------------------------------------------- fused decode collectives
def fused_all_reduce_add_norm(partial: torch.Tensor, residual: Optional[torch.Tensor], norm,
                              group: Optional[AxisGroup]
                              ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Inference: ``h = Σ_group partial + residual`` and ``(norm(h), h)`` in one symmetric-memory
    kernel, for a norm with the :class:`~megatron_ext.layers.norm.RMSNorm` contract
    (``add_norm``, ``weight``, ``eps``). ``None`` where it does not apply (the caller
    all-reduces, then ``norm.add_norm``: the same kernel math, so the same bits). No residual
    (a first layer's embedding sum) is left to the caller too: its ``norm(h)`` rounds
    differently. Counted as the all-reduce."""
    if group is None or group.is_trivial or group.fast is None or residual is None or \
            getattr(norm, "add_norm", None) is None:
        return None
    out = group.fast.all_reduce_add_rms_norm(partial, residual, norm.weight, norm.eps)
    if out is not None:
        record("all_reduce", group.name, _nbytes(partial), "forward")
    return out
