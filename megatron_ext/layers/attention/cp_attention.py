"""Context-parallel causal attention (design §5), forward and hand-written backward.

Every CP rank holds its load-balanced share of the sequence (see
:mod:`megatron_ext.data.cp_split`): ``q [b, s_local, hq, d]``, ``k, v [b, s_local, hkv, d]``
and, per token, ``token_index`` (global causal order) and ``segment_ids`` (document; -1 =
padding). Key ``j`` is visible to query ``i`` iff ``token_index[j] <= token_index[i]`` and both
are in the same document and ``j`` is not padding; padded queries return zeros. The result
equals single-process attention over the whole sequence, values and gradients.

K/V exchange strategies:

* ``all_gather``: gather K, V over CP (asynchronously, while the local blocks are computed);
  the backward gathers them again (nothing sequence-long is kept between passes), computes the
  peers' blocks first and hands each peer its dK, dV (the reduce-scatter, pairwise), then adds
  its own blocks. Both run as pairwise send/recv without a buffer for this rank's own slot
  (:mod:`megatron_ext.communication.raw`), and each peer's buffer is freed once used.
* ``p2p``: a ring of ``cp-1`` send/recv steps, each overlapped with the attention of the block
  in hand; partial outputs merged by log-sum-exp. The backward runs the ring again for K, V while
  dK, dV travel one step behind and reach their owner after ``cp`` steps. K/V travel as they
  are (no stacked copy) through at most two receive buffers.

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
from typing import Optional

import torch

from megatron_ext.layers.attention import te_attention
from megatron_ext.layers.attention.attention_math import (MaskKind, accum_dtype, block_backward,
                                                block_forward, default_scale, merge_partial,
                                                uses_flash)
from megatron_ext.communication.raw import (exchange_async, gather_peers_async, log_collective,
                                         ring_exchange_async)
from megatron_ext.communication.choices import CP_STRATEGIES, check_choice
from megatron_ext.layers.attention.cp_plan import CPAttentionPlan, plan_cp_attention
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


class _Forward:
    """Running (out, lse) per local query part."""

    def __init__(self, q: torch.Tensor, plan: CPAttentionPlan, scale: float):
        self.q, self.plan, self.scale = q, plan, scale
        self.q_parts = [q[:, a:e] for a, e in plan.parts]
        self.acc = [(None, None) for _ in plan.parts]
        self.aux = None
        self.one_diagonal = diagonal_is_one_causal_block(plan)

    def attend(self, k_src: torch.Tensor, v_src: torch.Tensor, src: int) -> None:
        if src == self.plan.cp_rank and self.one_diagonal:
            o, lse, aux = block_forward(self.q, k_src, v_src, self.scale, MaskKind.CAUSAL)
            for i, (a, e) in enumerate(self.plan.parts):
                self.acc[i] = merge_partial(*self.acc[i], o[:, a:e], lse[..., a:e])
            self.aux = self.aux if self.aux is not None else aux
            return
        for i, qp in enumerate(self.q_parts):
            for grp in self.plan.blocks(i, src):
                mask = (self.plan.mask(i, src, grp.ranges) if grp.kind == MaskKind.GENERAL
                        else None)
                o, lse, aux = block_forward(qp, _take(k_src, grp.ranges),
                                            _take(v_src, grp.ranges), self.scale, grp.kind, mask)
                self.acc[i] = merge_partial(*self.acc[i], o, lse)
                self.aux = self.aux if self.aux is not None else aux
                del o, lse

    def result(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The output in q's dtype (written part by part into one tensor) and each part's
        log-sum-exp; the running accumulators are dropped."""
        lses = []
        b, _, hq, d = self.q.shape
        out = self.q.new_empty(self.q.shape)
        for (a, e), (o, lse) in zip(self.plan.parts, self.acc):
            if o is None:  # nothing visible for this part (all padding)
                out[:, a:e].zero_()
                lse = torch.full((b, hq, e - a), float("-inf"), device=self.q.device,
                                 dtype=accum_dtype(self.q.dtype))
            else:
                out[:, a:e].copy_(o)
            lses.append(lse.contiguous())
        self.acc = None
        if self.plan.q_valid is not None:
            out.mul_(self.plan.q_valid[:, :, None, None].to(out.dtype))
        return out, lses


class _Backward:
    """dq summed over every block; dk, dv of a source rank added into given sums per call."""

    def __init__(self, dout, q, out, lses, plan, scale, aux):
        self.plan, self.scale, self.aux = plan, scale, aux
        self.parts = [(q[:, a:e], dout[:, a:e], out[:, a:e], lse)
                      for (a, e), lse in zip(plan.parts, lses)]
        self.one_diagonal = diagonal_is_one_causal_block(plan)
        self.whole = (dout, q, out, torch.cat(lses, -1)) if self.one_diagonal else None
        counts = [sum(self._calls(i, r) for r in range(plan.cp_size))
                  for i in range(len(plan.parts))]
        self.dq = _GradSum(q.shape, q.dtype, q.device, plan.parts, counts)

    def _calls(self, q_part: int, src: int) -> int:
        """Kernel calls adding to query part ``q_part``'s gradient for source ``src``."""
        if src == self.plan.cp_rank and self.one_diagonal:
            return 1
        return len(self.plan.blocks(q_part, src))

    def kv_sums(self, k: torch.Tensor, v: torch.Tensor, src: int, extra: int = 0
                ) -> tuple[_GradSum, _GradSum]:
        """Empty dK, dV sums for source ``src``, counting this rank's blocks per key part
        (plus ``extra`` further additions, e.g. partial sums of more peers). Each sum has the
        dtype of its own tensor: under autocast K may be float32 (after a float32-weight QK-norm)
        while V is bf16, and the peer's receive buffer for dV is ``empty_like(v)``."""
        counts = [extra] * len(self.plan.parts)
        if src == self.plan.cp_rank and self.one_diagonal:
            counts = [c + 1 for c in counts]
        else:
            for i in range(len(self.plan.parts)):
                for grp in self.plan.blocks(i, src):
                    for j, _ in _covered(self.plan.parts, grp.ranges):
                        counts[j] += 1
        return tuple(_GradSum(t.shape, t.dtype, t.device, self.plan.parts, counts)
                     for t in (k, v))

    def grads(self, k_src: torch.Tensor, v_src: torch.Tensor, src: int, dk: _GradSum,
              dv: _GradSum) -> None:
        """Add this rank's contributions to dK, dV of source ``src`` (and to dq)."""
        if src == self.plan.cp_rank and self.one_diagonal:
            dout, q, out, lse = self.whole
            whole = ((0, q.shape[1]),)
            gq, gk, gv = block_backward(dout, q, k_src, v_src, out, lse, self.scale,
                                        MaskKind.CAUSAL, None, self.aux)
            self.dq.add(whole, gq)
            dk.add(whole, gk)
            dv.add(whole, gv)
            return
        for i, (qp, dop, op, lse) in enumerate(self.parts):
            for grp in self.plan.blocks(i, src):
                mask = (self.plan.mask(i, src, grp.ranges) if grp.kind == MaskKind.GENERAL
                        else None)
                gq, gk, gv = block_backward(dop, qp, _take(k_src, grp.ranges),
                                            _take(v_src, grp.ranges), op, lse, self.scale,
                                            grp.kind, mask, self.aux)
                self.dq.add((self.plan.parts[i],), gq)
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
        return fwd
    peers, pending = gather_peers_async([k, v], group)
    fwd.attend(k, v, plan.cp_rank)  # local blocks while K/V travel
    pending.wait()
    for r in sorted(peers):
        kr, vr = peers.pop(r)
        fwd.attend(kr, vr, r)
        del kr, vr  # each peer's K/V freed once used
    return fwd


def _backward_all_gather(bwd: _Backward, k, v, plan, group):
    """Remote sources first: gather K/V again, compute each peer's dK/dV, exchange it with
    that peer (the reduce-scatter, pairwise) and free it, so that the received K/V, the outgoing
    dK/dV and this rank's own dK/dV are never all held at once; own blocks last."""
    cp, me = plan.cp_size, plan.cp_rank
    if group.is_trivial:
        dk, dv = bwd.kv_sums(k, v, me)
        bwd.grads(k, v, me, dk, dv)
        return dk.result(), dv.result()
    peers, pending = gather_peers_async([k, v], group)
    log_collective("reduce_scatter", group,
                   cp * (k.numel() * k.element_size() + v.numel() * v.element_size()))
    own = bwd.kv_sums(k, v, me, extra=cp - 2)  # the first peer's share starts the sum
    pending.wait()
    whole = ((0, k.shape[1]),)
    for t in range(1, cp):
        src, frm = (me - t) % cp, (me + t) % cp
        ks, vs = peers.pop(src)
        dks, dvs = bwd.kv_sums(k, v, src)
        bwd.grads(ks, vs, src, dks, dvs)
        del ks, vs
        send = [dks.result(), dvs.result()]
        del dks, dvs
        recv = [torch.empty_like(k), torch.empty_like(v)]
        exchange_async(send, recv, src, frm, group, log_as=None).wait()
        del send
        own[0].add(whole, recv[0])
        own[1].add(whole, recv[1])
        del recv
    bwd.grads(k, v, me, *own)
    return own[0].result(), own[1].result()


def _forward_p2p(q, k, v, plan, group, scale):
    fwd = _Forward(q, plan, scale)
    cp, me = plan.cp_size, plan.cp_rank
    ring = _KVRing(k, v, group)
    for t in range(cp):
        if t < cp - 1:
            ring.start()
        fwd.attend(ring.cur[0], ring.cur[1], (me - t) % cp)
        if t < cp - 1:
            ring.advance()
    return fwd


def _backward_p2p(bwd: _Backward, k, v, plan, group):
    """Ring of cp steps: K/V of source ``me - t`` arrive while step ``t - 1`` computes; the
    partial dK/dV of that source arrive from the previous rank (in the kernel's dtype), start
    this rank's sum for it and travel on; after ``cp`` steps a rank holds its own dK/dV. The
    previous step's dK/dV exchange is waited for before computing, so only one partial dK/dV
    per direction is held."""
    cp, me = plan.cp_size, plan.cp_rank
    ring = _KVRing(k, v, group)
    whole = ((0, k.shape[1]),)
    dkv_in, pending = None, None
    for t in range(cp):
        src = (me - t) % cp
        if t < cp - 1:
            ring.start()
        sums = bwd.kv_sums(k, v, src)
        if pending is not None:
            pending.wait()
            sums[0].add(whole, dkv_in[0])
            sums[1].add(whole, dkv_in[1])
            dkv_in = None
        bwd.grads(ring.cur[0], ring.cur[1], src, *sums)
        if t < cp - 1:
            ring.advance()
        else:
            ring = None  # the last source's K/V are no longer needed
        send = [sm.result() for sm in sums]
        del sums
        if cp == 1:
            return send[0], send[1]
        dkv_in = [torch.empty_like(k), torch.empty_like(v)]
        pending = ring_exchange_async(send, dkv_in, group, tag=2)  # apart from K/V
        del send
    pending.wait()
    return dkv_in[0], dkv_in[1]


_STRATEGY = {"all_gather": (_forward_all_gather, _backward_all_gather),
             "p2p": (_forward_p2p, _backward_p2p)}


class _ContextParallelAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, group, strategy, scale):
        fwd = _STRATEGY[strategy][0](q, k, v, plan, group, scale)
        out, lses = fwd.result()
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.plan, ctx.group, ctx.strategy = plan, group, strategy
        ctx.scale, ctx.aux = scale, fwd.aux
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, *lses = ctx.saved_tensors
        plan = ctx.plan
        dout = dout.to(q.dtype)
        if plan.q_valid is not None:
            dout = dout * plan.q_valid[:, :, None, None].to(dout.dtype)
        bwd = _Backward(dout.contiguous(), q, out, lses, plan, ctx.scale, ctx.aux)
        del lses, out
        dk, dv = _STRATEGY[ctx.strategy][1](bwd, k, v, plan, ctx.group)
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
