"""Tokenizers for pretraining data: a byte-level default that needs no files, and a local Hugging
Face tokenizer directory (never downloaded).

Both expose the same small surface (``encode``, ``decode``, ``vocab_size``, ``eos_id``,
``pad_id``, ``name``), which is all the data pipeline needs: documents are encoded and joined with
``eos_id``; ``pad_id`` only fills CP padding and never enters the loss.
"""
from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; ``<eos>`` = 256 ends a document, ``<pad>`` = 257.

    Works for any text in any language without a vocabulary file, so the default run is offline and
    a token id can never fall outside the model's vocabulary.
    """

    name = "byte"
    eos_id = 256
    pad_id = 257
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A tokenizer saved in a local directory (``tokenizer.json`` / ``tokenizer_config.json``),
    loaded with ``transformers`` (imported lazily; files only, no network)."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer {path!r} is neither 'byte' nor a local directory")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # pragma: no cover - transformers is a test/extra dependency
            raise ValueError(f"tokenizer directory {path!r} needs the transformers package") from err
        self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.name = f"hf:{os.path.abspath(path)}"
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {path!r} has no eos token; documents need a separator")
        self.eos_id = int(eos)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """``"byte"`` (default) or the path of a local HF tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
