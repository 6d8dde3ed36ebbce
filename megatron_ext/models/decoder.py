"""The decoder every supported model runs: one :class:`DecoderLayer` configured by
:class:`~megatron_ext.models.config.ModelConfig`, and :class:`CausalLM` (embedding, layers, final norm, LM head).

No collectives here: the parallel layers (``megatron_ext.layers``) and the per-layer
:class:`~megatron_ext.communication.communicator.LayerCommunicator` issue every one of them. A layer is::

    x, residual = comm.prepare_attn(hidden, residual)      # pending sum + add + input_layernorm
    x, residual = comm.prepare_mlp(self_attn(x), residual)  # attention sum + add + post-attn norm
    hidden, residual = comm.postprocess_layer(mlp(x), residual)  # the MLP's one reduction (or
                                                                 # pending for the next layer)

Hidden states travel between blocks as ``[tokens, H]`` with ``tokens = b · s_local`` (row-major
over the local ``[b, s_local]`` batch) or this rank's SCATTERED share of them; the attention block
sees them as ``[b, s_local, H]``.

Module and parameter names follow ``transformers`` (``model.layers.3.self_attn.q_proj.weight``),
so :meth:`CausalLM.hf_sources` only special-cases what is stored differently: stacked experts,
the shared expert's inner MLP and gate, and a tied LM head on another pipeline stage.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_ext.checkpoint.hf_sources import HFSource
from megatron_ext.communication.communicator import FusedReduceAddNorm, LayerCommunicator
from megatron_ext.layers.attention.block import AttentionBlock
from megatron_ext.layers.backend import LayerBackend
from megatron_ext.layers.attention.cp_plan import QKVShapes, plan_cp_attention_for_shapes
from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.layers.embedding import VocabParallelEmbedding, VocabParallelLMHead
from megatron_ext.layers.mlp import DenseMLP
from megatron_ext.layers.moe import MoELayer, RouterStats, load_balancing_loss
from megatron_ext.layers.rope import RotaryEmbedding, rope_sequence_length
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.communication.choices import (CP_STRATEGIES, MOE_DISPATCHERS, RECOMPUTE_MODES,
                                                Recompute, check_choice)
from megatron_ext.communication.scatter_modes import LayerScatterModes
from megatron_ext.communication.token_layout import TokenLayout
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.hf_adapter import hf_sources
from megatron_ext.models.init_weights import init_weights
from megatron_ext.models.hf_keys import hf_tensor_shapes
from megatron_ext.parallel.stages import stage_layer_range



@dataclass
class StepInputs:
    """Per-forward inputs every layer reads (built once by :class:`CausalLM`)."""

    batch: int
    seq: int
    position_ids: torch.Tensor
    token_index: Optional[torch.Tensor]
    segment_ids: Optional[torch.Tensor]
    layout: TokenLayout
    token_masks: dict = field(default_factory=dict)   # ScatterMode -> [rows] bool, for MoE stats
    attn_plan: Optional[object] = None                # CP attention plan shared by every layer
    kv_cache: Optional[object] = None                 # serving: megatron_ext.serving.KVCache
    attn_position_ids: Optional[torch.Tensor] = None  # decode, one owner per token: every row
                                                      # the attention reads (layout.attention_rows)
    rope_seq_len: Optional[torch.Tensor] = None       # dynamic NTK RoPE: the input's length
    rotary_cache: dict = field(default_factory=dict)  # RoPE cos/sin, computed once per forward
    router_stats: bool = True                         # MoE load-balancing statistics wanted


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: attention block, then a dense gated MLP or a MoE block, with the
    residual stream and every reduction handled by this layer's :class:`LayerCommunicator`."""

    def __init__(self, config: ModelConfig, layer_idx: int, groups: ParallelGroups,
                 modes: LayerScatterModes, *, rope: RotaryEmbedding, cp_strategy: str,
                 moe_dispatcher: str, fused_reduce_add_norm: Optional[FusedReduceAddNorm] = None,
                 backend: Optional[LayerBackend] = None, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        c, prefix = config, f"model.layers.{layer_idx}"
        self.layer_idx, self.hidden_size = layer_idx, c.hidden_size
        self.is_sparse = c.is_sparse(layer_idx)
        kw = dict(dtype=dtype, device=device)
        backend = backend if backend is not None else LayerBackend()
        self.input_layernorm = backend.rms_norm(c.hidden_size, c.rms_norm_eps,
                                                name=f"{prefix}.input_layernorm.weight", **kw)
        self.self_attn = AttentionBlock(
            c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, groups, rope=rope,
            qkv_bias=c.qkv_bias, qk_norm=c.qk_norm, rms_norm_eps=c.rms_norm_eps,
            cp_strategy=cp_strategy, sync_input_grad=False, name=f"{prefix}.self_attn",
            backend=backend, **kw)
        self.post_attention_layernorm = backend.rms_norm(
            c.hidden_size, c.rms_norm_eps, name=f"{prefix}.post_attention_layernorm.weight", **kw)
        if self.is_sparse:
            self.mlp = MoELayer(c.hidden_size, c.num_experts, c.num_experts_per_tok,
                                c.moe_intermediate_size, groups, norm_topk_prob=c.norm_topk_prob,
                                shared_expert_intermediate_size=c.shared_expert_intermediate_size,
                                shared_expert_gate=c.shared_expert_gate, dispatcher=moe_dispatcher,
                                sync_input_grad=False, name=f"{prefix}.mlp", backend=backend,
                                **kw)
        else:
            self.mlp = DenseMLP(c.hidden_size, c.intermediate_size, groups, sync_input_grad=False,
                                name=f"{prefix}.mlp", backend=backend, **kw)
        self.modes = modes
        # a plain attribute, not a submodule: the norms are registered above
        self.comm = LayerCommunicator(modes, groups, self.input_layernorm,
                                      self.post_attention_layernorm,
                                      fused_reduce_add_norm=fused_reduce_add_norm)

    def forward(self, hidden, residual: Optional[torch.Tensor], inputs: StepInputs):
        """``(hidden, residual)`` of the layer input mode -> ``(hidden, residual, stats)``;
        ``hidden`` may be a pending reduction for the next layer, ``stats`` the router's
        load-balancing statistics (``None`` for a dense layer)."""
        layout = inputs.layout
        x, residual = self.comm.prepare_attn(hidden, residual, layout)
        kv_cache = (inputs.kv_cache.layer(self.layer_idx) if inputs.kv_cache is not None
                    else None)
        if layout.attn_gathers_cp:   # decode, one owner per token: x holds the CP group's rows
            positions, owner_rows = inputs.attn_position_ids, layout.attn_cp_sizes
        else:
            positions, owner_rows = inputs.position_ids, None
        attn = self.self_attn(x.view(positions.shape[0], inputs.seq, self.hidden_size),
                              positions, token_index=inputs.token_index,
                              segment_ids=inputs.segment_ids, plan=inputs.attn_plan,
                              kv_cache=kv_cache, owner_rows=owner_rows,
                              rope_seq_len=inputs.rope_seq_len,
                              rotary_cache=inputs.rotary_cache)
        x, residual = self.comm.prepare_mlp(attn.reshape(-1, self.hidden_size), residual, layout)
        stats = None
        if self.is_sparse:
            mode = self.modes.mlp_mode
            out = self.mlp(x, token_mask=inputs.token_masks.get(mode),
                           token_counts=self.mlp.token_counts(layout),
                           with_stats=inputs.router_stats)
            y, stats = out.hidden, out.router_stats
        else:
            y = self.mlp(x)
        hidden, residual = self.comm.postprocess_layer(y, residual, layout)
        return hidden, residual, stats


@dataclass
class CausalLMOutput:
    """What one stage returns.

    * ``logits`` (last stage): ``[b, s_local, Vp/attn_tp]``, this rank's shard of the padded
      vocabulary (columns ``attn_tp_rank·Vp/attn_tp …``, padding columns ``-inf``), or
      ``[b, s_local, V]`` (the real vocabulary) with ``gather_logits=True``.
    * ``loss`` (last stage, with ``labels``): per-token cross-entropy ``[b, s_local]`` in float32,
      0 where ``labels == -100``; identical on every attn_tp rank. Normalising (e.g. by the global
      count of labelled tokens) is the caller's choice.
    * ``aux_loss`` (sparse layers, when requested): this rank's share of the load-balancing loss
      of this stage's MoE layers, without the coefficient: summed over the stage's ranks it is
      ``transformers``' ``load_balancing_loss_func``; back-propagating each rank's share gives
      the reference gradients after the usual grad sync.
    * ``hidden_states`` (every stage but the last): the stage output to send to the next stage,
      ``[rows, H]`` in the residual mode (TP_ATTN_FULL, or SCATTERED with
      ``allow_reduce_scatter``); pass it unchanged as the next stage's ``hidden_states``.
    """

    logits: Optional[torch.Tensor] = None
    loss: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None
    hidden_states: Optional[torch.Tensor] = None
    router_stats: list = field(default_factory=list)


class _Backbone(nn.Module):
    """``model.*`` of the HF layout: ``embed_tokens``, ``layers.N``, ``norm`` (what this stage
    holds of them)."""

    def __init__(self):
        super().__init__()
        self.embed_tokens: Optional[VocabParallelEmbedding] = None
        self.layers = nn.ModuleDict()
        self.norm: Optional[nn.Module] = None


class CausalLM(nn.Module):
    """A decoder-only causal LM (Qwen3-MoE, Qwen2-MoE, Llama) on any parallel layout.

    * ``pre_process`` / ``post_process`` / ``layer_range``: a pipeline stage holds layers
      ``range(*layer_range)`` (default all), the embedding if ``pre_process`` and the final norm
      and LM head if ``post_process``. Use :func:`stage_layer_range` to split layers evenly.
    * ``cp_strategy``: K/V exchange of context-parallel attention (``"all_gather"``, ``"p2p"``).
    * ``allow_reduce_scatter``: sums complete by reduce-scatter into a SCATTERED residual stream
      (sequence-parallel style) instead of all-reduce into TP_ATTN_FULL.
    * ``moe_dispatcher``: ``"local"`` (MoE on the token group's gathered tokens, one reduction
      over the shard) or ``"all_to_all"`` (SCATTERED tokens exchanged over ``moe_ep``).
    * ``defer_reductions``: leave each MLP sum pending for the next layer's fused completion.
    * ``transformer_impl``: ``native``, ``te`` or ``auto`` (TE where it imports on CUDA), resolved
      once here (:class:`~megatron_ext.layers.backend.LayerBackend`); ``self.backend.describe()``
      says what each module kind got (logged once). Parameters and checkpoints do not depend on it.
    * ``make_vocab_size_divisible_by``: the embedding and LM head pad the vocabulary to a multiple
      of this × attn_tp (Megatron's ``--make-vocab-size-divisible-by``, default 128); padding
      rows live only in memory and their logits take no part in loss or sampling.
    """

    def __init__(self, config: ModelConfig, groups: ParallelGroups, *, pre_process: bool = True,
                 post_process: bool = True, layer_range: Optional[tuple[int, int]] = None,
                 cp_strategy: str = "all_gather", allow_reduce_scatter: bool = False,
                 moe_dispatcher: str = "local", defer_reductions: bool = True,
                 fused_reduce_add_norm: Optional[FusedReduceAddNorm] = None,
                 transformer_impl: str = "native",
                 make_vocab_size_divisible_by: int = 128,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        check_choice("cp_strategy", cp_strategy, CP_STRATEGIES)
        backend = LayerBackend.resolve(transformer_impl)
        check_choice("moe_dispatcher", moe_dispatcher, MOE_DISPATCHERS)
        start, stop = layer_range if layer_range is not None else (0, config.num_layers)
        if not 0 <= start < stop <= config.num_layers:
            raise ValueError(f"layer_range={layer_range} must be a non-empty range inside "
                             f"[0, num_layers={config.num_layers}]")
        config.check_fits(groups.topology)
        self.config, self.groups = config, groups
        self.pre_process, self.post_process = pre_process, post_process
        self.layer_range = (start, stop)
        kw = dict(dtype=dtype, device=device)
        tied_across_stages = config.tie_word_embeddings and not (pre_process and post_process)
        emb_sync = (Axis.ATTN_DP_CP, Axis.EMBEDDING) if tied_across_stages else (Axis.ATTN_DP_CP,)

        self.model = _Backbone()
        if pre_process:
            self.model.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, groups.attn_tp, reduce_results=False,
                vocab_multiple=make_vocab_size_divisible_by,
                grad_sync=emb_sync, name="model.embed_tokens", **kw)
        rope = RotaryEmbedding(config.head_dim, config.rope_theta, device=device,
                               scaling=config.rope_scaling,
                               max_position_embeddings=config.max_position_embeddings)
        self.rope = rope
        stage_sparse = [i - start for i in range(start, stop) if config.is_sparse(i)]
        modes = LayerScatterModes.for_stack(
            stop - start, stage_sparse, groups.topology, allow_reduce_scatter,
            moe_dispatcher=moe_dispatcher, defer_reductions=defer_reductions)
        for i in range(start, stop):
            self.model.layers[str(i)] = DecoderLayer(
                config, i, groups, modes[i - start], rope=rope, cp_strategy=cp_strategy,
                moe_dispatcher=moe_dispatcher, fused_reduce_add_norm=fused_reduce_add_norm,
                backend=backend, **kw)
        self.lm_head: Optional[VocabParallelLMHead] = None
        if post_process:
            self.model.norm = backend.rms_norm(config.hidden_size, config.rms_norm_eps,
                                               name="model.norm.weight", **kw)
            tied = self.model.embed_tokens if config.tie_word_embeddings and pre_process else None
            self.lm_head = VocabParallelLMHead(
                config.hidden_size, config.vocab_size, groups.attn_tp, tied_embedding=tied,
                vocab_multiple=make_vocab_size_divisible_by,
                sync_input_grad=False, grad_sync=emb_sync, name="lm_head", **kw)
        self.backend = backend
        backend.log_once()

    recompute: str = Recompute.NONE

    def set_recompute(self, mode: str) -> None:
        """Activation recomputation for training. ``full``: each decoder layer keeps only its
        inputs and runs again in backward — with its collectives (TP/CP/MOE_FULL/all-to-all),
        which re-run in the same order on every rank because every rank of a group recomputes
        the same layers at the same point of the same backward graph. ``selective``: only the
        SwiGLU activation of experts and MLPs, a collective-free region. The attention core is
        not recomputed in either mode's selective part: CP attention already keeps only q, k, v,
        its output and the log-sum-exp (flash-style), so recomputing it would save nothing."""
        check_choice("recompute", mode, RECOMPUTE_MODES)
        self.recompute = Recompute(mode)
        for module in self.modules():
            if hasattr(module, "recompute_activation"):
                module.recompute_activation = mode == Recompute.SELECTIVE

    # ------------------------------------------------------------------ forward
    @property
    def layers(self) -> list[DecoderLayer]:
        return list(self.model.layers.values())

    def forward(self, input_ids: Optional[torch.Tensor] = None, *,
                position_ids: torch.Tensor, hidden_states: Optional[torch.Tensor] = None,
                token_index: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None,
                labels: Optional[torch.Tensor] = None, layout: Optional[TokenLayout] = None,
                return_logits: bool = True, gather_logits: bool = False,
                compute_aux_loss: Optional[bool] = None, kv_cache=None,
                compute_lm_head: bool = True,
                attn_position_ids: Optional[torch.Tensor] = None,
                check_input_ids: bool = True,
                rope_seq_len: Optional[torch.Tensor] = None,
                logit_rows: Optional[slice] = None) -> CausalLMOutput:
        """One stage's forward on this rank's CP-local tokens.

        ``position_ids`` ``[b, s_local]`` (RoPE positions; gives the local batch shape);
        ``input_ids`` (first stage) or ``hidden_states`` (later stages, the previous stage's
        output as returned); ``token_index`` (causal order in the padded sequence, required when
        ``attn_cp > 1``) and ``segment_ids`` (document per token, -1 = padding) as
        :func:`megatron_ext.data.cp_split.split_batch_for_cp` makes them; ``labels``
        ``[b, s_local]`` per-position targets (-100 = ignore). ``layout``: token counts of every
        attention group of the stage; default: all equal to ``b · s_local`` (pass one for uneven
        attention-DP batches, e.g. from :func:`megatron_ext.communication.local_batch.split_batch`).
        ``compute_aux_loss`` defaults to ``labels is not None`` (collective over the stage).

        Serving (:mod:`megatron_ext.serving`): ``kv_cache`` (a ``KVCache``) makes every attention
        block store its K/V (prefill) or attend to the cache spread over attn_cp (decode step,
        ``kv_cache.decoding``: no CP attention plan is built). ``compute_lm_head=False`` stops
        after the last layer (no final norm, logits or loss): a prefill that only fills the cache.
        A decode step with one owner per token (``layout.attn_gathers_cp``): ``input_ids`` /
        ``position_ids`` are this rank's owned rows, ``attn_position_ids``
        ``[layout.attention_rows, s]`` the positions of every row of its CP group, which the
        attention reads. ``check_input_ids=False`` skips the embedding's id range check (the host
        sync a captured decode step cannot have): for ids the caller vouches for, e.g. sampled ones.
        ``rope_seq_len`` (dynamic NTK RoPE only): the input length to scale for, when it is not
        ``1 +`` the largest position of this input (a serving prefill of all prompt tokens but
        the last scales for the whole prompt, as ``transformers``' prefill does).
        ``logit_rows`` (no labels): the batch rows whose logits are computed, e.g. the rows this
        CP rank samples in a decode step whose rows are replicated over CP.
        """
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [b, s_local], got {tuple(position_ids.shape)}")
        b, s = position_ids.shape
        if self.pre_process == (input_ids is None):
            raise ValueError("the first stage takes input_ids, later stages take hidden_states "
                             f"(pre_process={self.pre_process})")
        if input_ids is not None and tuple(input_ids.shape) != (b, s):
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and position_ids {(b, s)} "
                             f"differ in shape")
        for name, t in (("token_index", token_index), ("segment_ids", segment_ids),
                        ("labels", labels)):
            if t is not None and tuple(t.shape) != (b, s):
                raise ValueError(f"{name} shape {tuple(t.shape)} must be [b, s_local]={(b, s)}")
        if labels is not None and not self.post_process:
            raise ValueError("labels are only used by the last pipeline stage")
        if labels is not None and not compute_lm_head:
            raise ValueError("labels need the LM head: compute_lm_head=False gives no loss")
        if labels is not None and logit_rows is not None:
            raise ValueError("logit_rows computes some rows' logits: labels need every row's")
        layout = layout or TokenLayout.uniform(self.groups, b * s)
        if layout.local_tokens != b * s:
            raise ValueError(f"layout says this rank's attention group holds "
                             f"{layout.local_tokens} tokens but the batch has b*s_local={b * s}")
        if layout.cp_replicated and (kv_cache is None or not kv_cache.decoding):
            raise ValueError("a layout with cp_replicated (decode rows replicated over CP) is "
                             "for decode steps with a decoding kv_cache")
        if layout.attn_gathers_cp:
            if kv_cache is None or not kv_cache.decoding:
                raise ValueError("a layout with attn_gathers_cp (one owner per decode token) is "
                                 "for decode steps with a decoding kv_cache")
            want = (layout.attention_rows, s)
            got = None if attn_position_ids is None else tuple(attn_position_ids.shape)
            if got != want:
                raise ValueError(f"attn_position_ids must be [attention_rows, s]={want} for a "
                                 f"decode step with one owner per token, got {got}")
        inputs = StepInputs(b, s, position_ids, token_index, segment_ids, layout,
                            kv_cache=kv_cache, attn_position_ids=attn_position_ids,
                            # statistics only skipped where nothing can use them
                            router_stats=compute_aux_loss is not False or torch.is_grad_enabled())
        if kv_cache is None or not kv_cache.decoding:
            inputs.attn_plan = self._attention_plan(b, s, inputs)
        if self.rope.is_dynamic:
            inputs.rope_seq_len = (self._rope_seq_len(inputs, kv_cache) if rope_seq_len is None
                                   else torch.as_tensor(rope_seq_len, dtype=torch.int64,
                                                        device=position_ids.device))
        if segment_ids is not None:
            inputs.token_masks = self._token_masks(segment_ids.reshape(-1) >= 0, layout)

        layers = self.layers
        if self.pre_process:
            embeds = self.model.embed_tokens(input_ids, check_ids=check_input_ids)
            embeds = embeds.reshape(b * s, embeds.shape[-1])
            hidden = layers[0].comm.embedding_output(embeds, layout, is_partial=True)
        else:
            if hidden_states is None:
                raise ValueError("a later pipeline stage needs hidden_states")
            hidden = hidden_states
        residual = None
        stats: list[RouterStats] = []
        full_recompute = self.recompute == Recompute.FULL and torch.is_grad_enabled()
        for layer in layers:
            if full_recompute:  # the layer's collectives re-run in backward, see set_recompute
                hidden, residual, layer_stats = checkpoint(layer, hidden, residual, inputs,
                                                           use_reentrant=False)
            else:
                hidden, residual, layer_stats = layer(hidden, residual, inputs)
            if layer_stats is not None:
                stats.append(layer_stats)

        out = CausalLMOutput(router_stats=stats)
        if compute_aux_loss is None:
            compute_aux_loss = labels is not None
        if compute_aux_loss and stats:
            out.aux_loss = load_balancing_loss(stats, (self.groups.stage,))
        last = layers[-1].comm
        if self.post_process and not compute_lm_head:
            return out
        if not self.post_process:
            out.hidden_states = last.flush(hidden) + residual
            return out
        x = last.finalize(hidden, residual, self.model.norm, layout)
        if logit_rows is not None:
            x = x.view(b, s, x.shape[-1])[logit_rows].reshape(-1, x.shape[-1])
        if labels is not None and not return_logits and torch.is_grad_enabled():
            # training: the loss without keeping the [tokens, V/p] logits (the step's largest
            # activation, and its gradient the largest transient at the start of backward)
            out.loss = self.lm_head.loss(x, labels.reshape(-1)).view(b, s)
            return out
        logits = self.lm_head(x)
        if labels is not None:
            out.loss = vocab_parallel_cross_entropy(logits, labels.reshape(-1),
                                                    self.groups.attn_tp,
                                                    vocab_size=self.config.vocab_size).view(b, s)
        if return_logits:
            if gather_logits:
                logits = self.lm_head.gather_logits(logits)
            out.logits = logits.view(-1, s, logits.shape[-1])
        return out

    def _attention_plan(self, b: int, s: int, inputs: StepInputs):
        """One CP attention plan per forward (block schedule + validation: a collective over
        attn_cp), shared by every layer instead of one per layer."""
        attn = self.layers[0].self_attn
        shapes = QKVShapes(b, s, attn.local_heads, attn.local_kv_heads, attn.head_dim,
                           next(self.parameters()).dtype, inputs.position_ids.device)
        token_index = inputs.token_index if inputs.token_index is not None else \
            inputs.position_ids
        return plan_cp_attention_for_shapes(shapes, self.groups.attn_cp, token_index=token_index,
                                            segment_ids=inputs.segment_ids,
                                            strategy=attn.cp_strategy)

    def _rope_seq_len(self, inputs: StepInputs, kv_cache) -> torch.Tensor:
        """The length dynamic NTK RoPE scales for: ``1 + the largest position`` of the input, as
        ``transformers`` takes it per forward. A prefill / training step spans the CP ranks'
        chunks of each sequence (all-reduced over attn_cp); a decode step's rows are the same
        on every CP rank (``attn_position_ids``, or the replicated ``position_ids`` without CP),
        so each step scales for its own furthest position, as ``transformers``' generate does."""
        if kv_cache is not None and kv_cache.decoding:
            rows = inputs.attn_position_ids if inputs.layout.attn_gathers_cp \
                else inputs.position_ids
            return rope_sequence_length(rows)
        return rope_sequence_length(inputs.position_ids, self.groups.attn_cp)

    def _token_masks(self, valid: torch.Tensor, layout: TokenLayout) -> dict:
        """Real-token masks on the rows each MoE layer reads (padding is left out of the
        load-balancing statistics), one per MLP mode, moved by the communicator."""
        masks: dict = {}
        for layer in self.layers:
            mode = layer.modes.mlp_mode
            if layer.is_sparse and mode not in masks:
                masks[mode] = layer.comm.mlp_token_mask(valid, layout)
        return masks

    # ------------------------------------------------------------------ weights
    def init_weights(self, seed: int = 0, std: float = 0.02) -> None:
        """Layout-independent initialisation (:func:`~megatron_ext.models.init_weights.init_weights`)."""
        init_weights(self, self.hf_sources(), seed, std)

    def hf_expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return hf_tensor_shapes(self.config)

    def hf_config_dict(self) -> dict:
        return self.config.to_hf_dict()

    def hf_sources(self) -> dict[str, HFSource]:
        """HF source of every parameter this rank holds (``megatron_ext.checkpoint``)."""
        return hf_sources((name for name, _ in self.named_parameters()), self.config)

    @classmethod
    def for_stage(cls, config: ModelConfig, groups: ParallelGroups, *,
                  layers_per_stage: Optional[Sequence[int]] = None, **kwargs) -> "CausalLM":
        """This rank's pipeline stage (``groups.topology.pp`` stages, this rank's ``pp``
        coordinate): its layers (:func:`stage_layer_range`), the embedding on the first stage,
        the final norm and LM head on the last. With ``pp == 1`` the whole model."""
        pp, stage = groups.topology.pp, groups.coords.pp
        return cls(config, groups, pre_process=stage == 0, post_process=stage == pp - 1,
                   layer_range=stage_layer_range(config.num_layers, pp, stage, layers_per_stage),
                   **kwargs)

    @classmethod
    def from_pretrained(cls, path: str, groups: ParallelGroups, *, strict: bool = True,
                        strict_config: Optional[bool] = None, **kwargs) -> "CausalLM":
        """Build this rank's stage (:meth:`for_stage`) from an HF directory's config and load its
        slices of the weights (no collectives). ``strict``: unexpected tensors are an error;
        ``strict_config`` (default: ``strict``): unknown config fields are an error."""
        from megatron_ext.checkpoint.hf import load_hf_checkpoint

        config = ModelConfig.from_hf_dir(path, strict=strict if strict_config is None
                                         else strict_config)
        model = cls.for_stage(config, groups, **kwargs)
        load_hf_checkpoint(model, path, strict=strict)
        return model

    def save_pretrained(self, path: str, **kwargs) -> None:
        """Write an HF directory (collective over the world; rank 0 writes)."""
        from megatron_ext.checkpoint.hf import save_hf_checkpoint

        save_hf_checkpoint(self, path, self.groups, **kwargs)
