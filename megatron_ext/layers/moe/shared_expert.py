"""Shared expert (Qwen2-MoE): a SwiGLU MLP every token goes through, beside the routed experts.

Its intermediate dim is split over the whole MoE shard (``moe_ep × moe_tp`` ranks, shard-rank
order), and its ``down`` projection keeps ``reduce_results=False``: the partial is added to the
routed experts' partial so the MoE layer needs **one** reduction over the shard (design §1, origin 2). The
optional gate ``sigmoid(x · w_gate)`` is a replicated ``[1, H]`` weight; scaling a partial sum by a
replicated factor keeps it a partial sum. Each rank's gate gradient sees only its slice of the
shared expert, so the gate syncs over the whole stage.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.layers.linear import default_init
from megatron_ext.layers.backend import LayerBackend
from megatron_ext.layers.mlp import SwiGLUMLP
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, set_spec


class SharedExpert(nn.Module):
    """``[sigmoid(x w_gate^T) ·] SwiGLU(x)`` → partial sum over ``moe_shard``.

    ParamSpecs: ``mlp.{gate,up}_proj`` ``[I_s, H]`` ``Split(0, shard)``, ``mlp.down_proj``
    ``[H, I_s]`` ``Split(1, shard)``, ``grad_sync=("moe_dp",)``, ``shard_axis="moe_shard"``;
    ``gate.weight`` ``[1, H]`` replicated, ``grad_sync=("stage",)``. Parameter names in the
    module tree: ``mlp.gate_proj.weight`` … and ``gate.weight`` (HF: ``shared_expert.*`` and
    ``shared_expert_gate.weight``).
    """

    def __init__(self, hidden_size: int, intermediate_size: int, groups: ParallelGroups, *,
                 gated: bool = False, name: Optional[str] = "shared_expert",
                 backend: Optional[LayerBackend] = None, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        shard = groups.moe_shard
        if intermediate_size % shard.size:
            raise ValueError(f"shared_expert_intermediate_size={intermediate_size} must be "
                             f"divisible by the MoE shard size moe_ep*moe_tp={shard.size}")
        self.mlp = SwiGLUMLP(hidden_size, intermediate_size, shard, sync_input_grad=False,
                             grad_sync=(Axis.MOE_DP,), shard_axis=Axis.MOE_SHARD, name=name,
                             backend=backend, dtype=dtype, device=device)
        if gated:
            self.gate = nn.Linear(hidden_size, 1, bias=False, dtype=dtype, device=device)
            default_init(self.gate.weight)
            set_spec(self.gate.weight, ParamSpec((1, hidden_size), (), (Axis.STAGE,), None,
                                                 f"{name}_gate.weight" if name else None))
        else:
            self.gate = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        if self.gate is not None:
            out = torch.sigmoid(F.linear(x, self.gate.weight)) * out
        return out
