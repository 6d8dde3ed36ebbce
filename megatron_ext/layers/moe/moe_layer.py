"""Sparse MoE MLP: router + routed experts (EP × TP inside the MoE shard) + optional shared expert.

Two dispatchers, chosen by where the input tokens live (design §3):

* ``"local"`` — MOE_FULL / TP_ATTN_FULL input, identical on every rank of the shard. Routing is
  identical everywhere, each rank runs its own experts (and its slice of the shared expert) on the
  tokens that picked them, and routed + shared partials are **added locally**: the output is ONE
  partial sum over ``moe_shard`` that the communicator completes with a single reduction. No
  collective in this layer. The input gradient is partial over the shard too; the communicator's
  gather to MOE_FULL sums it (its adjoint), or pass ``sync_input_grad=True`` to all-reduce it here.
* ``"all_to_all"`` — SCATTERED input, distinct tokens on every rank. Tokens are first gathered
  inside ``moe_tp`` (the ranks holding slices of the same experts), routed, sent to the ``moe_ep``
  rank owning each expert and back (all-to-all), and the ``moe_tp`` partials reduce-scattered back:
  the output is **complete** for this rank's own tokens. A shared expert (split over the whole
  shard) costs one all-gather + one reduce-scatter over ``moe_shard`` on this path. Uneven token
  counts: pass ``token_counts`` (every shard rank's count, shard-rank order).

The router's load-balancing statistics come back beside the output (:class:`MoEOutput`); combine
them with :func:`megatron_ext.layers.moe.router.load_balancing_loss`.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import nn

from megatron_ext.layers.moe.dispatch import (AllToAllDispatch, combine, gather_rows,
                                              drop_foreign_rows, local_dispatch,
                                              row_weights)
from megatron_ext.layers.backend import LayerBackend
from megatron_ext.layers.moe.router import RouterStats, TopKRouter
from megatron_ext.layers.moe.shared_expert import SharedExpert
from megatron_ext.communication.choices import MOE_DISPATCHERS, MoEDispatcher, check_choice
from megatron_ext.communication.collectives import all_gather, copy_to_region, reduce_scatter
from megatron_ext.parallel.groups import ParallelGroups


class MoEOutput(NamedTuple):
    hidden: torch.Tensor       # input's shape; partial over moe_shard ("local") or complete
    router_stats: Optional[RouterStats]  # inputs of the load-balancing loss (None: not asked)


def _join(prefix: Optional[str], name: str) -> Optional[str]:
    return f"{prefix}.{name}" if prefix else name


def _capturing(x: torch.Tensor) -> bool:
    """Whether an inference step on ``x``'s CUDA stream is being captured into a graph (the
    local dispatch of a rank holding some of the experts then keeps a data-independent row
    count, without host sync; training keeps the data-sized dispatch, whose backward never
    sees the rows the fused GEMMs leave unspecified)."""
    return x.is_cuda and not torch.is_grad_enabled() and torch.cuda.is_current_stream_capturing()


class MoELayer(nn.Module):
    """Qwen2/Qwen3-MoE sparse block. Submodules (HF names): ``gate`` (router), ``experts``,
    ``shared_expert`` (with its ``gate`` = HF ``shared_expert_gate``) or ``None``."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int,
                 moe_intermediate_size: int, groups: ParallelGroups, *,
                 norm_topk_prob: bool = False, shared_expert_intermediate_size: int = 0,
                 shared_expert_gate: bool = False, dispatcher: str = "local",
                 sync_input_grad: bool = False, name: Optional[str] = "mlp",
                 backend: Optional[LayerBackend] = None, dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        check_choice("dispatcher", dispatcher, MOE_DISPATCHERS)
        if shared_expert_gate and not shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate=True needs shared_expert_intermediate_size > 0")
        if dispatcher == "all_to_all" and sync_input_grad:
            raise ValueError("sync_input_grad applies to the 'local' dispatcher only (SCATTERED "
                             "inputs have whole gradients)")
        self.groups, self.dispatcher, self.sync_input_grad = groups, dispatcher, sync_input_grad
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.gate = TopKRouter(hidden_size, num_experts, top_k, norm_topk_prob=norm_topk_prob,
                               name=_join(name, "gate"), dtype=dtype, device=device)
        backend = backend if backend is not None else LayerBackend()
        self.experts = backend.routed_experts(num_experts, hidden_size, moe_intermediate_size,
                                              groups, name=_join(name, "experts"), dtype=dtype,
                                              device=device)
        self.shared_expert = (SharedExpert(hidden_size, shared_expert_intermediate_size, groups,
                                           gated=shared_expert_gate, backend=backend,
                                           name=_join(name, "shared_expert"), dtype=dtype,
                                           device=device)
                              if shared_expert_intermediate_size else None)

    def token_counts(self, layout) -> Optional[tuple[int, ...]]:
        """What :meth:`forward` needs to know of the layout (a ``TokenLayout``): the per-rank token
        counts of the MoE shard for ``all_to_all`` (SCATTERED tokens), nothing for ``local``."""
        return layout.moe_shard_sizes if self.dispatcher == MoEDispatcher.ALL_TO_ALL else None

    def forward(self, hidden: torch.Tensor, token_mask: Optional[torch.Tensor] = None,
                token_counts: Optional[Sequence[int]] = None,
                with_stats: bool = True) -> MoEOutput:
        """``hidden`` ``[..., H]``; ``token_mask`` (same leading shape, bool) marks real tokens
        for the load-balancing statistics; ``token_counts`` only for ``"all_to_all"``;
        ``with_stats=False``: no router statistics (``router_stats`` None)."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(f"MoELayer expects last dim {self.hidden_size}, got "
                             f"{tuple(hidden.shape)}")
        if token_mask is not None and token_mask.shape != hidden.shape[:-1]:
            raise ValueError(f"token_mask shape {tuple(token_mask.shape)} must match the tokens "
                             f"{tuple(hidden.shape[:-1])}")
        x = hidden.reshape(-1, self.hidden_size)
        mask = None if token_mask is None else token_mask.reshape(-1)
        if self.dispatcher == MoEDispatcher.LOCAL:
            if token_counts is not None:
                raise ValueError("token_counts is only used by the 'all_to_all' dispatcher")
            out, stats = self._local(x, mask, with_stats)
        else:
            out, stats = self._all_to_all(x, mask, token_counts, with_stats)
        return MoEOutput(out.reshape(hidden.shape), stats)

    def _local(self, x: torch.Tensor, mask: Optional[torch.Tensor], with_stats: bool = True):
        if self.sync_input_grad:
            x = copy_to_region(x, self.groups.moe_shard)
        out, stats = self.routed(x, mask, with_stats)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out, stats

    def routed(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
               with_stats: bool = True) -> tuple[torch.Tensor, Optional[RouterStats]]:
        """The routed experts' partial sum over ``moe_shard`` of MOE_FULL rows ``x`` ``[T, H]``
        (the ``"local"`` dispatcher, without the shared expert) and the router statistics."""
        routing = self.gate(x, mask, with_stats)
        partial = self.experts.num_local != self.num_experts  # a rank holding some experts
        assign = local_dispatch(routing.experts, self.experts.first_expert,
                                self.experts.num_local, self.num_experts,
                                fixed_size=partial and _capturing(x))
        if self.experts.fused_decode_applies(x, assign.token_index.numel()):
            y = self.experts.forward_tokens(x, assign.token_index, assign.counts,
                                            routing.weights.reshape(-1), assign.flat_index)
        else:
            y = self.experts(gather_rows(x, assign, self.top_k), assign.counts,
                             row_weights(routing.weights, assign))
        return combine(drop_foreign_rows(y, assign), assign, self.top_k), routing.stats

    def _all_to_all(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                    token_counts: Optional[Sequence[int]], with_stats: bool = True):
        g = self.groups
        shard_sizes = tp_sizes = None
        if token_counts is not None:
            shard_sizes = [int(c) for c in token_counts]
            if len(shard_sizes) != g.moe_shard.size or shard_sizes[g.moe_shard.rank] != x.shape[0]:
                raise ValueError(f"token_counts={shard_sizes} must list the {g.moe_shard.size} "
                                 f"moe_shard ranks' token counts (this rank, shard rank "
                                 f"{g.moe_shard.rank}, has {x.shape[0]})")
            first = g.moe_shard.rank - g.moe_tp.rank     # shard rank = moe_tp + M·moe_ep
            tp_sizes = shard_sizes[first:first + g.moe_tp.size]
        xg = all_gather(x, g.moe_tp, dim=0, sizes=tp_sizes, backward="reduce_scatter")
        mask_g = None
        if mask is not None:
            with torch.no_grad():
                mask_g = all_gather(mask.to(torch.float32), g.moe_tp, dim=0, sizes=tp_sizes,
                                    backward="own_rows") > 0.5
        routing = self.gate(xg, mask_g, with_stats)
        exchange = AllToAllDispatch(routing.experts, self.num_experts, g.moe_ep)
        y = self.experts(exchange.send(xg), exchange.local_counts,
                         exchange.send_weights(routing.weights))
        routed = exchange.combine(exchange.receive_back(y))
        out = reduce_scatter(routed, g.moe_tp, dim=0, sizes=tp_sizes)
        if self.shared_expert is not None:
            xs = all_gather(x, g.moe_shard, dim=0, sizes=shard_sizes, backward="reduce_scatter")
            out = out + reduce_scatter(self.shared_expert(xs), g.moe_shard, dim=0,
                                       sizes=shard_sizes)
        return out, routing.stats
