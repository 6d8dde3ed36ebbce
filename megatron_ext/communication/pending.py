"""A reduction left for the next consumer, as a value (design §3).

A block that ends in a row-parallel projection returns a partial sum. Instead of reducing it at
once (and then adding the residual and normalising in separate passes), the communicator hands
the next consumer a :class:`PendingReduction`: the partial, the group it is partial over, the rows
it lives on and the residual mode it must complete into. The consumer completes it fused with the
residual add + norm — or calls :meth:`complete`. No flags, no globals: whatever holds the value
knows exactly what is owed.

A pending MoE sum on ``MOE_FULL`` rows completes *with* its scatter back to the residual mode
(reduce-scatter over the shard, or all-reduce + own rows), so deferring across a ``MOE_FULL`` layer
can never leave hidden states longer than the residual (design §1, origin 1). A pending value whose target is
not a residual mode is refused at construction; one whose target differs from the consumer's
residual mode is refused by the consumer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.communication.mode_transitions import check_rows, complete_sum
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups
from megatron_ext.communication.scatter_modes import PARTIAL_AXES, RESIDUAL_MODES, ScatterMode
from megatron_ext.communication.token_layout import TokenLayout


@dataclass(frozen=True, eq=False)
class PendingReduction:
    """``partial`` (rows of ``source_mode``) still to be summed over ``axis``, then brought to
    ``target_mode``. ``allow_reduce_scatter`` picks reduce-scatter vs all-reduce + own rows."""

    partial: torch.Tensor
    axis: str
    source_mode: ScatterMode
    target_mode: ScatterMode
    layout: TokenLayout
    allow_reduce_scatter: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "source_mode", ScatterMode(self.source_mode))
        object.__setattr__(self, "target_mode", ScatterMode(self.target_mode))
        if self.axis not in PARTIAL_AXES:
            raise ValueError(f"PendingReduction axis={self.axis!r} must be one of {PARTIAL_AXES}")
        if self.target_mode not in RESIDUAL_MODES:
            raise ValueError(
                f"PendingReduction target_mode={self.target_mode.name}: a pending sum completes "
                f"into the residual's mode (SCATTERED or TP_ATTN_FULL); completing into "
                f"{self.target_mode.name} would leave hidden states "
                f"({self.layout.rows(self.target_mode)} rows) longer than the residual "
                f"({self.layout.rows(ScatterMode.TP_ATTN_FULL)} rows) — the deferral must "
                f"include the scatter")
        check_rows(self.partial, self.source_mode if self.source_mode is not ScatterMode.MOE_FULL
                   or self.layout.topology.uses_moe_full else ScatterMode.TP_ATTN_FULL,
                   self.layout, f"PendingReduction partial over {self.axis}")

    def complete(self, groups: ParallelGroups) -> torch.Tensor:
        """Issue the one reduction: this rank's complete rows of ``target_mode``."""
        return complete_sum(self.partial, self.axis, self.source_mode, self.target_mode, groups,
                            self.layout, self.allow_reduce_scatter)

    def plain_all_reduce_group(self, groups: ParallelGroups) -> Optional[AxisGroup]:
        """The group, when completing is a plain all-reduce with the rows unchanged
        (TP_ATTN_FULL → TP_ATTN_FULL over attn_tp, or over the shard when it is one attention-TP
        group): the case a fused all-reduce + residual add + RMSNorm kernel can take. ``None``
        otherwise."""
        if self.target_mode is not ScatterMode.TP_ATTN_FULL:
            return None
        if self.axis == Axis.MOE_SHARD and self.layout.topology.uses_moe_full \
                and not self.layout.cp_replicated:
            return None
        return groups.axis(self.axis)

    def __repr__(self) -> str:
        return (f"PendingReduction(partial={tuple(self.partial.shape)}, axis={self.axis}, "
                f"{self.source_mode.name} -> {self.target_mode.name}, "
                f"reduce_scatter={self.allow_reduce_scatter})")
