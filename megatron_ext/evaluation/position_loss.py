"""Next-token loss resolved by position: the curve that shows whether later tokens gain from the
context before them (it falls with position for a model that uses its context, and flattens or
rises past the length a model was trained for).

A token predicted with ``t`` tokens of context (``t = 1 … S-1`` in a window of ``S`` tokens)
falls in the log-spaced bucket ``[edges[i], edges[i+1])``. Each rank bins the per-token losses of
the tokens it holds (CP chunk, DP rows) by their RoPE position, and one all-reduce of
``2 × buckets`` numbers over ``attn_dp_cp`` sums the bins, so the full per-token loss never
travels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence


import torch

from megatron_ext.communication.collectives import all_reduce
from megatron_ext.communication.local_batch import split_batch
from megatron_ext.data.cp_split import IGNORE_INDEX, shift_labels
from megatron_ext.parallel.groups import ParallelGroups


def position_buckets(seq_len: int, num_buckets: int) -> tuple[int, ...]:
    """Bucket edges over context lengths ``1 … seq_len-1``: about ``num_buckets`` log-spaced
    buckets (fewer when small lengths would repeat an edge), first edge 1, last ``seq_len``."""
    if seq_len < 2 or num_buckets < 1:
        raise ValueError(f"position buckets need seq_len >= 2 (got {seq_len}) and num_buckets "
                         f">= 1 (got {num_buckets})")
    edges = {1, seq_len} | {int(round(seq_len ** (i / num_buckets))) for i in range(1, num_buckets)}
    return tuple(sorted(e for e in edges if 1 <= e <= seq_len))


@dataclass(frozen=True)
class PositionLoss:
    """Summed loss and token count per bucket ``[edges[i], edges[i+1])`` of context length."""

    edges: tuple[int, ...]
    loss_sum: tuple[float, ...]
    tokens: tuple[int, ...]

    @classmethod
    def empty(cls, edges: Sequence[int]) -> "PositionLoss":
        n = len(edges) - 1
        return cls(tuple(edges), (0.0,) * n, (0,) * n)

    def __add__(self, other: "PositionLoss") -> "PositionLoss":
        if self.edges != other.edges:
            raise ValueError(f"cannot add position losses over different buckets {self.edges} "
                             f"and {other.edges}")
        return PositionLoss(self.edges, tuple(a + b for a, b in zip(self.loss_sum, other.loss_sum)),
                            tuple(a + b for a, b in zip(self.tokens, other.tokens)))

    @property
    def mean(self) -> tuple[Optional[float], ...]:
        return tuple(s / n if n else None for s, n in zip(self.loss_sum, self.tokens))

    @property
    def loss(self) -> float:
        return sum(self.loss_sum) / max(sum(self.tokens), 1)

    def to_dict(self) -> dict:
        return {"edges": list(self.edges), "loss_sum": list(self.loss_sum),
                "tokens": list(self.tokens), "mean_loss": list(self.mean), "loss": self.loss}

    @classmethod
    def from_dict(cls, d: dict) -> "PositionLoss":
        return cls(tuple(d["edges"]), tuple(float(x) for x in d["loss_sum"]),
                   tuple(int(x) for x in d["tokens"]))


def evaluate_position_loss(model, groups: ParallelGroups, input_ids: torch.Tensor,
                           edges: Sequence[int], *, vocab_size: int,
                           rows_per_dp: Optional[Sequence[int]] = None) -> PositionLoss:
    """Per-bucket loss of the ``[B, S]`` windows ``input_ids`` (the same batch on every rank),
    identical on every rank. Collective over the stage."""
    if groups.topology.pp != 1:
        raise ValueError(f"evaluation runs one pipeline stage; got pp={groups.topology.pp}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, S] with S >= 2, got {tuple(input_ids.shape)}")
    if edges[0] != 1 or edges[-1] != input_ids.shape[1]:
        raise ValueError(f"bucket edges {tuple(edges)} must run from 1 to the window length "
                         f"{input_ids.shape[1]}")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(input_ids[bad][0])} is outside the model's vocabulary "
                         f"[0, {vocab_size})")
    batch = split_batch(groups, input_ids, shift_labels(input_ids), rows_per_dp=rows_per_dp)
    with torch.no_grad():
        out = model(**batch.model_kwargs(), return_logits=False, compute_aux_loss=False)
        valid = (batch.labels != IGNORE_INDEX).reshape(-1)
        context = (batch.position_ids.reshape(-1) + 1)[valid]   # tokens seen before the target
        bounds = torch.as_tensor(edges, device=context.device)
        bucket = torch.searchsorted(bounds, context, right=True) - 1
        n = len(edges) - 1
        sums = torch.zeros(2, n, dtype=torch.float64, device=context.device)
        sums[0].index_add_(0, bucket, out.loss.reshape(-1)[valid].double())
        sums[1].index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
        sums = all_reduce(sums, groups.attn_dp_cp)   # attention-TP ranks hold the same loss
    return PositionLoss(tuple(edges), tuple(float(x) for x in sums[0]),
                        tuple(int(round(float(x))) for x in sums[1]))


TASK = "position_loss"


def run_position_loss(ctx, settings, dataset, num_buckets: int) -> dict:
    """Every batch of windows (:class:`~megatron_ext.evaluation.windows.WindowSettings`) not
    already in the results file; returns (and writes) the summed curve."""
    from megatron_ext.evaluation.windows import batch_key, window_batch

    edges = position_buckets(settings.seq_len, num_buckets)
    cells = ctx.store.cells(TASK)
    device = next(ctx.model.parameters()).device
    todo = [r for r in settings.batches(ctx.groups.topology.attn_dp) if batch_key(r) not in cells]
    progress = ctx.progress(TASK, len(todo), sum(len(r) for r in todo) * settings.seq_len)
    for rows in todo:
        part = evaluate_position_loss(ctx.model, ctx.groups,
                                      window_batch(dataset, rows, settings.seq_len, device),
                                      edges, vocab_size=ctx.model.config.vocab_size)
        ctx.store.put_cell(TASK, batch_key(rows), part.to_dict())
        progress.advance(len(rows) * settings.seq_len)
    total = PositionLoss.empty(edges)
    for cell in cells.values():
        total = total + PositionLoss.from_dict(cell)
    summary = dict(total.to_dict(), tokens_per_second=progress.tokens_per_second)
    ctx.store.put_summary(TASK, summary)
    return summary
