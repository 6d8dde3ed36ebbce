"""Load-balanced split of sequences over context-parallel (CP) ranks, and its inverse.

Causal attention costs more for late tokens than for early ones, so a sequence is cut into
``2·cp`` equal chunks and CP rank ``c`` holds chunks ``c`` and ``2cp-1-c`` (design §5): every
rank then does the same work. Pure index math here; no process group is touched (the gather back
is :func:`megatron_ext.communication.local_batch.gather_from_cp`).

Padded layout. A row's tokens are placed in a *padded layout* of ``padded_len`` slots:

* one document (``doc_lengths=None``): the tokens, then padding up to a multiple of ``2·cp``;
* packed documents: each document, padded to a multiple of ``2·cp``, one after the other, so every
  document is split and balanced on its own (per-document balancing, like TransformerEngine's
  THD format);
* then, if the batch asks for a longer ``padded_len`` (rows of one batch must have one length), a
  *filler* block of padding, itself split the same way.

Rank ``r`` holds, for every document (and the filler) in order, chunk ``r`` then chunk
``2cp-1-r`` of that document's padded span. The slot number in the padded layout is the token's
``token_index`` (the causal order CP attention uses): increasing along the sequence, equal for
all rows with the same layout. Padding slots have ``segment = -1`` (never attended, zero
output), ``label = -100`` and RoPE position 0. Tokens are never truncated.

Padding limit: the padding a row needs may not exceed ``max_pad`` tokens; by default at most as
many padding tokens as real ones (``max_pad = seq_len``). A ``cp`` the length cannot be padded
for within that limit is a ``ValueError`` naming the numbers.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

IGNORE_INDEX = -100

DocLengths = Union[None, Sequence[int], Sequence[Sequence[int]]]


def _check_cp(cp_size: int, cp_rank: Optional[int] = None) -> None:
    if not isinstance(cp_size, int) or cp_size < 1:
        raise ValueError(f"cp_size={cp_size!r} must be a positive int")
    if cp_rank is not None and not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} must be in [0, cp_size={cp_size})")


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _check_pad(seq_len: int, padded_len: int, cp_size: int, max_pad: Optional[int]) -> None:
    limit = seq_len if max_pad is None else max_pad
    pad = padded_len - seq_len
    if pad > limit:
        rule = ("max_pad" if max_pad is not None
                else "the default limit (no more padding than real tokens)")
        raise ValueError(f"cp_size={cp_size} cannot split {seq_len} tokens within the padding "
                         f"limit: it needs {padded_len} slots (multiples of 2*cp={2 * cp_size} "
                         f"per document), i.e. {pad} padding tokens > {limit} allowed by {rule}")


def cp_padded_length(seq_len: int, cp_size: int, max_pad: Optional[int] = None) -> int:
    """Smallest multiple of ``2·cp`` holding ``seq_len`` tokens; ``ValueError`` if that needs
    more than ``max_pad`` padding tokens (default: more padding than real tokens)."""
    _check_cp(cp_size)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    padded = _round_up(seq_len, 2 * cp_size)
    _check_pad(seq_len, padded, cp_size, max_pad)
    return padded


def _check_docs(doc_lengths: Sequence[int], seq_len: int) -> tuple[int, ...]:
    docs = tuple(int(n) for n in doc_lengths)
    if not docs or any(n < 1 for n in docs):
        raise ValueError(f"doc_lengths={list(docs)} must be non-empty positive lengths")
    if sum(docs) != seq_len:
        raise ValueError(f"doc_lengths={list(docs)} sum to {sum(docs)}, not the sequence "
                         f"length {seq_len}")
    return docs


def required_padded_length(seq_len: int, cp_size: int,
                           doc_lengths: Optional[Sequence[int]] = None) -> int:
    """Padded length one row needs (each document rounded up to a multiple of ``2·cp``)."""
    _check_cp(cp_size)
    docs = _check_docs(doc_lengths if doc_lengths is not None else [seq_len], seq_len)
    return sum(_round_up(n, 2 * cp_size) for n in docs)


@dataclass(frozen=True)
class CPLayout:
    """Where each token of one row goes under CP.

    ``source[slot]``: original position of the token in padded-layout slot ``slot`` (-1 =
    padding); ``segment[slot]``: its document (-1 = padding); ``doc_position[slot]``: its position
    inside its document (0 for padding); ``order``: padded slots in rank-major local order — rank
    ``r`` holds ``order[r*local_len:(r+1)*local_len]``."""

    cp_size: int
    seq_len: int
    padded_len: int
    doc_lengths: tuple[int, ...]
    source: torch.Tensor
    segment: torch.Tensor
    doc_position: torch.Tensor
    order: torch.Tensor

    @property
    def local_len(self) -> int:
        return self.padded_len // self.cp_size

    def local_slots(self, cp_rank: int) -> torch.Tensor:
        """Padded-layout slots (= ``token_index``) rank ``cp_rank`` holds, in local order."""
        _check_cp(self.cp_size, cp_rank)
        n = self.local_len
        return self.order[cp_rank * n:(cp_rank + 1) * n]

    def inverse(self) -> torch.Tensor:
        """``[seq_len]``: for each original token, its row in the rank-major concatenation of
        every rank's local tokens (what an all-gather over CP returns)."""
        src = self.source[self.order]
        inv = torch.empty(self.seq_len, dtype=torch.long)
        real = src >= 0
        inv[src[real]] = torch.nonzero(real).flatten()
        return inv


def cp_layout(seq_len: int, cp_size: int, doc_lengths: Optional[Sequence[int]] = None, *,
              padded_len: Optional[int] = None, max_pad: Optional[int] = None) -> CPLayout:
    """Layout of one row of ``seq_len`` tokens (documents ``doc_lengths``, default one) over
    ``cp_size`` ranks, padded to ``padded_len`` (default: the least that works)."""
    _check_cp(cp_size)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive int")
    docs = _check_docs(doc_lengths if doc_lengths is not None else [seq_len], seq_len)
    unit = 2 * cp_size
    need = sum(_round_up(n, unit) for n in docs)
    if padded_len is None:
        padded_len = need
    elif padded_len < need or padded_len % unit:
        raise ValueError(f"padded_len={padded_len} must be a multiple of 2*cp={unit} and at "
                         f"least {need} (documents {list(docs)} padded per document)")
    _check_pad(seq_len, padded_len, cp_size, max_pad)

    source = torch.full((padded_len,), -1, dtype=torch.long)
    segment = torch.full((padded_len,), -1, dtype=torch.long)
    doc_pos = torch.zeros(padded_len, dtype=torch.long)
    spans = []  # (start slot, padded length) of each document and the filler
    slot = tok = 0
    for d, n in enumerate(docs):
        source[slot:slot + n] = torch.arange(tok, tok + n)
        segment[slot:slot + n] = d
        doc_pos[slot:slot + n] = torch.arange(n)
        spans.append((slot, _round_up(n, unit)))
        slot += _round_up(n, unit)
        tok += n
    if padded_len > slot:
        spans.append((slot, padded_len - slot))
    per_rank = []
    for r in range(cp_size):
        pieces = []
        for start, length in spans:
            c = length // unit
            pieces.append(torch.arange(start + r * c, start + (r + 1) * c))
            pieces.append(torch.arange(start + (unit - 1 - r) * c, start + (unit - r) * c))
        per_rank.append(torch.cat(pieces))
    return CPLayout(cp_size, seq_len, padded_len, docs, source, segment, doc_pos,
                    torch.cat(per_rank))


def split_for_cp(seq_len: int, cp_size: int, cp_rank: int,
                 doc_lengths: Optional[Sequence[int]] = None, *,
                 padded_len: Optional[int] = None, max_pad: Optional[int] = None) -> torch.Tensor:
    """Original positions of the tokens rank ``cp_rank`` holds, in local order (``-1`` marks a
    padding slot). ``len == padded_len // cp_size``."""
    layout = cp_layout(seq_len, cp_size, doc_lengths, padded_len=padded_len, max_pad=max_pad)
    return layout.source[layout.local_slots(cp_rank)]


def unsplit_index(seq_len: int, cp_size: int, doc_lengths: Optional[Sequence[int]] = None, *,
                  padded_len: Optional[int] = None, max_pad: Optional[int] = None
                  ) -> torch.Tensor:
    """Inverse of :func:`split_for_cp`: ``global = concat_over_ranks(local)[index]``."""
    return cp_layout(seq_len, cp_size, doc_lengths, padded_len=padded_len,
                     max_pad=max_pad).inverse()


# ---------------------------------------------------------------------------------- batches
def _row_docs(doc_lengths: DocLengths, position_ids: Optional[torch.Tensor], b: int, s: int
              ) -> list[Optional[list[int]]]:
    if doc_lengths is not None:
        if len(doc_lengths) and not isinstance(doc_lengths[0], numbers.Integral):
            if len(doc_lengths) != b:
                raise ValueError(f"doc_lengths has {len(doc_lengths)} rows for a batch of {b}")
            return [list(d) for d in doc_lengths]
        return [list(doc_lengths)] * b
    if position_ids is None:
        return [None] * b
    return [docs_from_position_ids(position_ids[i]) for i in range(b)]


def docs_from_position_ids(position_ids: torch.Tensor) -> list[int]:
    """Document lengths of one packed row whose position ids restart at 0 for every document
    (the convention of HF's flattening collator); the row's first token always starts one."""
    pos = position_ids.reshape(-1)
    starts = torch.nonzero(pos == 0).flatten().tolist()
    if not starts or starts[0] != 0:
        starts = [0] + starts
    bounds = starts + [pos.numel()]
    return [bounds[i + 1] - bounds[i] for i in range(len(starts))]


def shift_labels(input_ids: torch.Tensor, doc_lengths: DocLengths = None,
                 ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token labels aligned to positions (``labels[t] = input_ids[t+1]``), ``ignore_index``
    at the last token of every document. Shift *before* splitting: the next token may live on
    another CP rank."""
    b, s = input_ids.shape
    labels = torch.full_like(input_ids, ignore_index)
    labels[:, :-1] = input_ids[:, 1:]
    for i, docs in enumerate(_row_docs(doc_lengths, None, b, s)):
        ends = torch.tensor(docs if docs is not None else [s]).cumsum(0) - 1
        labels[i, ends] = ignore_index
    return labels


@dataclass(frozen=True)
class CPBatch:
    """One CP rank's share of a ``[b, s]`` batch; every tensor is ``[b, local_len]``."""

    input_ids: torch.Tensor
    labels: Optional[torch.Tensor]
    position_ids: torch.Tensor   # RoPE positions (reset per document when packed)
    token_index: torch.Tensor    # padded-layout slot: causal order for CP attention
    segment_ids: torch.Tensor    # document id, -1 = padding
    layouts: tuple[CPLayout, ...]
    cp_rank: int

    @property
    def valid(self) -> torch.Tensor:
        """Real (non-padding) tokens."""
        return self.segment_ids >= 0

    @property
    def padded_len(self) -> int:
        return self.layouts[0].padded_len


def split_batch_for_cp(input_ids: torch.Tensor, labels: Optional[torch.Tensor], cp_size: int,
                       cp_rank: int, *, position_ids: Optional[torch.Tensor] = None,
                       doc_lengths: DocLengths = None, padded_len: Optional[int] = None,
                       max_pad: Optional[int] = None, pad_token_id: int = 0) -> CPBatch:
    """This CP rank's tokens of a ``[b, s]`` batch.

    ``labels`` are per-position targets (already shifted, see :func:`shift_labels`; ``None`` for
    inference). Documents come from ``doc_lengths`` (one list for every row, or one per row),
    else from ``position_ids`` restarting at 0, else one document per row. ``position_ids``
    (optional) are carried with their tokens; by default positions restart per document. Rows
    are padded to one ``padded_len`` (default: the longest any row needs)."""
    _check_cp(cp_size, cp_rank)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [b, s], got {tuple(input_ids.shape)}")
    b, s = input_ids.shape
    for name, t in (("labels", labels), ("position_ids", position_ids)):
        if t is not None and tuple(t.shape) != (b, s):
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match input_ids {(b, s)}")
    rows = _row_docs(doc_lengths, position_ids, b, s)
    need = max(required_padded_length(s, cp_size, d) for d in rows)
    padded_len = need if padded_len is None else padded_len
    layouts = tuple(cp_layout(s, cp_size, d, padded_len=padded_len, max_pad=max_pad)
                    for d in rows)
    dev = input_ids.device
    out = {k: [] for k in ("ids", "labels", "pos", "tok", "seg")}
    for i, lay in enumerate(layouts):
        slots = lay.local_slots(cp_rank)
        src = lay.source[slots].to(dev)
        real = src >= 0
        take = src.clamp(min=0)
        out["ids"].append(torch.where(real, input_ids[i, take], pad_token_id))
        if labels is not None:
            out["labels"].append(torch.where(real, labels[i, take], IGNORE_INDEX))
        pos = position_ids[i, take] if position_ids is not None else lay.doc_position[slots].to(dev)
        out["pos"].append(torch.where(real, pos, 0))
        out["tok"].append(slots.to(dev))
        out["seg"].append(lay.segment[slots].to(dev))
    return CPBatch(input_ids=torch.stack(out["ids"]),
                   labels=torch.stack(out["labels"]) if labels is not None else None,
                   position_ids=torch.stack(out["pos"]), token_index=torch.stack(out["tok"]),
                   segment_ids=torch.stack(out["seg"]), layouts=layouts, cp_rank=cp_rank)


def unsplit_from_cp(gathered: torch.Tensor, layouts: Sequence[CPLayout]) -> torch.Tensor:
    """Global-order ``[b, s, ...]`` from the rank-major concatenation ``[b, cp*local_len, ...]``
    of every rank's local tensors; padding is dropped."""
    if gathered.shape[0] != len(layouts):
        raise ValueError(f"{gathered.shape[0]} rows but {len(layouts)} layouts")
    if gathered.shape[1] != layouts[0].padded_len:
        raise ValueError(f"gathered length {gathered.shape[1]} is not the padded length "
                         f"{layouts[0].padded_len}")
    return torch.stack([gathered[i, lay.inverse().to(gathered.device)]
                        for i, lay in enumerate(layouts)])
