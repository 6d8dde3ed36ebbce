"""AdamW on local parameter shards, a warmup + cosine learning-rate schedule, and clipping on the
true global gradient norm.

AdamW is elementwise, so running ``torch.optim.AdamW`` on each rank's shard is the same update as
on the full tensor. The norm is not: every piece of a parameter exists on several ranks (replicas
over data/context parallel ranks, copies of a tied embedding on two pipeline stages). Each rank
weights its squared norm of a parameter by ``distinct_pieces / holders`` (``holders`` = ranks that
hold some piece of it), so the world-wide sum counts every element exactly once, whatever the
layout. Gradients must be synced (``GradSync``) first, so that replicas agree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, get_spec
from megatron_ext.communication.raw import all_reduce_


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
    if spec.shard_axis is not None and groups.axis(spec.shard_axis).size != spec.distinct_pieces:
        raise ValueError(f"parameter {name}: shard_axis {spec.shard_axis} has "
                         f"{groups.axis(spec.shard_axis).size} ranks but the splits give "
                         f"{spec.distinct_pieces} pieces")


def global_grad_norm(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                     groups: ParallelGroups) -> float:
    """The 2-norm of the full model's gradient, as one process holding every global tensor would
    compute it (collective over the whole world)."""
    by_weight: dict[float, list[torch.Tensor]] = {}
    device = torch.device("cpu")
    for _, p in named_params:
        if p.grad is None:
            continue
        spec = get_spec(p)
        by_weight.setdefault(spec.distinct_pieces / _holders(spec, groups), []).append(p.grad)
        device = p.grad.device
    total = torch.zeros((), dtype=torch.float64, device=device)
    for weight, grads in by_weight.items():
        norms = torch.stack(torch._foreach_norm(grads)).double()
        total += norms.pow(2).sum() * weight
    if not groups.world.is_trivial:
        if dist.get_backend() == "nccl" and total.device.type != "cuda":
            total = total.cuda()
        all_reduce_(total, groups.world)
    return float(total.sqrt())


def clip_grads_(params: Iterable[torch.nn.Parameter], max_norm: float, total_norm: float) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the factor used."""
    if max_norm <= 0 or not math.isfinite(total_norm) or total_norm <= max_norm:
        return 1.0
    coef = max_norm / (total_norm + 1e-6)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef)
    return coef


def build_adamw(named_params: list[tuple[str, torch.nn.Parameter]], lr: float,
                weight_decay: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms, biases or other vectors)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        (decay if len(get_spec(p).global_shape) >= 2 else no_decay).append(p)
    param_groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, eps=eps, foreach=True)


class TrainOptimizer:
    """AdamW + schedule + global-norm clipping over one rank's parameters."""

    def __init__(self, named_params: list[tuple[str, torch.nn.Parameter]], groups: ParallelGroups,
                 schedule: LRSchedule, clip_grad: float, weight_decay: float,
                 betas: tuple[float, float], eps: float) -> None:
        self.named_params = [(n, p) for n, p in named_params if p.requires_grad]
        self.groups = groups
        self.schedule = schedule
        self.clip_grad = clip_grad
        for name, p in self.named_params:
            check_spec_layout(name, get_spec(p), groups)
        self.adamw = build_adamw(self.named_params, schedule.lr, weight_decay, betas, eps)

    def grad_norm(self) -> float:
        return global_grad_norm(self.named_params, self.groups)

    def step(self, step: int, grad_norm: Optional[float] = None) -> tuple[float, float]:
        """Clip, set the learning rate of ``step`` and update. Returns ``(grad_norm, lr)``."""
        if grad_norm is None:
            grad_norm = self.grad_norm()
        clip_grads_((p for _, p in self.named_params), self.clip_grad, grad_norm)
        lr = self.schedule.lr_at(step)
        for group in self.adamw.param_groups:
            group["lr"] = lr
        self.adamw.step()
        return grad_norm, lr

    def zero_grad(self) -> None:
        self.adamw.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ checkpoint state
    def init_state(self) -> None:
        """Create Adam's moments now (zeros), so a checkpoint can be loaded into them."""
        for group in self.adamw.param_groups:
            for p in group["params"]:
                state = self.adamw.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def moment_tensors(self) -> dict[str, tuple[torch.nn.Parameter, torch.Tensor]]:
        """``{"<param name>/exp_avg": (param, tensor), ...}``: the state laid out like its param."""
        self.init_state()
        out = {}
        for name, p in self.named_params:
            state = self.adamw.state[p]
            out[f"{name}/exp_avg"] = (p, state["exp_avg"])
            out[f"{name}/exp_avg_sq"] = (p, state["exp_avg_sq"])
        return out

    def set_step_count(self, steps: int) -> None:
        """Adam's bias-correction step (identical for every parameter)."""
        self.init_state()
        for _, p in self.named_params:
            self.adamw.state[p]["step"].fill_(float(steps))
