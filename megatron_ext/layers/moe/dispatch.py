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
The routing weights travel with the rows (:func:`row_weights`, :meth:`AllToAllDispatch.send_weights`)
and the experts apply them inside their activation
(:mod:`~megatron_ext.layers.weighted_swiglu`), so the combine is the unweighted slot sum
``out[t] = Σ_j y[slot_row[t·k + j]]``: the adjoint of the dispatch gather ``x[token_index]``, and
its backward is that gather of the incoming gradient. Neither keeps an ``[N, H]`` tensor for
backward (a weighted combine would keep the expert outputs ``y`` for the weights' gradient). The
slot sum reads each token's ``k`` rows and sums them in float32: one Triton kernel on CUDA
fp16/bf16 (no ``[T·k, H]`` intermediate), torch gathers elsewhere. A rank holding every expert
needs no host sync: the counts per expert come from the sorted keys (``searchsorted``), not
``bincount`` (which syncs on CUDA). On CUDA that rank, and a ``fixed_size`` dispatch, sort in one
Triton kernel instead (a counting sort with the same results, :mod:`.fused_routing`): in a
decode step the torch radix sort and its bookkeeping are a dozen small kernels per layer.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.communication.collectives import all_to_all
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.kernels.triton_loader import kernel_module
from megatron_ext.layers.moe.fused_routing import align_kernel_applies, fused_align


@dataclass
class LocalAssignments:
    """Assignments of tokens to this rank's experts, sorted by local expert."""

    flat_index: torch.Tensor   # [N] index into the flattened [T*k] routing (token*k + slot)
    token_index: torch.Tensor  # [N] token of each assignment
    counts: torch.Tensor       # [E_local] assignments per local expert (int64)
    slot_row: Optional[torch.Tensor] = None  # [T*k] sorted row of each slot; N = not here
    # [N] False for rows that are not this rank's (only ``fixed_size`` dispatches have them)
    valid_rows: Optional[torch.Tensor] = None


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
                   num_experts: Optional[int] = None, fixed_size: bool = False,
                   use_kernel: bool = True) -> LocalAssignments:
    """Select and sort the assignments of ``experts`` ``[T, k]`` that fall in
    ``[first_expert, first_expert + num_local)`` (a stable sort keeps token order per expert).
    When this rank holds every expert (``num_local == num_experts``) nothing is filtered, so no
    host sync is needed (the CUDA grouped GEMM takes the counts as a device tensor).

    ``fixed_size`` (a CUDA-graph capture, where the row count must not depend on the data and a
    host sync is illegal): every one of the ``T·k`` assignments gets a row, other ranks' sorted
    after this rank's (their key is ``num_local``) and marked in ``valid_rows``; the counts
    cover only this rank's, so the grouped GEMMs leave the rest alone and the caller zeroes
    their outputs (:func:`drop_foreign_rows`). This rank's rows are the same rows in the same
    order as without it.

    Both of these modes sort on CUDA in one Triton kernel (:func:`fused_align`, the same
    results) unless ``use_kernel=False``."""
    top_k = experts.shape[-1]
    every_expert = first_expert == 0 and num_local == num_experts
    if ((every_expert or fixed_size) and use_kernel
            and align_kernel_applies(experts, num_local)):
        return LocalAssignments(*fused_align(experts, first_expert, num_local,
                                             with_valid=not every_expert))
    local = experts.reshape(-1) - first_expert
    if every_expert:
        keys, sel = torch.sort(local, stable=True)
    elif fixed_size:
        mine = (local >= 0) & (local < num_local)
        keys, sel = torch.sort(torch.where(mine, local, num_local), stable=True)
        counts = _sorted_counts(keys, num_local)
        return LocalAssignments(sel, torch.div(sel, top_k, rounding_mode="floor"), counts,
                                slot_rows(sel, local.numel()), keys < num_local)
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
    """The Triton slot sum (:mod:`megatron_ext.kernels.moe_combine`); ``None`` without Triton."""
    k = kernel_module("moe_combine")
    return None if k is None else (k.triton, k.slot_sum)


MAX_TRITON_COLS = 16384


def _triton_applies(rows: torch.Tensor) -> bool:
    return (rows.is_cuda and rows.dtype in (torch.bfloat16, torch.float16) and rows.dim() == 2
            and 0 < rows.shape[1] <= MAX_TRITON_COLS and _kernels() is not None)


def _slot_sum_triton(rows: torch.Tensor, slot_row: torch.Tensor, top_k: int) -> torch.Tensor:
    triton, kernel = _kernels()
    rows = rows.contiguous()
    num_tokens, cols = slot_row.numel() // top_k, rows.shape[1]
    out = torch.empty((num_tokens, cols), dtype=rows.dtype, device=rows.device)
    if num_tokens == 0:
        return out
    block = min(2048, triton.next_power_of_2(cols))
    kernel[(num_tokens, triton.cdiv(cols, block))](
        rows, slot_row.contiguous(), out, rows.shape[0], cols, TOP_K=top_k, BLOCK=block,
        num_warps=max(1, min(8, block // 256)))
    return out


def _with_zero_row(rows: torch.Tensor, slot_row: torch.Tensor) -> torch.Tensor:
    """``rows`` plus one zero row at index ``len(rows)`` when some slot points there."""
    if rows.shape[0] == slot_row.numel():  # every slot has its row (a permutation)
        return rows
    return torch.cat([rows, rows.new_zeros((1,) + tuple(rows.shape[1:]))])


def sum_slots(rows: torch.Tensor, slot_row: torch.Tensor, top_k: int) -> torch.Tensor:
    """``out[t] = Σ_j rows[slot_row[t·k + j]]`` (slots of other ranks add zero) → ``[T, H]``."""
    if _triton_applies(rows):
        return _slot_sum_triton(rows, slot_row, top_k)
    picked = _with_zero_row(rows, slot_row).index_select(0, slot_row)
    return picked.view(slot_row.numel() // top_k, top_k, *rows.shape[1:]).sum(1)


class _GatherTokenRows(torch.autograd.Function):
    """``x[token_index]`` whose adjoint sums each token's rows back (no atomics)."""

    @staticmethod
    def forward(ctx, x, token_index, slot_row, top_k):
        ctx.save_for_backward(slot_row)
        ctx.top_k = top_k
        return x.index_select(0, token_index)

    @staticmethod
    def backward(ctx, grad):
        (slot_row,) = ctx.saved_tensors
        return sum_slots(grad, slot_row, ctx.top_k), None, None, None


class _SumTokenSlots(torch.autograd.Function):
    """The combine ``out[t] = Σ_j rows[slot_row[t·k + j]]``: the adjoint of
    :class:`_GatherTokenRows`, whose adjoint is that gather (it keeps only ``token_index``)."""

    @staticmethod
    def forward(ctx, rows, token_index, slot_row, top_k):
        ctx.save_for_backward(token_index)
        return sum_slots(rows, slot_row, top_k)

    @staticmethod
    def backward(ctx, grad):
        (token_index,) = ctx.saved_tensors
        return grad.index_select(0, token_index), None, None, None


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


def drop_foreign_rows(rows: torch.Tensor, assignments: LocalAssignments) -> torch.Tensor:
    """Expert outputs with the rows of other ranks' assignments zeroed (a ``fixed_size``
    dispatch computes none of them: their values are whatever the grouped GEMMs left)."""
    if assignments.valid_rows is None:
        return rows
    return rows.masked_fill(~assignments.valid_rows.unsqueeze(-1), 0)


def row_weights(weights: torch.Tensor, assignments: LocalAssignments) -> torch.Tensor:
    """The routing weight ``[N]`` of every assignment (``weights`` ``[T, k]``), in the
    assignments' order: what the experts multiply their activation rows by (differentiable)."""
    return weights.reshape(-1).index_select(0, assignments.flat_index)


def combine(expert_out: torch.Tensor, assignments: LocalAssignments, top_k: int
            ) -> torch.Tensor:
    """``out[t] = Σ_assignments of t  expert_out`` → ``[T, H]`` (the rows already carry their
    routing weights)."""
    if expert_out.shape[0] != assignments.token_index.numel():
        raise ValueError(f"combine: {expert_out.shape[0]} rows for "
                         f"{assignments.token_index.numel()} assignments")
    return _SumTokenSlots.apply(expert_out, assignments.token_index, assignments.slot_row, top_k)


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

    def _exchange(self, rows: torch.Tensor) -> torch.Tensor:
        received = all_to_all(rows, self.group, self.recv_splits, self.send_splits)
        return _PermuteRows.apply(received, self.perm, self.inverse)

    def send(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` ``[T, H]`` for every assignment → rows for this rank's experts, grouped
        by local expert (``self.local_counts``)."""
        return self._exchange(_GatherTokenRows.apply(x, self.token_index, self.slot_row,
                                                     self.top_k))

    def send_weights(self, weights: torch.Tensor) -> torch.Tensor:
        """Routing weights ``[T, k]`` → the ``[N]`` weights of :meth:`send`'s rows, in its order
        (a second, differentiable exchange with the same splits)."""
        return self._exchange(weights.reshape(-1).index_select(0, self.flat_index))

    def receive_back(self, y: torch.Tensor) -> torch.Tensor:
        """Expert outputs (order of :meth:`send`'s result) → rows in this rank's assignment order
        (sorted by global expert; ``self.token_index`` gives each row's token)."""
        mine = _PermuteRows.apply(y, self.inverse, self.perm)
        return all_to_all(mine, self.group, self.send_splits, self.recv_splits)

    def combine(self, back: torch.Tensor) -> torch.Tensor:
        """:meth:`receive_back`'s rows (already weighted) summed per token → ``[T, H]``."""
        return _SumTokenSlots.apply(back, self.token_index, self.slot_row, self.top_k)
