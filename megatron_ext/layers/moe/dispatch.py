"""Token ↔ expert routing bookkeeping for the two MoE input layouts.

* :func:`local_dispatch` — MOE_FULL / TP_ATTN_FULL inputs: every rank of the shard holds the same
  tokens and the same routing, so a rank just picks the (token, slot) assignments of its own
  experts. No communication; the combined output is a partial sum over the shard.
* :class:`AllToAllDispatch` — SCATTERED inputs (tokens distinct per rank): assignments travel to
  the ``moe_ep`` rank owning the expert and the results travel back (``all_to_all`` both ways,
  autograd adjoint = the reverse exchange).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.parallel.collectives import all_to_all
from megatron_ext.parallel.groups import AxisGroup


@dataclass
class LocalAssignments:
    """Assignments of tokens to this rank's experts, sorted by local expert."""

    flat_index: torch.Tensor   # [N] index into the flattened [T*k] routing (token*k + slot)
    token_index: torch.Tensor  # [N] token of each assignment
    counts: torch.Tensor       # [E_local] assignments per local expert (int64)


def local_dispatch(experts: torch.Tensor, first_expert: int, num_local: int,
                   num_experts: Optional[int] = None) -> LocalAssignments:
    """Select and sort the assignments of ``experts`` ``[T, k]`` that fall in
    ``[first_expert, first_expert + num_local)`` (a stable sort keeps token order per expert).
    When this rank holds every expert (``num_local == num_experts``) nothing is filtered, so no
    host sync is needed (the CUDA grouped GEMM takes the counts as a device tensor)."""
    top_k = experts.shape[-1]
    local = experts.reshape(-1) - first_expert
    if first_expert == 0 and num_local == num_experts:
        sel = torch.argsort(local, stable=True)
    else:
        sel = ((local >= 0) & (local < num_local)).nonzero().squeeze(1)
        sel = sel[torch.argsort(local[sel], stable=True)]
    counts = torch.bincount(local[sel], minlength=num_local)
    return LocalAssignments(sel, torch.div(sel, top_k, rounding_mode="floor"), counts)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, assignments: LocalAssignments,
            num_tokens: int) -> torch.Tensor:
    """``out[t] = Σ_assignments of t  weight · expert_out`` (differentiable in both)."""
    w = weights.reshape(-1)[assignments.flat_index].unsqueeze(-1)
    out = expert_out.new_zeros((num_tokens, expert_out.shape[-1]))
    return out.index_add(0, assignments.token_index, expert_out * w)


class AllToAllDispatch:
    """One exchange round over ``ep_group``: ``send`` moves the rows of all assignments (sorted by
    global expert) to their owners and sorts them there by local expert; ``receive_back`` undoes
    both. Experts ``[j·E_local, (j+1)·E_local)`` live on ``ep_group`` rank ``j``.

    The per-(source, expert) counts are exchanged first (one small ``all_to_all``) because the
    row split sizes must be known on the host.
    """

    def __init__(self, experts: torch.Tensor, num_experts: int, ep_group: AxisGroup):
        ep = ep_group.size
        if num_experts % ep:
            raise ValueError(f"num_experts={num_experts} must be divisible by moe_ep={ep}")
        self.group, self.num_local = ep_group, num_experts // ep
        top_k = experts.shape[-1]
        flat = experts.reshape(-1)
        self.flat_index = torch.argsort(flat, stable=True)
        self.token_index = torch.div(self.flat_index, top_k, rounding_mode="floor")
        per_expert = torch.bincount(flat, minlength=num_experts)                   # [E]
        recv_matrix = all_to_all(per_expert, ep_group, [self.num_local] * ep,
                                 [self.num_local] * ep).view(ep, self.num_local)   # [src, E_l]
        self.send_splits = per_expert.view(ep, self.num_local).sum(1).tolist()
        self.recv_splits = recv_matrix.sum(1).tolist()
        local_ids = torch.repeat_interleave(
            torch.arange(self.num_local, device=flat.device).repeat(ep), recv_matrix.reshape(-1))
        # (source, expert) order → (expert, source) order
        self.perm = torch.argsort(local_ids, stable=True)
        self.inverse = torch.argsort(self.perm)
        self.local_counts = recv_matrix.sum(0)                 # [E_local]

    def send(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` ``[T, H]`` for every assignment → rows for this rank's experts, grouped
        by local expert (``self.local_counts``)."""
        rows = x[self.token_index]
        received = all_to_all(rows, self.group, self.recv_splits, self.send_splits)
        return received[self.perm]

    def receive_back(self, y: torch.Tensor) -> torch.Tensor:
        """Expert outputs (order of :meth:`send`'s result) → rows in this rank's assignment order
        (sorted by global expert; ``self.token_index`` gives each row's token)."""
        return all_to_all(y[self.inverse], self.group, self.send_splits, self.recv_splits)

    def combine(self, back: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        w = weights.reshape(-1)[self.flat_index].unsqueeze(-1)
        out = back.new_zeros((num_tokens, back.shape[-1]))
        return out.index_add(0, self.token_index, back * w)
