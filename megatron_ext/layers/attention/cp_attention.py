"""Context-parallel causal attention (design §5), forward and hand-written backward.

Every CP rank holds its load-balanced share of the sequence (see
:mod:`megatron_ext.data.cp_split`): ``q [b, s_local, hq, d]``, ``k, v [b, s_local, hkv, d]``
and, per token, ``token_index`` (global causal order) and ``segment_ids`` (document; -1 =
padding). Key ``j`` is visible to query ``i`` iff ``token_index[j] <= token_index[i]`` and both
are in the same document and ``j`` is not padding; padded queries return zeros. The result
equals single-process attention over the whole sequence, values and gradients.

K/V exchange strategies:

* ``all_gather``: gather K, V over CP (asynchronously, while the local blocks are computed);
  the backward gathers them again (nothing sequence-long is kept between passes) while it
  computes its own blocks, then each peer's, handing each peer its dK, dV (the reduce-scatter,
  pairwise) while the next computes. Both run as pairwise send/recv without a buffer for this rank's own slot
  (:mod:`megatron_ext.communication.raw`), and each peer's buffer is freed once used.
* ``p2p``: a ring of ``cp-1`` send/recv steps, each overlapped with the attention of the block
  in hand; partial outputs merged by log-sum-exp. The backward runs the ring in reverse from the
  K/V the forward ended with (kept: one K/V-sized buffer more than ``all_gather`` keeps, for no
  exposed K/V transfer), while partial dK/dV follow the same way and reach their owner, whose own
  blocks come last and hide the final transfer. K/V travel as they are (no stacked copy).

A source whose keys every local query part sees fully is one kernel call over all local queries
(:func:`source_calls`), and the local diagonal of the standard split is one causal call.

Gradient sums (:class:`_GradSum`) stay in the kernel's dtype where a part gets at most two
contributions on a rank (one rounding, as a float32 sum would give) and use float32 only where
more are summed; partial dK/dV travel between ranks in the kernel's dtype (one rounding per
rank they pass). float32/float64 inputs accumulate in their own dtype, as before.

Both skip blocks that are fully masked (:mod:`megatron_ext.layers.attention.cp_plan`). A one-rank group
is plain (causal / document-masked) attention with no collective, so single-process models use
the same function; when its plan is a single unmasked causal block on CUDA it calls the fused
kernel directly (no block loop, no float32 accumulators). With TransformerEngine importable on CUDA, ``backend="auto"`` hands standard
layouts to ``te.pytorch.DotProductAttention`` (:mod:`megatron_ext.layers.attention.te_attention`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.layers.attention import te_attention
from megatron_ext.layers.attention.attention_math import (MaskKind, accum_dtype, block_backward,
                                                block_forward, default_scale, merge_partial,
                                                uses_flash)
from megatron_ext.communication.raw import (exchange_async, gather_peers_async, log_collective,
                                         ring_exchange_async)
from megatron_ext.communication.choices import CP_STRATEGIES, check_choice
from megatron_ext.layers.attention.cp_plan import BlockGroup, CPAttentionPlan, plan_cp_attention
from megatron_ext.parallel.groups import AxisGroup

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "te")
_reported: set = set()


def _take(x: torch.Tensor, ranges) -> torch.Tensor:
    if len(ranges) == 1:
        a, e = ranges[0]
        return x[:, a:e]
    return torch.cat([x[:, a:e] for a, e in ranges], 1)


def _covered(parts, ranges):
    """``(part index, offset in a tensor of the concatenated ranges)`` of every part inside
    ``ranges`` (ranges are unions of whole parts)."""
    off = 0
    for a, e in ranges:
        for j, (pa, pe) in enumerate(parts):
            if a <= pa and pe <= e:
                yield j, off + pa - a
        off += e - a


class _GradSum:
    """Sum of gradient contributions to one ``[b, s, h, d]`` tensor, each covering whole parts
    (``ranges`` along dim 1). A part whose ``count`` (contributions computed on this rank) is at
    most two is summed in the tensor's own dtype: the first is copied, the second added with one
    rounding, as a float32 sum rounded at the end would be. Parts with more are summed in
    float32 (``accum_dtype``) and rounded once. A partial sum from another rank (the ring's
    dK/dV, a reduce-scatter's share) is added like a contribution but not counted: it starts
    the sum, so a part keeps at most two roundings per rank. A first contribution covering the
    whole tensor is adopted (no copy)."""

    def __init__(self, shape, dtype: torch.dtype, device, parts, counts: list[int]):
        self.shape, self.dtype, self.device, self.parts = tuple(shape), dtype, device, parts
        self.wide_dtype = accum_dtype(dtype)
        self.is_wide = [self.wide_dtype != dtype and c > 2 for c in counts]
        self.wide: dict[int, torch.Tensor] = {}
        self.seen = [0] * len(parts)
        self.out: Optional[torch.Tensor] = None

    def add(self, ranges, grad: torch.Tensor) -> None:
        whole = tuple(tuple(r) for r in ranges) == ((0, self.shape[1]),)
        if (self.out is None and whole and grad.dtype == self.dtype and grad.is_contiguous()
                and tuple(grad.shape) == self.shape):
            self.out = grad
            for j, (pa, pe) in enumerate(self.parts):
                if self.is_wide[j]:
                    self.wide[j] = grad[:, pa:pe].to(self.wide_dtype, copy=True)
                self.seen[j] += 1
            return
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for j, off in _covered(self.parts, ranges):
            pa, pe = self.parts[j]
            g = grad[:, off:off + pe - pa]
            if self.is_wide[j]:
                if j in self.wide:
                    self.wide[j] += g
                elif self.seen[j]:
                    self.wide[j] = self.out[:, pa:pe].to(self.wide_dtype).add_(g)
                else:
                    self.wide[j] = g.to(self.wide_dtype, copy=True)
            elif self.seen[j]:
                self.out[:, pa:pe] += g
            else:
                self.out[:, pa:pe].copy_(g)
            self.seen[j] += 1

    def result(self) -> torch.Tensor:
        if self.out is None:
            self.out = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        for j, w in self.wide.items():
            pa, pe = self.parts[j]
            self.out[:, pa:pe].copy_(w)
        self.wide = {}
        return self.out


def _add_share(sums: tuple[_GradSum, _GradSum], share) -> None:
    """Add another rank's partial dK, dV (each a whole ``[b, s, h, d]`` tensor) into ``sums``."""
    for total, part in zip(sums, share):
        total.add(((0, total.shape[1]),), part)


# ----------------------------------------------------------------------------- block loops
def diagonal_is_one_causal_block(plan: CPAttentionPlan) -> bool:
    """Whether this rank's own blocks (queries against its own K/V) together are exactly one
    causal block over the whole local sequence: part ``i`` sees parts ``< i`` fully and itself
    causally — the load-balanced split of one unpadded document, whose local tokens are in
    global order. Then one fused causal call replaces the ``2P - 1`` part calls and the
    log-sum-exp merges between them (what TE's p2p does on its diagonal step)."""
    if plan.q_valid is not None or len(plan.parts) < 2:
        return False
    me = plan.cp_rank
    for i, (a, e) in enumerate(plan.parts):
        want = {(MaskKind.CAUSAL, ((a, e),))} | ({(MaskKind.FULL, ((0, a),))} if a else set())
        if {(g.kind, g.ranges) for g in plan.blocks(i, me)} != want:
            return False
    return True


@dataclass(frozen=True)
class _Call:
    """One kernel call: local queries ``q_range`` (whole parts) against a source's key
    ``group``; ``part`` is the query part when the call covers one part (``GENERAL`` masks are
    built per part)."""

    q_range: tuple[int, int]
    group: BlockGroup
    part: Optional[int]


def source_calls(plan: CPAttentionPlan, src: int) -> tuple[_Call, ...]:
    """The kernel calls of this rank's queries against source ``src``'s K/V. Part by part as
    the plan groups them, except where one call over the whole local sequence does the same
    work: the diagonal of :func:`diagonal_is_one_causal_block`, and a source every query part
    sees the same keys of, fully (e.g. cp 2's rank 1: both its chunks see all of chunk 0 — one
    call of twice the queries instead of two, as TE's p2p makes it)."""
    s = plan.shape[1]
    if src == plan.cp_rank and diagonal_is_one_causal_block(plan):
        return (_Call((0, s), BlockGroup(MaskKind.CAUSAL, ((0, s),)), None),)
    per_part = [plan.blocks(i, src) for i in range(len(plan.parts))]
    first = per_part[0]
    if (len(per_part) > 1 and len(first) == 1 and first[0].kind == MaskKind.FULL
            and all(p == first for p in per_part)):
        return (_Call((0, s), first[0], None),)
    return tuple(_Call(plan.parts[i], grp, i) for i, groups in enumerate(per_part)
                 for grp in groups)


def _parts_in(plan: CPAttentionPlan, q_range: tuple[int, int]):
    """``(part index, start, end)`` of the parts inside ``q_range``, relative to its start."""
    a0, e0 = q_range
    return [(i, a - a0, e - a0) for i, (a, e) in enumerate(plan.parts) if a0 <= a and e <= e0]


def _all_calls(plan: CPAttentionPlan) -> tuple[list[tuple[_Call, ...]], list[int]]:
    """Every source's calls, and how many calls cover each local query part (the merges a
    part's output takes, the contributions its dq sums)."""
    calls = [source_calls(plan, r) for r in range(plan.cp_size)]
    per_part = [0] * len(plan.parts)
    for source in calls:
        for call in source:
            for i, _, _ in _parts_in(plan, call.q_range):
                per_part[i] += 1
    return calls, per_part


class _Forward:
    """Running (out, lse) per local query part; a part's last merge writes straight into the
    output (no float32 accumulator left to copy)."""

    def __init__(self, q: torch.Tensor, plan: CPAttentionPlan, scale: float):
        self.q, self.plan, self.scale = q, plan, scale
        self.calls, self.left = _all_calls(plan)  # left: calls still to come per part
        self.out = q.new_empty(q.shape)
        self.acc = [(None, None) for _ in plan.parts]
        self.done = [False] * len(plan.parts)
        self.aux = None

    def attend(self, k_src: torch.Tensor, v_src: torch.Tensor, src: int) -> None:
        for call in self.calls[src]:
            a, e = call.q_range
            grp = call.group
            mask = (self.plan.mask(call.part, src, grp.ranges) if grp.kind == MaskKind.GENERAL
                    else None)
            o, lse, aux = block_forward(self.q[:, a:e], _take(k_src, grp.ranges),
                                        _take(v_src, grp.ranges), self.scale, grp.kind, mask)
            for i, pa, pe in _parts_in(self.plan, call.q_range):
                self.left[i] -= 1
                last = self.left[i] == 0 and self.acc[i][0] is not None
                qa, qe = self.plan.parts[i]
                self.acc[i] = merge_partial(*self.acc[i], o[:, pa:pe], lse[..., pa:pe],
                                            into=self.out[:, qa:qe] if last else None)
                self.done[i] = last
            self.aux = self.aux if self.aux is not None else aux
            del o, lse

    def result(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output in q's dtype and each part's log-sum-exp; the running accumulators are
        dropped."""
        lses = []
        b, _, hq, d = self.q.shape
        out = self.out
        for i, ((a, e), (o, lse)) in enumerate(zip(self.plan.parts, self.acc)):
            if o is None:  # nothing visible for this part (all padding)
                out[:, a:e].zero_()
                lse = torch.full((b, hq, e - a), float("-inf"), device=self.q.device,
                                 dtype=accum_dtype(self.q.dtype))
            elif not self.done[i]:
                out[:, a:e].copy_(o)
            lses.append(lse.contiguous())
        self.acc = self.out = None
        if self.plan.q_valid is not None:
            out.mul_(self.plan.q_valid[:, :, None, None].to(out.dtype))
        return out, lses


class _Backward:
    """dq summed over every call; dk, dv of a source rank added into given sums per call."""

    def __init__(self, dout, q, out, lses, plan, scale, aux):
        self.plan, self.scale, self.aux = plan, scale, aux
        self.dout, self.q, self.out = dout, q, out
        self.lse = torch.cat(lses, -1) if len(lses) > 1 else lses[0]
        self.calls, counts = _all_calls(plan)
        self.dq = _GradSum(q.shape, q.dtype, q.device, plan.parts, counts)

    def kv_sums(self, k: torch.Tensor, v: torch.Tensor, src: int, extra: int = 0
                ) -> tuple[_GradSum, _GradSum]:
        """Empty dK, dV sums for source ``src``, counting this rank's calls per key part
        (plus ``extra`` further additions, e.g. partial sums of peers). Each sum has the
        dtype of its own tensor: under autocast K may be float32 (after a float32-weight QK-norm)
        while V is bf16, and the peer's receive buffer for dV is ``empty_like(v)``."""
        counts = [extra] * len(self.plan.parts)
        for call in self.calls[src]:
            for j, _ in _covered(self.plan.parts, call.group.ranges):
                counts[j] += 1
        return tuple(_GradSum(t.shape, t.dtype, t.device, self.plan.parts, counts)
                     for t in (k, v))

    def grads(self, k_src: torch.Tensor, v_src: torch.Tensor, src: int, dk: _GradSum,
              dv: _GradSum) -> None:
        """Add this rank's contributions to dK, dV of source ``src`` (and to dq)."""
        for call in self.calls[src]:
            a, e = call.q_range
            grp = call.group
            mask = (self.plan.mask(call.part, src, grp.ranges) if grp.kind == MaskKind.GENERAL
                    else None)
            gq, gk, gv = block_backward(self.dout[:, a:e], self.q[:, a:e],
                                        _take(k_src, grp.ranges), _take(v_src, grp.ranges),
                                        self.out[:, a:e], self.lse[..., a:e], self.scale,
                                        grp.kind, mask, self.aux)
            self.dq.add((call.q_range,), gq)
            dk.add(grp.ranges, gk)
            dv.add(grp.ranges, gv)
            del gq, gk, gv  # free before the next kernel call


class _KVRing:
    """K/V of source ``me - t`` at step ``t``, passed along the ring. The local K/V are sent as
    they are (no stacked copy); at most two receive buffers exist, reused in turn."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, group: AxisGroup):
        self.group, self.cur, self.own = group, (k, v), True
        self.nxt, self.spare, self.pending = None, None, None

    def start(self) -> None:
        """Send the K/V in hand on and start receiving the next source's."""
        k, v = self.cur
        self.nxt = self.spare or (torch.empty_like(k), torch.empty_like(v))
        self.spare = None
        self.pending = ring_exchange_async(list(self.cur), list(self.nxt), self.group)

    def advance(self) -> None:
        self.pending.wait()
        if not self.own:
            self.spare = self.cur  # its send has completed
        self.cur, self.nxt, self.own, self.pending = self.nxt, None, False, None


# ------------------------------------------------------------------------------ strategies
def _forward_all_gather(q, k, v, plan, group, scale):
    fwd = _Forward(q, plan, scale)
    if group.is_trivial:
        fwd.attend(k, v, plan.cp_rank)
        return fwd, ()
    peers, pending = gather_peers_async([k, v], group)
    fwd.attend(k, v, plan.cp_rank)  # local blocks while K/V travel
    pending.wait()
    for r in sorted(peers):
        kr, vr = peers.pop(r)
        fwd.attend(kr, vr, r)
        del kr, vr  # each peer's K/V freed once used
    return fwd, ()


def _backward_all_gather(bwd: _Backward, k, v, plan, group, kept=()):
    """Own blocks first while K/V are gathered again; then each peer's blocks, whose dK/dV go
    back to that peer (the reduce-scatter, pairwise) while the next peer's blocks compute; the
    shares received for this rank's K/V are added last. Only the last exchange is exposed."""
    cp, me = plan.cp_size, plan.cp_rank
    own = bwd.kv_sums(k, v, me, extra=cp - 1)
    if group.is_trivial:
        bwd.grads(k, v, me, *own)
        return own[0].result(), own[1].result()
    peers, pending = gather_peers_async([k, v], group)
    log_collective("reduce_scatter", group,
                   cp * (k.numel() * k.element_size() + v.numel() * v.element_size()))
    bwd.grads(k, v, me, *own)  # while K/V travel
    pending.wait()
    in_flight = None
    for t in range(1, cp):
        src, frm = (me - t) % cp, (me + t) % cp
        ks, vs = peers.pop(src)
        dks, dvs = bwd.kv_sums(k, v, src)
        bwd.grads(ks, vs, src, dks, dvs)
        del ks, vs  # each peer's K/V freed once used
        send = [dks.result(), dvs.result()]
        del dks, dvs
        if in_flight is not None:
            in_flight[0].wait()
            _add_share(own, in_flight[1])
        recv = [torch.empty_like(k), torch.empty_like(v)]
        in_flight = (exchange_async(send, recv, src, frm, group, log_as=None, tag=t), recv)
        del send, recv
    in_flight[0].wait()
    _add_share(own, in_flight[1])
    return own[0].result(), own[1].result()


def _forward_p2p(q, k, v, plan, group, scale):
    """Ring of ``cp - 1`` K/V steps, each overlapped with the attention of the block in hand.
    Returns the K/V held at the end (source ``me + 1``) for the backward to start from."""
    fwd = _Forward(q, plan, scale)
    cp, me = plan.cp_size, plan.cp_rank
    ring = _KVRing(k, v, group)
    for t in range(cp):
        if t < cp - 1:
            ring.start()
        fwd.attend(ring.cur[0], ring.cur[1], (me - t) % cp)
        if t < cp - 1:
            ring.advance()
    return fwd, (ring.cur if cp > 1 else ())


def _backward_p2p(bwd: _Backward, k, v, plan, group, kept=()):
    """The forward's ring run backwards, starting from the K/V the forward ended with (kept for
    that: no K/V travel before the first step). Step ``u`` adds this rank's share of the
    gradients of source ``me + 1 + u``; the next source's K/V come from rank ``me + 1`` while it
    computes, and the last step is this rank's own K/V. A source's partial dK/dV sum travels
    the same way (from rank ``src - 1`` down to the owner), each rank adding the partial it
    receives *after* computing its own share, so every transfer overlaps a compute step — the
    owner's own blocks come last and hide the final one. cp 2 moves no K/V in backward and one
    dK/dV (TE's p2p re-sends K/V and waits for the last dK/dV exposed)."""
    cp, me = plan.cp_size, plan.cp_rank
    own = bwd.kv_sums(k, v, me, extra=1 if cp > 1 else 0)
    if cp == 1:
        bwd.grads(k, v, me, *own)
        return own[0].result(), own[1].result()
    up, down = (me + 1) % cp, (me - 1) % cp
    cur, kv_next, dkv_in, pending = tuple(kept), None, None, None
    for u in range(cp):
        src = (me + 1 + u) % cp
        if u < cp - 2:  # K/V of the source after next's: from rank me + 1, ours on to me - 1
            nxt = (torch.empty_like(k), torch.empty_like(v))
            kv_next = (exchange_async(list(cur), list(nxt), down, up, group, tag=1), nxt)
        sums = own if src == me else bwd.kv_sums(k, v, src, extra=1 if u > 0 else 0)
        bwd.grads(*((k, v) if src == me else cur), src, *sums)
        if pending is not None:  # the partial of this source from rank me + 1
            pending.wait()
            _add_share(sums, dkv_in)
        if src == me:
            return own[0].result(), own[1].result()
        send = [sm.result() for sm in sums]
        del sums
        dkv_in = [torch.empty_like(k), torch.empty_like(v)]
        pending = exchange_async(send, dkv_in, down, up, group, tag=2)  # apart from K/V
        del send
        if kv_next is not None:
            kv_next[0].wait()
            cur, kv_next = kv_next[1], None
    raise AssertionError("unreachable: the last step is this rank's own K/V")


_STRATEGY = {"all_gather": (_forward_all_gather, _backward_all_gather),
             "p2p": (_forward_p2p, _backward_p2p)}


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, strategy, scale):
        fwd, kept = _STRATEGY[strategy][0](q, k, v, plan, group, scale)
        out, lses = fwd.result()
        ctx.n_kept = len(kept)
        ctx.save_for_backward(q, k, v, out, *kept, *lses)
        ctx.plan, ctx.group, ctx.strategy = plan, group, strategy
        ctx.scale, ctx.aux = scale, fwd.aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *rest = ctx.saved_tensors
        kept, lses = rest[:ctx.n_kept], rest[ctx.n_kept:]
        plan = ctx.plan
        dout = dout.to(q.dtype)
        if plan.q_valid is not None:
            dout = dout * plan.q_valid[:, :, None, None].to(dout.dtype)
        bwd = _Backward(dout.contiguous(), q, out, lses, plan, ctx.scale, ctx.aux)
        del lses, out, rest
        dk, dv = _STRATEGY[ctx.strategy][1](bwd, k, v, plan, ctx.group, kept)
        del kept
        return bwd.dq.result(), dk, dv, None, None, None, None


class _SingleBlockAttention(torch.autograd.Function):
    """A one-rank call whose plan is one unmasked causal block (the usual 1-GPU / attn_cp 1
    case) on the fused CUDA kernel: the kernel's own output and gradients, without the block
    loop's float32 accumulators (a merge of one block, and dq/dk/dv buffers, each a full pass
    over the activations)."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        out, lse, aux = block_forward(q, k, v, scale, MaskKind.CAUSAL)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.aux = scale, aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_backward(dout.to(q.dtype).contiguous(), q, k, v, out, lse, ctx.scale,
                                    MaskKind.CAUSAL, None, ctx.aux)
        return dq, dk, dv, None


def _one_causal_block(q: torch.Tensor, plan: CPAttentionPlan, group: AxisGroup) -> bool:
    """A one-rank plan that is one unmasked causal block over the whole local sequence."""
    if not group.is_trivial or len(plan.parts) != 1 or plan.q_valid is not None:
        return False
    blocks = plan.blocks(0, plan.cp_rank)
    return (len(blocks) == 1 and blocks[0].kind == MaskKind.CAUSAL
            and blocks[0].ranges == ((0, q.shape[1]),))


def _cpu_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """One causal block on the CPU through torch's SDPA (what ``transformers`` runs there): its
    fused CPU kernel is ~1.5x faster than the block loop, whose chunked scores allocate and
    stream far more memory; autograd gives the gradients."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True, scale=scale,
        enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


# ---------------------------------------------------------------------------------- public
def select_backend(q: torch.Tensor, plan: CPAttentionPlan, backend: str = "auto") -> str:
    """``"te"`` or ``"torch"``. ``auto`` takes TransformerEngine when it imports, ``q`` is a
    CUDA fp16/bf16 tensor and the layout is the standard one-document zigzag split (TE's own);
    everything else (packed documents, padding, CPU, float32/64) runs the torch backend."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    te_ok, why = te_attention.te_usable(q, plan)
    if backend == "te" and not te_ok:
        raise ValueError(f"backend='te' is not usable here: {why}")
    chosen = "te" if backend == "te" or (backend == "auto" and te_ok) else "torch"
    key = (chosen, why)
    if key not in _reported:
        _reported.add(key)
        log.info("context-parallel attention backend: %s%s", chosen,
                 "" if chosen == "te" else f" ({why})")
    return chosen


def backend_name(q: Optional[torch.Tensor] = None) -> str:
    """The backend ``backend="auto"`` picks for a standard layout of tensors like ``q``
    (default: a bf16 tensor on the current CUDA device if any, else CPU)."""
    if q is None:
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        q = torch.empty(0, device=dev, dtype=torch.bfloat16)
    return "te" if te_attention.te_usable(q, None)[0] else "torch"


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cp_group: AxisGroup, *, token_index: Optional[torch.Tensor] = None,
                               segment_ids: Optional[torch.Tensor] = None,
                               strategy: str = "all_gather",
                               softmax_scale: Optional[float] = None,
                               plan: Optional[CPAttentionPlan] = None,
                               backend: str = "auto") -> torch.Tensor:
    """Causal (document-masked) attention over the CP group; returns ``[b, s_local, hq, d]``.

    ``token_index`` ``[b, s_local]`` (or ``[s_local]``): global causal order of the local tokens
    (optional on a one-rank group: ``0..s-1``). ``segment_ids``: document per token, -1 =
    padding (never attended; padded queries give zeros); None = one document. ``plan``: a
    :func:`plan_cp_attention` result for these shapes and indices, to reuse across layers
    (otherwise one is built: two small all-gathers). Collective over ``cp_group``."""
    check_choice("strategy", strategy, CP_STRATEGIES)
    if plan is None:
        plan = plan_cp_attention(q, k, v, cp_group, token_index=token_index,
                                 segment_ids=segment_ids, strategy=strategy)
    else:
        plan.check_matches(q, k)
    scale = softmax_scale if softmax_scale is not None else default_scale(q.shape[-1])
    if select_backend(q, plan, backend) == "te":
        return te_attention.te_context_parallel_attention(q, k, v, cp_group, strategy=strategy,
                                                          softmax_scale=scale)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if _one_causal_block(q, plan, cp_group):
        if uses_flash(q, MaskKind.CAUSAL):
            return _SingleBlockAttention.apply(q, k, v, scale)
        if q.device.type == "cpu":
            return _cpu_sdpa(q, k, v, scale)
    return _ContextParallelAttention.apply(q, k, v, plan, cp_group, strategy, scale)
