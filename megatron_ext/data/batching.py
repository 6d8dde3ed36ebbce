"""Split one global batch over attention data parallel ranks, micro-batches and context parallel
ranks, consistently with the layers.

A global batch of ``G`` samples is cut into ``G / micro_batch_size`` global micro-batches; attention
DP rank ``d`` runs micro-batches ``i·D + d`` for ``i = 0 .. n-1`` (``D = attn_dp``, ``n`` per
rank), so the ``D`` micro-batches a stage runs together at local step ``i`` are the consecutive
samples ``i·D·mbs .. (i+1)·D·mbs-1`` — what a one-rank run with micro-batch ``D·mbs`` sees in its
micro-batch ``i`` (the MoE load-balancing loss is computed over exactly those tokens). Inside each,
CP rank ``c`` takes its load-balanced chunks (``parallel/cp_split.py``: chunks ``c`` and ``2cp-1-c``, positions
travel with the tokens, lengths that don't divide are padded and masked). Every rank of an
attention group (the ``attn_tp`` ranks) gets identical tensors.

The loss of a step is ``sum over every rank's real label tokens / global token count``; the global
count is computed from the global batch on every rank (each rank reads the whole global batch,
which is tiny next to the model), so no collective is needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_ext.data.cp_split import IGNORE_INDEX, CPBatch, split_batch_for_cp
from megatron_ext.parallel.topology import RankCoords, Topology


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of one rank: CP-local ``[b, local_len]`` tensors."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    token_index: torch.Tensor
    segment_ids: torch.Tensor
    cp: CPBatch

    @property
    def num_label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def to(self, device: torch.device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.labels.to(device),
                          self.position_ids.to(device), self.token_index.to(device),
                          self.segment_ids.to(device), self.cp)


@dataclass(frozen=True)
class StepBatch:
    micro_batches: list[MicroBatch]
    global_label_tokens: int   # real label tokens of the whole global batch (the loss divisor)
    global_micro_batches: int  # micro-batches of the whole global batch (aux-loss averaging)


def inputs_and_labels(samples: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, L+1]`` token ids → ``input_ids [B, L]`` and next-token ``labels [B, L]``."""
    tokens = torch.as_tensor(np.asarray(samples, dtype=np.int64))
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def split_global_batch(samples: np.ndarray, topology: Topology, coords: RankCoords,
                       micro_batch_size: int, pad_token_id: int) -> StepBatch:
    """This rank's micro-batches of the global batch ``samples`` ``[G, L+1]``."""
    g = samples.shape[0]
    per_rank = micro_batch_size * topology.attn_dp
    if g % per_rank:
        raise ValueError(f"global batch of {g} samples does not split into attn_dp="
                         f"{topology.attn_dp} ranks x micro_batch_size={micro_batch_size}")
    input_ids, labels = inputs_and_labels(samples)
    global_tokens = int((labels != IGNORE_INDEX).sum())
    micro_batches = []
    for m in range(coords.attn_dp, g // micro_batch_size, topology.attn_dp):
        rows = slice(m * micro_batch_size, (m + 1) * micro_batch_size)
        cp = split_batch_for_cp(input_ids[rows], labels[rows], topology.attn_cp, coords.attn_cp,
                                pad_token_id=pad_token_id)
        micro_batches.append(MicroBatch(cp.input_ids, cp.labels, cp.position_ids,
                                        cp.token_index, cp.segment_ids, cp))
    return StepBatch(micro_batches, global_tokens, g // micro_batch_size)
