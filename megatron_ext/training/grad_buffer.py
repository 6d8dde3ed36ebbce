"""Contiguous parameter and main-gradient buckets, and the gradient reduction that fills them
(design §4; Megatron's ``ParamAndGradBuffer`` + ``DistributedDataParallel`` idea, driven by each
parameter's ``ParamSpec.grad_sync`` instead of two fixed groups).

* Parameters with the same non-trivial sync axes and dtype share a bucket. Their storage becomes
  a view of the bucket's flat ``param_data`` (so the distributed optimizer all-gathers updated
  parameters in place) and their gradient is accumulated into the bucket's flat ``main_grad``,
  fp32 for bf16/fp16 parameters (accumulation over micro-batches in fp32), the parameter's dtype
  otherwise (fp32/float64 runs are exactly today's math).
* A post-accumulate-grad hook adds each parameter's fresh ``.grad`` into its ``main_grad`` view and
  drops ``.grad``; when a bucket's parameters have all been accumulated for the step's last
  micro-batch, its reduction is launched asynchronously from the hook, overlapping the rest of the
  backward. Buckets are launched strictly in bucket order (a ready bucket waits for earlier ones),
  so every rank of a group issues the same collectives in the same order, whatever the timing —
  gloo and NCCL match collectives by order.
* ``shard_axis`` (distributed optimizer): the bucket is padded to a multiple of the group size and
  reduce-scattered over its first sync axis, so rank ``r`` of that group ends with the summed
  gradient of slice ``r`` only; further sync axes (the pipeline ``embedding`` pair, attention TP
  for norms of scattered regions) are summed over that slice only. Without sharding every axis is
  an all-reduce of the whole bucket.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

import torch

from megatron_ext.parallel.axes import GROUP_AXES
from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, get_spec
from megatron_ext.communication.raw import all_reduce_, reduce_scatter_single


def main_grad_dtype(param_dtype: torch.dtype) -> torch.dtype:
    """fp32 gradients for 16-bit parameters; exact dtype otherwise."""
    return torch.float32 if param_dtype in (torch.bfloat16, torch.float16) else param_dtype


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


def can_shard_over(axes: Sequence[str], groups: ParallelGroups) -> bool:
    """Slice ``i`` of a bucket reduce-scattered over ``axes[0]`` may be summed further over the
    other axes only if every rank of those groups owns the same slice index."""
    topo, first = groups.topology, axes[0]
    mine = groups.axis(first).rank
    for other in axes[1:]:
        for r in groups.axis(other).ranks:
            if topo.group_of(first, r).index(r) != mine:
                return False
    return True


@dataclass
class Slot:
    """A parameter's place in its bucket: flat elements ``[start, start + numel)``."""

    name: str
    param: torch.nn.Parameter
    spec: ParamSpec
    start: int

    @property
    def numel(self) -> int:
        return self.param.numel()


@dataclass
class Bucket:
    axes: tuple[str, ...]            # non-trivial sync axes, summed in this order
    shard_axis: Optional[str]        # axes[0] when the optimizer state is sharded over it
    slots: list[Slot]
    param_data: torch.Tensor         # flat, padded to a multiple of the shard group size
    main_grad: torch.Tensor
    shard_size: int                  # elements of the owned slice (all of them when unsharded)
    shard_rank: int
    work: object = None              # the launched reduction, until waited
    remaining: int = 0               # gradient accumulations still expected this step
    launched: bool = False
    gather_work: object = None       # the pending parameter all-gather (distributed optimizer)

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.slots)

    @property
    def own(self) -> tuple[int, int]:
        """Flat range of the slice this rank owns (optimizer state, main weights)."""
        return self.shard_rank * self.shard_size, (self.shard_rank + 1) * self.shard_size

    def grad_view(self, slot: Slot) -> torch.Tensor:
        return self.main_grad[slot.start:slot.start + slot.numel].view_as(slot.param)


def build_buckets(named_params: Iterable[tuple[str, torch.nn.Parameter]], groups: ParallelGroups,
                  bucket_bytes: int, distributed: bool,
                  param_dtype: Optional[torch.dtype] = None) -> list[Bucket]:
    """Bucket the parameters (in reverse order, the order backward produces their gradients) and
    move their storage into the buckets, cast to ``param_dtype`` when given."""
    plan: list[tuple[tuple, list[tuple[str, torch.nn.Parameter, ParamSpec]]]] = []
    open_: dict[tuple, list] = {}
    sizes: dict[int, int] = {}
    for name, param in reversed(list(named_params)):
        if not param.requires_grad:
            continue
        spec = get_spec(param)
        check_axes_independent(spec.grad_sync, groups, name)
        axes = tuple(a for a in spec.grad_sync if not groups.axis(a).is_trivial)
        dtype = param_dtype or param.dtype
        key = (axes, dtype)
        members = open_.get(key)
        nbytes = param.numel() * torch.empty((), dtype=dtype).element_size()
        if members is None or sizes[id(members)] + nbytes > bucket_bytes:
            members = []
            open_[key] = members
            sizes[id(members)] = 0
            plan.append((key, members))
        members.append((name, param, spec))
        sizes[id(members)] += nbytes
    buckets = []
    for (axes, dtype), members in plan:
        shard_axis = axes[0] if distributed and axes and can_shard_over(axes, groups) else None
        n = groups.axis(shard_axis).size if shard_axis else 1
        numel = sum(p.numel() for _, p, _ in members)
        padded = -(-numel // n) * n
        device = members[0][1].device
        param_data = torch.zeros(padded, dtype=dtype, device=device)
        main_grad = torch.zeros(padded, dtype=main_grad_dtype(dtype), device=device)
        slots, start = [], 0
        for name, param, spec in members:
            slots.append(Slot(name, param, spec, start))
            start += param.numel()
        buckets.append(Bucket(axes, shard_axis, slots, param_data, main_grad, padded // n,
                              groups.axis(shard_axis).rank if shard_axis else 0))
    return buckets


def adopt_storage(bucket: Bucket) -> None:
    """Point every parameter of ``bucket`` at its view of ``param_data`` (values copied, cast)."""
    with torch.no_grad():
        for s in bucket.slots:
            view = bucket.param_data[s.start:s.start + s.numel].view_as(s.param)
            view.copy_(s.param.data)
            s.param.data = view


@dataclass
class GradReducer:
    """Accumulates gradients into the buckets and reduces them (see the module doc)."""

    buckets: list[Bucket]
    groups: ParallelGroups
    overlap: bool = True
    launched_in_backward: int = 0    # buckets whose reduction a backward hook started, this step
    _next: int = 0
    _hooks: list = field(default_factory=list)

    def __post_init__(self) -> None:
        for bucket in self.buckets:
            for slot in bucket.slots:
                self._hooks.append(slot.param.register_post_accumulate_grad_hook(
                    self._make_hook(bucket, slot)))

    def _make_hook(self, bucket: Bucket, slot: Slot):
        def hook(param: torch.nn.Parameter) -> None:
            if param.grad is None:
                return
            bucket.grad_view(slot).add_(param.grad)
            param.grad = None
            if bucket.remaining > 0:
                bucket.remaining -= 1
                if bucket.remaining == 0:
                    self._launch_ready()
        return hook

    # ------------------------------------------------------------------ per step
    def start_step(self, micro_batches: int) -> None:
        """Zero the main gradients; with overlap, expect ``micro_batches`` accumulations of every
        parameter before a bucket's reduction launches."""
        for bucket in self.buckets:
            bucket.main_grad.zero_()
            bucket.work, bucket.launched = None, False
            bucket.remaining = len(bucket.slots) * micro_batches if self.overlap else 0
        self._next = 0
        self.launched_in_backward = 0

    def _launch_ready(self) -> None:
        while self._next < len(self.buckets):
            bucket = self.buckets[self._next]
            if bucket.remaining > 0 and bucket.axes:
                return
            self._launch(bucket)
            self._next += 1
            self.launched_in_backward += bool(bucket.axes)

    def _launch(self, bucket: Bucket) -> None:
        bucket.launched = True
        if not bucket.axes:
            return
        axis = self.groups.axis(bucket.axes[0])
        flat = bucket.main_grad
        nbytes = flat.numel() * flat.element_size()
        if bucket.shard_axis:
            lo, hi = bucket.own
            record("reduce_scatter", axis.name, nbytes)
            bucket.work = reduce_scatter_single(flat[lo:hi], flat, group=axis.group,
                                                async_op=True)
        else:
            bucket.work = all_reduce_(flat, axis, async_op=True)

    def finish(self) -> None:
        """Complete every bucket's reduction (collective: call on every rank after backward).
        Gradients left in ``.grad`` (set by hand, or of a parameter whose hook did not run) are
        accumulated first; a parameter that got no gradient contributes zeros."""
        for bucket in self.buckets:
            for slot in bucket.slots:
                if slot.param.grad is not None:
                    bucket.grad_view(slot).add_(slot.param.grad)
                    slot.param.grad = None
        for bucket in self.buckets[self._next:]:
            self._launch(bucket)
        self._next = len(self.buckets)
        for bucket in self.buckets:
            if bucket.work is not None:
                bucket.work.wait()
                bucket.work = None
        for bucket in self.buckets:
            lo, hi = bucket.own
            for axis_name in bucket.axes[1:]:  # each sums the previous result
                all_reduce_(bucket.main_grad[lo:hi], self.groups.axis(axis_name))
        for bucket in self.buckets:
            bucket.remaining = 0

    def describe(self) -> str:
        return ", ".join(f"{'+'.join(b.axes) or 'local'}{'/zero' if b.shard_axis else ''}:"
                         f"{len(b.slots)}p/{b.numel}" for b in self.buckets)
