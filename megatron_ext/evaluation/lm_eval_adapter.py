"""lm-evaluation-harness on the parallel model: the harness's ``LM`` interface
(``loglikelihood``, ``loglikelihood_rolling``, ``generate_until``) over a
:class:`~megatron_ext.models.decoder.CausalLM` in any layout (CP prefill splits long contexts,
attention DP splits each batch's rows, TP the heads and vocabulary).

Every rank runs the harness with the same requests (the adapter reports rank 0 of a world of 1
to the harness, so the harness never shards requests itself) and each call is collective over
the model's stage. The numbers follow the harness's own HF backend (``HFLM``): the same
context/continuation split (trailing context spaces move to the continuation; the continuation is
``encode(context + continuation)`` minus ``encode(context)``), an empty context conditioned on
``prefix_token_id``, left truncation to ``max_length + 1`` tokens, the same rolling windows, and
``until`` stop strings cut after greedy generation.

:class:`ParallelLMScorer` holds all of that and needs no harness (so it is testable and usable
without it); :func:`lm_eval_model` wraps it in a subclass of the harness's ``LM``, importing
``lm_eval`` only then (an optional extra: ``pip install 'megatron_ext[eval]'``).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ext.communication.local_batch import gather_to_global, split_batch
from megatron_ext.data.cp_split import IGNORE_INDEX
from megatron_ext.parallel.groups import ParallelGroups

DEFAULT_MAX_GEN_TOKS = 256


def _args(request) -> tuple:
    """``Instance.args`` of a harness request, or a plain tuple."""
    return tuple(getattr(request, "args", request))


def rolling_windows(tokens: Sequence[int], prefix_token: int,
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """Disjoint ``(context, continuation)`` windows that predict every token once with as much
    context as ``max_length`` allows (the harness's ``get_rolling_token_windows`` with
    ``context_len=1`` followed by ``make_disjoint_window``)."""
    tokens = list(tokens)
    if not tokens:
        return []
    out = [([prefix_token], tokens[:max_length])]
    predicted = min(max_length, len(tokens))
    while predicted < len(tokens):
        n = min(len(tokens) - predicted, max_length)
        end = predicted + n
        context = tokens[max(end - max_length - 1, 0):end - 1]
        out.append((context[:len(context) - (n - 1)], tokens[end - n:end]))
        predicted = end
    return out


class ParallelLMScorer:
    """Log-likelihoods and greedy generation of text requests (see the module doc). Collective:
    every rank calls the same method with the same requests."""

    def __init__(self, model, groups: ParallelGroups, tokenizer, *,
                 max_length: Optional[int] = None, batch_size: int = 1,
                 prefix_token_id: Optional[int] = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS) -> None:
        self.model, self.groups, self.tokenizer = model, groups, tokenizer
        self.max_length = max_length or model.config.position_limit
        if not 1 <= self.max_length <= model.config.position_limit:
            raise ValueError(f"max_length={self.max_length} must be in [1, the model's "
                             f"{model.config.position_limit_text()}]")
        self.batch_size = max(batch_size, 1)
        self.prefix_token_id = tokenizer.eos_id if prefix_token_id is None else prefix_token_id
        self.max_gen_toks = max_gen_toks
        self.device = next(model.parameters()).device

    # ------------------------------------------------------------------ tokens
    def encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self.encode(context + continuation)
        context_ids = self.encode(context)
        return context_ids, whole[len(context_ids):]

    def _token_scores(self, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logprob, greedy)`` ``[B, S-1]`` of right-padded ``rows`` (position ``i`` predicts
        token ``i+1``), identical on every rank. Short batches get copies of their first row so
        every attention-DP rank has one."""
        real = len(rows)
        rows = rows + [rows[0]] * max(self.groups.topology.attn_dp - real, 0)
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.tokenizer.pad_id if hasattr(
            self.tokenizer, "pad_id") else 0, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.as_tensor(r)
            labels[i, :len(r) - 1] = torch.as_tensor(r[1:])
        batch = split_batch(self.groups, ids.to(self.device), labels.to(self.device))
        with torch.no_grad():
            out = self.model(**batch.model_kwargs(), gather_logits=True, compute_aux_loss=False)
            greedy = out.logits.argmax(-1) == batch.labels
            local = torch.stack([-out.loss.double(), greedy.double()], dim=-1)
            every = gather_to_global(local, batch, self.groups)
        return every[:real, :width - 1, 0].cpu(), every[:real, :width - 1, 1].cpu().bool()

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]
                             ) -> list[tuple[float, bool]]:
        """``(sum of log p(continuation | context), continuation is the greedy one)`` per
        ``(context_ids, continuation_ids)``; ``context + continuation`` keeps its last
        ``max_length + 1`` tokens."""
        out: list[tuple[float, bool]] = []
        for first in range(0, len(pairs), self.batch_size):
            rows, spans = [], []
            for context, continuation in pairs[first:first + self.batch_size]:
                if not continuation:
                    raise ValueError("a loglikelihood request needs a non-empty continuation")
                context = list(context) or [self.prefix_token_id]
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                n = min(len(continuation), len(whole) - 1)
                rows.append(whole)
                spans.append((len(whole) - 1 - n, len(whole) - 1))
            logprob, greedy = self._token_scores(rows)
            for i, (a, b) in enumerate(spans):
                out.append((float(logprob[i, a:b].sum()), bool(greedy[i, a:b].all())))
        return out

    # ------------------------------------------------------------------ the LM interface
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for request in requests:
            context, continuation = _args(request)[:2]
            if context == "":
                pairs.append(([self.prefix_token_id], self.encode(continuation)))
            else:
                pairs.append(self.encode_pair(context, continuation))
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        windows, owner = [], []
        for i, request in enumerate(requests):
            for w in rolling_windows(self.encode(_args(request)[0]), self.prefix_token_id,
                                     self.max_length):
                windows.append(w)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self.loglikelihood_tokens(windows)):
            totals[i] += logprob
        return totals

    def generate_until(self, requests) -> list[str]:
        """Greedy continuations, cut before the first ``until`` string (and EOS), at most
        ``max_gen_toks`` tokens; sampling settings other than greedy are refused."""
        from megatron_ext.serving import generate

        jobs = []
        for request in requests:
            context, kwargs = _args(request)[:2]
            kwargs = dict(kwargs or {})
            if kwargs.pop("do_sample", False) or float(kwargs.pop("temperature", 0.0) or 0.0) > 0:
                raise ValueError("generate_until: only greedy generation is supported "
                                 "(do_sample=False, temperature=0)")
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            room = self.max_length - max_new
            if room < 1:
                raise ValueError(f"generate_until: max_gen_toks={max_new} leaves no room for "
                                 f"context within max_length={self.max_length}")
            ids = self.encode(context)[-room:] or [self.prefix_token_id]
            jobs.append((ids, until, max_new))
        out: list[Optional[str]] = [None] * len(jobs)
        order = sorted(range(len(jobs)), key=lambda i: jobs[i][2])
        for first in range(0, len(order), self.batch_size):
            part = order[first:first + self.batch_size]
            part += [part[0]] * max(self.groups.topology.attn_dp - len(part), 0)
            max_new = max(jobs[i][2] for i in part)
            width = max(len(jobs[i][0]) for i in part)
            prompts = torch.full((len(part), width), self.prefix_token_id, dtype=torch.long)
            mask = torch.zeros_like(prompts)
            for row, i in enumerate(part):
                ids = jobs[i][0]
                prompts[row, width - len(ids):] = torch.as_tensor(ids)
                mask[row, width - len(ids):] = 1
            tokens = generate(self.model, self.groups, prompts.to(self.device), max_new,
                              eos_token_id=self.tokenizer.eos_id,
                              attention_mask=mask.to(self.device))
            for row, i in enumerate(part):
                new = tokens[row, width:width + jobs[i][2]].tolist()
                if self.tokenizer.eos_id in new:
                    new = new[:new.index(self.tokenizer.eos_id)]
                text = self.tokenizer.decode(new)
                for stop in jobs[i][1]:
                    if stop and stop in text:
                        text = text[:text.index(stop)]
                out[i] = text
        return out  # type: ignore[return-value]


def lm_eval_model(scorer: ParallelLMScorer):
    """``scorer`` as an ``lm_eval.api.model.LM`` (imports the harness; ``ValueError`` naming the
    extra to install when it is absent)."""
    try:
        from lm_eval.api.model import LM
    except ImportError as err:
        raise ValueError("--task lm_eval needs lm-evaluation-harness: pip install "
                         "'megatron_ext[eval]' (or pip install lm_eval)") from err

    class ParallelLM(LM):
        """The harness's ``LM`` over :class:`ParallelLMScorer` (rank 0 of 1 to the harness:
        every rank runs every request, collectively)."""

        def __init__(self) -> None:
            super().__init__()
            self.scorer = scorer

        @property
        def max_length(self) -> int:
            return scorer.max_length

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            return scorer.loglikelihood(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            return scorer.loglikelihood_rolling(requests)

        def generate_until(self, requests, disable_tqdm: bool = False):
            return scorer.generate_until(requests)

    return ParallelLM()
