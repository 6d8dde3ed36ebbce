"""Context-parallel causal attention (DESIGN.md §5), forward and hand-written backward.

Every CP rank holds its load-balanced share of the sequence (see
:mod:`megatron_ext.parallel.cp_split`): ``q [b, s_local, hq, d]``, ``k, v [b, s_local, hkv, d]``
and, per token, ``token_index`` (global causal order) and ``segment_ids`` (document; -1 =
padding). Key ``j`` is visible to query ``i`` iff ``token_index[j] <= token_index[i]`` and both
are in the same document and ``j`` is not padding; padded queries return zeros. The result
equals single-process attention over the whole sequence, values and gradients.

K/V exchange strategies:

* ``all_gather``: gather K, V over CP (asynchronously, while the local blocks are computed);
  the backward gathers them again (nothing sequence-long is kept between passes) and
  reduce-scatters dK, dV.
* ``p2p``: a ring of ``cp-1`` send/recv steps, each overlapped with the attention of the block
  in hand; partial outputs merged by log-sum-exp. The backward runs the ring again for K, V while
  dK, dV travel one step behind and reach their owner after ``cp`` steps.

Both skip blocks that are fully masked (:mod:`megatron_ext.layers.cp_plan`). A one-rank group
is plain (causal / document-masked) attention with no collective, so single-process models use
the same function; when its plan is a single unmasked causal block on CUDA it calls the fused
kernel directly (no block loop, no float32 accumulators). With TransformerEngine importable on CUDA, ``backend="auto"`` hands standard
layouts to ``te.pytorch.DotProductAttention`` (:mod:`megatron_ext.layers.te_attention`).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_ext.layers import te_attention
from megatron_ext.layers.attention_math import (MaskKind, accum_dtype, block_backward,
                                                block_forward, default_scale, merge_partial,
                                                uses_flash)
from megatron_ext.layers.cp_comm import all_gather_async, reduce_scatter, ring_exchange_async
from megatron_ext.layers.cp_plan import STRATEGIES, CPAttentionPlan, plan_cp_attention
from megatron_ext.parallel.groups import AxisGroup

log = logging.getLogger(__name__)
BACKENDS = ("auto", "torch", "te")
_reported: set = set()


def _take(x: torch.Tensor, ranges) -> torch.Tensor:
    if len(ranges) == 1:
        a, e = ranges[0]
        return x[:, a:e]
    return torch.cat([x[:, a:e] for a, e in ranges], 1)


def _add_into(buf: torch.Tensor, ranges, grad: torch.Tensor) -> None:
    off = 0
    for a, e in ranges:
        buf[:, a:e] += grad[:, off:off + e - a]
        off += e - a


# ----------------------------------------------------------------------------- block loops
class _Forward:
    """Running (out, lse) per local query part."""

    def __init__(self, q: torch.Tensor, plan: CPAttentionPlan, scale: float):
        self.q, self.plan, self.scale = q, plan, scale
        self.q_parts = [q[:, a:e] for a, e in plan.parts]
        self.acc = [(None, None) for _ in plan.parts]
        self.aux = None

    def attend(self, k_src: torch.Tensor, v_src: torch.Tensor, src: int) -> None:
        for i, qp in enumerate(self.q_parts):
            for grp in self.plan.blocks(i, src):
                mask = (self.plan.mask(i, src, grp.ranges) if grp.kind == MaskKind.GENERAL
                        else None)
                o, lse, aux = block_forward(qp, _take(k_src, grp.ranges),
                                            _take(v_src, grp.ranges), self.scale, grp.kind, mask)
                self.acc[i] = merge_partial(*self.acc[i], o, lse)
                self.aux = self.aux if self.aux is not None else aux

    def result(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        outs, lses = [], []
        b, _, hq, d = self.q.shape
        for (a, e), (o, lse) in zip(self.plan.parts, self.acc):
            if o is None:  # nothing visible for this part (all padding)
                o = self.q.new_zeros(b, e - a, hq, d)
                lse = torch.full((b, hq, e - a), float("-inf"), device=self.q.device,
                                 dtype=torch.float64 if self.q.dtype == torch.float64
                                 else torch.float32)
            outs.append(o.to(self.q.dtype))
            lses.append(lse.contiguous())
        out = torch.cat(outs, 1)
        if self.plan.q_valid is not None:
            out = out * self.plan.q_valid[:, :, None, None].to(out.dtype)
        return out, lses


class _Backward:
    """dq per local query part; dk, dv of a source rank returned per call."""

    def __init__(self, dout, q, out, lses, plan, scale, aux):
        self.plan, self.scale, self.aux = plan, scale, aux
        self.parts = [(q[:, a:e], dout[:, a:e], out[:, a:e], lse)
                      for (a, e), lse in zip(plan.parts, lses)]
        self.dq = torch.zeros(q.shape, dtype=accum_dtype(q.dtype), device=q.device)

    def grads(self, k_src: torch.Tensor, v_src: torch.Tensor, src: int,
              dkv: torch.Tensor) -> None:
        """Add this rank's contribution to ``dkv [2, b, s, hkv, d]`` of source ``src``."""
        for i, (qp, dop, op, lse) in enumerate(self.parts):
            a, e = self.plan.parts[i]
            for grp in self.plan.blocks(i, src):
                mask = (self.plan.mask(i, src, grp.ranges) if grp.kind == MaskKind.GENERAL
                        else None)
                dq, dk, dv = block_backward(dop, qp, _take(k_src, grp.ranges),
                                            _take(v_src, grp.ranges), op, lse, self.scale,
                                            grp.kind, mask, self.aux)
                self.dq[:, a:e] += dq
                _add_into(dkv[0], grp.ranges, dk)
                _add_into(dkv[1], grp.ranges, dv)


# ------------------------------------------------------------------------------ strategies
def _forward_all_gather(q, k, v, plan, group, scale):
    fwd = _Forward(q, plan, scale)
    if group.is_trivial:
        fwd.attend(k, v, plan.cp_rank)
        return fwd
    gathered, pending = all_gather_async(torch.stack([k, v]), group)
    fwd.attend(k, v, plan.cp_rank)  # local blocks while K/V travel
    pending.wait()
    for r in range(plan.cp_size):
        if r != plan.cp_rank:
            fwd.attend(gathered[r, 0], gathered[r, 1], r)
    return fwd


def _backward_all_gather(bwd: _Backward, k, v, plan, group):
    acc = accum_dtype(k.dtype)
    me = plan.cp_rank
    dkv_all = torch.zeros((plan.cp_size, 2) + tuple(k.shape), dtype=acc, device=k.device)
    if group.is_trivial:
        bwd.grads(k, v, me, dkv_all[0])
        return dkv_all[0].to(k.dtype)
    gathered, pending = all_gather_async(torch.stack([k, v]), group)
    bwd.grads(k, v, me, dkv_all[me])
    pending.wait()
    for r in range(plan.cp_size):
        if r != me:
            bwd.grads(gathered[r, 0], gathered[r, 1], r, dkv_all[r])
    del gathered
    return reduce_scatter(dkv_all.to(k.dtype), group)


def _forward_p2p(q, k, v, plan, group, scale):
    fwd = _Forward(q, plan, scale)
    cp, me = plan.cp_size, plan.cp_rank
    bufs = [torch.stack([k, v])]
    if cp > 1:
        bufs.append(torch.empty_like(bufs[0]))
    for t in range(cp):
        cur = bufs[t % 2]
        pending = ring_exchange_async(cur, bufs[(t + 1) % 2], group) if t < cp - 1 else None
        fwd.attend(cur[0], cur[1], (me - t) % cp)
        if pending is not None:
            pending.wait()
    return fwd


def _backward_p2p(bwd: _Backward, k, v, plan, group):
    acc = accum_dtype(k.dtype)
    cp, me = plan.cp_size, plan.cp_rank
    bufs = [torch.stack([k, v])]
    if cp > 1:
        bufs.append(torch.empty_like(bufs[0]))
    dkv_pending, dkv_in = None, None
    for t in range(cp):
        cur = bufs[t % 2]
        kv_pending = ring_exchange_async(cur, bufs[(t + 1) % 2], group) if t < cp - 1 else None
        dkv = torch.zeros((2,) + tuple(k.shape), dtype=acc, device=k.device)
        bwd.grads(cur[0], cur[1], (me - t) % cp, dkv)
        if dkv_pending is not None:  # the other ranks' share for this source, one step behind
            dkv_pending.wait()
            dkv += dkv_in
        if kv_pending is not None:
            kv_pending.wait()
        if cp > 1:
            dkv_in = torch.empty_like(dkv)
            dkv_pending = ring_exchange_async(dkv, dkv_in, group)
        else:
            dkv_in = dkv
    if dkv_pending is not None:
        dkv_pending.wait()
    return dkv_in.to(k.dtype)


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
        dkv = _STRATEGY[ctx.strategy][1](bwd, k, v, plan, ctx.group)
        return bwd.dq.to(q.dtype), dkv[0], dkv[1], None, None, None, None


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


def _is_single_causal_block(q: torch.Tensor, plan: CPAttentionPlan, group: AxisGroup) -> bool:
    if not group.is_trivial or len(plan.parts) != 1 or plan.q_valid is not None:
        return False
    blocks = plan.blocks(0, plan.cp_rank)
    return (len(blocks) == 1 and blocks[0].kind == MaskKind.CAUSAL
            and blocks[0].ranges == ((0, q.shape[1]),) and uses_flash(q, MaskKind.CAUSAL))


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
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r} must be one of {STRATEGIES}")
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
    if _is_single_causal_block(q, plan, cp_group):
        return _SingleBlockAttention.apply(q, k, v, scale)
    return _ContextParallelAttention.apply(q, k, v, plan, cp_group, strategy, scale)
