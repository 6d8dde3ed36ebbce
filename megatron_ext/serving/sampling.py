"""Sampling parameters and the sampler of a decode step.

What users of ``transformers`` / SGLang expect: ``temperature`` (0 = greedy, the argmax — bit
for bit what ``generate(do_sample=False)`` picks), then ``top_k`` (0 = off), then ``top_p``
(nucleus; 1 = off), each request with its own ``seed``.

**Layout-independent randomness.** A request's ``t``-th token is drawn by inverse CDF from one
uniform number ``u = hash(seed, t)`` (a counter-based generator: splitmix64 in int64 tensor ops,
identical on CPU and CUDA, no generator state, no host sync, so a CUDA graph can replay it). The
same seed therefore gives the same tokens whatever the batch, its order, the parallel layout or
the device — as long as the logits agree; each token is sampled once, on the CP rank that owns
it (:mod:`megatron_ext.serving.decode_step`), from the full-vocabulary logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

_MASK64 = (1 << 64) - 1


def _signed(c: int) -> int:
    """A 64-bit constant as the int64 torch holds it."""
    c &= _MASK64
    return c - (1 << 64) if c >= 1 << 63 else c


_GOLDEN, _MIX1, _MIX2 = (_signed(0x9E3779B97F4A7C15), _signed(0xBF58476D1CE4E5B9),
                         _signed(0x94D049BB133111EB))


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding: ``max_new_tokens`` (>= 1), ``temperature`` (>= 0; 0 = greedy),
    ``top_k`` (>= 0; 0 = whole vocabulary), ``top_p`` (in (0, 1]), ``seed`` (0 <= seed < 2**63).
    Validated on construction."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r} must be a positive int")
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r} must be a finite number >= 0 "
                             f"(0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an int >= 0 (0 = no top-k)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) \
                or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = no nucleus filter)")
        if not is_int(self.seed) or not 0 <= self.seed < 1 << 63:
            raise ValueError(f"seed={self.seed!r} must be an int in [0, 2**63)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 ``x`` (torch's ``>>`` is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    z = x + _GOLDEN
    z = (z ^ _shr(z, 30)) * _MIX1
    z = (z ^ _shr(z, 27)) * _MIX2
    return z ^ _shr(z, 31)


def request_uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """``[n]`` float64 uniforms in [0, 1): a pure function of each (seed, counter) pair."""
    z = _splitmix64(_splitmix64(seeds.to(torch.int64)) ^ counters.to(torch.int64))
    return _shr(z, 11).to(torch.float64) * (2.0 ** -53)


@dataclass
class SamplingTensors:
    """Per-row parameters on the device (rows = this rank's owned decode rows)."""

    temperature: torch.Tensor   # [n] float64
    top_k: torch.Tensor         # [n] int64 (0 = off)
    top_p: torch.Tensor         # [n] float64
    seed: torch.Tensor          # [n] int64
    any_sampled: bool           # host-side: False = every row greedy, skip the sort
    any_top_k: bool = True      # host-side: False = no sampled row has a top-k, skip its mask

    @classmethod
    def build(cls, params: Sequence[SamplingParams], device) -> "SamplingTensors":
        def t(values, dtype):
            return torch.tensor(list(values), dtype=dtype, device=device)

        return cls(t((0.0 if p.greedy else float(p.temperature) for p in params), torch.float64),
                   t((p.top_k for p in params), torch.int64),
                   t((float(p.top_p) for p in params), torch.float64),
                   t((p.seed for p in params), torch.int64),
                   any(not p.greedy for p in params),
                   any(p.top_k > 0 for p in params if not p.greedy))


#: elements per chunk of :func:`cumsum_rows`
SCAN_CHUNK = 1024


def cumsum_rows(x: torch.Tensor) -> torch.Tensor:
    """Inclusive sum along the last dim of ``x`` ``[n, V]``, in chunks of :data:`SCAN_CHUNK`:
    the chunks' own sums, plus the sum of the chunks before. torch's scan of a few long rows
    runs one row per thread block (~250 µs for 64 × 151936 float32 on an H200, BENCHMARKS.md
    §11e); short chunks and a scan of the chunk totals use the whole GPU. One fixed order of
    additions on every device: the same bits wherever the same logits are sampled."""
    n, vocab = x.shape
    if vocab <= SCAN_CHUNK:
        return x.cumsum(-1)
    inner = torch.nn.functional.pad(x, (0, -vocab % SCAN_CHUNK)).view(n, -1, SCAN_CHUNK)
    inner = inner.cumsum(-1)
    before = torch.nn.functional.pad(inner[..., -1].cumsum(-1)[:, :-1], (1, 0))
    return (inner + before[..., None]).view(n, -1)[:, :vocab]


def _nucleus(logits: torch.Tensor, params: "SamplingTensors"
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(probs, cum, kept, order)``: the temperature- and top-k-filtered probabilities in
    descending-logit order (equal logits in vocabulary order), their running sum, the number
    of leading tokens top-p keeps (``[n, 1]``, at least 1) and the vocabulary index of each
    column."""
    n, vocab = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    temp = torch.where(params.temperature > 0, params.temperature, 1.0).to(acc)
    # descending logits, ties in vocabulary order: a stable sort of the logits as they come
    # (bf16 logits sort on 16-bit keys); dividing by a positive temperature keeps the order
    ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    scaled = ordered.to(acc) / temp[:, None]
    if params.any_top_k:
        rank = torch.arange(vocab, device=logits.device)
        k = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), vocab)
        scaled = scaled.masked_fill(rank[None] >= k[:, None], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    cum = cumsum_rows(probs)
    # the smallest set of best tokens whose mass reaches top_p: those with less mass before
    kept = ((cum - probs) < params.top_p.to(acc)[:, None]).sum(-1, keepdim=True).clamp(min=1)
    return probs, cum, kept, order


def filtered_probs(logits: torch.Tensor, params: SamplingParams | "SamplingTensors"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The distribution a sampled row draws from: temperature, then top-k, then top-p (the
    smallest set of best tokens whose mass reaches ``top_p``; the best token always stays).
    Returns ``(probs, order)``: ``probs [n, V]`` in descending-logit order, equal logits in
    vocabulary order (zeros for filtered tokens, not renormalised) and ``order`` the vocabulary
    index of each column."""
    if isinstance(params, SamplingParams):
        params = SamplingTensors.build([params] * logits.shape[0], logits.device)
    probs, _, kept, order = _nucleus(logits, params)
    rank = torch.arange(logits.shape[1], device=logits.device)
    return probs * (rank[None] < kept), order


def sample_tokens(logits: torch.Tensor, params: SamplingTensors,
                  counter: torch.Tensor) -> torch.Tensor:
    """Tokens ``[n]`` from full-vocabulary ``logits`` ``[n, V]``: the argmax for greedy rows,
    else the inverse CDF of :func:`filtered_probs` at ``request_uniform(seed, counter)``
    (``counter``: the request's token index, a device scalar): the first token whose running
    mass exceeds ``u`` times the kept mass. No host sync."""
    greedy = logits.argmax(-1)
    if not params.any_sampled or logits.shape[0] == 0:
        return greedy
    probs, cum, kept, order = _nucleus(logits, params)
    cum = cum.contiguous()
    total = cum.gather(1, kept - 1)                      # the kept tokens' mass
    u = request_uniform(params.seed, counter.expand(logits.shape[0])).to(cum.dtype)[:, None]
    pick = torch.searchsorted(cum, (u * total).contiguous(), right=True)
    # never past the kept tokens, nor onto a token top-k left with no mass
    pick = torch.minimum(torch.minimum(pick, kept - 1), (probs > 0).sum(-1, keepdim=True) - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(params.temperature > 0, sampled, greedy)
