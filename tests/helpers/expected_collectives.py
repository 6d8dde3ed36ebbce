"""The collectives design §3–4 prescribe for a stack of layers, from their scatter modes: the
model of what a ``LayerCommunicator`` issues, step by step, that the communicator tests and the
whole-model collective counts are pinned to."""
from __future__ import annotations

from collections import Counter
from typing import Optional

from megatron_ext.communication.scatter_modes import LayerScatterModes, ScatterMode
from megatron_ext.parallel.topology import Topology

S, T = ScatterMode.SCATTERED, ScatterMode.TP_ATTN_FULL

# Ops of the transition table (mode_transitions.py doc) → forward / backward collectives.
_FWD = {"all_reduce": "all_reduce", "reduce_scatter": "reduce_scatter", "gather": "all_gather",
        "gather_tok": "all_gather", "gather_own": "all_gather", "copy": None, "own_rows": None}
_BWD = {"all_reduce": [], "reduce_scatter": ["all_gather"], "gather": ["reduce_scatter"],
        "gather_own": [], "copy": ["all_reduce"], "own_rows": ["all_gather"]}


def expected_ops(modes: list[LayerScatterModes], topo: Topology,
                 first_owed: Optional[str] = "attn_tp") -> dict:
    """Per step, the ops design §3–4 prescribe (one reduction per block output; gathers whose
    adjoint sums over the consuming block's group; moves of whole tensors). A shard inside an
    attention-TP group (g > 1) sums to SCATTERED and gathers over attn_tp for TP_ATTN_FULL.
    ``first_owed``: the sum the first layer completes (the vocab-parallel embedding's over
    attn_tp; ``None`` for a later pipeline stage, whose input is complete)."""
    rs = modes[0].allow_reduce_scatter
    k, g = topo.token_group_size, topo.shards_per_attn_tp_group

    def reduce(axis, dst):
        if axis is None:  # complete on SCATTERED (all-to-all MoE)
            return [] if dst is S else [("gather_own", "attn_tp")]
        if dst is S or (axis == "moe_shard" and g > 1):
            ops = [("reduce_scatter", axis)] if rs else [("all_reduce", axis), ("own_rows", axis)]
            return ops + ([("gather_own", "attn_tp")] if dst is T else [])
        return [("all_reduce", "attn_tp")] if axis == "attn_tp" else [("all_reduce", "moe_shard"),
                                                                       ("own_rows", "moe_cp")]

    def move(src, dst):  # whole tensors (residual moves, inputs of the all-to-all MoE)
        return [] if src is dst else [("own_rows" if dst is S else "gather_own", "attn_tp")]

    def to_block(src, dst, axis):
        if axis is None:
            return move(src, dst)
        if src is S:
            return [("gather", axis)]
        if axis == "moe_shard" and g > 1:  # through SCATTERED
            return [("own_rows", "attn_tp"), ("gather", "moe_shard")]
        if axis == "moe_shard" and k > 1:
            return [("gather_tok", "moe_cp")]
        return [("copy", axis)]

    steps, owed = {("embed", "entry"): []}, first_owed
    for l, m in enumerate(modes):
        r_in, r_mid, r_out = m.layer_input_mode, m.middle_residual_mode, m.layer_output_mode
        steps[(l, "prepare_attn")] = ((reduce(owed, r_in) if owed else [])
                                      + to_block(r_in, T, "attn_tp"))
        steps[(l, "prepare_mlp")] = (move(r_in, r_mid) + reduce("attn_tp", r_mid)
                                     + to_block(r_mid, m.mlp_mode, m.mlp_partial_axis))
        post = move(r_mid, r_out)
        if m.defer_mlp_reduction:
            owed = m.mlp_partial_axis
        else:
            post, owed = post + reduce(m.mlp_partial_axis, r_out), None
        steps[(l, "postprocess")] = post
    assert owed is None
    steps[("final", "finalize")] = to_block(modes[-1].layer_output_mode, T, "attn_tp")
    return steps


def forward_counter(ops, trivial) -> Counter:
    return Counter((_FWD[op], ax) for op, ax in ops if _FWD[op] and ax not in trivial)


def backward_counter(ops, trivial) -> Counter:
    out = Counter()
    for op, ax in ops:
        kinds = ([("reduce_scatter", "moe_cp"), ("all_reduce", "attn_tp")] if op == "gather_tok"
                 else [(kind, ax) for kind in _BWD[op]])
        out.update(kv for kv in kinds if kv[1] not in trivial)
    return out
