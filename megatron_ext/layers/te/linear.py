"""Column- and row-parallel linears on ``te.Linear``, with our sharding and no TE collectives.

Each rank builds ``te.Linear`` for its own slice (``parallel_mode=None``, ``tp_size=1``): TE then
performs no communication at all (its docs: "When set to ``None``, no communication is
performed"), so

* column-parallel: the input gradient stays partial over the group; the caller (attention block,
  MLP, communicator) sums it once, exactly as with :class:`ColumnParallelLinear`;
* row-parallel: the output is this rank's partial sum, completed by the ``LayerCommunicator``
  (fused with the residual add and the norm). A bias is taken out with ``return_bias=True`` and
  added on group rank 0 only, so the completed sum holds it once (as ``RowParallelLinear``).

``sequence_parallel`` stays off for the same reason: the communicator does the gathers and
reduce-scatters of a scattered residual stream. The weight is TE's own parameter ``weight``
(``[out_local, in_local]``, HF's layout), so the module path ``...q_proj`` gives the HF name
``...q_proj.weight``; it gets the same ParamSpec as the native layer.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_ext.layers.linear import InitFn, _AddOnce, shard_axis_name, split_index
from megatron_ext.layers.te.runtime import te_module
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.parallel.param_meta import ParamSpec, Split, set_spec


def _te_device(device: Optional[torch.device]):
    return device if device is not None else torch.device("cuda", torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _classes():
    te = te_module()

    class TEColumnParallelLinear(te.Linear):
        """``te.Linear`` on this rank's output rows; see the module doc."""

    class TERowParallelLinear(te.Linear):
        """``te.Linear`` on this rank's input columns → partial sum; see the module doc."""

        add_bias_here: bool = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
            if not self.use_bias:
                return super().forward(x)
            y, bias = super().forward(x)
            return _AddOnce.apply(y, bias, self.add_bias_here)

    return TEColumnParallelLinear, TERowParallelLinear


def _spec(global_shape, split, grad_sync, axis, name, suffix) -> ParamSpec:
    return ParamSpec(tuple(global_shape), split, tuple(grad_sync), axis,
                     f"{name}.{suffix}" if name else None)


def te_column_parallel_linear(in_features: int, out_features: int, tp_group: AxisGroup,
                              bias: bool, *, grad_sync: tuple[str, ...],
                              shard_axis: Optional[str], name: Optional[str],
                              init_method: InitFn, dtype: Optional[torch.dtype],
                              device: Optional[torch.device]):
    """Output features split over ``tp_group`` (``W`` global ``[out, in]``, ``Split(0)``)."""
    what = f"TE column-parallel linear {name or ''}".strip()
    parts = tp_group.size
    index = split_index(tp_group, parts, what)
    if out_features % parts:
        raise ValueError(f"{what}: out_features={out_features} must be divisible by the "
                         f"{tp_group.name} size {parts}")
    cls, _ = _classes()
    mod = cls(in_features, out_features // parts, bias=bias, init_method=init_method,
              params_dtype=dtype, parallel_mode=None, tp_size=1, device=_te_device(device),
              name=name)
    axis = shard_axis_name(tp_group, shard_axis) if parts > 1 else None
    split = (Split(0, parts, index),) if parts > 1 else ()
    set_spec(mod.weight, _spec((out_features, in_features), split, grad_sync, axis, name,
                               "weight"))
    if bias:
        with torch.no_grad():
            mod.bias.zero_()
        set_spec(mod.bias, _spec((out_features,), split, grad_sync, axis, name, "bias"))
    return mod


def te_row_parallel_linear(in_features: int, out_features: int, tp_group: AxisGroup,
                           bias: bool, *, grad_sync: tuple[str, ...], shard_axis: Optional[str],
                           name: Optional[str], init_method: InitFn,
                           dtype: Optional[torch.dtype], device: Optional[torch.device]):
    """Input features split over ``tp_group`` (``W`` global ``[out, in]``, ``Split(1)``); returns
    the partial sum."""
    what = f"TE row-parallel linear {name or ''}".strip()
    parts = tp_group.size
    if in_features % parts:
        raise ValueError(f"{what}: in_features={in_features} must be divisible by the "
                         f"{tp_group.name} size {parts}")
    _, cls = _classes()
    mod = cls(in_features // parts, out_features, bias=bias, return_bias=bias,
              init_method=init_method, params_dtype=dtype, parallel_mode=None, tp_size=1,
              device=_te_device(device), name=name)
    mod.fast_setattr("add_bias_here", tp_group.rank == 0)
    axis = shard_axis_name(tp_group, shard_axis) if parts > 1 else None
    split = (Split(1, parts, tp_group.rank),) if parts > 1 else ()
    set_spec(mod.weight, _spec((out_features, in_features), split, grad_sync, axis, name,
                               "weight"))
    if bias:
        with torch.no_grad():
            mod.bias.zero_()
        set_spec(mod.bias, _spec((out_features,), (), grad_sync, None, name, "bias"))
    return mod
