"""Top-k softmax router (HF Qwen2/Qwen3-MoE numerics) and the Switch-style load-balancing loss.

The router weight is replicated on every rank. Each rank's gradient of it is partial (only its own
experts' share of the output, or only its own tokens), so it is summed over the whole stage:
``grad_sync=("stage",)`` (design §4).

The auxiliary loss is HF's ``load_balancing_loss_func``: ``E · Σ_e f_e · P_e`` with ``f_e`` the
fraction of top-k assignments and ``P_e`` the mean router probability, both over all tokens of all
layers. Layers only return :class:`RouterStats`; :func:`load_balancing_loss` combines them, summing
the (gradient-free) counts over the given groups so every rank's term is its exact share.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from megatron_ext.layers.linear import default_init
from megatron_ext.layers.moe.fused_routing import fused_top_k_softmax, top_k_kernel_applies
from megatron_ext.layers.skinny_linear import linear
from megatron_ext.communication.collectives import all_reduce
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.parallel.param_meta import ParamSpec, set_spec


@dataclass
class RouterStats:
    """Per-layer inputs of the load-balancing loss, over this rank's (valid) tokens.

    ``counts`` ``[E]`` top-k assignments per expert (no gradient); ``prob_sum`` ``[E]`` summed
    softmax probabilities (differentiable); ``num_tokens`` scalar count of valid tokens.
    """

    counts: torch.Tensor
    prob_sum: torch.Tensor
    num_tokens: torch.Tensor


@dataclass
class RouterOutput:
    logits: torch.Tensor    # [T, E], input dtype
    weights: torch.Tensor   # [T, k], input dtype (HF casts the top-k probabilities back)
    experts: torch.Tensor   # [T, k], int64
    stats: Optional[RouterStats]   # None: not asked for (with_stats=False)


def top_k_softmax(logits: torch.Tensor, top_k: int, norm_topk_prob: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HF Qwen2/3-MoE routing of ``logits`` ``[T, E]`` → ``(probs [T, E]`` float32 or wider,
    ``weights [T, k]`` in the logits' dtype, ``experts [T, k]`` int64): the softmax in float32,
    its ``top_k`` largest in descending order, optionally divided by their sum, cast back."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    top_vals, top_ids = torch.topk(probs, top_k, dim=-1)
    if norm_topk_prob:
        top_vals = top_vals / top_vals.sum(dim=-1, keepdim=True)
    return probs, top_vals.to(logits.dtype), top_ids


class TopKRouter(nn.Module):
    """``softmax(x W^T)`` in float32, top-k, optionally renormalised (Qwen3 ``norm_topk_prob``).

    Weight ParamSpec: global ``[E, H]``, replicated, ``grad_sync=("stage",)``.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *,
                 norm_topk_prob: bool = False, name: Optional[str] = "gate",
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        if num_experts < 1 or hidden_size < 1:
            raise ValueError(f"TopKRouter: num_experts={num_experts}, hidden_size={hidden_size} "
                             f"must be >= 1")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"TopKRouter: top_k={top_k} must be in [1, num_experts="
                             f"{num_experts}]")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.norm_topk_prob = norm_topk_prob
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=dtype,
                                               device=device))
        default_init(self.weight)
        set_spec(self.weight, ParamSpec((num_experts, hidden_size), (), (Axis.STAGE,), None,
                                        f"{name}.weight" if name else None))

    def forward(self, x: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                with_stats: bool = True) -> RouterOutput:
        """``x`` ``[T, H]``; ``token_mask`` ``[T]`` bool, False for padding (excluded from the
        load-balancing statistics only; padded tokens are still routed). ``with_stats=False``
        (inference without the auxiliary loss, e.g. a decode step): no statistics, ``stats`` is
        None — five small kernels per layer fewer; on CUDA without autograd the softmax and top-k
        are then one Triton kernel (same results, :mod:`~megatron_ext.layers.moe.fused_routing`)."""
        if x.dim() != 2 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"TopKRouter expects x [T, {self.hidden_size}], got "
                             f"{tuple(x.shape)}")
        if token_mask is not None and tuple(token_mask.shape) != (x.shape[0],):
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} must be "
                             f"({x.shape[0]},)")
        logits = linear(x, self.weight)   # one launch for a decode batch (no autograd)
        if not with_stats and top_k_kernel_applies(logits):
            weights, top_ids = fused_top_k_softmax(logits, self.top_k, self.norm_topk_prob)
            return RouterOutput(logits, weights, top_ids, None)
        probs32, weights, top_ids = top_k_softmax(logits, self.top_k, self.norm_topk_prob)
        if not with_stats:
            return RouterOutput(logits, weights, top_ids, None)
        if token_mask is None:
            prob_sum = probs32.sum(0)
            flat_ids, flat_w = top_ids.reshape(-1), None
            num_tokens = torch.full((), float(x.shape[0]), device=x.device)  # capturable
        else:
            m = token_mask.to(probs32.dtype)
            prob_sum = (probs32 * m.unsqueeze(-1)).sum(0)
            flat_ids, flat_w = top_ids.reshape(-1), m.repeat_interleave(self.top_k)
            num_tokens = m.sum()
        with torch.no_grad():
            counts = torch.zeros(self.num_experts, dtype=torch.float32, device=x.device)
            counts.index_add_(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.float32)
                              if flat_w is None else flat_w.float())
        return RouterOutput(logits, weights, top_ids, RouterStats(counts, prob_sum, num_tokens))


def load_balancing_loss(stats: Sequence[RouterStats],
                        sum_groups: Sequence[AxisGroup] = ()) -> torch.Tensor:
    """HF/Switch auxiliary loss over all given layers, as this rank's share.

    ``sum_groups``: groups over which the token counts are summed (e.g. ``(groups.stage,)``, plus
    ``groups.pp`` for layers spread over pipeline stages). The counts include replicas (ranks that
    routed the same tokens, e.g. a MOE_FULL shard) and so does the sum of the per-rank terms, so
    the replicas cancel: **the sum over the groups of every rank's returned value is the global
    loss**, and so are the gradients after the usual gradient sync. Single process (no groups):
    exactly ``transformers``' ``load_balancing_loss_func`` (without the coefficient).
    """
    if not stats:
        raise ValueError("load_balancing_loss needs the RouterStats of at least one layer")
    num_experts = stats[0].counts.numel()
    if any(s.counts.numel() != num_experts for s in stats):
        raise ValueError("load_balancing_loss: layers have different numbers of experts")
    prob = torch.stack([s.prob_sum for s in stats]).sum(0)
    with torch.no_grad():
        totals = torch.cat([torch.stack([s.counts for s in stats]).sum(0),
                            torch.stack([s.num_tokens.float() for s in stats]).sum().reshape(1)])
        for group in sum_groups:
            totals = all_reduce(totals, group)
        counts, rows = totals[:-1], totals[-1].clamp_min(1.0)
    return num_experts * torch.sum((counts / rows) * prob) / rows
