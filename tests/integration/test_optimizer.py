"""Gradient sync, global gradient norm, clipping and AdamW on sharded parameters against a
one-process reference holding the full tensors; learning-rate schedule against torch's schedulers."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import ParamSpec, get_spec
from megatron_ext.parallel.topology import GROUP_AXES, Topology
from megatron_ext.training.grad_sync import GradSync, check_axes_independent
from megatron_ext.training.optimizer import LRSchedule, TrainOptimizer, clip_grads_
from tests.helpers.multirank import run_ranks
from tests.helpers.pretrain_standin import build_params, global_tensor

LAYOUTS = [
    dict(attn_tp=2, attn_cp=2, moe_dp=1),                        # seed layout, moe_tp 4
    dict(attn_tp=2, attn_dp=2, moe_ep=2, moe_tp=1, moe_dp=2),
    dict(pp=2, attn_tp=2, moe_ep=2, moe_tp=1, moe_dp=1),
    dict(attn_cp=2, attn_dp=2, attn_tp=1, moe_ep=2, moe_tp=2, moe_dp=1),
]
OPT = dict(clip_grad=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
SCHEDULE = LRSchedule(lr=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=10)


def _grad_share(name: str, spec: ParamSpec, groups: ParallelGroups) -> torch.Tensor:
    """This rank's pre-sync share of the global gradient: random parts over the sync groups that
    sum to the global gradient."""
    axes = [groups.axis(a) for a in spec.grad_sync if not groups.axis(a).is_trivial]
    n, j = 1, 0
    for ax in axes:
        j += ax.rank * n
        n *= ax.size
    grad = global_tensor(name, seed=2).double()
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    noise = torch.randn((n,) + tuple(grad.shape), generator=gen, dtype=torch.float64)
    part = noise[j] - noise.mean(0) + grad / n
    return spec.take_local(part.float())


def _reference(steps: int = 2):
    """One process, full tensors: gradient norm and parameters after ``steps`` updates."""
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=1)
    opt = TrainOptimizer(params, groups, SCHEDULE, **OPT)
    norms = []
    for step in range(steps):
        for name, p in params:
            p.grad = global_tensor(name, seed=2) * (step + 1)
        norms.append(opt.grad_norm())
        opt.step(step)
        opt.zero_grad()
    return norms, {n: p.detach().clone() for n, p in params}


def _layout_rank(rank: int, world: int) -> None:
    ref_norms, ref_params = _reference()
    for sizes in LAYOUTS:
        groups = build_groups(Topology(world=world, **sizes))
        params = build_params(groups, seed=1)
        sync = GradSync(params, groups, bucket_bytes=256)  # small buckets: several per axis set
        opt = TrainOptimizer(params, groups, SCHEDULE, **OPT)
        for step in range(2):
            for name, p in params:
                p.grad = _grad_share(name, get_spec(p), groups) * (step + 1)
            with count_collectives() as log:
                sync.sync()
            # one all-reduce per bucket and axis, carrying exactly the bytes of its parameters
            want_bytes: dict = {}
            for b in sync.buckets:
                for axis in b.axes:
                    want_bytes[axis] = want_bytes.get(axis, 0) + sum(
                        q.numel() * q.element_size() for q in b.params)
            assert log.count("all_reduce") == sum(len(b.axes) for b in sync.buckets)
            assert {a: log.nbytes("all_reduce", a) for a in want_bytes} == want_bytes, sizes
            for name, p in params:
                want = get_spec(p).take_local(global_tensor(name, seed=2) * (step + 1))
                torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-5,
                                           msg=f"{sizes} {name}: synced gradient")
            norm = opt.grad_norm()
            assert math.isclose(norm, ref_norms[step], rel_tol=1e-6), (sizes, norm, ref_norms)
            opt.step(step, norm)
            opt.zero_grad()
        for name, p in params:
            torch.testing.assert_close(p.detach(), get_spec(p).take_local(ref_params[name]),
                                       rtol=1e-5, atol=1e-6, msg=f"{sizes} {name}: parameters")


def test_sync_norm_clip_adamw_match_single_process_in_4_layouts():
    """World 4: seed layout, attn_dp 2 x moe_ep 2, pp 2 x attn_tp 2, attn_cp 2 x moe_ep 2 x moe_tp 2.
    Per-rank gradient shares sum to the global gradient over each parameter's sync axes; after
    the bucketed sync every local gradient is its slice of the global one, the global norm equals
    the one-process norm (no double counting of replicas or shards), and two clipped AdamW steps
    give the one-process parameters."""
    run_ranks(_layout_rank, 4, timeout=120)


def test_reference_really_clips():
    """The layouts test only means something if clipping is active in the reference."""
    norms, _ = _reference()
    assert min(norms) > 10 * OPT["clip_grad"]


def test_lr_schedule_matches_torch_schedulers():
    lr, min_lr, warmup, total = 0.5, 0.05, 3, 12
    sched = LRSchedule(lr, min_lr, warmup, total)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    torch_sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warmup, 1.0, total_iters=warmup - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr),
    ], milestones=[warmup])
    for step in range(total + 1):
        assert math.isclose(sched.lr_at(step), opt.param_groups[0]["lr"], rel_tol=1e-9), step
        opt.step()
        torch_sched.step()
    assert sched.lr_at(total + 5) == pytest.approx(min_lr)


def test_clip_scales_to_max_norm_and_leaves_small_grads():
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    a.grad, b.grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)
    norm = math.sqrt(9 + 16 + 4 * 36)
    coef = clip_grads_([a, b], 2.0, norm)
    assert coef == pytest.approx(2.0 / (norm + 1e-6))
    assert math.sqrt(a.grad.pow(2).sum() + b.grad.pow(2).sum()) == pytest.approx(2.0, rel=1e-5)
    before = a.grad.clone()
    assert clip_grads_([a], 100.0, 1.0) == 1.0 and torch.equal(a.grad, before)


def test_weight_decay_only_on_matrices():
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=1)
    opt = TrainOptimizer(params, groups, SCHEDULE, **OPT)
    decayed = {id(p) for g in opt.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in params:
        assert (id(p) in decayed) == (p.dim() >= 2), name


def test_sync_axes_that_overlap_are_rejected():
    topo = Topology(world=4, attn_tp=2, attn_cp=2, moe_dp=1)
    groups = ParallelGroups(topo, 0, **{
        a: AxisGroup(a, tuple(topo.group_of(a, 0)), topo.group_of(a, 0).index(0), None)
        for a in GROUP_AXES})
    check_axes_independent(("attn_dp_cp", "attn_tp"), groups, "ok")
    with pytest.raises(ValueError, match="double count"):
        check_axes_independent(("attn_dp_cp", "stage"), groups, "norm.weight")
    with pytest.raises(ValueError, match="unknown grad_sync axis"):
        check_axes_independent(("dp",), groups, "w")
