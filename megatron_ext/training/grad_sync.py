"""Bucketed gradient all-reduce driven by each parameter's ``ParamSpec.grad_sync`` (DESIGN.md §4).

After backward every rank holds, for each local parameter, the gradient of *its* share of the
loss. The spec names the axes over which those shares are summed: ``attn_dp_cp`` for dense
parameters, ``moe_dp`` for experts, ``stage`` for replicated parameters whose gradient is partial
per rank, plus ``embedding`` for weights tied across pipeline stages. Parameters with the same
axes and dtype are flattened into buckets and each bucket is all-reduced (SUM: the loss is already
divided by the global token count) once per non-trivial axis; buckets of one axis are issued
asynchronously and waited together.

Why not megatron-core's ``DistributedDataParallel``: its grad buffers are allocated on
``torch.cuda.current_device()`` (no CPU/gloo path) and it knows two sync groups (dense dp-cp and
expert dp) but not the per-parameter ``stage``/``embedding`` sums our layouts need; the GPU image
also has no megatron-core. This module is the same idea (contiguous buckets, async reductions)
driven by the specs, on gloo and NCCL alike.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.distributed as dist

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.parallel.axes import GROUP_AXES
from megatron_ext.communication.raw import all_reduce_


@dataclass
class GradBucket:
    axes: tuple[str, ...]  # non-trivial axes, summed in this order
    dtype: torch.dtype
    params: list[torch.nn.Parameter]

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


def check_axes_independent(axes: Sequence[str], groups: ParallelGroups, name: str) -> None:
    """Summing over several axes one after the other equals one sum over their product only if
    the groups meet in this rank alone; otherwise a gradient would be counted twice."""
    for axis in axes:
        if axis not in GROUP_AXES:
            raise ValueError(f"parameter {name}: unknown grad_sync axis {axis!r}; known: "
                             f"{', '.join(GROUP_AXES)}")
    for i, a in enumerate(axes):
        for b in axes[i + 1:]:
            common = set(groups.axis(a).ranks) & set(groups.axis(b).ranks)
            if common != {groups.global_rank}:
                raise ValueError(f"parameter {name}: grad_sync axes {a} and {b} share ranks "
                                 f"{sorted(common)}; summing over both would double count")


class GradSync:
    """Sum gradients over each parameter's ``grad_sync`` axes, in buckets of ``bucket_bytes``."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 groups: ParallelGroups, bucket_bytes: int = 25 * 2**20) -> None:
        self.groups = groups
        self.buckets: list[GradBucket] = []
        open_buckets: dict[tuple, GradBucket] = {}
        for name, param in named_params:
            if not param.requires_grad:
                continue
            spec = get_spec(param)
            check_axes_independent(spec.grad_sync, groups, name)
            axes = tuple(a for a in spec.grad_sync if not groups.axis(a).is_trivial)
            if not axes:
                continue
            key = (axes, param.dtype)
            bucket = open_buckets.get(key)
            if bucket is None or (bucket.numel + param.numel()) * param.element_size() > bucket_bytes:
                bucket = GradBucket(axes, param.dtype, [])
                open_buckets[key] = bucket
                self.buckets.append(bucket)
            bucket.params.append(param)

    def sync(self) -> None:
        """All-reduce every bucket (collective over each bucket's groups: call on every rank after
        backward). A parameter that got no gradient contributes zeros."""
        if not self.buckets:
            return
        flats = []
        for bucket in self.buckets:
            parts = []
            for p in bucket.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                parts.append(p.grad.reshape(-1))
            flats.append(torch.cat(parts) if len(parts) > 1 else parts[0].clone())
        max_axes = max(len(b.axes) for b in self.buckets)
        for step in range(max_axes):
            works = []
            for b, flat in zip(self.buckets, flats):
                if step < len(b.axes):
                    works.append(all_reduce_(flat, self.groups.axis(b.axes[step]),
                                             async_op=True))
            for work in works:
                work.wait()
        for bucket, flat in zip(self.buckets, flats):
            offset = 0
            for p in bucket.params:
                n = p.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n

    def describe(self) -> str:
        return ", ".join(f"{'+'.join(b.axes)}:{len(b.params)}p/{b.numel}" for b in self.buckets)
