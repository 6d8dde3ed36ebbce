"""Token ↔ expert routing bookkeeping for the two MoE input layouts.

* :func:`local_dispatch` — MOE_FULL / TP_ATTN_FULL inputs: every rank of the shard holds the same
  tokens and the same routing, so a rank just picks the (token, slot) assignments of its own
  experts. No communication; the combined output is a partial sum over the shard.
* :class:`AllToAllDispatch` — SCATTERED inputs (tokens distinct per rank): assignments travel to
  the ``moe_ep`` rank owning the expert and the results travel back (``all_to_all`` both ways,
  autograd adjoint = the reverse exchange).

Moving rows between token order and expert order is done with gathers only (no ``index_add``
atomics): besides the sorted assignments every dispatch keeps ``slot_row``, the sorted row of
each of the ``T·k`` (token, slot) pairs (or ``N``, a zero row, for slots owned by another rank).
The combine ``out[t] = Σ_j w[t, j] · y[slot_row[t·k + j]]`` and the adjoint of the dispatch
gather ``x[token_index]`` (the same sum with unit weights) read each token's ``k`` rows and sum
them in float32; its backward ``dy[i] = w_i · g[token_i]``, ``dw_i = <g[token_i], y[i]>`` reads
each sorted row once. On CUDA fp16/bf16 each of these is one Triton kernel (no ``[T·k, H]``
intermediate); elsewhere the same math in torch ops (gathers, a batched ``[1, k] × [k, H]``
product). A rank holding every expert needs no host sync: the counts
per expert come from the sorted keys (``searchsorted``), not ``bincount`` (which syncs on CUDA).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.communication.collectives import all_to_all
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.kernels.triton_loader import kernel_module


@dataclass
class LocalAssignments:
    """Assignments of tokens to this rank's experts, sorted by local expert."""

    flat_index: torch.Tensor   # [N] index into the flattened [T*k] routing (token*k + slot)
    token_index: torch.Tensor  # [N] token of each assignment
    counts: torch.Tensor       # [E_local] assignments per local expert (int64)
    slot_row: Optional[torch.Tensor] = None  # [T*k] sorted row of each slot; N = not here


def _sorted_counts(sorted_keys: torch.Tensor, num_groups: int) -> torch.Tensor:
    """Rows per group ``0..num_groups-1`` of ascending ``sorted_keys`` (no host sync)."""
    bounds = torch.arange(num_groups + 1, device=sorted_keys.device, dtype=sorted_keys.dtype)
    edges = torch.searchsorted(sorted_keys, bounds)
    return (edges[1:] - edges[:-1]).to(torch.int64)


def slot_rows(flat_index: torch.Tensor, num_slots: int) -> torch.Tensor:
    """``[num_slots]``: position of each slot in ``flat_index`` (``len(flat_index)`` for slots
    that are not in it)."""
    n = flat_index.numel()
    rows = torch.full((num_slots,), n, dtype=torch.int64, device=flat_index.device)
    return rows.scatter_(0, flat_index, torch.arange(n, device=flat_index.device))


def local_dispatch(experts: torch.Tensor, first_expert: int, num_local: int,
                   num_experts: Optional[int] = None) -> LocalAssignments:
    """Select and sort the assignments of ``experts`` ``[T, k]`` that fall in
    ``[first_expert, first_expert + num_local)`` (a stable sort keeps token order per expert).
    When this rank holds every expert (``num_local == num_experts``) nothing is filtered, so no
    host sync is needed (the CUDA grouped GEMM takes the counts as a device tensor)."""
    top_k = experts.shape[-1]
    local = experts.reshape(-1) - first_expert
    if first_expert == 0 and num_local == num_experts:
        keys, sel = torch.sort(local, stable=True)
    else:
        sel = ((local >= 0) & (local < num_local)).nonzero().squeeze(1)
        keys, order = torch.sort(local[sel], stable=True)
        sel = sel[order]
    counts = _sorted_counts(keys, num_local)
    return LocalAssignments(sel, torch.div(sel, top_k, rounding_mode="floor"), counts,
                            slot_rows(sel, local.numel()))


# ------------------------------------------------------------------------------ Triton kernels
@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels (:mod:`megatron_ext.kernels.moe_combine`); ``None`` without Triton."""
    k = kernel_module("moe_combine")
    return None if k is None else (k.triton, k.weighted_slot_sum, k.combine_backward)


MAX_TRITON_COLS = 16384


def _triton_applies(rows: torch.Tensor) -> bool:
    return (rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and rows.dim() == 2
            and 0 < rows.shape[1] <= MAX_TRITON_COLS and _kernels() is not None)


def _slot_sum_triton(rows: torch.Tensor, slot_row: torch.Tensor, top_k: int,
                     weights: Optional[torch.Tensor]) -> torch.Tensor:
    triton, kernel, _ = _kernels()
    rows = rows.contiguous()
    num_tokens, cols = slot_row.numel() // top_k, rows.shape[1]
    out = torch.empty((num_tokens, cols), dtype=rows.dtype, device=rows.device)
    if num_tokens == 0:
        return out
    block = min(2048, triton.next_power_of_2(cols))
    w = rows if weights is None else weights.to(rows.dtype).contiguous()
    kernel[(num_tokens, triton.cdiv(cols, block))](
        rows, w, slot_row.contiguous(), out, rows.shape[0], cols, TOP_K=top_k,
        HAS_W=weights is not None, BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return out


def _with_zero_row(rows: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    """``rows`` plus one zero row at index ``len(rows)`` when some slot points there."""
    if rows.shape[0] == slot_row.numel():  # every slot has its row (a permutation)
        return rows
    return torch.cat([rows, rows.new_zeros((1,) + tuple(rows.shape[1:]))])


def sum_slots(rows: torch.Tensor, slot_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out[t] = Σ_j rows[slot_row[t·k + j]]`` (slots of other ranks add zero) → ``[T, H]``."""
    if _triton_applies(rows):
        return _slot_sum_triton(rows, slot_row, top_k, None)
    picked = _with_zero_row(rows, slot_row).index_select(0, slot_row)
    return picked.view(slot_row.numel() // top_k, top_k, -1).sum(1)


class _GatherTokenRows(torch.autograd.Function):
    """``x[token_index]`` whose adjoint gathers each token's rows back (no atomics)."""

    @staticmethod
    def forward(ctx, x, token_index, slot_row, top_k):
        ctx.save_for_backward(slot_row)
        ctx.top_k = top_k
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        return sum_slots(grad, slot_row, ctx.top_k), None, None, None


class _CombineSlots(torch.autograd.Function):
    """``out[t] = Σ_j w[t, j] · y[slot_row[t·k + j]]``, differentiable in ``y`` and ``w``."""

    @staticmethod
    def forward(ctx, y, weights, flat_index, token_index, slot_row):
        num_tokens, top_k = weights.shape
        ctx.save_for_backward(y, weights, flat_index, token_index)
        if _triton_applies(y):
            return _slot_sum_triton(y, slot_row, top_k, weights)
        picked = _with_zero_row(y, slot_row).index_select(0, slot_row)
        return torch.bmm(weights.to(y.dtype).unsqueeze(1),
                         picked.view(num_tokens, top_k, y.shape[-1])).squeeze(1)

    @staticmethod
    def backward(ctx, grad):
        y, weights, flat_index, token_index = ctx.saved_tensors
        if _triton_applies(y):
            triton, _, kernel = _kernels()
            y = y.contiguous()
            dy = torch.empty_like(y)
            dw = weights.new_zeros(weights.numel())
            if y.shape[0]:
                kernel[(y.shape[0],)](grad.contiguous(), y, weights.contiguous(), flat_index,
                                      token_index, dy, dw, y.shape[1],
                                      BLOCK=triton.next_power_of_2(y.shape[1]), num_warps=8)
            return dy, dw.view_as(weights), None, None, None
        rows = grad.index_select(0, token_index)                     # [N, H], sorted order
        dy = dw = None
        if ctx.needs_input_grad[0]:
            w_rows = weights.reshape(-1).index_select(0, flat_index).to(y.dtype)
            dy = rows * w_rows.unsqueeze(-1)
        if ctx.needs_input_grad[1]:
            per_row = (rows * y).sum(-1, dtype=torch.promote_types(y.dtype, torch.float32))
            dw = weights.new_zeros(weights.numel()).index_copy_(
                0, flat_index, per_row.to(weights.dtype)).view_as(weights)
        return dy, dw, None, None, None


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm``; the adjoint is the gather by its inverse."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def gather_rows(x: torch.Tensor, assignments: LocalAssignments, top_k: int) -> torch.Tensor:
    """Rows of ``x`` ``[T, H]`` for every assignment, in the assignments' (expert) order."""
    return _GatherTokenRows.apply(x, assignments.token_index, assignments.slot_row, top_k)


def combine(expert_out: torch.Tensor, weights: torch.Tensor, assignments: LocalAssignments,
            num_tokens: int) -> torch.Tensor:
    """``out[t] = Σ_assignments of t  weight · expert_out`` (differentiable in both)."""
    if weights.shape[0] != num_tokens:
        raise ValueError(f"combine: weights {tuple(weights.shape)} for {num_tokens} tokens")
    return _CombineSlots.apply(expert_out, weights, assignments.flat_index,
                               assignments.token_index, assignments.slot_row)


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
        self.top_k = experts.shape[-1]
        flat = experts.reshape(-1)
        keys, self.flat_index = torch.sort(flat, stable=True)
        self.token_index = torch.div(self.flat_index, self.top_k, rounding_mode="floor")
        self.slot_row = slot_rows(self.flat_index, flat.numel())
        per_expert = _sorted_counts(keys, num_experts)                             # [E]
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
        rows = _GatherTokenRows.apply(x, self.token_index, self.slot_row, self.top_k)
        received = all_to_all(rows, self.group, self.recv_splits, self.send_splits)
        return _PermuteRows.apply(received, self.perm, self.inverse)

    def receive_back(self, y: torch.Tensor) -> torch.Tensor:
        """Expert outputs (order of :meth:`send`'s result) → rows in this rank's assignment order
        (sorted by global expert; ``self.token_index`` gives each row's token)."""
        mine = _PermuteRows.apply(y, self.inverse, self.perm)
        return all_to_all(mine, self.group, self.send_splits, self.recv_splits)

    def combine(self, back: torch.Tensor, weights: torch.Tensor, num_tokens: int) -> torch.Tensor:
        if weights.shape[0] != num_tokens:
            raise ValueError(f"combine: weights {tuple(weights.shape)} for {num_tokens} tokens")
        return _CombineSlots.apply(back, weights, self.flat_index, self.token_index,
                                   self.slot_row)
