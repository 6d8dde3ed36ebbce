"""The named process-group axes, as one type.

An :class:`Axis` is a ``StrEnum``: it compares and hashes equal to its plain name (``Axis.ATTN_TP ==
"attn_tp"``), so ParamSpecs, checkpoints and the command line keep their spelling, while code names
axes through one list that a typo cannot slip past.
"""
from __future__ import annotations

from enum import StrEnum


class Axis(StrEnum):
    """Every axis :class:`~megatron_ext.parallel.topology.Topology` builds rank lists for."""

    ATTN_TP = "attn_tp"        # attention tensor parallel
    ATTN_CP = "attn_cp"        # attention context parallel
    ATTN_DP = "attn_dp"        # attention data parallel
    ATTN_DP_CP = "attn_dp_cp"  # gradient sync of dense parameters
    ATTN_TP_CP = "attn_tp_cp"
    MOE_TP = "moe_tp"
    MOE_EP = "moe_ep"
    MOE_DP = "moe_dp"          # gradient sync of expert parameters
    MOE_SHARD = "moe_shard"    # moe_ep x moe_tp: one full copy of the experts
    MOE_CP = "moe_cp"          # the MOE_FULL token group
    STAGE = "stage"            # every rank of one pipeline stage
    PP = "pp"
    EMBEDDING = "embedding"    # tied embedding / LM head across the first and last stage
    MODEL = "model"            # tp x pp: one copy of the dense model


# Groups are created in this order on every rank (gloo needs one order everywhere).
GROUP_AXES: tuple[Axis, ...] = tuple(Axis)
