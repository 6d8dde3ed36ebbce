"""SwiGLU MLP split over one group: ``down(silu(gate(x)) * up(x))``.

``gate``/``up`` are column-parallel and ``down`` row-parallel with ``reduce_results=False``, so the
output is a partial sum over the group that the communicator completes (one reduction per layer).
The same class is the dense MLP (split over ``attn_tp``, gradients synced over ``attn_dp_cp``) and
the MoE shared expert (split over the whole MoE shard, synced over ``moe_dp``); ``gate`` and ``up``
stay separate weights so their ParamSpecs are plain contiguous slices of the HF tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_ext.parallel.collectives import copy_to_region
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups


def _join(prefix: Optional[str], name: str) -> Optional[str]:
    return f"{prefix}.{name}" if prefix else name


class SwiGLUMLP(nn.Module):
    """Gated MLP with the intermediate dim split over ``group`` → partial sum over ``group``.

    ``sync_input_grad=True`` all-reduces the input gradient over ``group`` in backward (the input is
    replicated over ``group``); pass ``False`` when the caller's collective already sums it.
    ParamSpecs: ``gate_proj``/``up_proj`` ``[I, H]`` ``Split(0)``, ``down_proj`` ``[H, I]``
    ``Split(1)``, all with ``grad_sync`` and ``shard_axis``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, group: AxisGroup, *,
                 sync_input_grad: bool = True, grad_sync: tuple[str, ...] = ("attn_dp_cp",),
                 shard_axis: Optional[str] = None, name: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        if intermediate_size % group.size:
            raise ValueError(f"MLP {name or ''}: intermediate_size={intermediate_size} must be "
                             f"divisible by the {group.name} size {group.size}")
        self.group, self.sync_input_grad = group, sync_input_grad
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        common = dict(grad_sync=grad_sync, shard_axis=shard_axis, dtype=dtype, device=device)
        self.gate_proj = ColumnParallelLinear(hidden_size, intermediate_size, group,
                                              sync_input_grad=False,
                                              name=_join(name, "gate_proj"), **common)
        self.up_proj = ColumnParallelLinear(hidden_size, intermediate_size, group,
                                            sync_input_grad=False, name=_join(name, "up_proj"),
                                            **common)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, group,
                                           reduce_results=False, name=_join(name, "down_proj"),
                                           **common)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync_input_grad:
            x = copy_to_region(x, self.group)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DenseMLP(SwiGLUMLP):
    """The dense (non-MoE) MLP: split over ``groups.attn_tp``, input TP_ATTN_FULL, output partial
    over ``attn_tp``; gradients synced over ``attn_dp_cp``."""

    def __init__(self, hidden_size: int, intermediate_size: int, groups: ParallelGroups, *,
                 sync_input_grad: bool = True, name: Optional[str] = "mlp",
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__(hidden_size, intermediate_size, groups.attn_tp,
                         sync_input_grad=sync_input_grad, grad_sync=("attn_dp_cp",),
                         shard_axis="attn_tp", name=name, dtype=dtype, device=device)
