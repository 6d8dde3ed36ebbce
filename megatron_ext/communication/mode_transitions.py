"""The collectives that move hidden states between scatter modes (design §3–4).

Two kinds of moves, each one autograd-correct by construction:

* :func:`complete_sum` — a block's partial sum becomes a complete tensor in a residual mode
  (exactly one reduction; "own rows" slices cost nothing in forward).
* :func:`to_consumer` — a complete tensor is brought to the rows a block consumes.
  ``grad_sum_axis`` names the group over which the block's output is partial (``attn_tp`` for
  attention, dense MLP, vocab-parallel LM head; ``moe_shard`` for a MoE; ``None`` for a block
  whose input grads are whole), and the move's backward sums the input grads over exactly that
  group. Blocks fed this way must not sum their input grads again (``sync_input_grad=False``).

Transition table (sizes from the ``TokenLayout``; k = token group size; g = MoE shards per
attention-TP group, > 1 when a shard is smaller than the group; "own rows" is
:func:`take_own_rows`: no forward collective, an all-gather in backward):

partial over attn_tp (TP_ATTN_FULL rows)
  → TP_ATTN_FULL   all_reduce(attn_tp)
  → SCATTERED      reduce_scatter(attn_tp); without reduce-scatter all_reduce(attn_tp) + own rows
partial over moe_shard (MOE_FULL rows; TP_ATTN_FULL rows when shard == attn-TP group)
  → SCATTERED      reduce_scatter(moe_shard); without reduce-scatter all_reduce(moe_shard) +
                   own rows(moe_shard)
  → TP_ATTN_FULL   all_reduce(moe_shard) + own rows(moe_cp) (the slice only when k > 1;
                   none for decode rows replicated over CP, ``layout.cp_replicated``);
                   g > 1: the move to SCATTERED above + all_gather(attn_tp, backward own rows)
                   (the shard holds 1/g of the group's rows: still one reduction)
complete on SCATTERED (all-to-all MoE)
  → SCATTERED      nothing
  → TP_ATTN_FULL   all_gather(attn_tp, backward own rows)
complete tensor → input of a block whose output is partial over G
  TP_ATTN_FULL → TP_ATTN_FULL   copy_to_region(G)   (G = attn_tp, or moe_shard when k == 1)
  SCATTERED → TP_ATTN_FULL      all_gather(G)       (backward reduce-scatter over G)
  SCATTERED → MOE_FULL          all_gather(moe_shard)   (backward reduce-scatter over the shard)
  TP_ATTN_FULL → MOE_FULL       all_gather(moe_cp, grad_sum_group=attn_tp)
                                (backward reduce-scatter(moe_cp) + all_reduce(attn_tp));
                                g > 1: own rows(attn_tp) + all_gather(moe_shard) — the tokens
                                enter through SCATTERED (backward reduce-scatter over the shard
                                + all-gather over attn_tp)
decode with one owner per token (``layout.attn_gathers_cp``), attention input
  TP_ATTN_FULL (owned rows) → every row of the CP group   all_gather(attn_cp)
                                (:func:`gather_attention_rows`; backward reduce-scatter
                                over attn_cp)
complete tensor → whole-grad consumer (residual moves, all-to-all MoE input)
  TP_ATTN_FULL → SCATTERED      own rows(attn_tp)   (backward all-gather)
  SCATTERED → TP_ATTN_FULL      all_gather(attn_tp, backward own rows)
  same mode                     nothing
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.communication import collectives as C
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.communication.scatter_modes import PARTIAL_AXES, ScatterMode
from megatron_ext.communication.token_layout import TokenLayout

S, T, M = ScatterMode.SCATTERED, ScatterMode.TP_ATTN_FULL, ScatterMode.MOE_FULL


def check_rows(x: torch.Tensor, mode: ScatterMode, layout: TokenLayout, what: str) -> None:
    """Raise (before any collective) when ``x`` does not hold this rank's rows of ``mode``."""
    want = layout.rows(mode)
    if x.dim() == 0 or x.shape[0] != want:
        raise ValueError(f"{what}: expected {want} rows (dim 0) in {ScatterMode(mode).name} for "
                         f"this rank, got shape {tuple(x.shape)}")


def moe_rows_mode(layout: TokenLayout) -> ScatterMode:
    """The rows a MoE partial lives on: MOE_FULL, which is TP_ATTN_FULL when the shard is one
    attention-TP group."""
    return M if layout.topology.uses_moe_full and not layout.cp_replicated else T


def _canonical(mode: ScatterMode, layout: TokenLayout) -> ScatterMode:
    mode = ScatterMode(mode)
    if mode is ScatterMode.FULL:
        if layout.topology.moe_dp != 1:
            raise ValueError("FULL (all tokens of the stage) is not a block mode when moe_dp > 1")
        mode = M
    if mode is M and (not layout.topology.uses_moe_full or layout.cp_replicated):
        mode = T
    return mode


def complete_sum(partial: torch.Tensor, partial_axis: Optional[str], source_mode: ScatterMode,
                 target_mode: ScatterMode, groups: ParallelGroups, layout: TokenLayout,
                 allow_reduce_scatter: bool) -> torch.Tensor:
    """Complete ``partial`` (a sum over ``partial_axis`` pending; ``None`` = already complete) and
    return this rank's rows of ``target_mode`` (SCATTERED or TP_ATTN_FULL)."""
    src, dst = _canonical(source_mode, layout), _canonical(target_mode, layout)
    check_rows(partial, src, layout, f"partial over {partial_axis} in {src.name}")
    if dst not in (S, T):
        raise ValueError(f"a sum completes into a residual mode (SCATTERED or TP_ATTN_FULL), "
                         f"not {dst.name}")
    if partial_axis is None:
        if src is not S:
            raise ValueError(f"a complete block output is expected on SCATTERED rows, got "
                             f"{src.name}")
        if dst is S:
            return partial
        return C.all_gather(partial, groups.attn_tp, sizes=layout.attn_tp_sizes,
                            backward="own_rows")
    if partial_axis == Axis.ATTN_TP:
        if src is not T:
            raise ValueError(f"a partial over attn_tp lives on TP_ATTN_FULL rows, not {src.name}")
        if dst is T:
            return C.all_reduce(partial, groups.attn_tp)
        if allow_reduce_scatter:
            return C.reduce_scatter(partial, groups.attn_tp, sizes=layout.attn_tp_sizes)
        whole = C.all_reduce(partial, groups.attn_tp)
        return C.take_own_rows(whole, groups.attn_tp, sizes=layout.attn_tp_sizes)
    if partial_axis == Axis.MOE_SHARD:
        if src is not moe_rows_mode(layout):
            raise ValueError(f"a partial over moe_shard lives on "
                             f"{moe_rows_mode(layout).name} rows, not {src.name}")
        shard = groups.moe_shard
        if dst is S or layout.topology.shards_per_attn_tp_group > 1:
            if allow_reduce_scatter:
                own = C.reduce_scatter(partial, shard, sizes=layout.moe_shard_sizes)
            else:
                own = C.take_own_rows(C.all_reduce(partial, shard), shard,
                                      sizes=layout.moe_shard_sizes)
            if dst is S:
                return own
            # g > 1: the attention group's other rows were summed by the other shards
            return C.all_gather(own, groups.attn_tp, sizes=layout.attn_tp_sizes,
                                backward="own_rows")
        whole = C.all_reduce(partial, shard)
        if layout.cp_replicated:   # every rank of the token group keeps every row
            return whole
        return C.take_own_rows(whole, groups.moe_cp, sizes=layout.moe_cp_sizes)
    raise ValueError(f"partial_axis={partial_axis!r} must be one of {PARTIAL_AXES} or None")


def to_consumer(x: torch.Tensor, from_mode: ScatterMode, to_mode: ScatterMode,
                grad_sum_axis: Optional[str], groups: ParallelGroups,
                layout: TokenLayout) -> torch.Tensor:
    """Bring complete ``x`` (rows of ``from_mode``) to the rows of ``to_mode`` for a block whose
    output is partial over ``grad_sum_axis`` (its input grads get summed there in backward)."""
    src, dst = _canonical(from_mode, layout), _canonical(to_mode, layout)
    check_rows(x, src, layout, f"block input in {src.name}")
    if src not in (S, T):
        raise ValueError(f"block inputs come from the residual modes, not {src.name}")
    if grad_sum_axis is None:
        if dst is src:
            return x
        if dst is S:
            return C.take_own_rows(x, groups.attn_tp, sizes=layout.attn_tp_sizes)
        if dst is T:
            return C.all_gather(x, groups.attn_tp, sizes=layout.attn_tp_sizes,
                                backward="own_rows")
        raise ValueError(f"a block with whole input grads reads SCATTERED or TP_ATTN_FULL, not "
                         f"{dst.name}")
    if grad_sum_axis not in PARTIAL_AXES:
        raise ValueError(f"grad_sum_axis={grad_sum_axis!r} must be one of {PARTIAL_AXES} or None")
    if grad_sum_axis == Axis.ATTN_TP and dst is not T:
        raise ValueError(f"a block sharded over attn_tp reads TP_ATTN_FULL, not {dst.name}")
    if grad_sum_axis == Axis.MOE_SHARD and dst is not moe_rows_mode(layout):
        raise ValueError(f"a MoE sharded over moe_shard reads {moe_rows_mode(layout).name} (token "
                         f"group k={layout.topology.token_group_size}), not {dst.name}")
    group = groups.axis(grad_sum_axis)
    sizes = layout.attn_tp_sizes if grad_sum_axis == Axis.ATTN_TP else layout.moe_shard_sizes
    if src is S:  # one gather over the whole consuming group: its adjoint is the reduce-scatter
        return C.all_gather(x, group, sizes=sizes, backward="reduce_scatter")
    if dst is T:  # TP_ATTN_FULL → TP_ATTN_FULL (a MoE here has shard == attn_tp ranks)
        return C.copy_to_region(x, group)
    if layout.topology.shards_per_attn_tp_group > 1:
        # TP_ATTN_FULL → MOE_FULL, shard inside the attention-TP group: through SCATTERED
        own = C.take_own_rows(x, groups.attn_tp, sizes=layout.attn_tp_sizes)
        return C.all_gather(own, group, sizes=sizes, backward="reduce_scatter")
    # TP_ATTN_FULL → MOE_FULL: gather over the token group; grads also partial over attn_tp
    return C.all_gather(x, groups.moe_cp, sizes=layout.moe_cp_sizes, backward="reduce_scatter",
                        grad_sum_group=groups.attn_tp)



def gather_attention_rows(x: torch.Tensor, groups: ParallelGroups,
                          layout: TokenLayout) -> torch.Tensor:
    """Decode with one owner per token: the attention input (this rank's owned TP_ATTN_FULL rows)
    → the rows of every rank of its CP group, CP order (``layout.attention_rows``). Each CP rank
    scores them against its own KV share and keeps its own rows of the output, so the input
    grads are partial over attn_cp: backward reduce-scatter. Identity without
    ``attn_gathers_cp``."""
    check_rows(x, T, layout, "attention input in TP_ATTN_FULL")
    if not layout.attn_gathers_cp:
        return x
    return C.all_gather(x, groups.attn_cp, sizes=layout.attn_cp_sizes, backward="reduce_scatter")
