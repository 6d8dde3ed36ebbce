"""Tensor-parallel linear layers (Megatron column/row split) over an explicit :class:`AxisGroup`.

* :class:`ColumnParallelLinear` — output features split over the group; the input is replicated
  over the group (TP_ATTN_FULL), so each rank's input gradient is a partial sum. With
  ``sync_input_grad=True`` the layer completes it itself (``copy_to_region``: identity forward,
  all-reduce backward). A caller whose input comes out of a gather with a reduce-scatter adjoint, or
  a block that shares one input between several linears, passes ``False`` and syncs once.
* :class:`RowParallelLinear` — input features split over the group; the output is a partial sum.
  ``reduce_results=False`` returns the partial so the communicator can fuse the reduction
  (design §3: one reduction per layer).

Output partitions fewer than ranks (GQA with ``kv_heads < attn_tp``): ``num_partitions`` pieces,
each held by ``tp / num_partitions`` consecutive ranks. The replicas' weight gradients are partial
(each only sees its own consumers), so they are summed over the replicas in backward; after that
the usual ``grad_sync`` gives every replica the reference gradient of its piece.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from megatron_ext.communication.collectives import all_reduce, copy_to_region
from megatron_ext.layers.skinny_linear import linear
from megatron_ext.parallel.axes import GROUP_AXES, Axis
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.parallel.param_meta import ParamSpec, Split, set_spec

InitFn = Callable[[torch.Tensor], None]


def default_init(weight: torch.Tensor) -> None:
    """Normal(0, 0.02) — HF's ``initializer_range`` default; checkpoints overwrite it anyway."""
    with torch.no_grad():
        weight.normal_(0.0, 0.02)


def shard_axis_name(group: AxisGroup, shard_axis: Optional[str]) -> Optional[str]:
    """The ParamSpec ``shard_axis`` of a parameter split over ``group`` (its axis name)."""
    if shard_axis is not None:
        return shard_axis
    return group.name if group.name in GROUP_AXES else None


def split_index(group: AxisGroup, num_partitions: int, what: str) -> int:
    """Which of ``num_partitions`` pieces this rank holds (consecutive ranks share a piece)."""
    if num_partitions < 1 or num_partitions > group.size or group.size % num_partitions:
        raise ValueError(f"{what}: num_partitions={num_partitions} must divide the {group.name} "
                         f"size {group.size} (pieces are split over or replicated across ranks)")
    return group.rank // (group.size // num_partitions)


def sum_grad_over_replicas(param: torch.Tensor, group: AxisGroup, index: int,
                           num_partitions: int) -> torch.Tensor:
    """Identity forward; backward sums the gradient over the ranks of ``group`` holding the same
    piece ``index`` (of ``num_partitions``). Each rank's piece goes into its own slot of a
    zero-padded stack, the stack's gradient is all-reduced over ``group`` (``copy_to_region``), and
    the slot is read back: the other pieces' grads never mix in."""
    if num_partitions == group.size:
        return param
    zeros = param.new_zeros(param.shape).detach()
    stacked = torch.stack([param if i == index else zeros for i in range(num_partitions)])
    return copy_to_region(stacked, group)[index]


class _AddOnce(torch.autograd.Function):
    """``y + bias`` on one rank only (the partial sum then holds the bias once), while every rank
    gets the bias's whole gradient: the completed sum's gradient is the same on every rank."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor, add: bool) -> torch.Tensor:
        ctx.bias_shape = bias.shape
        return y + bias if add else y.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, grad.reshape(-1, grad.shape[-1]).sum(0).reshape(ctx.bias_shape), None


class ColumnParallelLinear(nn.Module):
    """``y[..., out/p] = x[..., in] @ W_p^T (+ b_p)``; ``W`` global ``[out, in]`` split on dim 0.

    ``num_partitions`` (default: group size) pieces; fewer pieces than ranks replicate them (see
    module doc). Weight/bias ParamSpec: ``Split(0, num_partitions, index)``, ``grad_sync``,
    ``shard_axis`` (default: the group's axis name).
    """

    def __init__(self, in_features: int, out_features: int, tp_group: AxisGroup,
                 bias: bool = False, *, num_partitions: Optional[int] = None,
                 sync_input_grad: bool = True, grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,),
                 shard_axis: Optional[str] = None, name: Optional[str] = None,
                 init_method: InitFn = default_init, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        what = f"ColumnParallelLinear {name or ''}".strip()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"{what}: in_features={in_features}, out_features={out_features} "
                             f"must be >= 1")
        parts = tp_group.size if num_partitions is None else num_partitions
        index = split_index(tp_group, parts, what)
        if out_features % parts:
            raise ValueError(f"{what}: out_features={out_features} must be divisible by "
                             f"num_partitions={parts} ({tp_group.name} size {tp_group.size})")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.num_partitions, self.partition = tp_group, parts, index
        self.sync_input_grad = sync_input_grad
        axis = shard_axis_name(tp_group, shard_axis) if parts > 1 else None
        local_out = out_features // parts
        self.weight = nn.Parameter(torch.empty(local_out, in_features, dtype=dtype, device=device))
        init_method(self.weight)
        split = (Split(0, parts, index),) if parts > 1 else ()
        set_spec(self.weight, ParamSpec((out_features, in_features), split, tuple(grad_sync), axis,
                                        f"{name}.weight" if name else None))
        if bias:
            self.bias = nn.Parameter(torch.zeros(local_out, dtype=dtype, device=device))
            set_spec(self.bias, ParamSpec((out_features,), split, tuple(grad_sync), axis,
                                          f"{name}.bias" if name else None))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"ColumnParallelLinear expects last dim {self.in_features}, got "
                             f"shape {tuple(x.shape)}")
        if self.sync_input_grad:
            x = copy_to_region(x, self.tp_group)
        weight = sum_grad_over_replicas(self.weight, self.tp_group, self.partition,
                                        self.num_partitions)
        bias = None if self.bias is None else sum_grad_over_replicas(
            self.bias, self.tp_group, self.partition, self.num_partitions)
        return linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, partitions="
                f"{self.num_partitions}, axis={self.tp_group.name}, bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """``y[..., out] = x[..., in/p] @ W_p^T``; ``W`` global ``[out, in]`` split on dim 1.

    ``reduce_results=True``: all-reduce over the group (backward identity), complete output.
    ``reduce_results=False``: the partial sum over the group is returned; the bias (replicated) is
    added on group rank 0 only so the completed sum holds it once.
    """

    def __init__(self, in_features: int, out_features: int, tp_group: AxisGroup,
                 reduce_results: bool, bias: bool = False, *,
                 grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,), shard_axis: Optional[str] = None,
                 name: Optional[str] = None, init_method: InitFn = default_init,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        what = f"RowParallelLinear {name or ''}".strip()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"{what}: in_features={in_features}, out_features={out_features} "
                             f"must be >= 1")
        if in_features % tp_group.size:
            raise ValueError(f"{what}: in_features={in_features} must be divisible by the "
                             f"{tp_group.name} size {tp_group.size}")
        self.in_features, self.out_features = in_features, out_features
        self.tp_group, self.reduce_results = tp_group, bool(reduce_results)
        parts = tp_group.size
        axis = shard_axis_name(tp_group, shard_axis) if parts > 1 else None
        self.weight = nn.Parameter(torch.empty(out_features, in_features // parts, dtype=dtype,
                                               device=device))
        init_method(self.weight)
        split = (Split(1, parts, tp_group.rank),) if parts > 1 else ()
        set_spec(self.weight, ParamSpec((out_features, in_features), split, tuple(grad_sync), axis,
                                        f"{name}.weight" if name else None))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
            set_spec(self.bias, ParamSpec((out_features,), (), tuple(grad_sync), None,
                                          f"{name}.bias" if name else None))
        else:
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        local_in = self.in_features // self.tp_group.size
        if x.shape[-1] != local_in:
            raise ValueError(f"RowParallelLinear expects this rank's input slice of {local_in} "
                             f"features (in={self.in_features} over {self.tp_group.name} size "
                             f"{self.tp_group.size}), got shape {tuple(x.shape)}")
        y = linear(x, self.weight)   # one launch for a decode batch where it is faster
        if self.reduce_results:
            y = all_reduce(y, self.tp_group)
            return y if self.bias is None else y + self.bias
        if self.bias is None:
            return y
        return _AddOnce.apply(y, self.bias, self.tp_group.rank == 0)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, axis={self.tp_group.name}, "
                f"reduce_results={self.reduce_results}, bias={self.bias is not None}")
