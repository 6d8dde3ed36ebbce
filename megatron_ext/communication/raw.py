"""The raw (non-autograd) collectives of CP attention over an explicit :class:`AxisGroup`.

CP attention writes its own backward, so it needs plain collectives that can run asynchronously
(to overlap with attention math): all-gather of K/V, reduce-scatter of dK/dV and the ring
exchange (send to the next CP rank, receive from the previous one). Each is logged through
:func:`megatron_ext.parallel.comm_counter.record` under the group's axis name.

Attention's K/V all-gather and dK/dV reduce-scatter run as pairwise send/recv
(:func:`gather_peers_async`, :func:`exchange_async`): NCCL's collectives need a ``[cp, ...]``
buffer that holds this rank's own slot too (one more copy of K/V or dK/dV per GPU), and the
pairwise form lets each peer's buffer be freed as soon as it is used. Each is still logged once
as the collective it implements.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import AxisGroup


# NCCL's single-tensor forms (newer torch names first)
gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def gather_into(out: torch.Tensor, x: torch.Tensor, group: AxisGroup, async_op: bool = False):
    """Raw all-gather of contiguous ``x`` into contiguous ``out [cp, *x.shape]`` (flat views:
    gloo wants the output as a dim-0 concatenation)."""
    return gather_single(out.view(-1), x.view(-1), group=group.group, async_op=async_op)


class Pending:
    """Handles of asynchronous ops; :meth:`wait` makes their results usable."""

    def __init__(self, works: Optional[list] = None):
        self.works = [w for w in (works or []) if w is not None]

    def wait(self) -> None:
        for w in self.works:
            w.wait()
        self.works = []


def reduce_scatter(x: torch.Tensor, group: AxisGroup) -> torch.Tensor:
    """``x [cp, ...]``: sum over ranks of ``x[i]`` lands on rank ``i``."""
    x = x.contiguous()
    record("reduce_scatter", group.name, _nbytes(x))
    if dist.get_backend(group.group) == "nccl":
        out = x.new_empty(x.shape[1:])
        reduce_scatter_single(out.view(-1), x.view(-1), group=group.group)
        return out
    return summed_slice(x, group, group.rank, 1)[0]


def summed_slice(x: torch.Tensor, group: AxisGroup, start: int, length: int) -> torch.Tensor:
    """Reduce-scatter as gloo can always do it (builds without a native one exist): all-reduce a
    copy of ``x`` (the caller logs the collective it implements), keep rows ``start:start+length``."""
    full = x.clone()
    if full.numel():
        dist.all_reduce(full, group=group.group)
    return full[start:start + length].clone()


Tensors = Union[torch.Tensor, Sequence[torch.Tensor]]


def _seq(x: Tensors) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else list(x)


def _pair_ops(send: Sequence[torch.Tensor], recv: Sequence[torch.Tensor], dst: int, src: int,
              group: AxisGroup, tag: int = 0) -> list:
    """isend of ``send`` to group index ``dst``, irecv of ``recv`` from ``src``; the i-th
    tensors are matched by tag ``tag + i`` (gloo matches by tag; NCCL by order)."""
    ops = [dist.P2POp(dist.isend, t, group.ranks[dst], group.group, tag=tag + i)
           for i, t in enumerate(send)]
    ops += [dist.P2POp(dist.irecv, t, group.ranks[src], group.group, tag=tag + i)
            for i, t in enumerate(recv)]
    return ops


def exchange_async(send: Tensors, recv: Tensors, dst: int, src: int, group: AxisGroup,
                   log_as: Optional[str] = "send_recv", tag: int = 0) -> Pending:
    """Send ``send`` (contiguous tensors) to CP rank ``dst`` and receive as many tensors from
    ``src`` into ``recv`` (indices in the group). ``log_as=None``: part of a collective that is
    logged once by its caller. ``tag``: keeps exchanges in flight together apart (gloo)."""
    send, recv = _seq(send), _seq(recv)
    if log_as is not None:
        record(log_as, group.name, sum(_nbytes(t) for t in send))
    return Pending(dist.batch_isend_irecv(_pair_ops(send, recv, dst, src, group, tag)))


def ring_exchange_async(send: Tensors, recv: Tensors, group: AxisGroup, tag: int = 0) -> Pending:
    """Send ``send`` to the next CP rank and receive the previous rank's into ``recv``."""
    n, me = group.size, group.rank
    return exchange_async(send, recv, (me + 1) % n, (me - 1) % n, group, tag=tag)


def gather_peers_async(xs: Sequence[torch.Tensor], group: AxisGroup
                       ) -> tuple[dict[int, list[torch.Tensor]], Pending]:
    """All-gather of the contiguous tensors ``xs`` without this rank's own slot: ``{peer index:
    [its copies of xs]}`` (valid after ``wait()``), so the caller can drop each peer's buffers
    as soon as they are used. Logged as one all-gather."""
    xs = [x.contiguous() for x in xs]
    record("all_gather", group.name, group.size * sum(_nbytes(x) for x in xs))
    out, ops = {}, []
    for r in range(group.size):
        if r != group.rank:
            out[r] = [torch.empty_like(x) for x in xs]
            ops += _pair_ops(xs, out[r], r, r, group)
    return out, Pending(dist.batch_isend_irecv(ops) if ops else [])


def all_reduce_(x: torch.Tensor, group: AxisGroup, op=dist.ReduceOp.SUM, async_op: bool = False,
                phase: Optional[str] = None):
    """In-place raw all-reduce of ``x`` over ``group``: logged (``phase`` as
    :func:`~megatron_ext.parallel.comm_counter.record` takes it), nothing at all on a trivial
    group, no traffic for an empty tensor. Every all-reduce of the package goes through here."""
    if group.is_trivial:
        return None
    record("all_reduce", group.name, _nbytes(x), phase)
    if not x.numel():
        return None
    return dist.all_reduce(x, op=op, group=group.group, async_op=async_op)


def log_collective(kind: str, group: AxisGroup, nbytes: int) -> None:
    """Log one collective that the caller carries out as several :func:`exchange_async`
    calls with ``log_as=None``."""
    record(kind, group.name, nbytes)
