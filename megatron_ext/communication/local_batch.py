"""From a full (single-process) batch to this rank's model inputs, and back (tests, eval).

A ``[B, S]`` batch is split over attention DP by rows (contiguous; by default as even as
possible, the first ranks one row more — or any per-rank row counts, for uneven batches), then
each DP rank's rows over attention CP with the load-balanced split of
:mod:`megatron_ext.data.cp_split` (padding to a multiple of ``2·cp``; every rank pads to the
same length, so only the row counts can differ). The :class:`~megatron_ext.communication.token_layout.TokenLayout`
follows from that without any exchange. :func:`gather_to_global` undoes both splits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from megatron_ext.communication.collectives import all_gather
from megatron_ext.data.cp_split import (CPLayout, DocLengths, unsplit_from_cp,
                                            required_padded_length, split_batch_for_cp)
from megatron_ext.communication.raw import gather_into
from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.communication.token_layout import TokenLayout, split_rows


@dataclass(frozen=True)
class LocalBatch:
    """This rank's ``[b_local, s_local]`` inputs for :meth:`megatron_ext.models.decoder.CausalLM.forward`."""

    input_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    position_ids: torch.Tensor
    token_index: torch.Tensor
    segment_ids: torch.Tensor
    layout: TokenLayout
    rows_per_dp: tuple[int, ...]
    row_start: int
    cp_layouts: tuple[CPLayout, ...]

    def model_kwargs(self) -> dict:
        return dict(input_ids=self.input_ids, labels=self.labels, position_ids=self.position_ids,
                    token_index=self.token_index, segment_ids=self.segment_ids,
                    layout=self.layout)


def split_batch(groups: ParallelGroups, input_ids: torch.Tensor,
                labels: Optional[torch.Tensor] = None, *,
                rows_per_dp: Optional[Sequence[int]] = None, doc_lengths: DocLengths = None,
                pad_token_id: int = 0) -> LocalBatch:
    """This rank's share of the full batch ``input_ids`` ``[B, S]`` (``labels``: per-position
    targets, already shifted, -100 = ignore). ``doc_lengths``: packed documents (one list for
    every row, or one per row). Every rank must pass the same full batch."""
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [B, S], got {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    topo, coords = groups.topology, groups.coords
    rows = tuple(split_rows(B, topo.attn_dp) if rows_per_dp is None else rows_per_dp)
    if len(rows) != topo.attn_dp or sum(rows) != B or min(rows) < 1:
        raise ValueError(f"rows_per_dp={list(rows)} must give each of the attn_dp={topo.attn_dp} "
                         f"ranks at least one of the B={B} rows, summing to B")
    per_row_docs = _per_row(doc_lengths, B)
    padded = max(required_padded_length(S, topo.attn_cp, d) for d in per_row_docs)
    start = sum(rows[:coords.attn_dp])
    mine = slice(start, start + rows[coords.attn_dp])
    docs = None if doc_lengths is None else per_row_docs[mine]
    cp = split_batch_for_cp(input_ids[mine], None if labels is None else labels[mine],
                            topo.attn_cp, coords.attn_cp, doc_lengths=docs, padded_len=padded,
                            pad_token_id=pad_token_id)
    s_local = padded // topo.attn_cp
    counts = [rows[d] * s_local for d in range(topo.attn_dp) for _ in range(topo.attn_cp)]
    return LocalBatch(cp.input_ids, cp.labels, cp.position_ids, cp.token_index, cp.segment_ids,
                      TokenLayout.from_counts(groups, counts), rows, start, cp.layouts)


def _per_row(doc_lengths: DocLengths, batch: int) -> list:
    if doc_lengths is None:
        return [None] * batch
    if len(doc_lengths) and not isinstance(doc_lengths[0], int):
        if len(doc_lengths) != batch:
            raise ValueError(f"doc_lengths has {len(doc_lengths)} rows for a batch of {batch}")
        return [list(d) for d in doc_lengths]
    return [list(doc_lengths)] * batch


def gather_to_global(local: torch.Tensor, batch: LocalBatch,
                     groups: ParallelGroups) -> torch.Tensor:
    """``[b_local, s_local, ...]`` on every rank -> the full ``[B, S, ...]`` in the original order
    (padding dropped), on every rank. Collective over attn_cp and attn_dp; no gradient."""
    with torch.no_grad():
        rows = gather_from_cp(local.contiguous(), groups.attn_cp, batch.cp_layouts)
        return all_gather(rows.contiguous(), groups.attn_dp, dim=0, sizes=batch.rows_per_dp,
                          backward="own_rows")


def gather_from_cp(local: torch.Tensor, cp_group, layouts: Sequence[CPLayout]) -> torch.Tensor:
    """All-gather ``local [b, local_len, ...]`` over the CP group (no autograd; evaluation and
    inspection) and return it in global order ``[b, s, ...]``."""
    if cp_group.is_trivial:
        return unsplit_from_cp(local, layouts)
    x = local.movedim(1, 0).contiguous()
    out = x.new_empty((cp_group.size,) + tuple(x.shape))
    record("all_gather", cp_group.name, out.numel() * out.element_size())
    gather_into(out, x, cp_group)
    return unsplit_from_cp(out.flatten(0, 1).movedim(0, 1), layouts)
