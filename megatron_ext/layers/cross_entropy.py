"""Cross-entropy over vocab-parallel logits, without gathering the ``[tokens, V]`` logits.

Forward (float32, or float64 for float64 logits): every rank reduces its shard to a per-token
log-sum-exp; the shards' LSEs are all-gathered (``[p, tokens]``, tiny) and merged, and the target
logit is summed from the one rank whose range holds the label. Backward needs no collective: the
per-token loss is identical on every rank, so each rank's logit gradient is
``(softmax - onehot) · dloss`` on its own columns.

On CUDA with fp16/bf16 logits and Triton present, the per-row log-sum-exp and the gradient are one
Triton kernel each, reading the logits in their own dtype (float32 arithmetic): the torch path
writes a float32 copy of the ``[tokens, V/p]`` logits, a float32 softmax kept for backward and
passes over both, ~5x the bytes (it computes the softmax in place in that copy: one float32
buffer of the logits' shape, not three). The softmax is then recomputed in backward from the
saved logits and log-sum-exp.

Without a gradient to compute (evaluation, inference) no softmax is kept (nor the float32 copy it
is computed in), and on one rank the loss is ``F.cross_entropy`` itself, over row chunks: its
fused log-softmax reads the logits once, where ``torch.logsumexp`` on the CPU is max, subtract,
exp and sum passes over a ``[tokens, V]`` temporary (~2x slower at SmolLM2's 49152 columns).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_ext.communication.collectives import all_gather, all_reduce
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.kernels.triton_loader import kernel_module


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Integer labels in ``[0, vocab_size)`` or ``ignore_index`` (one host sync), else ValueError."""
    if labels.is_floating_point():
        raise ValueError(f"labels must be integers, got {labels.dtype}")
    if labels.numel() == 0:
        return
    valid = labels != ignore_index  # one host sync for the whole check
    lo, hi = torch.stack([torch.where(valid, labels, 0).min(),
                          torch.where(valid, labels, 0).max()]).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"label {lo if lo < 0 else hi} out of range for vocab_size={vocab_size} "
                         f"(ignore_index={ignore_index})")


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels (:mod:`megatron_ext.kernels.cross_entropy`); ``None`` without Triton."""
    k = kernel_module("cross_entropy")
    return None if k is None else (k.row_lse, k.softmax_grad)


_BLOCK = 4096


def merge_shards(local_lse: torch.Tensor, target: torch.Tensor, group: AxisGroup
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``(log-sum-exp, label logit)`` over the whole vocabulary from each rank's shard:
    the shards' log-sum-exps all-gathered (``[p, tokens]``, tiny) and merged, the label logit
    summed (only the rank holding the label has it; the others pass 0)."""
    lse = torch.logsumexp(all_gather(local_lse.unsqueeze(0), group, dim=0), dim=0)
    return lse, all_reduce(target, group)


def triton_applies(logits: torch.Tensor) -> bool:
    """Whether the Triton kernels take these ``[rows, cols]`` logits (CUDA fp16/bf16)."""
    return (logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16)
            and logits.numel() > 0 and _kernels() is not None)


def triton_row_lse(logits: torch.Tensor) -> torch.Tensor:
    """Per-row float32 log-sum-exp of contiguous ``[rows, cols]`` logits (one Triton pass)."""
    lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    _kernels()[0][(logits.shape[0],)](logits, lse, logits.shape[1], BLOCK=_BLOCK, num_warps=8)
    return lse


def triton_logit_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                      scale: torch.Tensor) -> torch.Tensor:
    """``(softmax(logits) - onehot(target)) · scale`` per row in the logits' dtype (``target``
    -1: the label is not among these columns), recomputing the softmax from ``lse``."""
    grad = torch.empty_like(logits)
    _kernels()[1][(logits.shape[0],)](logits, lse, target, scale, grad, logits.shape[1],
                                      BLOCK=_BLOCK, num_warps=8)
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, group: AxisGroup,
                ignore_index: int, for_backward: bool = True) -> torch.Tensor:
        shard = logits.shape[-1]
        start = group.rank * shard
        fused = triton_applies(logits)
        if fused:
            logits = logits.contiguous()
            lf = logits
            local_lse = triton_row_lse(logits)
        else:
            # a private copy: the softmax is computed in it in place (one [tokens, V/p] float32
            # buffer, as Megatron's cross-entropy keeps), never in the caller's logits; none
            # without backward (no softmax then)
            lf = logits.to(torch.promote_types(logits.dtype, torch.float32), copy=for_backward)
            local_lse = torch.logsumexp(lf, dim=-1)                               # [N]
        local_label = labels - start
        mine = (local_label >= 0) & (local_label < shard) & (labels != ignore_index)
        idx = torch.where(mine, local_label, torch.zeros_like(local_label))
        target = torch.gather(lf, -1, idx.unsqueeze(-1)).squeeze(-1).to(local_lse.dtype)
        target = torch.where(mine, target, torch.zeros_like(target))  # -inf padding x 0 is nan
        lse, target = merge_shards(local_lse, target, group)
        keep = labels != ignore_index
        loss = (lse - target) * keep
        ctx.fused, ctx.dtype = fused, logits.dtype
        if not for_backward:  # no gradient wanted: skip the [tokens, V/p] softmax
            return loss
        if fused:  # the softmax is recomputed in backward from the logits (no float32 copy)
            ctx.save_for_backward(logits, lse, torch.where(mine, local_label, -1), keep)
        else:
            softmax = lf.sub_(lse.unsqueeze(-1)).exp_()
            ctx.save_for_backward(softmax, idx, mine, keep)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if getattr(ctx, "consumed", False):
            raise RuntimeError("vocab_parallel_cross_entropy: backward ran twice through the same "
                               "graph; its saved softmax is reused in place (memory), so "
                               "retain_graph double backward is not supported")
        ctx.consumed = True
        if ctx.fused:
            logits, lse, target, keep = ctx.saved_tensors
            scale = (grad_loss.to(torch.float32) * keep).contiguous()
            return triton_logit_grad(logits, lse, target, scale), None, None, None, None
        softmax, idx, mine, keep = ctx.saved_tensors
        grad = softmax  # reused in place: [tokens, V/p] float32 is the largest buffer here
        grad.scatter_add_(-1, idx.unsqueeze(-1), -mine.to(grad.dtype).unsqueeze(-1))
        grad.mul_((grad_loss.to(grad.dtype) * keep).unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


_EVAL_CHUNK = 1 << 22  # logits per F.cross_entropy call without grad (16 MB in float32)


def _one_rank_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Evaluation on one rank: ``F.cross_entropy`` (log-softmax and pick, one fused pass over the
    logits, as transformers runs it) instead of log-sum-exp's max / subtract / exp / sum passes,
    over row chunks so its log-softmax temporary is reused memory, not a fresh ``[tokens, V]``
    buffer (rows are independent: the same values as one call)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    rows = max(1, _EVAL_CHUNK // max(1, logits.shape[-1]))
    parts = [F.cross_entropy(x, y, reduction="none", ignore_index=ignore_index)
             for x, y in zip(logits.split(rows), labels.split(rows))]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def vocab_parallel_cross_entropy(logits_shard: torch.Tensor, labels: torch.Tensor,
                                 tp_group: AxisGroup, ignore_index: int = -100,
                                 vocab_size: Optional[int] = None) -> torch.Tensor:
    """Per-token loss (float32 or wider, shape ``labels.shape``; 0 where
    ``labels == ignore_index``) of logits split over ``tp_group`` along the last dim (rank ``r``
    holds columns ``[r·Vp/p, (r+1)·Vp/p)``, as :class:`VocabParallelLMHead` yields; padding
    columns ``-inf`` take no part). Equals ``F.cross_entropy(full_logits, labels,
    reduction="none", ignore_index=...)`` in value and gradient. Labels outside ``[0, V)``
    (``vocab_size``, default all columns; other than ``ignore_index``) raise before any
    collective.
    """
    if logits_shard.shape[:-1] != labels.shape:
        raise ValueError(f"logits shard {tuple(logits_shard.shape)} does not match labels "
                         f"{tuple(labels.shape)} (need logits [..., V/p] and labels [...])")
    if vocab_size is None:
        vocab_size = logits_shard.shape[-1] * tp_group.size
    check_labels(labels, vocab_size, ignore_index)
    flat, flat_labels = logits_shard.reshape(-1, logits_shard.shape[-1]), labels.reshape(-1)
    if torch.is_grad_enabled() and flat.requires_grad:
        loss = _VocabParallelCrossEntropy.apply(flat, flat_labels, tp_group, ignore_index)
    elif tp_group.is_trivial and not triton_applies(flat):
        loss = _one_rank_loss(flat, flat_labels, ignore_index)
    else:
        loss = _VocabParallelCrossEntropy.apply(flat, flat_labels, tp_group, ignore_index, False)
    return loss.reshape(labels.shape)
