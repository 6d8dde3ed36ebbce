"""Small-message collectives through symmetric memory, for inference on one NVLink host.

Why: a batched decode step issues a few collectives per layer (the attention rows gathered over
``attn_cp``, the CP partials exchanged, the MoE rows gathered and its partial sum reduced), each
a few hundred KB. Inside a CUDA graph NCCL spends ~15 µs on each; one Triton kernel that copies
the input into a symmetric slot, crosses one barrier and pulls from the peers
(:mod:`megatron_ext.kernels.symm_exchange`) does it in a few µs.

:func:`with_symm_collectives` returns the groups with a :class:`SymmCollectives` attached to
every multi-rank axis (``AxisGroup.fast``); :mod:`~megatron_ext.communication.collectives` sends
a forward collective there when :meth:`SymmCollectives.serves` it — CUDA, equal pieces, within
one slot — and to NCCL otherwise, so results never depend on which path ran (sums in group-rank
order, bit-identical on every rank). Training builds its groups without it.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from megatron_ext.communication.fused_reduce_norm import (MAX_TRITON_HIDDEN,
                                                          copy_in_reduce_add_rms_norm)
from megatron_ext.communication.symm_mem import SymmMemAllReduce, SymmMemConfig
from megatron_ext.kernels.launch import sm_count
from megatron_ext.kernels.triton_loader import kernel_module
from megatron_ext.parallel.axes import GROUP_AXES
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups

#: slots of 8 MB (two per group): a decode step's largest message at batch 256 is ~4 MB
DECODE_SYMM_CONFIG = SymmMemConfig(slot_bytes=8 * 2**20, two_shot_max_bytes=8 * 2**20)
#: the exchange kernel's launch: elements per program per pass, warps, programs per SM (at most);
#: ``benchmarks/decode_collectives.py --sweep`` times the alternatives
EXCHANGE_LAUNCH = dict(block=2048, num_warps=8, programs_per_sm=2)


class SymmCollectives:
    """All-gather, all-reduce, reduce-scatter and equal-split all-to-all along dim 0 over one
    group, each one kernel with one barrier. Construction is collective over the group."""

    def __init__(self, axis: AxisGroup, device: torch.device,
                 config: SymmMemConfig = DECODE_SYMM_CONFIG):
        self.reducer = SymmMemAllReduce(axis, device, config, uniform_tokens=True)
        self.active = True   # False: every call to NCCL (same-run A/B in benchmarks)
        self.fuse = True     # False: no fused reduce + add + norm (same-run A/B in benchmarks)

    @property
    def enabled(self) -> bool:
        return self.reducer.enabled and kernel_module("symm_exchange") is not None

    @property
    def reason(self) -> Optional[str]:
        return self.reducer.reason if not self.reducer.enabled else (
            None if self.enabled else "Triton is not available")

    def serves(self, x: torch.Tensor, chunks: int = 1, total: bool = False) -> bool:
        """Whether ``x`` (``chunks`` equal pieces along dim 0) goes through symmetric memory; a
        sum (``total``) only of floating-point values (it accumulates in float32)."""
        return (self.active and self.enabled and x.is_cuda and x.device == self.reducer.device
                and x.numel() * x.element_size() <= self.reducer.config.slot_bytes
                and x.numel() % chunks == 0 and (x.is_floating_point() or not total))

    def _run(self, x: torch.Tensor, out: torch.Tensor, chunks: int, src_chunk: int,
             total: bool) -> torch.Tensor:
        r = self.reducer
        x = x.contiguous()
        n = x.numel() // chunks
        if n == 0:
            return out
        slot = r.next_slot(x.numel() * x.element_size()).view(x.dtype)
        launch = EXCHANGE_LAUNCH
        grid = max(1, min(-(-n // launch["block"]),
                          launch["programs_per_sm"] * sm_count(r.device),
                          r.signal_slots // r.world_size))
        kernel_module("symm_exchange").exchange[(grid,)](
            x, r.peer_pointers(slot), r.signal_pointers(), out, n, grid, src_chunk,
            CHUNKS=chunks, SUM=total, RANK=r.rank, WORLD=r.world_size, BLOCK=launch["block"],
            num_warps=launch["num_warps"])
        return out

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's ``x`` (equal shapes) concatenated along dim 0, group-rank order."""
        out = x.new_empty((self.reducer.world_size * x.shape[0],) + tuple(x.shape[1:]))
        return self._run(x, out, 1, 0, False)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over the group (float32 accumulation, group-rank order)."""
        return self._run(x, torch.empty_like(x, memory_format=torch.contiguous_format), 1, 0,
                         True)

    def reduce_scatter(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's ``1/world`` of the rows of the sum."""
        w = self.reducer.world_size
        out = x.new_empty((x.shape[0] // w,) + tuple(x.shape[1:]))
        return self._run(x, out, w, self.reducer.rank, True)

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """Equal splits: piece ``i`` of ``x`` goes to group rank ``i``; the result holds every
        rank's piece for this rank, group-rank order."""
        return self._run(x, torch.empty_like(x, memory_format=torch.contiguous_format),
                         self.reducer.world_size, self.reducer.rank, False)

    def all_reduce_add_rms_norm(self, partial: torch.Tensor, residual: Optional[torch.Tensor],
                                weight: torch.Tensor, eps: float
                                ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``h = Σ_group partial (+ residual)``, returns ``(rms_norm(h) · weight, h)`` in one
        kernel (copy in, one barrier, sum in group-rank order, add, norm); ``None`` where it does
        not apply (the caller reduces, adds and normalises): the same roundings as
        :meth:`all_reduce` followed by the add + RMSNorm kernel."""
        cols = partial.shape[-1]
        if not (self.fuse and not torch.is_grad_enabled() and self.serves(partial, 1, True)
                and cols <= MAX_TRITON_HIDDEN
                and partial.dtype == weight.dtype and weight.shape == (cols,)
                and (residual is None or (residual.shape == partial.shape
                                          and residual.dtype == partial.dtype))):
            return None
        return copy_in_reduce_add_rms_norm(partial, residual, weight, eps, self.reducer)


def symm_reducers(groups: ParallelGroups) -> list[SymmMemAllReduce]:
    """The distinct symmetric buffers behind ``groups``' fast collectives, in axis order."""
    seen: dict[int, SymmMemAllReduce] = {}
    for axis in GROUP_AXES:
        fast = getattr(groups, axis).fast
        if fast is not None and fast.enabled:
            seen.setdefault(id(fast.reducer), fast.reducer)
    return list(seen.values())


def align_slots(groups: ParallelGroups) -> None:
    """Every symmetric buffer of ``groups`` with slot 0 next
    (:meth:`~megatron_ext.communication.symm_mem.SymmMemAllReduce.align_slot`): what a CUDA-graph
    runner calls before a capture, at the end of it and before each replay. Collective over
    each buffer's group (every rank runs the same steps, so every rank's turn is the same)."""
    for reducer in symm_reducers(groups):
        reducer.align_slot(0)


def with_symm_collectives(groups: ParallelGroups, device: torch.device,
                          config: SymmMemConfig = DECODE_SYMM_CONFIG) -> ParallelGroups:
    """``groups`` with a :class:`SymmCollectives` on every multi-rank axis (one per distinct rank
    list, shared by the axes that have it). Collective over the world: every rank calls it, with
    the same groups (axes are visited in one fixed order). Axes where symmetric memory is not
    possible (CPU, gloo, one rank) keep no object, so this is harmless everywhere."""
    made: dict[tuple[int, ...], SymmCollectives] = {}
    changes = {}
    for axis in GROUP_AXES:
        g = getattr(groups, axis)
        if g.is_trivial or g.group is None:
            continue
        if g.ranks not in made:
            made[g.ranks] = SymmCollectives(g, torch.device(device), config)
        fast = made[g.ranks]
        if fast.enabled:
            changes[axis] = dataclasses.replace(g, fast=fast)
    return dataclasses.replace(groups, **changes)
