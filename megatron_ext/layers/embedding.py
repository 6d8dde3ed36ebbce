"""Vocab-parallel input embedding and LM head (Megatron split of the vocabulary over a TP group).

Each rank holds rows ``[r·V/p, (r+1)·V/p)`` of the ``[V, H]`` table. The embedding looks up the
ids that fall in its range and zeroes the rest, so its output is a partial sum over the group: the
communicator (or ``reduce_results=True``) completes it. The LM head is column-parallel over the
vocabulary and yields this rank's logit shard, which :func:`vocab_parallel_cross_entropy` consumes
without ever gathering the full ``[tokens, V]`` logits.

A vocabulary that does not divide is padded, as Megatron does, to a multiple of
``vocab_multiple · p`` (``--make-vocab-size-divisible-by``): the padding rows exist only in memory
(ParamSpec ``padded_shape``: checkpoints and HF files keep the real ``[V, H]``), stay zero, are
never looked up, and their logits are ``-inf`` so they take no part in the loss, softmax, argmax
or sampling, and get no gradient. Out-of-range token ids raise before any collective.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.layers.linear import InitFn, default_init, shard_axis_name
from megatron_ext.communication.collectives import all_gather, all_reduce, copy_to_region
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.layers.cross_entropy import check_labels
from megatron_ext.layers.lm_head_loss import CHUNK_BYTES, lm_head_cross_entropy
from megatron_ext.parallel.param_meta import ParamSpec, Split, set_spec


def padded_vocab_size(vocab_size: int, tp_size: int, vocab_multiple: int = 1) -> int:
    """The vocabulary rounded up to a multiple of ``vocab_multiple · tp_size`` (Megatron's
    ``make_vocab_size_divisible_by × tensor_model_parallel_size``)."""
    for name, value in (("vocab_size", vocab_size), ("vocab_multiple", vocab_multiple)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive integer")
    unit = vocab_multiple * tp_size
    return -(-vocab_size // unit) * unit


def vocab_range(padded_vocab: int, group: AxisGroup) -> tuple[int, int]:
    """``(start, end)`` of this rank's rows of the padded vocabulary."""
    per = padded_vocab // group.size
    return group.rank * per, (group.rank + 1) * per


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise if any id is outside ``[0, vocab_size)`` (one host sync; before any collective)."""
    if ids.is_floating_point():
        raise ValueError(f"token ids must be integers, got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} out of range for vocab_size={vocab_size} "
                         f"(ids span [{lo}, {hi}])")


def vocab_shard_weight(vocab_size: int, padded_vocab: int, hidden_size: int, tp_group: AxisGroup,
                       grad_sync, shard_axis: Optional[str], name: Optional[str],
                       init_method: InitFn, dtype: Optional[torch.dtype],
                       device: Optional[torch.device]) -> nn.Parameter:
    """This rank's ``[Vp/p, H]`` rows of a ``[V, H]`` table padded to ``Vp`` rows and split over
    ``tp_group`` (embedding and untied LM head), initialised (padding rows zero) and carrying its
    ParamSpec."""
    start, end = vocab_range(padded_vocab, tp_group)
    weight = nn.Parameter(torch.empty(end - start, hidden_size, dtype=dtype, device=device))
    init_method(weight)
    parts = tp_group.size
    split = (Split(0, parts, tp_group.rank),) if parts > 1 else ()
    axis = shard_axis_name(tp_group, shard_axis) if parts > 1 else None
    padded = (padded_vocab, hidden_size) if padded_vocab != vocab_size else None
    spec = ParamSpec((vocab_size, hidden_size), split, tuple(grad_sync), axis,
                     f"{name}.weight" if name else None, padded_shape=padded)
    if padded is not None:
        with torch.no_grad():
            weight[spec.real_part(weight).shape[0]:].zero_()
    set_spec(weight, spec)
    return weight


class VocabParallelEmbedding(nn.Module):
    """Token embedding with the table split over ``tp_group`` along the vocabulary.

    ``forward(ids)`` returns the partial sum over the group (``reduce_results=False``, the default:
    the caller fuses the reduction) or the complete embedding. Weight ParamSpec: global
    ``[V, H]``, ``Split(0, p, r)``, ``grad_sync`` (default ``("attn_dp_cp",)``; add
    ``"embedding"`` for weights tied across pipeline stages), ``shard_axis`` = the group's axis.
    """

    def __init__(self, vocab_size: int, hidden_size: int, tp_group: AxisGroup, *,
                 vocab_multiple: int = 1, reduce_results: bool = False, check_ids: bool = True,
                 grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,), shard_axis: Optional[str] = None,
                 name: Optional[str] = None, init_method: InitFn = default_init,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"VocabParallelEmbedding hidden_size={hidden_size} must be >= 1")
        self.padded_vocab = padded_vocab_size(vocab_size, tp_group.size, vocab_multiple)
        self.start, self.end = vocab_range(self.padded_vocab, tp_group)
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp_group, self.reduce_results, self.check_ids = tp_group, reduce_results, check_ids
        self.weight = vocab_shard_weight(vocab_size, self.padded_vocab, hidden_size, tp_group,
                                         grad_sync, shard_axis, name, init_method, dtype, device)

    def forward(self, ids: torch.Tensor, check_ids: bool = True) -> torch.Tensor:
        """``check_ids=False``: the caller vouches for the ids (a decode step feeding back its
        own sampled tokens), so no host sync — a CUDA graph can capture the step."""
        if self.check_ids and check_ids:
            check_token_ids(ids, self.vocab_size)
        if self.tp_group.is_trivial:
            return F.embedding(ids, self.weight)
        outside = (ids < self.start) | (ids >= self.end)
        local = torch.where(outside, torch.zeros_like(ids), ids - self.start)
        out = F.embedding(local, self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return all_reduce(out, self.tp_group) if self.reduce_results else out

    def extra_repr(self) -> str:
        return (f"vocab={self.vocab_size} (padded {self.padded_vocab}, rows {self.start}:"
                f"{self.end}), hidden={self.hidden_size}, axis={self.tp_group.name}")


class VocabParallelLMHead(nn.Module):
    """LM head, column-parallel over the vocabulary: ``logits_shard = h @ W_r^T``.

    The input ``h`` is replicated over ``tp_group`` (TP_ATTN_FULL); with ``sync_input_grad`` its
    partial gradient is all-reduced over the group in backward (pass ``False`` when the caller's
    gather already sums it). ``tied_embedding`` reuses that embedding's weight (HF
    ``tie_word_embeddings``); the embedding must be split over the same group.
    """

    def __init__(self, hidden_size: int, vocab_size: int, tp_group: AxisGroup, *,
                 vocab_multiple: int = 1,
                 tied_embedding: Optional[VocabParallelEmbedding] = None,
                 sync_input_grad: bool = True, grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,),
                 shard_axis: Optional[str] = None, name: Optional[str] = None,
                 init_method: InitFn = default_init, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None):
        super().__init__()
        self.padded_vocab = padded_vocab_size(vocab_size, tp_group.size, vocab_multiple)
        self.start, self.end = vocab_range(self.padded_vocab, tp_group)
        self.real_rows = max(0, min(self.end, vocab_size) - self.start)  # the rest: padding
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.tp_group, self.sync_input_grad = tp_group, sync_input_grad
        self.tied = tied_embedding is not None
        if tied_embedding is not None:
            mine = (vocab_size, self.padded_vocab, hidden_size)
            theirs = (tied_embedding.vocab_size, tied_embedding.padded_vocab,
                      tied_embedding.hidden_size)
            if theirs != mine:
                raise ValueError(f"tied embedding is [{theirs[0]} (padded {theirs[1]}), "
                                 f"{theirs[2]}] but the LM head is [{mine[0]} (padded "
                                 f"{mine[1]}), {mine[2]}]")
            if tied_embedding.tp_group.ranks != tp_group.ranks:
                raise ValueError(f"tied embedding is split over {tied_embedding.tp_group.name} "
                                 f"{tied_embedding.tp_group.ranks} but the LM head over "
                                 f"{tp_group.name} {tp_group.ranks}")
            self._embedding = (tied_embedding,)  # a tuple: not registered twice as a submodule
            self.register_parameter("weight", None)
        else:
            self._embedding = ()
            self.weight = vocab_shard_weight(vocab_size, self.padded_vocab, hidden_size,
                                             tp_group, grad_sync, shard_axis, name, init_method,
                                             dtype, device)

    @property
    def table(self) -> torch.Tensor:
        return self._embedding[0].weight if self.tied else self.weight

    def loss(self, hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
             chunk_bytes: int = CHUNK_BYTES) -> torch.Tensor:
        """Per-token cross-entropy of this head's logits against ``labels`` (``hidden``'s leading
        shape) without keeping the logits (:mod:`megatron_ext.layers.lm_head_loss`): the training
        loss. Equals ``vocab_parallel_cross_entropy(self(hidden), labels)``."""
        if hidden.shape[-1] != self.hidden_size or hidden.shape[:-1] != labels.shape:
            raise ValueError(f"VocabParallelLMHead.loss expects hidden [..., {self.hidden_size}] "
                             f"and labels of its leading shape, got {tuple(hidden.shape)} and "
                             f"{tuple(labels.shape)}")
        check_labels(labels, self.vocab_size, ignore_index)
        if self.sync_input_grad:
            hidden = copy_to_region(hidden, self.tp_group)
        loss = lm_head_cross_entropy(hidden.reshape(-1, self.hidden_size), self.table,
                                     labels.reshape(-1), self.tp_group, start=self.start,
                                     real_rows=self.real_rows, ignore_index=ignore_index,
                                     chunk_bytes=chunk_bytes)
        return loss.view(labels.shape)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """This rank's logits ``[..., Vp/p]`` (rows ``start:end`` of the padded vocabulary;
        padding columns are ``-inf``)."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"VocabParallelLMHead expects last dim {self.hidden_size}, got "
                             f"shape {tuple(hidden.shape)}")
        if self.sync_input_grad:
            hidden = copy_to_region(hidden, self.tp_group)
        logits = F.linear(hidden, self.table)
        if self.real_rows < self.end - self.start:  # masked_fill: no gradient to padding rows
            padding = torch.arange(self.end - self.start, device=logits.device) >= self.real_rows
            logits = logits.masked_fill(padding, float("-inf"))
        return logits

    def gather_logits(self, logits_shard: torch.Tensor) -> torch.Tensor:
        """Full ``[..., V]`` logits (real vocabulary only) on every rank (inference / sampling).
        The gathered logits are consumed identically on every rank, so the backward keeps own
        columns."""
        full = all_gather(logits_shard, self.tp_group, dim=-1, backward="own_rows")
        return full[..., :self.vocab_size]

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, vocab={self.vocab_size} (padded "
                f"{self.padded_vocab}, rows {self.start}:{self.end}), axis={self.tp_group.name}, "
                f"tied={self.tied}")
