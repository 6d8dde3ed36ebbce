"""Tokenizers for pretraining data: a byte-level default that needs no files, and a local Hugging
Face tokenizer directory (never downloaded).

Both expose the same small surface (``encode``, ``decode``, ``vocab_size``, ``eos_id``,
``pad_id``, ``bos_id``, ``name``), which is all the data pipeline needs: documents are encoded and joined with
``eos_id``; ``pad_id`` only fills CP padding and never enters the loss.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Optional, Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: Optional[int]

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
    bos_id = None
    vocab_size = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")


# Files ``transformers`` reads or writes for a tokenizer; any of the first three makes a directory
# a tokenizer directory.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
    "chat_template.json")


def has_tokenizer_files(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES[:3])


class HFTokenizer:
    """A tokenizer saved in a local directory (``tokenizer.json`` / ``tokenizer_config.json``),
    loaded with ``transformers`` (imported lazily; files only, no network).

    ``name`` identifies it by content (a hash of the serialized tokenizer and its special ids),
    not by path: the same tokenizer copied elsewhere (e.g. into a converted model) is the same
    tokenizer for a prepared dataset or a resumed run."""

    def __init__(self, path: str) -> None:
        if not os.path.isdir(path):
            raise ValueError(f"tokenizer {path!r} is neither 'byte' nor a local directory")
        if not has_tokenizer_files(path):
            raise ValueError(f"directory {path!r} has no tokenizer files "
                             f"({', '.join(TOKENIZER_FILES[:3])})")
        try:
            from transformers import AutoTokenizer
        except ImportError as err:  # pragma: no cover - transformers is in the base install
            raise ValueError(f"tokenizer directory {path!r} needs the transformers package "
                             f"(pip install 'megatron_ext[hf]')") from err
        try:
            self._tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as err:  # a broken or unsupported tokenizer: one clear line
            raise ValueError(f"cannot load the tokenizer in {path!r}: "
                             f"{type(err).__name__}: {err}") from err
        self.path = os.path.abspath(path)
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        if eos is None:
            raise ValueError(f"tokenizer {path!r} has no eos token; documents need a separator")
        self.eos_id = int(eos)
        pad = self._tok.pad_token_id
        self.pad_id = int(pad) if pad is not None else self.eos_id
        bos = self._tok.bos_token_id
        self.bos_id = int(bos) if bos is not None else None
        self.name = f"hf:sha256:{self._content_hash()}"

    def _content_hash(self) -> str:
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None:
            body = backend.to_str()
        else:  # a slow (python) tokenizer: its vocabulary in id order
            vocab = self._tok.get_vocab()
            body = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
        ids = json.dumps([self.eos_id, self.pad_id, self.bos_id, self.vocab_size])
        return hashlib.sha256((body + ids).encode("utf-8")).hexdigest()[:16]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False), dtype=np.int64)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def save(self, directory: str) -> None:
        """Write the tokenizer files into ``directory`` (``AutoTokenizer`` loads them again)."""
        self._tok.save_pretrained(directory)


def load_tokenizer(spec: str = "byte") -> Tokenizer:
    """``"byte"`` (default) or the path of a local HF tokenizer directory."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)


def resolve_tokenizer(spec: Optional[str], model: Optional[str] = None) -> str:
    """What ``--tokenizer`` means: ``None`` / ``"auto"`` is the model's own tokenizer when
    ``model`` is a directory holding tokenizer files (an HF model), else ``"byte"``; anything else
    is taken as given."""
    if spec not in (None, "auto"):
        return spec
    if model is not None and has_tokenizer_files(model):
        return model
    return "byte"
