"""Long-context evaluation: next-token loss of full sequences with the same layers, groups and CP
split as training (forward only), so a sequence longer than one rank can hold is split over
attention CP and its batch over attention DP."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import math

import torch

from megatron_ext.communication.collectives import all_reduce
from megatron_ext.data.cp_split import IGNORE_INDEX, shift_labels
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.communication.local_batch import split_batch


@dataclass(frozen=True)
class EvalResult:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.tokens

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


def evaluate_loss(model, groups: ParallelGroups, input_ids: torch.Tensor, *,
                  vocab_size: int, rows_per_dp: Optional[Sequence[int]] = None) -> EvalResult:
    """Summed next-token cross-entropy of the ``[B, S]`` batch ``input_ids`` (every rank passes
    the same batch) and the number of predicted tokens, identical on every rank. Token ids are
    checked against ``vocab_size`` before any collective."""
    if groups.topology.pp != 1:
        raise ValueError(f"evaluation runs one pipeline stage; got pp={groups.topology.pp}")
    if input_ids.dim() != 2 or input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [B, S] with S >= 2, got {tuple(input_ids.shape)}")
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if bad.any():
        raise ValueError(f"token id {int(input_ids[bad][0])} is outside the model's vocabulary "
                         f"[0, {vocab_size})")
    labels = shift_labels(input_ids)
    batch = split_batch(groups, input_ids, labels, rows_per_dp=rows_per_dp)
    with torch.no_grad():
        out = model(**batch.model_kwargs(), return_logits=False, compute_aux_loss=False)
        totals = torch.stack([out.loss.double().sum(),
                              (batch.labels != IGNORE_INDEX).sum().double()])
        # each (dp, cp) rank holds distinct tokens; attention-TP ranks hold the same loss
        totals = all_reduce(totals, groups.attn_dp_cp)
    return EvalResult(float(totals[0]), int(totals[1]))
