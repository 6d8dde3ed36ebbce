"""LayerCommunicator: moves ``(hidden, residual)`` between scatter modes around one decoder layer.

Model code calls only these methods and the parallel layers; every collective of the residual
stream is issued here (through ``mode_transitions``), each with its adjoint::

    hidden = comm[0].embedding_output(embeds, layout)          # vocab-parallel partial → pending
    residual = None
    for layer, comm in zip(layers, comms):
        x, residual = comm.prepare_attn(hidden, residual, layout)     # TP_ATTN_FULL
        x, residual = comm.prepare_mlp(layer.attn(x), residual, layout)
        hidden, residual = comm.postprocess_layer(layer.mlp(x), residual, layout)
    x = comms[-1].finalize(hidden, residual, final_norm, layout)  # TP_ATTN_FULL, for the LM head

Contracts:

* The attention block and a dense MLP return a partial sum over attn_tp (row-parallel projection
  with ``reduce_results=False``); a ``"local"`` MoE returns one partial sum over ``moe_shard``
  (routed + shared added locally); an all-to-all MoE returns complete SCATTERED rows.
* Inputs handed to a block (``prepare_attn``, ``prepare_mlp``, ``finalize``) already sum their
  gradients over the block's group in backward — build the blocks with ``sync_input_grad=False``
  so nothing is summed twice.
* The communicator does the residual adds and calls the norms. The norms' ParamSpec
  ``grad_sync`` is set here: ``("stage",)`` for a norm on SCATTERED tokens (each rank sees
  1/attn_tp of them), ``("attn_dp_cp",)`` on TP_ATTN_FULL.
* One reduction per block output: the attention sum is completed in ``prepare_mlp``; the MLP sum
  in ``postprocess_layer`` or — left pending — in the next layer's ``prepare_attn``, fused with
  the residual add + norm. The last layer of a stage flushes it (``flush`` before a pipeline send).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Union

import torch
from torch import nn

from megatron_ext.communication.collectives import fused_all_reduce_add_norm
from megatron_ext.communication.mode_transitions import (check_rows, complete_sum,
                                                        gather_attention_rows, moe_rows_mode,
                                                        to_consumer)
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups
from megatron_ext.parallel.param_meta import get_spec, set_spec
from megatron_ext.communication.pending import PendingReduction
from megatron_ext.communication.scatter_modes import LayerScatterModes, ScatterMode
from megatron_ext.communication.token_layout import TokenLayout

Hidden = Union[torch.Tensor, PendingReduction]
# (partial, residual or None, norm, group) -> (normed, new residual): fused all-reduce + add + norm
FusedReduceAddNorm = Callable[[torch.Tensor, Optional[torch.Tensor], nn.Module, AxisGroup],
                              tuple[torch.Tensor, torch.Tensor]]


def norm_grad_sync(mode: ScatterMode) -> tuple[str, ...]:
    """Grad-sync axes of a replicated norm weight that runs on ``mode`` rows (design §4 table)."""
    return (Axis.STAGE,) if ScatterMode(mode) is ScatterMode.SCATTERED else (Axis.ATTN_DP_CP,)


def tag_norm(norm: Optional[nn.Module], mode: ScatterMode) -> None:
    """Set ``grad_sync`` of every parameter of ``norm`` for a norm running on ``mode`` rows."""
    if norm is None:
        return
    axes = norm_grad_sync(mode)
    for param in norm.parameters():
        spec = get_spec(param)
        if spec.grad_sync != axes:
            set_spec(param, dataclasses.replace(spec, grad_sync=axes))


class LayerCommunicator:
    """Scatter-mode transitions of one decoder layer (see the module doc for the call order).

    ``fused_reduce_add_norm`` (optional): used when a pending sum completes by a plain all-reduce
    with unchanged rows (``PendingReduction.plain_all_reduce_group``), e.g. the symmetric-memory
    kernel; every other case runs the collective, the add and the norm separately.
    """

    def __init__(self, modes: LayerScatterModes, groups: ParallelGroups,
                 input_layernorm: nn.Module, post_attention_layernorm: nn.Module, *,
                 fused_reduce_add_norm: Optional[FusedReduceAddNorm] = None):
        modes.check_topology(groups.topology)
        self.modes, self.groups = modes, groups
        self.input_layernorm = input_layernorm
        self.post_attention_layernorm = post_attention_layernorm
        self.fused_reduce_add_norm = fused_reduce_add_norm
        tag_norm(input_layernorm, modes.layer_input_mode)
        tag_norm(post_attention_layernorm, modes.middle_residual_mode)

    # ------------------------------------------------------------------ entry / exit
    def embedding_output(self, embeds: torch.Tensor, layout: TokenLayout,
                         is_partial: bool = True) -> Hidden:
        """The first layer's ``hidden`` from the embedding's TP_ATTN_FULL output: a vocab-parallel
        partial over attn_tp (``is_partial``) becomes a pending sum into this layer's input mode,
        completed by ``prepare_attn``; a complete (replicated) embedding is moved there."""
        if is_partial:
            return self._pending(embeds, Axis.ATTN_TP, ScatterMode.TP_ATTN_FULL,
                                 self.modes.layer_input_mode, layout)
        return to_consumer(embeds, ScatterMode.TP_ATTN_FULL, self.modes.layer_input_mode, None,
                           self.groups, layout)

    def flush(self, hidden: Hidden) -> torch.Tensor:
        """Complete a pending sum (before a pipeline send, or for any caller needing a tensor)."""
        return hidden.complete(self.groups) if isinstance(hidden, PendingReduction) else hidden

    def finalize(self, hidden: Hidden, residual: Optional[torch.Tensor], final_norm: nn.Module,
                 layout: TokenLayout, to_mode: ScatterMode = ScatterMode.TP_ATTN_FULL,
                 consumer_axis: Optional[str] = Axis.ATTN_TP) -> torch.Tensor:
        """After the last layer: residual add + ``final_norm`` on the output mode, then the rows of
        ``to_mode`` for a consumer partial over ``consumer_axis`` (default: the vocab-parallel LM
        head over attn_tp). Tags ``final_norm``'s grad sync like the layer norms."""
        mode = self.modes.layer_output_mode
        tag_norm(final_norm, mode)
        normed, _ = self._complete_add_norm(hidden, residual, final_norm, mode, layout)
        return to_consumer(normed, mode, to_mode, consumer_axis, self.groups, layout)

    def mlp_token_mask(self, valid: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
        """A per-token boolean (``valid``, on the layer-input rows of TP_ATTN_FULL) moved to the
        rows the MLP reads, e.g. so a MoE router leaves padding out of its statistics. No
        gradient; one gather when the MLP runs on MOE_FULL or SCATTERED rows."""
        mode = self.modes.mlp_mode
        with torch.no_grad():
            v = valid.to(torch.float32).unsqueeze(-1)
            if mode is ScatterMode.SCATTERED:
                v = to_consumer(v, ScatterMode.TP_ATTN_FULL, mode, None, self.groups, layout)
            elif moe_rows_mode(layout) is ScatterMode.MOE_FULL:
                v = to_consumer(v, ScatterMode.TP_ATTN_FULL, ScatterMode.MOE_FULL, Axis.MOE_SHARD,
                                self.groups, layout)
            return v.squeeze(-1) > 0.5

    # ------------------------------------------------------------------ the three steps
    def prepare_attn(self, hidden: Hidden, residual: Optional[torch.Tensor],
                     layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete a pending sum + residual add + ``input_layernorm`` on the layer input mode;
        return ``(attention input on TP_ATTN_FULL, residual)``. ``residual=None``: first layer.
        Decode with one owner per token (``layout.attn_gathers_cp``): the attention input holds
        the rows of the whole CP group (``layout.attention_rows``)."""
        mode = self.modes.layer_input_mode
        normed, residual = self._complete_add_norm(hidden, residual, self.input_layernorm, mode,
                                                   layout)
        x = to_consumer(normed, mode, self.modes.attn_mode, Axis.ATTN_TP, self.groups, layout)
        return gather_attention_rows(x, self.groups, layout), residual

    def prepare_mlp(self, attn_output: torch.Tensor, residual: torch.Tensor,
                    layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """Complete the attention's partial sum (over attn_tp) + residual add +
        ``post_attention_layernorm``; return ``(MLP input on mlp_mode, residual)``."""
        modes = self.modes
        mode = modes.middle_residual_mode
        residual = self._move_residual(residual, modes.layer_input_mode, mode, layout)
        pending = self._pending(attn_output, Axis.ATTN_TP, modes.attn_mode, mode, layout)
        normed, residual = self._complete_add_norm(pending, residual,
                                                   self.post_attention_layernorm, mode, layout)
        return to_consumer(normed, mode, modes.mlp_mode, modes.mlp_partial_axis, self.groups,
                           layout), residual

    def postprocess_layer(self, mlp_output: torch.Tensor, residual: torch.Tensor,
                          layout: TokenLayout) -> tuple[Hidden, torch.Tensor]:
        """The MLP's one reduction into the layer output mode — or, when ``defer_mlp_reduction``,
        a :class:`PendingReduction` for the next ``prepare_attn``. Returns ``(hidden, residual)``
        with the residual add still to do (next ``prepare_attn`` or ``finalize``)."""
        modes = self.modes
        out = modes.layer_output_mode
        residual = self._move_residual(residual, modes.middle_residual_mode, out, layout)
        if modes.mlp_partial_axis is None:
            return complete_sum(mlp_output, None, modes.mlp_mode, out, self.groups, layout,
                                modes.allow_reduce_scatter), residual
        pending = self._pending(mlp_output, modes.mlp_partial_axis, modes.mlp_mode, out, layout)
        if modes.defer_mlp_reduction:
            return pending, residual
        return pending.complete(self.groups), residual

    # ------------------------------------------------------------------ helpers
    def _pending(self, partial: torch.Tensor, axis: str, source: ScatterMode,
                 target: ScatterMode, layout: TokenLayout) -> PendingReduction:
        return PendingReduction(partial, axis, source, target, layout,
                                self.modes.allow_reduce_scatter)

    def _move_residual(self, residual: torch.Tensor, src: ScatterMode, dst: ScatterMode,
                       layout: TokenLayout) -> torch.Tensor:
        return to_consumer(residual, src, dst, None, self.groups, layout)

    def _complete_add_norm(self, hidden: Hidden, residual: Optional[torch.Tensor],
                           norm: nn.Module, mode: ScatterMode,
                           layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """``h = complete(hidden) (+ residual)``; returns ``(norm(h), h)`` (``h``: new residual)."""
        if residual is not None:
            check_rows(residual, mode, layout, f"residual in {mode.name}")
        if isinstance(hidden, PendingReduction):
            if hidden.target_mode is not mode:
                raise ValueError(
                    f"{hidden!r} completes into {hidden.target_mode.name} but the residual lives "
                    f"in {mode.name} ({layout.rows(mode)} rows): hidden and residual would differ "
                    f"in length")
            group = hidden.plain_all_reduce_group(self.groups)
            if (self.fused_reduce_add_norm is not None and group is not None
                    and not group.is_trivial):
                return self.fused_reduce_add_norm(hidden.partial, residual, norm, group)
            fused = fused_all_reduce_add_norm(hidden.partial, residual, norm, group)
            if fused is not None:   # inference over symmetric memory: one kernel
                return fused
            hidden = hidden.complete(self.groups)
        check_rows(hidden, mode, layout, f"hidden in {mode.name}")
        if residual is not None and hasattr(norm, "add_norm"):   # one pass where it can
            return norm.add_norm(hidden, residual)
        h = hidden if residual is None else hidden + residual
        return norm(h), h
