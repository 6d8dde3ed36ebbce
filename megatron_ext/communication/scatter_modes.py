"""Where tokens live between the blocks of a decoder layer (design §3).

* ``SCATTERED`` — a distinct slice of the attention group's tokens (``split_rows`` over attn_tp);
* ``TP_ATTN_FULL`` — all tokens of the attention group (its dp/cp chunk), identical across
  attn_tp;
* ``MOE_FULL`` — all tokens of the MoE shard, identical across it: its token group's
  (``moe_cp``: k chunks in token-group order), or — a shard smaller than an attention-TP group
  (g = attn_tp / shard > 1) — its members' SCATTERED slices in shard order, 1/g of the attention
  group's tokens;
* ``FULL`` — all tokens of the stage: equal to ``MOE_FULL`` when ``moe_dp == 1``; no block is
  sharded over the whole stage when ``moe_dp > 1``, so layers never ask for it.

The residual stream lives in ``SCATTERED`` or ``TP_ATTN_FULL`` only: a ``MOE_FULL`` residual would
be k× longer than the attention's tokens (the bug of design §1, origin 1, when a deferred reduction skipped the
scatter). One residual mode is used for the whole stack:

* ``SCATTERED`` when ``allow_reduce_scatter`` (sequence-parallel style: every sum is a
  reduce-scatter straight into the residual, every block input an all-gather) or when sparse
  layers use the all-to-all dispatcher (its output is complete on SCATTERED tokens);
* ``TP_ATTN_FULL`` otherwise (every sum is an all-reduce, + own rows of the token group after a
  MOE_FULL MLP).

Because the residual mode is uniform and a pending reduction carries its own completion (see
``pending.py``), the neighbours' sparsity does not change any mode; it is kept for callers and
checks. ``is_last_layer`` (last layer *of the stage*) forbids leaving the MLP sum pending: it is
flushed before the final norm or the pipeline send.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Collection, Optional

from megatron_ext.communication.choices import MOE_DISPATCHERS, check_choice
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.topology import Topology

PARTIAL_AXES = (Axis.ATTN_TP, Axis.MOE_SHARD)


class ScatterMode(str, Enum):
    SCATTERED = "scattered"
    TP_ATTN_FULL = "tp_attn_full"
    MOE_FULL = "moe_full"
    FULL = "full"


RESIDUAL_MODES = (ScatterMode.SCATTERED, ScatterMode.TP_ATTN_FULL)


def residual_mode_for(allow_reduce_scatter: bool, moe_dispatcher: str = "local") -> ScatterMode:
    """The stack's residual mode (module doc)."""
    check_choice("moe_dispatcher", moe_dispatcher, MOE_DISPATCHERS)
    if allow_reduce_scatter or moe_dispatcher == "all_to_all":
        return ScatterMode.SCATTERED
    return ScatterMode.TP_ATTN_FULL


@dataclass(frozen=True)
class LayerScatterModes:
    """Modes of one decoder layer. Build with :meth:`compute` (or :meth:`for_stack`).

    * ``layer_input_mode`` — hidden/residual entering the layer (= previous layer's output mode);
      ``input_layernorm`` runs here.
    * ``attn_mode`` — the attention block's input (always ``TP_ATTN_FULL``); its output is a
      partial sum over attn_tp.
    * ``middle_residual_mode`` — residual between attention and MLP; ``post_attention_layernorm``
      runs here.
    * ``mlp_mode`` — the MLP's input rows. ``mlp_partial_axis`` says what its output is: a partial
      sum over ``"attn_tp"`` (dense TP MLP), over ``"moe_shard"`` (MoE, routed + shared added
      locally), or ``None`` — complete on SCATTERED tokens (all-to-all MoE dispatcher).
    * ``layer_output_mode`` — hidden/residual leaving the layer.
    * ``defer_mlp_reduction`` — the MLP sum is returned as a ``PendingReduction`` that the next
      layer's ``prepare_attn`` completes fused with residual add + norm.
    """

    layer_input_mode: ScatterMode
    middle_residual_mode: ScatterMode
    mlp_mode: ScatterMode
    layer_output_mode: ScatterMode
    mlp_partial_axis: Optional[str]
    allow_reduce_scatter: bool
    defer_mlp_reduction: bool
    is_layer_sparse: bool = False
    is_previous_layer_sparse: bool = False
    is_next_layer_sparse: bool = False
    is_last_layer: bool = False
    attn_mode: ScatterMode = ScatterMode.TP_ATTN_FULL

    def __post_init__(self) -> None:
        for name in ("layer_input_mode", "middle_residual_mode", "mlp_mode", "layer_output_mode",
                     "attn_mode"):
            object.__setattr__(self, name, ScatterMode(getattr(self, name)))
        for name in ("layer_input_mode", "middle_residual_mode", "layer_output_mode"):
            mode = getattr(self, name)
            if mode not in RESIDUAL_MODES:
                raise ValueError(
                    f"{name}={mode.name}: the residual lives in SCATTERED or TP_ATTN_FULL only; a "
                    f"{mode.name} residual would not match the attention's tokens (a reduction "
                    f"deferred across MOE_FULL must include the scatter back)")
        if self.attn_mode is not ScatterMode.TP_ATTN_FULL:
            raise ValueError(f"attn_mode={self.attn_mode.name}: attention runs on TP_ATTN_FULL")
        if self.mlp_mode is ScatterMode.FULL:
            raise ValueError("mlp_mode=FULL: use MOE_FULL (FULL equals MOE_FULL when moe_dp == 1; "
                             "no MLP is sharded over the whole stage when moe_dp > 1)")
        if self.mlp_partial_axis not in PARTIAL_AXES + (None,):
            raise ValueError(f"mlp_partial_axis={self.mlp_partial_axis!r} must be one of "
                             f"{PARTIAL_AXES} or None")
        if self.mlp_partial_axis is None and self.mlp_mode is not ScatterMode.SCATTERED:
            raise ValueError(f"a complete MLP output (mlp_partial_axis=None) lives on SCATTERED "
                             f"tokens, not {self.mlp_mode.name}")
        if self.mlp_partial_axis == Axis.ATTN_TP and self.mlp_mode is not ScatterMode.TP_ATTN_FULL:
            raise ValueError(f"a dense TP MLP (partial over attn_tp) runs on TP_ATTN_FULL, not "
                             f"{self.mlp_mode.name}")
        if self.mlp_partial_axis == Axis.MOE_SHARD and self.mlp_mode not in (
                ScatterMode.MOE_FULL, ScatterMode.TP_ATTN_FULL):
            raise ValueError(f"a MoE partial over moe_shard runs on MOE_FULL (or TP_ATTN_FULL "
                             f"when k == 1), not {self.mlp_mode.name}")
        if self.defer_mlp_reduction and (self.mlp_partial_axis is None or self.is_last_layer):
            raise ValueError("defer_mlp_reduction needs a partial MLP output and a next layer "
                             "(the last layer of a stage flushes its sum)")

    def check_topology(self, topology: Topology) -> None:
        """Modes that depend on the sizes: a MoE reads TP_ATTN_FULL only when its shard is one
        attention-TP group (E·M == attn_tp), MOE_FULL otherwise (k > 1, or g > 1)."""
        if self.mlp_partial_axis == Axis.MOE_SHARD:
            want = (ScatterMode.MOE_FULL if topology.uses_moe_full
                    else ScatterMode.TP_ATTN_FULL)
            if self.mlp_mode is not want:
                raise ValueError(f"mlp_mode={self.mlp_mode.name} for a MoE sharded over "
                                 f"{topology.moe_shard_size} ranks ({topology.moe_tokens_summary()}"
                                 f", attn_tp={topology.attn_tp}): the shard's ranks must see the "
                                 f"same tokens, use {want.name}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def compute(cls, *, layer_id: int, num_layers: int, is_layer_sparse: bool,
                is_previous_layer_sparse: bool, is_next_layer_sparse: bool, topology: Topology,
                allow_reduce_scatter: bool, moe_dispatcher: str = "local",
                defer_reductions: bool = True) -> "LayerScatterModes":
        """Modes of layer ``layer_id`` of a stage of ``num_layers`` layers (last layer: flush)."""
        if not 0 <= layer_id < num_layers:
            raise ValueError(f"layer_id={layer_id} out of range for num_layers={num_layers}")
        residual = residual_mode_for(allow_reduce_scatter, moe_dispatcher)
        if not is_layer_sparse:
            mlp_mode, axis = ScatterMode.TP_ATTN_FULL, Axis.ATTN_TP
        elif moe_dispatcher == "all_to_all":
            mlp_mode, axis = ScatterMode.SCATTERED, None
        else:
            mlp_mode = (ScatterMode.MOE_FULL if topology.uses_moe_full
                        else ScatterMode.TP_ATTN_FULL)
            axis = Axis.MOE_SHARD
        is_last = layer_id == num_layers - 1
        modes = cls(layer_input_mode=residual, middle_residual_mode=residual, mlp_mode=mlp_mode,
                    layer_output_mode=residual, mlp_partial_axis=axis,
                    allow_reduce_scatter=bool(allow_reduce_scatter),
                    defer_mlp_reduction=bool(defer_reductions) and not is_last and axis is not None,
                    is_layer_sparse=bool(is_layer_sparse),
                    is_previous_layer_sparse=bool(is_previous_layer_sparse),
                    is_next_layer_sparse=bool(is_next_layer_sparse), is_last_layer=is_last)
        modes.check_topology(topology)
        return modes

    @classmethod
    def for_stack(cls, num_layers: int, sparse_layers: Collection[int], topology: Topology,
                  allow_reduce_scatter: bool, moe_dispatcher: str = "local",
                  defer_reductions: bool = True) -> list["LayerScatterModes"]:
        """Modes of every layer of a stage; ``sparse_layers`` are the MoE layers' indices."""
        bad = sorted(i for i in sparse_layers if not 0 <= i < num_layers)
        if bad:
            raise ValueError(f"sparse_layers {bad} out of range for num_layers={num_layers}")
        sparse = set(sparse_layers)
        return [cls.compute(layer_id=i, num_layers=num_layers, is_layer_sparse=i in sparse,
                            is_previous_layer_sparse=(i - 1) in sparse,
                            is_next_layer_sparse=(i + 1) in sparse, topology=topology,
                            allow_reduce_scatter=allow_reduce_scatter,
                            moe_dispatcher=moe_dispatcher, defer_reductions=defer_reductions)
                for i in range(num_layers)]
