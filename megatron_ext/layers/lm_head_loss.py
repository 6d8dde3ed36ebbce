"""LM head and cross-entropy in one autograd function that never keeps the logits.

Why: in training the ``[tokens, V/p]`` logits are the largest activation of a step (Qwen3's
151,936 columns: 1.16 GiB in bf16 for one 4096-token micro-batch), and the loss's backward makes
a second tensor of that shape for their gradient — both alive at the start of backward, which is
when a step's memory peaks (every layer's activations are saved then). Here the forward walks the
vocabulary shard in column chunks (logits of one chunk at a time: the running per-token
log-sum-exp and the label's logit) and keeps only the hidden states; the backward recomputes
each chunk's logits, turns them into their gradient, and writes that chunk's rows of the weight
gradient (``dW[c] = dlogits_c^T · h``: every row computed once, no accumulation) and adds its
share of the input gradient (float32). The cost is the LM-head GEMM once more in backward
(about 2% of the 12-layer Qwen3-30B-A3B step); Megatron's and Liger's fused linear
cross-entropy make the same trade.

Values are those of ``vocab_parallel_cross_entropy(lm_head(h), labels)``: the same logits (one
GEMM per chunk of weight rows), the same float32 log-sum-exp and softmax gradient (the Triton
kernels of :mod:`megatron_ext.layers.cross_entropy` on CUDA fp16/bf16, torch ops elsewhere).
Vocabulary-parallel over ``tp_group``: one all-gather of the per-token log-sum-exps and one
all-reduce of the label logits, as the unfused loss.
"""
from __future__ import annotations

import torch

from megatron_ext.layers.cross_entropy import (merge_shards, triton_applies, triton_logit_grad,
                                               triton_row_lse)
from megatron_ext.parallel.groups import AxisGroup

#: Logit bytes computed at once (one chunk of columns for all tokens).
CHUNK_BYTES = 256 << 20


def _chunks(tokens: int, cols: int, itemsize: int, chunk_bytes: int) -> list[tuple[int, int]]:
    """Column ranges of at most ``chunk_bytes`` of logits (at least 128 columns); none for a
    shard without real rows (a TP rank holding only vocabulary padding)."""
    step = max(128, chunk_bytes // max(1, tokens * itemsize))
    return [(a, min(cols, a + step)) for a in range(0, cols, step)]


def _row_lse(logits: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    if triton_applies(logits):
        return triton_row_lse(logits)
    return torch.logsumexp(logits.to(acc), dim=-1)


def _logit_grad(logits: torch.Tensor, lse: torch.Tensor, target: torch.Tensor,
                scale: torch.Tensor) -> torch.Tensor:
    """``(softmax - onehot(target)) · scale`` in the logits' dtype (``target`` -1: no label
    among these columns)."""
    if triton_applies(logits):
        return triton_logit_grad(logits, lse, target, scale)
    p = torch.exp(logits.to(lse.dtype) - lse.unsqueeze(-1))
    hit = target >= 0
    p[hit, target[hit]] -= 1
    return (p * scale.to(p.dtype).unsqueeze(-1)).to(logits.dtype)


class _LMHeadCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, group: AxisGroup, start: int, real: int,
                ignore_index: int, chunk_bytes: int):
        acc = torch.promote_types(hidden.dtype, torch.float32)
        n = hidden.shape[0]
        local = labels - start
        keep = labels != ignore_index
        mine = (local >= 0) & (local < real) & keep
        local_lse = torch.full((n,), float("-inf"), dtype=acc, device=hidden.device)
        target = torch.zeros(n, dtype=acc, device=hidden.device)
        spans = _chunks(n, real, hidden.element_size(), chunk_bytes)
        for a, e in spans:
            logits = hidden @ weight[a:e].t()
            local_lse = torch.logaddexp(local_lse, _row_lse(logits, acc).to(acc))
            here = mine & (local >= a) & (local < e)
            picked = logits.gather(1, torch.where(here, local - a, 0).unsqueeze(1)).squeeze(1)
            target = torch.where(here, picked.to(acc), target)
            del logits
        lse, target = merge_shards(local_lse, target, group)
        ctx.save_for_backward(hidden, weight, lse, torch.where(mine, local, -1), keep)
        ctx.spans = spans
        return (lse - target) * keep

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, lse, local, keep = ctx.saved_tensors
        acc = lse.dtype
        scale = (grad_loss.to(acc) * keep).contiguous()
        grad_hidden = torch.zeros(hidden.shape, dtype=acc, device=hidden.device)
        grad_weight = torch.zeros_like(weight)  # padding rows (past ``real``) stay 0
        for a, e in ctx.spans:
            logits = hidden @ weight[a:e].t()
            here = torch.where((local >= a) & (local < e), local - a, -1)
            g = _logit_grad(logits, lse, here, scale)
            del logits
            grad_hidden += (g @ weight[a:e]).to(acc)
            torch.mm(g.t(), hidden, out=grad_weight[a:e])
            del g
        return grad_hidden.to(hidden.dtype), grad_weight, None, None, None, None, None, None


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          tp_group: AxisGroup, *, start: int, real_rows: int,
                          ignore_index: int = -100, chunk_bytes: int = CHUNK_BYTES
                          ) -> torch.Tensor:
    """Per-token loss of ``logits = hidden @ weight^T`` (``hidden [N, H]``, this rank's
    vocabulary rows ``weight [Vp/p, H]`` = global rows ``start ...``, of which the first
    ``real_rows`` are real words and the rest padding) against ``labels [N]`` — the logits are
    never kept (see the module doc). Collective over ``tp_group`` (every rank calls it)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"lm_head_cross_entropy expects hidden [N, H] and labels [N], got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    return _LMHeadCrossEntropy.apply(hidden, weight, labels, tp_group, start, real_rows,
                                     ignore_index, chunk_bytes)
