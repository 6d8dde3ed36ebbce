"""Passkey retrieval (Mohtashami & Jaggi, "Landmark Attention", 2023): a random number hidden at
depth ``d`` of ``L`` tokens of repetitive filler; the greedy continuation of "The pass key is"
must be that number exactly. Accuracy per (length, depth) cell."""
from __future__ import annotations

import numpy as np

from megatron_ext.evaluation.retrieval import GridSettings, RetrievalSample, build_prompt, run_grid

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there.\n")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"
TASK = "passkey"


class PasskeyBuilder:
    """Prompts for one tokenizer; ``digits``-digit keys (first digit non-zero)."""

    def __init__(self, tokenizer, digits: int = 5) -> None:
        if not 1 <= digits <= 18:
            raise ValueError(f"--passkey-digits={digits} must be in [1, 18]")
        self.tokenizer, self.digits = tokenizer, digits
        self.intro = tokenizer.encode(INTRO)
        self.filler = [tokenizer.encode(" " + s) for s in FILLER]
        self.question = tokenizer.encode(QUESTION)

    def needle(self, key: str) -> np.ndarray:
        return self.tokenizer.encode(NEEDLE.format(key=key))

    @property
    def fixed_tokens(self) -> int:
        """Tokens of intro, the longest needle and question: a prompt must be longer."""
        return int(self.intro.size + self.needle("9" * self.digits).size + self.question.size)

    def key(self, rng: np.random.Generator) -> str:
        return str(int(rng.integers(10 ** (self.digits - 1), 10 ** self.digits)))

    def sample(self, length: int, depth: float, rng: np.random.Generator) -> RetrievalSample:
        key = self.key(rng)
        ids, start, actual = build_prompt(self.intro, self.filler, self.needle(key),
                                          self.question, length, depth)
        return RetrievalSample(ids, key, start, actual)


def run_passkey(ctx, settings: GridSettings, builder: PasskeyBuilder) -> dict:
    return run_grid(ctx, TASK, settings, lambda length, j, rng: [
        builder.sample(length, settings.depths[j], rng)
        for _ in range(settings.samples_per_cell)])
