"""Validation and block plan of one context-parallel attention call.

Built once per call (or once per batch and reused by every layer): it checks the inputs on every
CP rank *before* any large collective — one small all-gather of a header (shapes, dtype, an
error flag) so that bad input on any rank becomes the same ``ValueError`` on every rank, never a
hang — then gathers every rank's ``token_index`` and ``segment_ids`` and decides, for each
(local query part, source rank, key part) block, its :class:`MaskKind`:

* ``SKIP``    every key is causally later than every query, or lies in another document, or is
              padding (fully-masked blocks are not computed: the load-balanced layout makes
              half of the remote blocks skippable);
* ``FULL``    every key is at or before every query, one document, no padding in the way;
* ``CAUSAL``  the local diagonal (same tokens, increasing ``token_index``), one document;
* ``GENERAL`` anything else: an explicit mask ``kv_index <= q_index & same segment & kv real``.

A local sequence is cut into two *parts* (the two load-balanced chunks) when ``cp > 1`` and its
length is even, else kept whole. Trailing padding (every padding slot of a row after every real
token, as :mod:`megatron_ext.data.cp_split` lays out one document) never changes a real
query's result under causality, so it does not force ``GENERAL``; padded queries are zeroed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_ext.layers.attention.attention_math import MaskKind
from megatron_ext.communication.choices import CP_STRATEGIES
from megatron_ext.communication.raw import gather_into
from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import AxisGroup

_BIG = 1 << 62
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class BlockGroup:
    """Key parts of one source rank that are attended together: their local ``ranges`` are
    concatenated (one kernel call) under one mask ``kind``."""

    kind: MaskKind
    ranges: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class CPAttentionPlan:
    """What this rank computes. ``tokens`` / ``segments``: every CP rank's ``token_index`` and
    ``segment_ids`` ``[cp, b, s_local]`` (for ``GENERAL`` masks)."""

    cp_size: int
    cp_rank: int
    shape: tuple[int, int, int, int, int]  # b, s_local, hq, hkv, d
    parts: tuple[tuple[int, int], ...]
    groups: dict
    tokens: torch.Tensor
    segments: torch.Tensor
    q_valid: Optional[torch.Tensor]  # [b, s_local] real queries; None = all real
    standard_layout: bool  # one document, no padding, zigzag split of cp * s_local tokens

    def blocks(self, q_part: int, kv_rank: int) -> tuple[BlockGroup, ...]:
        return self.groups[(q_part, kv_rank)]

    def mask(self, q_part: int, kv_rank: int, ranges) -> torch.Tensor:
        """``[b, s_q_part, sum(ranges)]`` visibility of a ``GENERAL`` block."""
        a, e = self.parts[q_part]
        tq = self.tokens[self.cp_rank][:, a:e, None]
        sq = self.segments[self.cp_rank][:, a:e, None]
        tk = torch.cat([self.tokens[kv_rank][:, x:y] for x, y in ranges], 1)[:, None]
        sk = torch.cat([self.segments[kv_rank][:, x:y] for x, y in ranges], 1)[:, None]
        return (tk <= tq) & (sk == sq) & (sk >= 0)

    def check_matches(self, q: torch.Tensor, k: torch.Tensor) -> None:
        b, s, hq, d = q.shape
        if (b, s, hq, k.shape[2], d) != self.shape:
            raise ValueError(f"plan was built for (b, s_local, hq, hkv, d)={self.shape}, got "
                             f"{(b, s, hq, k.shape[2], d)}")


# ------------------------------------------------------------------------------- validation
@dataclass(frozen=True)
class QKVShapes:
    """What a CP attention plan depends on: the local q/k/v shapes, dtype and device (planning
    needs no tensors, so a model plans once per forward before any layer runs)."""

    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor) -> "QKVShapes":
        b, s, hq, d = q.shape
        return cls(b, s, hq, k.shape[2], d, q.dtype, q.device)


def _tensor_problems(q, k, v) -> list[str]:
    """What the shapes alone cannot say: q/k/v ranks, k vs v, and their agreement with q."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return [f"q, k, v must be [b, s, heads, head_dim], got {tuple(q.shape)}, "
                f"{tuple(k.shape)}, {tuple(v.shape)}"]
    errs = []
    b, s, hq, d = q.shape
    if k.shape != v.shape:
        errs.append(f"k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if k.shape[0] != b or k.shape[1] != s or k.shape[3] != d:
        errs.append(f"k/v {tuple(k.shape)} do not match q {tuple(q.shape)} in batch, length or "
                    f"head_dim")
    if not (q.dtype == k.dtype == v.dtype):
        errs.append(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype} must agree and be floating")
    return errs


def _shape_problems(shapes: QKVShapes, token_index, segment_ids, strategy) -> list[str]:
    errs = []
    if strategy not in CP_STRATEGIES:
        errs.append(f"strategy={strategy!r} must be one of {CP_STRATEGIES}")
    b, s, hq, hkv = shapes.batch, shapes.seq, shapes.heads, shapes.kv_heads
    if hkv < 1 or hq % hkv:
        errs.append(f"mismatched head counts: q has {hq} heads, k/v have {hkv}; the number of "
                    f"query heads must be a multiple of the number of key/value heads")
    if s < 1:
        errs.append("the local sequence is empty")
    if shapes.dtype not in _DTYPES:
        errs.append(f"q, k, v dtype {shapes.dtype} must be floating")
    for name, t in (("token_index", token_index), ("segment_ids", segment_ids)):
        if t is None:
            continue
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            errs.append(f"{name} must be an integer tensor, got {t.dtype}")
        if tuple(t.shape) not in ((b, s), (s,)):
            errs.append(f"{name} shape {tuple(t.shape)} must be [b, s_local]={(b, s)} or [s]")
    return errs


def check_across_ranks(group: AxisGroup, device, errs: list[str], fields: dict[str, int],
                       what: str) -> None:
    """One small all-gather of ``[error flag, *fields]``: every rank learns whether any rank
    found a problem and whether the ``fields`` agree, and all raise the same ``ValueError``
    (bad input never leaves a rank waiting in a collective). No collective on a trivial group."""
    if group.is_trivial:
        if errs:
            raise ValueError(f"{what}: " + "; ".join(errs))
        return
    header = torch.tensor([int(bool(errs))] + [int(x) for x in fields.values()],
                          dtype=torch.long, device=device)
    allh = header.new_empty(group.size, header.numel())
    record("all_gather", group.name, allh.numel() * allh.element_size())
    gather_into(allh, header, group)
    rows = allh.tolist()
    if any(r[0] for r in rows):
        msgs: list = [None] * group.size
        dist.all_gather_object(msgs, "; ".join(errs), group=group.group)
        bad = "; ".join(f"CP rank {i}: {m}" for i, m in enumerate(msgs) if m)
        raise ValueError(f"{what} over {group.name}: {bad}")
    if any(r != rows[0] for r in rows):
        detail = "; ".join(f"CP rank {i}: " + ", ".join(f"{n}={x}" for n, x in zip(fields, r[1:]))
                           for i, r in enumerate(rows))
        raise ValueError(f"{what} over {group.name}: inconsistent inputs across CP ranks "
                         f"(these must agree on every rank): {detail}")


def _exchange_header(shapes: Optional[QKVShapes], errs: list[str], group: AxisGroup, strategy,
                     device) -> None:
    sh = shapes or QKVShapes(0, 0, 0, 0, 0, torch.float32, device)
    fields = dict(batch=sh.batch, s_local=sh.seq, heads=sh.heads, kv_heads=sh.kv_heads,
                  head_dim=sh.head_dim,
                  dtype=_DTYPES.index(sh.dtype) if sh.dtype in _DTYPES else -1,
                  strategy=CP_STRATEGIES.index(strategy) if strategy in CP_STRATEGIES else -1)
    check_across_ranks(group, device, errs, fields, "context_parallel_attention")


# ------------------------------------------------------------------------------------ plan
def _standard_tokens(cp: int, s: int, device) -> Optional[torch.Tensor]:
    """``[cp, s]`` zigzag layout of ``cp*s`` tokens, or None when ``s`` is odd with cp > 1."""
    if cp > 1 and s % 2:
        return None
    c = s // 2 if cp > 1 else s
    rows = []
    for r in range(cp):
        if cp == 1:
            rows.append(torch.arange(s, device=device))
        else:
            rows.append(torch.cat([torch.arange(r * c, (r + 1) * c, device=device),
                                   torch.arange((2 * cp - 1 - r) * c, (2 * cp - r) * c,
                                                device=device)]))
    return torch.stack(rows)


def plan_cp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cp_group: AxisGroup, *,
                      token_index: Optional[torch.Tensor] = None,
                      segment_ids: Optional[torch.Tensor] = None,
                      strategy: str = "all_gather") -> CPAttentionPlan:
    """Validate ``q, k, v`` on every rank and plan the blocks (collective over ``cp_group``:
    every CP rank calls it). ``token_index`` may be omitted only on a one-rank group (then
    ``0..s-1``)."""
    errs = _tensor_problems(q, k, v)
    shapes = QKVShapes.of(q, k) if q.dim() == 4 and k.dim() == 4 else None
    return _plan(shapes, errs, cp_group, token_index, segment_ids, strategy, q.device)


def plan_cp_attention_for_shapes(shapes: QKVShapes, cp_group: AxisGroup, *,
                                 token_index: Optional[torch.Tensor] = None,
                                 segment_ids: Optional[torch.Tensor] = None,
                                 strategy: str = "all_gather") -> CPAttentionPlan:
    """:func:`plan_cp_attention` from shapes alone (a model plans once per forward, before any
    layer has computed q/k/v)."""
    return _plan(shapes, [], cp_group, token_index, segment_ids, strategy, shapes.device)


def _plan(shapes: Optional[QKVShapes], errs: list[str], cp_group: AxisGroup,
          token_index: Optional[torch.Tensor], segment_ids: Optional[torch.Tensor],
          strategy: str, device) -> CPAttentionPlan:
    if not isinstance(cp_group, AxisGroup):
        raise TypeError(f"cp_group must be an AxisGroup, got {type(cp_group).__name__}")
    if not cp_group.is_trivial and cp_group.group is None:
        raise ValueError(f"axis {cp_group.name} has {cp_group.size} ranks but no process group")
    if shapes is not None:
        errs = errs + _shape_problems(shapes, token_index, segment_ids, strategy)
    if token_index is None and not cp_group.is_trivial:
        errs.append("token_index is required when the CP group has more than one rank")
    _exchange_header(shapes, errs, cp_group, strategy, device)

    b, s, hq, d = shapes.batch, shapes.seq, shapes.heads, shapes.head_dim
    hkv = shapes.kv_heads
    dev = device
    tok = (token_index if token_index is not None else torch.arange(s, device=dev))
    tok = tok.to(device=dev, dtype=torch.long).expand(b, s)
    seg = (segment_ids.to(device=dev, dtype=torch.long).expand(b, s) if segment_ids is not None
           else torch.zeros(b, s, dtype=torch.long, device=dev))
    cp, me = cp_group.size, cp_group.rank
    mine = torch.stack([tok, seg])
    if cp == 1:
        both = mine[None]
    else:
        both = mine.new_empty((cp,) + tuple(mine.shape))
        record("all_gather", cp_group.name, both.numel() * both.element_size())
        gather_into(both, mine.contiguous(), cp_group)
    tokens, segments = both[:, 0], both[:, 1]

    P = 2 if cp > 1 and s % 2 == 0 else 1
    L = s // P
    t4, s4 = tokens.reshape(cp, b, P, L), segments.reshape(cp, b, P, L)
    real = s4 >= 0
    inc = (t4[..., 1:] > t4[..., :-1]).all(-1) if L > 1 else torch.ones_like(real[..., 0])
    stats = torch.stack([
        t4.amin(-1), t4.amax(-1), inc.long(), real.any(-1).long(),
        torch.where(real, s4, _BIG).amin(-1), torch.where(real, s4, -1).amax(-1),
        (~real).any(-1).long()])  # [7, cp, b, P]
    real_max = torch.where(real, t4, -_BIG).amax((-1, -2)).amax(0)  # [b]
    pad_min = torch.where(real, _BIG, t4).amin((-1, -2)).amin(0)
    trailing = (pad_min > real_max).all()
    std = _standard_tokens(cp, s, dev)
    standard = (std is not None and bool(real.all()) and (segments == 0).all()
                and (tokens == std[:, None, :]).all())
    flat = torch.cat([stats.flatten(), torch.stack([trailing, torch.as_tensor(standard, device=dev)]
                                                   ).long()]).tolist()
    n = 7 * cp * b * P
    st = torch.tensor(flat[:n]).reshape(7, cp, b, P).tolist()
    trailing_ok, standard_ok = bool(flat[n]), bool(flat[n + 1])
    idx_min, idx_max, incr, has_real, seg_min, seg_max, has_pad = st

    def row_kind(i: int, r: int, j: int, row: int) -> MaskKind:
        q_ = (me, row, i)
        k_ = (r, row, j)

        def g(stat, key):
            return stat[key[0]][key[1]][key[2]]

        if (not g(has_real, q_) or not g(has_real, k_) or g(idx_min, k_) > g(idx_max, q_)
                or g(seg_max, k_) < g(seg_min, q_) or g(seg_min, k_) > g(seg_max, q_)):
            return MaskKind.SKIP
        one_doc = (g(seg_min, q_) == g(seg_max, q_) == g(seg_min, k_) == g(seg_max, k_))
        if trailing_ok and one_doc:
            if g(idx_max, k_) <= g(idx_min, q_):
                return MaskKind.FULL
            if r == me and j == i and g(incr, q_):
                return MaskKind.CAUSAL
        return MaskKind.GENERAL

    parts = tuple((p * L, (p + 1) * L) for p in range(P))
    groups = {}
    for i in range(P):
        for r in range(cp):
            kinds = []
            for j in range(P):
                per_row = {row_kind(i, r, j, row) for row in range(b)}
                kinds.append(per_row.pop() if len(per_row) == 1 else MaskKind.GENERAL)
            groups[(i, r)] = _group_parts(kinds, parts)
    local_pad = any(has_pad[me][row][p] for row in range(b) for p in range(P))
    q_valid = seg.ge(0) if local_pad else None
    return CPAttentionPlan(cp, me, (b, s, hq, hkv, d), parts, groups, tokens, segments,
                           q_valid, standard_ok)


def _group_parts(kinds: list[MaskKind], parts) -> tuple[BlockGroup, ...]:
    """FULL parts: contiguous ranges merged into one call; GENERAL parts: one call; CAUSAL:
    one call each."""
    out = []
    full = [parts[j] for j, kd in enumerate(kinds) if kd == MaskKind.FULL]
    if full:
        merged = [list(full[0])]
        for a, e in full[1:]:
            if a == merged[-1][1]:
                merged[-1][1] = e
            else:
                merged.append([a, e])
        out.append(BlockGroup(MaskKind.FULL, tuple(tuple(m) for m in merged)))
    out.extend(BlockGroup(MaskKind.CAUSAL, (parts[j],))
               for j, kd in enumerate(kinds) if kd == MaskKind.CAUSAL)
    general = tuple(parts[j] for j, kd in enumerate(kinds) if kd == MaskKind.GENERAL)
    if general:
        out.append(BlockGroup(MaskKind.GENERAL, general))
    return tuple(out)
