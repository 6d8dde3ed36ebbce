"""The raw (non-autograd) collectives of CP attention over an explicit :class:`AxisGroup`.

CP attention writes its own backward, so it needs plain collectives that can run asynchronously
(to overlap with attention math): all-gather of K/V, reduce-scatter of dK/dV and the ring
exchange (send to the next CP rank, receive from the previous one). Each is logged through
:func:`megatron_ext.parallel.comm_counter.record` under the group's axis name.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import AxisGroup


_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gather_into(out: torch.Tensor, x: torch.Tensor, group: AxisGroup, async_op: bool = False):
    """Raw all-gather of contiguous ``x`` into contiguous ``out [cp, *x.shape]`` (flat views:
    gloo wants the output as a dim-0 concatenation)."""
    return _GATHER(out.view(-1), x.view(-1), group=group.group, async_op=async_op)


class Pending:
    """Handles of asynchronous ops; :meth:`wait` makes their results usable."""

    def __init__(self, works: Optional[list] = None):
        self.works = [w for w in (works or []) if w is not None]

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


def all_gather_async(x: torch.Tensor, group: AxisGroup) -> tuple[torch.Tensor, Pending]:
    """``[cp, *x.shape]`` holding every rank's ``x`` (valid after ``wait()``)."""
    x = x.contiguous()
    out = x.new_empty((group.size,) + tuple(x.shape))
    record("all_gather", group.name, _nbytes(out))
    work = gather_into(out, x, group, async_op=True)
    return out, Pending([work])


def reduce_scatter(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """``x [cp, ...]``: sum over ranks of ``x[i]`` lands on rank ``i``."""
    x = x.contiguous()
    record("reduce_scatter", group.name, _nbytes(x))
    if dist.get_backend(group.group) == "nccl":
        out = x.new_empty(x.shape[1:])
        _REDUCE_SCATTER(out.view(-1), x.view(-1), group=group.group)
        return out
    dist.all_reduce(x, group=group.group)  # gloo builds without reduce-scatter exist
    return x[group.rank].clone()


def ring_exchange_async(send: torch.Tensor, recv: torch.Tensor, group: AxisGroup) -> Pending:
    """Send ``send`` to the next CP rank and receive the previous rank's into ``recv``."""
    nxt = group.ranks[(group.rank + 1) % group.size]
    prv = group.ranks[(group.rank - 1) % group.size]
    record("send_recv", group.name, _nbytes(send))
    ops = [dist.P2POp(dist.isend, send, nxt, group.group),
           dist.P2POp(dist.irecv, recv, prv, group.group)]
    return Pending(dist.batch_isend_irecv(ops))
