"""A small offline serving API: ``Engine(model, groups).generate(prompts, SamplingParams)``.

Prompts are token-id lists of any lengths (left-padded into one batch); the result is one
:class:`Completion` per prompt with the generated ids (up to and including the EOS) and why it
stopped. Everything else — CP prefill, one owner per decode token, sampling, CUDA graphs,
finished requests leaving the batch — is :func:`megatron_ext.serving.generate.generate_batch`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.serving.decode_step import resolve_decode_rows
from megatron_ext.serving.generate import GenerationOutput, generate_batch
from megatron_ext.serving.sampling import SamplingParams


@dataclass(frozen=True)
class Completion:
    """One request's result: ``token_ids`` generated (the EOS included), ``finish_reason``
    ``"eos"`` or ``"length"``."""

    token_ids: list[int]
    finish_reason: str


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, attention_mask)`` ``[B, longest]`` of token lists, left-padded with ``pad_id``
    (``ValueError`` naming an empty prompt)."""
    if not prompts:
        raise ValueError("no prompts: pass at least one token-id list")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: every request needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class Engine:
    """Offline batched generation on ``model`` (a ``CausalLM`` built on ``groups``, pp = 1).
    Every rank of the stage calls :meth:`generate` with the same prompts and gets the same
    completions. ``check_every``: decode steps between host checks (finished requests leave
    the batch there); ``decode_rows``: one owner per decode token or rows replicated over CP
    (:func:`~megatron_ext.serving.decode_step.resolve_decode_rows`)."""

    def __init__(self, model, groups: ParallelGroups, *, eos_token_id: Optional[int] = None,
                 pad_token_id: Optional[int] = None, check_every: int = 8,
                 use_cuda_graphs: Optional[bool] = None, decode_rows: str = "auto"):
        resolve_decode_rows(decode_rows, groups.topology)   # a bad choice fails here
        self.model, self.groups = model, groups
        self.eos_token_id, self.pad_token_id = eos_token_id, pad_token_id
        self.check_every, self.use_cuda_graphs = check_every, use_cuda_graphs
        self.decode_rows = decode_rows
        self.last_output: Optional[GenerationOutput] = None

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: Union[SamplingParams, Sequence[SamplingParams]] = SamplingParams(),
                 *, on_check: Optional[Callable[[int, int], None]] = None) -> list[Completion]:
        pad = self.pad_token_id if self.pad_token_id is not None else (
            self.eos_token_id if self.eos_token_id is not None else 0)
        ids, mask = left_pad(prompts, pad)
        out = generate_batch(self.model, self.groups, ids, sampling, self.eos_token_id,
                             attention_mask=mask, pad_token_id=pad,
                             check_every=self.check_every, use_cuda_graphs=self.use_cuda_graphs,
                             on_check=on_check, decode_rows=self.decode_rows)
        self.last_output = out
        S = ids.shape[1]
        done = []
        for r, n in enumerate(out.new_tokens):
            row = out.tokens[r, S:S + n].tolist()
            eos = self.eos_token_id is not None and bool(row) and row[-1] == self.eos_token_id
            done.append(Completion(row, "eos" if eos else "length"))
        return done
