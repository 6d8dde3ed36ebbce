"""Memory-mapped token dataset and the deterministic order in which training reads it.

On disk a dataset is two files with one prefix: ``<prefix>.bin`` holds every document's token ids
back to back, each document followed by the tokenizer's ``eos_id``; ``<prefix>.json`` says the
dtype, token count and tokenizer. Samples are ``seq_len + 1`` consecutive tokens (inputs and the
labels shifted by one), so every sample is full and the only padding is what CP adds.

The order of samples depends only on the seed and the number of samples consumed, never on the
parallel layout: a run resumed in another layout reads exactly the batches the original would have.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Iterable, Optional

import numpy as np

from megatron_ext.data.tokenizer import Tokenizer

FORMAT_VERSION = 1
CORPUS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


@dataclass(frozen=True)
class DatasetMeta:
    dtype: str
    num_tokens: int
    num_documents: int
    tokenizer: str
    vocab_size: int
    eos_id: int
    pad_id: int
    version: int = FORMAT_VERSION


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


def write_token_dataset(prefix: str, documents: Iterable[np.ndarray], tokenizer: Tokenizer) -> DatasetMeta:
    """Write encoded ``documents`` as ``<prefix>.bin`` + ``<prefix>.json`` (eos after each one).
    The ``.json`` is written last, so a dataset without one is an interrupted write."""
    dtype = _token_dtype(tokenizer.vocab_size)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    num_tokens = num_docs = 0
    eos = np.asarray([tokenizer.eos_id], dtype=dtype)
    with open(prefix + ".bin", "wb") as f:
        for doc in documents:
            doc = np.asarray(doc)
            if doc.size and (doc.min() < 0 or doc.max() >= tokenizer.vocab_size):
                raise ValueError(f"document {num_docs} has token ids outside [0, "
                                 f"{tokenizer.vocab_size})")
            f.write(doc.astype(dtype).tobytes())
            f.write(eos.tobytes())
            num_tokens += doc.size + 1
            num_docs += 1
    meta = DatasetMeta(dtype=dtype.name, num_tokens=num_tokens, num_documents=num_docs,
                       tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                       eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    tmp = prefix + ".json.tmp"
    with open(tmp, "w") as f:
        json.dump(meta.__dict__, f, indent=1)
    os.replace(tmp, prefix + ".json")
    return meta


class TokenDataset:
    """Token ids (a read-only memory map, or an in-memory array for the embedded corpus)."""

    def __init__(self, tokens: np.ndarray, meta: DatasetMeta, source: str) -> None:
        self.tokens = tokens
        self.meta = meta
        self.source = source

    @classmethod
    def open(cls, prefix: str) -> "TokenDataset":
        """Open ``<prefix>.bin`` / ``<prefix>.json``; every inconsistency is a ``ValueError`` naming
        the file (checked before training starts)."""
        if prefix.endswith(".bin") or prefix.endswith(".json"):
            prefix = prefix.rsplit(".", 1)[0]
        meta_path, bin_path = prefix + ".json", prefix + ".bin"
        if not os.path.isfile(meta_path):
            raise ValueError(f"dataset {prefix!r}: {meta_path} does not exist (write it with "
                             f"examples/prepare_data.py)")
        if not os.path.isfile(bin_path):
            raise ValueError(f"dataset {prefix!r}: {bin_path} does not exist")
        try:
            with open(meta_path, encoding="utf-8") as f:
                raw = json.load(f)
        except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
            raise ValueError(f"dataset {prefix!r}: {meta_path} is not valid JSON ({err})") from None
        try:
            meta = DatasetMeta(**raw)
        except TypeError as err:
            raise ValueError(f"dataset {prefix!r}: {meta_path} is not a dataset description: "
                             f"{err}") from None
        if meta.version != FORMAT_VERSION:
            raise ValueError(f"dataset {prefix!r}: format version {meta.version}, expected "
                             f"{FORMAT_VERSION}")
        dtype = np.dtype(meta.dtype)
        size = os.path.getsize(bin_path)
        if size != meta.num_tokens * dtype.itemsize:
            raise ValueError(f"dataset {prefix!r}: {bin_path} has {size} bytes but the description "
                             f"says {meta.num_tokens} tokens of {dtype.name}")
        tokens = np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta.num_tokens,))
        return cls(tokens, meta, os.path.abspath(prefix))

    @classmethod
    def from_documents(cls, documents: Iterable[np.ndarray], tokenizer: Tokenizer,
                       source: str) -> "TokenDataset":
        dtype = _token_dtype(tokenizer.vocab_size)
        parts, num_docs = [], 0
        for doc in documents:
            parts += [np.asarray(doc, dtype=dtype), np.asarray([tokenizer.eos_id], dtype=dtype)]
            num_docs += 1
        tokens = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        meta = DatasetMeta(dtype=dtype.name, num_tokens=int(tokens.size), num_documents=num_docs,
                           tokenizer=tokenizer.name, vocab_size=tokenizer.vocab_size,
                           eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
        return cls(tokens, meta, source)

    def num_samples(self, seq_len: int) -> int:
        """Non-overlapping samples of ``seq_len`` inputs (+1 label token shared with the next)."""
        return max(0, (self.meta.num_tokens - 1) // seq_len)

    def sample(self, index: int, seq_len: int) -> np.ndarray:
        start = index * seq_len
        return np.asarray(self.tokens[start:start + seq_len + 1], dtype=np.int64)

    def check_for(self, seq_len: int, global_batch_size: int, vocab_size: int,
                  tokenizer_name: str) -> None:
        """Reject a dataset the run cannot use (raised on every rank before any collective)."""
        if self.meta.tokenizer != tokenizer_name:
            raise ValueError(f"dataset {self.source!r} was tokenized with {self.meta.tokenizer!r} "
                             f"but the run uses tokenizer {tokenizer_name!r} (tokenizers are "
                             f"compared by content; prepare the data again with the run's "
                             f"--tokenizer, or pass the tokenizer it was prepared with)")
        if self.meta.vocab_size > vocab_size:
            raise ValueError(f"dataset {self.source!r} has vocab_size={self.meta.vocab_size} > the "
                             f"model's vocab_size={vocab_size}")
        n = self.num_samples(seq_len)
        if n < global_batch_size:
            raise ValueError(f"dataset {self.source!r} has {self.meta.num_tokens} tokens = {n} "
                             f"samples of seq_len={seq_len}; a global batch needs "
                             f"{global_batch_size}")


def corpus_files() -> list[str]:
    """The small public-domain corpus shipped with the package (Shakespeare excerpts)."""
    files = sorted(glob.glob(os.path.join(CORPUS_DIR, "*.txt")))
    if not files:
        raise ValueError(f"the embedded corpus is missing: no *.txt under {CORPUS_DIR}")
    return files


def read_text_documents(paths: Iterable[str], tokenizer: Tokenizer,
                        text_key: str = "text") -> Iterable[np.ndarray]:
    """Encode documents: a ``.txt`` file is one document; a ``.jsonl`` file has one JSON object per
    line whose ``text_key`` field is a document."""
    for path in paths:
        if not os.path.isfile(path):
            raise ValueError(f"input file {path!r} does not exist")
        try:
            yield from _read_documents(path, tokenizer, text_key)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: not UTF-8 text (byte {err.start}: "
                             f"{err.object[err.start:err.start + 4]!r})") from None


def _read_documents(path: str, tokenizer: Tokenizer, text_key: str) -> Iterable[np.ndarray]:
    """The documents of one ``.txt`` / ``.jsonl`` file, encoded."""
    if path.endswith(".jsonl") or path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record[text_key]
                except (json.JSONDecodeError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a "
                                     f"{text_key!r} string ({err})") from None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{lineno}: field {text_key!r} is not a string")
                yield tokenizer.encode(text)
    else:
        with open(path, encoding="utf-8") as f:
            yield tokenizer.encode(f.read())


def open_dataset(path: Optional[str], tokenizer: Tokenizer) -> TokenDataset:
    """``path`` = a prepared dataset prefix, or ``None`` for the embedded corpus (tokenized in
    memory at start-up: a few hundred KB, well under a second with the byte tokenizer)."""
    if path is None:
        return TokenDataset.from_documents(read_text_documents(corpus_files(), tokenizer),
                                           tokenizer, source="embedded-corpus")
    return TokenDataset.open(path)


class SampleOrder:
    """Which samples make global batch ``step``: sample stream position ``p = step·G + j`` is
    element ``p mod N`` of epoch ``p // N``'s permutation (seeded by ``seed`` and the epoch)."""

    def __init__(self, num_samples: int, seed: int, shuffle: bool = True) -> None:
        if num_samples < 1:
            raise ValueError("the dataset has no complete sample")
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) > 2:
                self._perms.clear()
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perms[epoch] = rng.permutation(self.num_samples)
            else:
                self._perms[epoch] = np.arange(self.num_samples)
        return self._perms[epoch]

    def indices(self, first: int, count: int) -> np.ndarray:
        """Sample indices at stream positions ``first .. first+count-1``."""
        out = np.empty(count, dtype=np.int64)
        for j in range(count):
            epoch, pos = divmod(first + j, self.num_samples)
            out[j] = self._perm(epoch)[pos]
        return out
