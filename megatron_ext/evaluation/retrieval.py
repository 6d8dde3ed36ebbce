"""What passkey and needle retrieval share: a prompt of exactly ``L`` tokens with a needle at depth
``d`` of the filler, greedy answers with CP prefill + CP decode, and exact-match scoring.

Prompt = ``intro + filler[:i] + needle + filler[i:] + question``. The filler is whole sentences
(each tokenized on its own, so a sentence boundary is a token boundary), cycled and cut to fill
the length exactly; the needle goes to the sentence boundary closest to ``d ×`` the filler
length, so ``d = 0`` puts it right after the intro and ``d = 1`` right before the question.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from megatron_ext.parallel.groups import ParallelGroups

DEFAULT_ANSWER_TOKENS = 16


@dataclass(frozen=True)
class RetrievalSample:
    """One prompt: ``prompt_ids`` (exactly ``length`` tokens), the expected ``answer`` text and
    where the needle starts (token index) and at which fraction of the filler it sits."""

    prompt_ids: np.ndarray
    answer: str
    needle_start: int
    depth: float

    @property
    def length(self) -> int:
        return int(self.prompt_ids.size)


def build_prompt(intro: np.ndarray, sentences: Sequence[np.ndarray], needle: np.ndarray,
                 question: np.ndarray, length: int, depth: float) -> tuple[np.ndarray, int, float]:
    """``(ids, needle_start, actual_depth)`` of a prompt of exactly ``length`` tokens (see the
    module doc); ``ValueError`` when the fixed parts leave no room for filler."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    if not sentences or any(s.size == 0 for s in sentences):
        raise ValueError("the filler needs at least one non-empty sentence")
    room = length - intro.size - needle.size - question.size
    if room < 1:
        raise ValueError(f"length {length} leaves no room for filler: intro, needle and question "
                         f"take {intro.size + needle.size + question.size} tokens")
    pieces, boundaries, filled, k = [], [0], 0, 0
    while filled < room:
        sentence = sentences[k % len(sentences)][:room - filled]
        pieces.append(sentence)
        filled += sentence.size
        boundaries.append(filled)
        k += 1
    filler = np.concatenate(pieces)
    cut = min(boundaries, key=lambda b: (abs(b - depth * room), b))
    ids = np.concatenate([intro, filler[:cut], needle, filler[cut:], question]).astype(np.int64)
    return ids, int(intro.size + cut), cut / room


def normalize(text: str) -> str:
    return " ".join(text.split())


def is_exact_match(generated: str, answer: str) -> bool:
    """The answer, exactly, at the start of the generated text (whitespace collapsed), not run on
    into more letters or digits: ``" 12345."`` matches ``12345``, ``"123456"`` does not."""
    g, a = normalize(generated), normalize(answer)
    return bool(a) and g.startswith(a) and (len(g) == len(a) or not g[len(a)].isalnum())


def answer_samples(model, groups: ParallelGroups, tokenizer, samples: Sequence[RetrievalSample],
                   max_new_tokens: int, batch_size: int) -> list[dict]:
    """Greedy answers of ``samples`` (all the same length: no padding), ``batch_size`` prompts per
    generation call, identical on every rank. Collective over the stage."""
    from megatron_ext.serving import generate

    device = next(model.parameters()).device
    out = []
    for part in generation_batches(samples, batch_size, groups.topology.attn_dp):
        ids = torch.as_tensor(np.stack([s.prompt_ids for s in part]), device=device)
        tokens = generate(model, groups, ids, max_new_tokens, eos_token_id=tokenizer.eos_id)
        for s, row in zip(part, tokens[:, ids.shape[1]:].tolist()):
            if tokenizer.eos_id in row:
                row = row[:row.index(tokenizer.eos_id)]
            text = tokenizer.decode(row)
            out.append({"answer": s.answer, "generated": text, "generated_ids": row,
                        "correct": is_exact_match(text, s.answer), "needle_start": s.needle_start,
                        "actual_depth": s.depth})
    return out


def generation_batches(items: Sequence, batch_size: int, attn_dp: int) -> list[Sequence]:
    """``items`` in consecutive batches of at most ``batch_size`` (more when ``batch_size <
    attn_dp``), as even as possible, each with at least ``attn_dp`` items (every attention-DP
    group gets a row); ``ValueError`` when there are fewer than ``attn_dp`` items."""
    if len(items) < attn_dp:
        raise ValueError(f"{len(items)} prompts per cell for attn_dp={attn_dp}: every "
                         f"attention-DP group needs one")
    count = max(1, min(-(-len(items) // max(batch_size, 1)), len(items) // attn_dp))
    base, extra = divmod(len(items), count)
    sizes = [base + (i < extra) for i in range(count)]
    starts = [sum(sizes[:i]) for i in range(count)]
    return [items[a:a + n] for a, n in zip(starts, sizes)]


def cell_key(length: int, depth: float) -> str:
    return f"L={length},d={depth:g}"


def cell_rng(seed: int, length: int, depth_index: int) -> np.random.Generator:
    """The same samples for a cell in every run and on every rank, whatever ran before."""
    return np.random.default_rng([seed, length, depth_index])


@dataclass(frozen=True)
class GridSettings:
    """A length × depth retrieval grid: ``samples_per_cell`` prompts per cell, answers of at most
    ``answer_tokens`` generated tokens, prompts drawn from ``seed``."""

    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples_per_cell: int = 4
    answer_tokens: int = DEFAULT_ANSWER_TOKENS
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 2:
            raise ValueError(f"--lengths={list(self.lengths)} must be a non-empty list of "
                             f"lengths >= 2")
        if not self.depths or any(not 0.0 <= d <= 1.0 for d in self.depths):
            raise ValueError(f"--depths={list(self.depths)} must be a non-empty list of "
                             f"fractions in [0, 1]")
        if self.samples_per_cell < 1 or self.answer_tokens < 1:
            raise ValueError(f"--samples-per-cell={self.samples_per_cell} and --answer-tokens="
                             f"{self.answer_tokens} must be >= 1")

    def check_fits(self, max_positions: int, fixed_tokens: int, attn_dp: int,
                   limit_text: Optional[str] = None) -> None:
        """Lengths the model can hold with the answer, with room for filler; enough prompts
        per cell for attention DP. Pure: runs before process groups exist. ``limit_text`` says
        where ``max_positions`` comes from (default: max_position_embeddings)."""
        longest = max(self.lengths) + self.answer_tokens
        if longest > max_positions:
            limit_text = limit_text or f"max_position_embeddings={max_positions}"
            raise ValueError(f"--lengths up to {max(self.lengths)} + --answer-tokens="
                             f"{self.answer_tokens} need {longest} positions, beyond the model's "
                             f"{limit_text} (pass --max-positions-scale F to scale RoPE for "
                             f"them)")
        if min(self.lengths) <= fixed_tokens:
            raise ValueError(f"--lengths={min(self.lengths)} leaves no room for filler: the "
                             f"intro, needle and question take up to {fixed_tokens} tokens")
        if self.samples_per_cell < attn_dp:
            raise ValueError(f"--samples-per-cell={self.samples_per_cell} gives some of the "
                             f"attn_dp={attn_dp} ranks no prompt")

    def to_dict(self) -> dict:
        return {"lengths": list(self.lengths), "depths": list(self.depths),
                "samples_per_cell": self.samples_per_cell, "answer_tokens": self.answer_tokens,
                "seed": self.seed}


def grid_summary(settings: GridSettings, cells: dict) -> dict:
    """Accuracy per cell (``accuracy[i][j]`` for length ``i``, depth ``j``; ``None`` if not run),
    per length and overall."""
    matrix, per_length, right, total = [], [], 0, 0
    for length in settings.lengths:
        row, lr, lt = [], 0, 0
        for depth in settings.depths:
            cell = cells.get(cell_key(length, depth))
            row.append(None if cell is None else cell["accuracy"])
            if cell is not None:
                lr += cell["correct"]
                lt += cell["samples"]
        matrix.append(row)
        per_length.append(lr / lt if lt else None)
        right, total = right + lr, total + lt
    return {"lengths": list(settings.lengths), "depths": list(settings.depths),
            "accuracy": matrix, "accuracy_per_length": per_length,
            "accuracy_overall": right / total if total else None, "samples": total}


def run_grid(ctx, task: str, settings: GridSettings, make_samples) -> dict:
    """Every cell of the grid not already in the results file: ``make_samples(length,
    depth_index, rng)`` builds the cell's prompts; answers are scored and the cell is written.
    Returns the summary (also written)."""
    cells = ctx.store.cells(task)
    todo = [(L, j, d) for L in settings.lengths for j, d in enumerate(settings.depths)
            if cell_key(L, d) not in cells]
    progress = ctx.progress(task, len(todo), sum(L * settings.samples_per_cell for L, _, _ in todo))
    for length, j, depth in todo:
        samples = make_samples(length, j, cell_rng(settings.seed, length, j))
        start = time.perf_counter()
        answers = answer_samples(ctx.model, ctx.groups, ctx.tokenizer, samples,
                                 settings.answer_tokens, ctx.batch_size)
        right = sum(a["correct"] for a in answers)
        ctx.store.put_cell(task, cell_key(length, depth), {
            "length": length, "depth": depth, "samples": len(answers), "correct": right,
            "accuracy": right / len(answers), "seconds": time.perf_counter() - start,
            "answers": answers})
        progress.advance(length * len(samples))
    summary = grid_summary(settings, cells)
    ctx.store.put_summary(task, summary)
    return summary
