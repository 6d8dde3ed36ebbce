"""Self-attention block: column-parallel Q/K/V over ``attn_tp``, optional QK-norm, RoPE, context-
parallel attention over ``attn_cp``, row-parallel ``o_proj`` whose sum is left pending.

Input is TP_ATTN_FULL ``[b, s_local, H]`` (this rank's CP chunks, identical across attention TP);
output is the partial sum over ``attn_tp`` — the communicator completes it (all-reduce or
reduce-scatter, fused with residual + norm), so the block holds no reduction of its own.

Heads: ``num_heads`` split over ``attn_tp``. KV heads split too when ``num_kv_heads >= attn_tp``;
otherwise each KV head is replicated on ``attn_tp / num_kv_heads`` consecutive ranks (rank ``r``
holds KV head ``r // (attn_tp / num_kv_heads)``, which is exactly the KV head its query heads use
under HF's GQA grouping). Q, K, V are separate weights (plain slices of the HF tensors).

Serving (``kv_cache``, optional; :mod:`megatron_ext.serving.kv_cache`): in a prefill the block
runs the usual CP attention and hands this rank's post-RoPE K/V to ``kv_cache.store(k, v)``; in a
decode step (``kv_cache.decoding``) the new tokens' K/V go to ``kv_cache.append(k, v)``, which
returns this rank's share of the cache ``(k, v, valid)``, and the queries attend to the cache
spread over the CP ranks with :func:`~megatron_ext.layers.attention.cp_decode.cp_decode_attention`
(partials merged by log-sum-exp).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ext.layers.attention.fused_qkv import FusedQKV
from megatron_ext.layers.backend import LayerBackend
from megatron_ext.layers.rope import RotaryEmbedding, apply_rotary
from megatron_ext.communication.choices import CP_STRATEGIES, check_choice
from megatron_ext.communication.collectives import copy_to_region
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups


def _join(prefix: Optional[str], name: str) -> Optional[str]:
    return f"{prefix}.{name}" if prefix else name


def check_head_split(num_heads: int, num_kv_heads: int, tp: int) -> None:
    """Heads must split evenly over attention TP; KV heads split or replicate evenly."""
    if num_heads < 1 or num_kv_heads < 1:
        raise ValueError(f"num_heads={num_heads}, num_kv_heads={num_kv_heads} must be >= 1")
    if num_heads % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} must divide num_heads={num_heads} (GQA)")
    if num_heads % tp:
        raise ValueError(f"num_heads={num_heads} must be divisible by attn_tp={tp}")
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise ValueError(f"num_kv_heads={num_kv_heads} must be divisible by attn_tp={tp} "
                         f"(or smaller than attn_tp and dividing it, to replicate KV heads)")
    if num_kv_heads < tp and tp % num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} < attn_tp={tp} replicates KV heads, so it "
                         f"must divide attn_tp")


class AttentionBlock(nn.Module):
    """Causal self-attention over ``groups.attn_tp`` (heads) and ``groups.attn_cp`` (sequence).

    ParamSpecs: ``q_proj`` ``[hq·d, H]`` ``Split(0, tp)``; ``k_proj``/``v_proj`` ``[hkv·d, H]``
    ``Split(0, min(hkv, tp))`` (replicated pieces get replica-summed gradients); ``o_proj``
    ``[H, hq·d]`` ``Split(1, tp)``; biases alike; all ``grad_sync=("attn_dp_cp",)``,
    ``shard_axis="attn_tp"``. QK-norm weights (over ``head_dim``) see only this rank's heads, so
    their gradients are partial over ``attn_tp``: ``grad_sync=("stage",)``.
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 groups: ParallelGroups, *, rope: Optional[RotaryEmbedding] = None,
                 rope_theta: float = 10000.0, qkv_bias: bool = False, o_bias: bool = False,
                 qk_norm: bool = False, rms_norm_eps: float = 1e-6,
                 cp_strategy: str = "all_gather", softmax_scale: Optional[float] = None,
                 sync_input_grad: bool = True, name: Optional[str] = "self_attn",
                 backend: Optional[LayerBackend] = None, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        tp_group = groups.attn_tp
        tp = tp_group.size
        check_head_split(num_heads, num_kv_heads, tp)
        check_choice("cp_strategy", cp_strategy, CP_STRATEGIES)
        self.groups, self.tp_group, self.cp_group = groups, tp_group, groups.attn_cp
        self.hidden_size, self.head_dim = hidden_size, head_dim
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.local_heads = num_heads // tp
        self.local_kv_heads = max(num_kv_heads // tp, 1)
        self.cp_strategy, self.softmax_scale = cp_strategy, softmax_scale
        self.sync_input_grad = sync_input_grad
        kv_parts = min(num_kv_heads, tp)
        backend = backend if backend is not None else LayerBackend()
        self.attention_kernel = backend.attention_kernel(cp_strategy)
        common = dict(grad_sync=(Axis.ATTN_DP_CP,), shard_axis=Axis.ATTN_TP, kind="attn_linear",
                      dtype=dtype, device=device)
        self.q_proj = backend.column_linear(hidden_size, num_heads * head_dim, tp_group, qkv_bias,
                                            name=_join(name, "q_proj"), **common)
        self.k_proj = backend.column_linear(hidden_size, num_kv_heads * head_dim, tp_group,
                                            qkv_bias, num_partitions=kv_parts,
                                            name=_join(name, "k_proj"), **common)
        self.v_proj = backend.column_linear(hidden_size, num_kv_heads * head_dim, tp_group,
                                            qkv_bias, num_partitions=kv_parts,
                                            name=_join(name, "v_proj"), **common)
        self.o_proj = backend.row_linear(num_heads * head_dim, hidden_size, tp_group, o_bias,
                                         name=_join(name, "o_proj"), **common)
        if qk_norm:
            self.q_norm = backend.rms_norm(head_dim, rms_norm_eps, grad_sync=(Axis.STAGE,),
                                           name=_join(name, "q_norm.weight"), dtype=dtype,
                                           device=device)
            self.k_norm = backend.rms_norm(head_dim, rms_norm_eps, grad_sync=(Axis.STAGE,),
                                           name=_join(name, "k_norm.weight"), dtype=dtype,
                                           device=device)
        else:
            self.q_norm = self.k_norm = None
        self.rope = rope if rope is not None else RotaryEmbedding(head_dim, rope_theta,
                                                                  device=device)
        # not a submodule (no parameters of its own): the decode fast path over the projections
        self.fused_qkv = FusedQKV(self.q_proj, self.k_proj, self.v_proj, self.q_norm,
                                  self.k_norm)

    def _decode_attention(self, q: torch.Tensor, k_all: torch.Tensor, v_all: torch.Tensor,
                          valid: torch.Tensor, kv_cache, owner_rows) -> torch.Tensor:
        """A decode step's attention of ``q`` ``[b, 1, heads, d]`` against the cache (already
        holding the step's K/V) spread over the CP ranks, then ``o_proj``."""
        from megatron_ext.layers.attention.cp_decode import cp_decode_attention

        # shapes are fixed for a whole generation: agree on them across CP at its first step
        out = cp_decode_attention(q, k_all, v_all, self.cp_group, kv_valid=valid,
                                  kv_len=kv_cache.valid_slots(), softmax_scale=self.softmax_scale,
                                  check=kv_cache.first_step, owner_rows=owner_rows,
                                  heads_first_cache=True)
        return self.o_proj(out.reshape(out.shape[0], q.shape[1],
                                       self.local_heads * self.head_dim))

    def _rotary(self, positions: torch.Tensor, dtype: torch.dtype,
                rope_seq_len: Optional[torch.Tensor], cache: Optional[dict]):
        if cache is None:
            return self.rope(positions, dtype=dtype, seq_len=rope_seq_len)
        key = (id(self.rope), id(positions), id(rope_seq_len), dtype)
        if key not in cache:   # the entry keeps its inputs alive, so their ids stay theirs
            cache[key] = (positions, rope_seq_len,
                          *self.rope(positions, dtype=dtype, seq_len=rope_seq_len))
        return cache[key][2:]

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, *,
                token_index: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, plan=None,
                kv_cache=None, owner_rows: Optional[tuple[int, ...]] = None,
                rope_seq_len: Optional[torch.Tensor] = None,
                rotary_cache: Optional[dict] = None) -> torch.Tensor:
        """``hidden`` ``[b, s_local, H]`` (TP_ATTN_FULL), ``positions`` ``[b, s_local]`` or
        ``[s_local]`` (RoPE positions of this rank's tokens). ``token_index`` (causal order in the
        full sequence; default ``positions``) and ``segment_ids`` (packed documents) go to
        :func:`context_parallel_attention`, with ``plan`` (a ``plan_cp_attention`` result shared by
        all layers of a step). Pass the CP split's ``token_index`` whenever the batch is padded or
        packed. ``kv_cache``: serving (module doc); None for training. Returns the partial sum
        over ``attn_tp``. ``owner_rows`` (decode steps only): the rows of ``hidden`` each CP rank
        owns (one owner per decode token under CP; contiguous blocks in CP order) — every row
        attends, only this rank's are merged, projected and returned. ``rope_seq_len``: the
        input's full sequence length, which dynamic NTK RoPE needs
        (:func:`~megatron_ext.layers.rope.rope_sequence_length`). ``rotary_cache``: a dict shared
        by the layers of one forward (they share the RoPE module and positions), so the cos/sin
        tables are computed once per step instead of once per layer."""
        from megatron_ext.layers.attention.cp_attention import context_parallel_attention

        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"AttentionBlock expects hidden [b, s, {self.hidden_size}], got "
                             f"{tuple(hidden.shape)}")
        b, s, _ = hidden.shape
        if positions.shape[-1] != s:
            raise ValueError(f"positions shape {tuple(positions.shape)} does not match "
                             f"{s} tokens per sequence")
        decoding = kv_cache is not None and kv_cache.decoding
        if owner_rows is not None and not decoding:
            raise ValueError("owner_rows (one owner per decode token) needs a decoding kv_cache")
        if decoding and self.fused_qkv.applies(hidden, s, self.head_dim):
            cos, sin = self._rotary(positions, hidden.dtype, rope_seq_len, rotary_cache)
            q = self.fused_qkv.decode(hidden, cos, sin, self.local_heads, self.local_kv_heads,
                                      self.head_dim, kv_cache)
            return self._decode_attention(q, *kv_cache.appended(), kv_cache, owner_rows)
        x = copy_to_region(hidden, self.tp_group) if self.sync_input_grad else hidden
        q = self.q_proj(x).view(b, s, self.local_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.local_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.local_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self._rotary(positions, q.dtype, rope_seq_len, rotary_cache)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = _in_autocast_dtype(q, k, v)
        if decoding:
            return self._decode_attention(q, *kv_cache.append(k, v), kv_cache, owner_rows)
        out = context_parallel_attention(
            q, k, v, self.cp_group, token_index=positions if token_index is None else token_index,
            segment_ids=segment_ids, strategy=self.cp_strategy, softmax_scale=self.softmax_scale,
            plan=plan, backend=self.attention_kernel)
        if kv_cache is not None:
            kv_cache.store(k, v)
        return self.o_proj(out.reshape(b, s, self.local_heads * self.head_dim))


def _in_autocast_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """Under autocast, attention runs in the autocast dtype, as torch's SDPA does: a QK-norm with
    a float32 weight otherwise leaves Q/K in float32 beside a bf16 V."""
    device = q.device.type
    if not torch.is_autocast_enabled(device):
        return q, k, v
    dtype = torch.get_autocast_dtype(device)
    return q.to(dtype), k.to(dtype), v.to(dtype)
