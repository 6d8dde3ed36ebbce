"""AdamW on main weights over gradient buckets (optionally sharded: ZeRO-1), a warmup + cosine
learning-rate schedule, and clipping on the true global gradient norm.

AdamW is elementwise, so stepping any slice of a parameter (a rank's local shard, or the piece of
it inside the 1/N bucket slice the distributed optimizer gives the rank) is the same update as on
the full tensor; weight decay is chosen per parameter (matrices only). The norm is not elementwise:
every element exists on several ranks (replicas over data/context parallel ranks, copies of a
tied embedding on two pipeline stages), and with the distributed optimizer only 1/N of the
replicas own it. Each rank weights its squared norm of an owned piece by
``distinct_pieces x N / holders`` (``holders`` = ranks holding some piece of the parameter), so the
world-wide sum counts every element exactly once, whatever the layout. Gradients must be reduced
(``finish_grad_sync``) first, so that owners agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, get_spec
from megatron_ext.communication.raw import all_reduce_, gather_single
from megatron_ext.training.grad_buffer import (Bucket, GradReducer, Slot, adopt_storage,
                                               build_buckets, main_grad_dtype)



@dataclass(frozen=True)
class LRSchedule:
    """Linear warmup from ``lr/warmup`` to ``lr`` over ``warmup_steps``, then cosine to
    ``min_lr`` at ``total_steps``. ``lr_at(step)`` is the rate used *by* optimizer step ``step``
    (0-based), a pure function: the schedule's checkpoint state is the step count alone."""

    lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def lr_at(self, step: int) -> float:
        if self.warmup_steps and step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def _holders(spec: ParamSpec, groups: ParallelGroups) -> int:
    """Ranks holding some piece of the parameter: its whole pipeline stage, twice over for a
    weight tied across the first and last stage."""
    n = groups.topology.stage_size
    if Axis.EMBEDDING in spec.grad_sync:
        n *= groups.embedding.size
    return n


def check_spec_layout(name: str, spec: ParamSpec, groups: ParallelGroups) -> None:
    """The norm weighting assumes each distinct piece has the same number of copies."""
    holders = _holders(spec, groups)
    if holders % spec.distinct_pieces:
        raise ValueError(f"parameter {name}: {spec.distinct_pieces} distinct pieces do not divide "
                         f"the {holders} ranks that hold it")
    # a shard axis may replicate its pieces evenly (K/V heads fewer than attn_tp: consecutive
    # attn_tp ranks share a head), never split them unevenly
    if spec.shard_axis is not None and groups.axis(spec.shard_axis).size % spec.distinct_pieces:
        raise ValueError(f"parameter {name}: shard_axis {spec.shard_axis} has "
                         f"{groups.axis(spec.shard_axis).size} ranks, which the splits' "
                         f"{spec.distinct_pieces} pieces do not divide")


def clip_grads_(tensors: Iterable[torch.Tensor], max_norm: float, total_norm: float) -> float:
    """Scale the gradients of ``tensors`` so the global norm is at most ``max_norm``; returns
    the factor used."""
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return 1.0
    coef = max_norm / (total_norm + 1e-6)
    grads = [t.grad for t in tensors if t.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef)
    return coef


def _norm_weight(spec: ParamSpec, groups: ParallelGroups, shard_group_size: int) -> float:
    """Each element of a global parameter is owned by ``holders / (distinct pieces x shard
    group)`` ranks; weighting squared norms by the inverse counts every element once."""
    return spec.distinct_pieces * shard_group_size / _holders(spec, groups)


@dataclass
class MainPiece:
    """The part of one parameter inside the slice of its bucket this rank owns, with its main
    (fp32 for 16-bit parameters) copy, the leaf AdamW updates."""

    slot: Slot
    bucket: Bucket
    lo: int                       # flat range in the bucket
    hi: int
    main: torch.nn.Parameter      # aliases param_data[lo:hi] when no cast is needed
    norm_weight: float

    @property
    def aliased(self) -> bool:
        return self.main.dtype == self.bucket.param_data.dtype

    @property
    def local_start(self) -> int:
        """Offset of the piece in the flattened local parameter."""
        return self.lo - self.slot.start


def _main_pieces(bucket: Bucket, groups: ParallelGroups) -> list[MainPiece]:
    """Main copies of the owned slice, taken from the parameters' current (full precision)
    values, then the parameters move into the bucket's storage."""
    own_lo, own_hi = bucket.own
    n = groups.axis(bucket.shard_axis).size if bucket.shard_axis else 1
    main_dtype = main_grad_dtype(bucket.param_data.dtype)
    cast = main_dtype != bucket.param_data.dtype
    found = []
    for slot in bucket.slots:
        lo, hi = max(own_lo, slot.start), min(own_hi, slot.start + slot.numel)
        if lo < hi:
            src = slot.param.detach().reshape(-1)[lo - slot.start:hi - slot.start]
            found.append((slot, lo, hi, src.to(main_dtype).clone() if cast else None))
    adopt_storage(bucket)
    pieces = []
    for slot, lo, hi, copy in found:
        main = torch.nn.Parameter(copy if cast else bucket.param_data[lo:hi])
        main.grad = bucket.main_grad[lo:hi]
        pieces.append(MainPiece(slot, bucket, lo, hi, main, _norm_weight(slot.spec, groups, n)))
    return pieces


STEP_CHUNK_BYTES = 256 * 2**20


def adamw_param_groups(pieces: list[MainPiece], weight_decay: float,
                       chunk_bytes: int = STEP_CHUNK_BYTES) -> list[dict]:
    """AdamW param groups: weight decay for matrices only, each group at most ``chunk_bytes`` of
    main weights (a larger single piece gets a group of its own).

    Why chunks: torch's foreach AdamW allocates ``sqrt(exp_avg_sq)`` for every tensor of a param
    group at once, a temporary as large as all the rank's main weights (15 GiB per rank for the
    12-layer Qwen3-30B-A3B slice at dp 2 / ep 2: the step, not the backward, set the peak). The
    temporaries of one group are freed before the next group runs, and AdamW is elementwise, so
    any grouping gives bitwise the same update."""
    groups: list[dict] = []
    for decay in (True, False):
        chunk, size = [], 0
        for q in pieces:
            if (len(q.slot.spec.global_shape) >= 2) != decay:
                continue
            nbytes = q.main.numel() * q.main.element_size()
            if chunk and size + nbytes > chunk_bytes:
                groups.append({"params": chunk, "weight_decay": weight_decay if decay else 0.0})
                chunk, size = [], 0
            chunk.append(q.main)
            size += nbytes
        if chunk:
            groups.append({"params": chunk, "weight_decay": weight_decay if decay else 0.0})
    return groups


class TrainOptimizer:
    """AdamW + schedule + global-norm clipping on main weights, over gradient buckets.

    * ``param_dtype`` (e.g. ``torch.bfloat16``): the model's parameters are cast to it; AdamW
      steps fp32 main weights and fp32 main gradients and the parameters are refreshed from them
      (mixed precision as Megatron does it). ``None``: parameters keep their dtype and AdamW
      updates them in place (fp32/float64 math unchanged).
    * ``distributed``: ZeRO-1 over each bucket's first sync group: gradients reduce-scattered,
      main weights and moments of the owned 1/N slice only, updated parameters all-gathered.
    * ``overlap_grad_reduce``: bucket reductions start from backward hooks (see
      :mod:`~megatron_ext.training.grad_buffer`). ``overlap_param_gather``: the parameter
      all-gather of a bucket is only waited for by the first forward that uses its parameters
      (hooks from :meth:`attach_param_gather_hooks`); otherwise it completes inside ``step``.

    * ``step_chunk_bytes`` (default the module's ``STEP_CHUNK_BYTES``): AdamW runs over param
      groups of at most this many main-weight bytes (:func:`adamw_param_groups`), bounding the
      step's temporary memory.

    One step: ``zero_grad(micro_batches)``, forward/backward, ``finish_grad_sync()``,
    ``grad_norm()``, ``step(step, grad_norm)``.
    """

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], groups: ParallelGroups,
                 schedule: LRSchedule, clip_grad: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, *, distributed: bool = False,
                 param_dtype: Optional[torch.dtype] = None, bucket_bytes: int = 25 * 2**20,
                 overlap_grad_reduce: bool = True, overlap_param_gather: bool = False,
                 step_chunk_bytes: Optional[int] = None) -> None:
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.groups = groups
        self.schedule = schedule
        self.clip_grad = clip_grad
        self.distributed = distributed
        self.overlap_param_gather = overlap_param_gather
        for name, p in self.named_params:
            check_spec_layout(name, get_spec(p), groups)
        self.buckets = build_buckets(self.named_params, groups, bucket_bytes, distributed,
                                     param_dtype)
        self.pieces = [piece for b in self.buckets for piece in _main_pieces(b, groups)]
        self.reducer = GradReducer(self.buckets, groups, overlap=overlap_grad_reduce)
        self.adamw = torch.optim.AdamW(
            adamw_param_groups(self.pieces, weight_decay, step_chunk_bytes or STEP_CHUNK_BYTES)
            or [{"params": []}],
            lr=schedule.lr, betas=betas, eps=eps, foreach=True)

    # ------------------------------------------------------------------ gradients
    def zero_grad(self, micro_batches: int = 1) -> None:
        """Start a step of ``micro_batches`` backward passes per parameter."""
        self.wait_params()
        self.reducer.start_step(micro_batches)

    def finish_grad_sync(self) -> None:
        self.reducer.finish()

    def grad_norm(self) -> float:
        """The 2-norm of the full model's gradient, as one process holding every global tensor
        would compute it (collective over the whole world; after ``finish_grad_sync``)."""
        by_weight: dict[float, list[torch.Tensor]] = {}
        for q in self.pieces:
            by_weight.setdefault(q.norm_weight, []).append(q.main.grad)
        device = self.buckets[0].main_grad.device if self.buckets else torch.device("cpu")
        total = torch.zeros((), dtype=torch.float64, device=device)
        for weight, grads in by_weight.items():
            norms = torch.stack(torch._foreach_norm(grads)).double()
            total += norms.pow(2).sum() * weight
        if not self.groups.world.is_trivial:
            if dist.get_backend() == "nccl" and total.device.type != "cuda":
                total = total.cuda()
            all_reduce_(total, self.groups.world)
        return float(total.sqrt())

    # ------------------------------------------------------------------ update
    def step(self, step: int, grad_norm: Optional[float] = None) -> tuple[float, float]:
        """Clip, set the learning rate of ``step``, update the owned main weights, refresh the
        parameters. Returns ``(grad_norm, lr)``."""
        if grad_norm is None:
            grad_norm = self.grad_norm()
        clip_grads_([q.main for q in self.pieces], self.clip_grad, grad_norm)
        lr = self.schedule.lr_at(step)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.step()
        self.refresh_params()
        return grad_norm, lr

    def refresh_params(self) -> None:
        """Copy main weights into the parameters and all-gather the sharded buckets."""
        with torch.no_grad():
            for q in self.pieces:
                if not q.aliased:
                    q.bucket.param_data[q.lo:q.hi].copy_(q.main)
        for b in self.buckets:
            if b.shard_axis:
                axis = self.groups.axis(b.shard_axis)
                lo, hi = b.own
                record("all_gather", axis.name, b.param_data.numel() * b.param_data.element_size())
                b.gather_work = gather_single(b.param_data, b.param_data[lo:hi], group=axis.group,
                                            async_op=True)
        if not self.overlap_param_gather:
            self.wait_params()

    def wait_params(self, buckets: Optional[Iterable[Bucket]] = None) -> None:
        """Complete pending parameter all-gathers (of ``buckets``, default all)."""
        for b in self.buckets if buckets is None else buckets:
            if b.gather_work is not None:
                b.gather_work.wait()
                b.gather_work = None

    def attach_param_gather_hooks(self, model: torch.nn.Module) -> list:
        """Forward pre-hooks that wait for the all-gather of the buckets holding a module's own
        parameters, so step n's all-gathers overlap step n+1's forward up to their first use."""
        bucket_of = {id(s.param): b for b in self.buckets for s in b.slots}
        handles = []
        for module in model.modules():
            mine = {id(bucket_of[id(p)]): bucket_of[id(p)]
                    for p in module.parameters(recurse=False) if id(p) in bucket_of}
            if mine:
                buckets = list(mine.values())
                handles.append(module.register_forward_pre_hook(
                    lambda _m, _args, bs=buckets: self.wait_params(bs)))
        return handles

    # ------------------------------------------------------------------ checkpoint state
    def init_state(self) -> None:
        """Create Adam's moments now (zeros), so a checkpoint can be loaded into them."""
        for q in self.pieces:
            state = self.adamw.state[q.main]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(q.main, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(q.main,
                                                       memory_format=torch.preserve_format)

    def state_bytes(self) -> int:
        """Bytes of this rank's main weights (when they are copies) and AdamW moments."""
        self.init_state()
        total = 0
        for q in self.pieces:
            state = self.adamw.state[q.main]
            total += sum(state[k].numel() * state[k].element_size()
                         for k in ("exp_avg", "exp_avg_sq"))
            if not q.aliased:
                total += q.main.numel() * q.main.element_size()
        return total

    def checkpoint_tensors(self) -> list[tuple[str, ParamSpec, int, torch.Tensor]]:
        """``(key, spec, local flat start, flat tensor)`` of every owned piece: ``model/<name>``
        (the main weights: fp32 for a bf16 model) and ``optim/<name>/exp_avg|exp_avg_sq``."""
        self.init_state()
        out = []
        for q in self.pieces:
            state = self.adamw.state[q.main]
            out.append((f"model/{q.slot.name}", q.slot.spec, q.local_start, q.main.data))
            for moment in ("exp_avg", "exp_avg_sq"):
                out.append((f"optim/{q.slot.name}/{moment}", q.slot.spec, q.local_start,
                            state[moment]))
        return out

    def after_load(self, steps: int) -> None:
        """Adam's bias-correction step and the parameters from the loaded main weights."""
        self.init_state()
        for q in self.pieces:
            self.adamw.state[q.main]["step"].fill_(float(steps))
        self.refresh_params()
        self.wait_params()
