"""Needle in a haystack over real text (RULER's single-needle form, Hsieh et al. 2024): a sentence
"One of the special magic numbers for <word> is: <number>." hidden at depth ``d`` of ``L`` tokens
of a haystack text (``--haystack``, default: the embedded corpus), then a question naming the
word; the greedy answer must be the number exactly. Accuracy per (length, depth) cell."""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from megatron_ext.evaluation.retrieval import GridSettings, RetrievalSample, build_prompt, run_grid

INTRO = ("Some special magic numbers are hidden within the following text. Make sure to "
         "memorize them. I will quiz you about the numbers afterwards.\n")
NEEDLE = " One of the special magic numbers for {word} is: {number}."
QUESTION = ("\nWhat is the special magic number for {word} mentioned in the provided text? The "
            "special magic number for {word} mentioned in the provided text is")
WORDS = ("amber-falcon", "quiet-harbor", "silver-meadow", "rapid-lantern", "hollow-cedar",
         "bright-compass", "distant-orchard", "crimson-anchor", "gentle-summit", "frozen-river",
         "golden-thistle", "swift-marble")
NUMBER_DIGITS = 7
TASK = "needle"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def read_haystack(path: Optional[str]) -> str:
    """The text of ``path``, or the embedded corpus; ``ValueError`` naming the file."""
    if path is None:
        from megatron_ext.data.dataset import corpus_files

        paths = corpus_files()
    else:
        paths = [path]
    texts = []
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                texts.append(f.read())
        except (OSError, UnicodeDecodeError) as err:
            raise ValueError(f"--haystack {p!r} cannot be read as UTF-8 text: {err}") from err
    text = "\n".join(texts)
    if len(text.split()) < 10:
        raise ValueError(f"--haystack {path!r} holds fewer than 10 words")
    return text


class NeedleBuilder:
    """Prompts for one tokenizer over one haystack (sentences tokenized one by one)."""

    def __init__(self, tokenizer, haystack: str) -> None:
        self.tokenizer = tokenizer
        self.intro = tokenizer.encode(INTRO)
        sentences = [" ".join(s.split()) for s in _SENTENCE_END.split(haystack)]
        self.sentences = [tokenizer.encode(" " + s) for s in sentences if s]

    def _parts(self, word: str, number: str) -> tuple[np.ndarray, np.ndarray]:
        return (self.tokenizer.encode(NEEDLE.format(word=word, number=number)),
                self.tokenizer.encode(QUESTION.format(word=word)))

    @property
    def fixed_tokens(self) -> int:
        longest = max(WORDS, key=lambda w: sum(p.size for p in self._parts(w, "9" * NUMBER_DIGITS)))
        return int(self.intro.size + sum(p.size for p in self._parts(longest, "9" * NUMBER_DIGITS)))

    def sample(self, length: int, depth: float, rng: np.random.Generator) -> RetrievalSample:
        word = WORDS[int(rng.integers(len(WORDS)))]
        number = str(int(rng.integers(10 ** (NUMBER_DIGITS - 1), 10 ** NUMBER_DIGITS)))
        needle, question = self._parts(word, number)
        # a different stretch of the haystack for every prompt
        first = int(rng.integers(len(self.sentences)))
        sentences = self.sentences[first:] + self.sentences[:first]
        ids, start, actual = build_prompt(self.intro, sentences, needle, question, length, depth)
        return RetrievalSample(ids, number, start, actual)


def run_needle(ctx, settings: GridSettings, builder: NeedleBuilder) -> dict:
    return run_grid(ctx, TASK, settings, lambda length, j, rng: [
        builder.sample(length, settings.depths[j], rng)
        for _ in range(settings.samples_per_cell)])
