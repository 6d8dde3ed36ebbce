"""Gradient buckets, global gradient norm, clipping and AdamW on sharded parameters — with and
without the distributed optimizer, fp32 and bf16 with fp32 main weights — against a one-process
reference holding the full tensors; learning-rate schedule against torch's schedulers."""
from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import ParamSpec, get_spec
from megatron_ext.parallel.topology import GROUP_AXES, Topology
from megatron_ext.training.grad_buffer import check_axes_independent
from megatron_ext.training.optimizer import LRSchedule, TrainOptimizer, clip_grads_
from tests.helpers.multirank import run_ranks
from tests.helpers.pretrain_standin import build_params, global_tensor

LAYOUTS = [  # (sizes, tied embedding)
    (dict(attn_tp=2, attn_cp=2, moe_dp=1), False),                        # seed layout, moe_tp 4
    (dict(attn_tp=2, attn_dp=2, moe_ep=2, moe_tp=1, moe_dp=2), False),
    (dict(pp=2, attn_tp=2, moe_ep=2, moe_tp=1, moe_dp=1), False),
    (dict(attn_cp=2, attn_dp=2, attn_tp=1, moe_ep=2, moe_tp=2, moe_dp=1), False),
    (dict(attn_dp=4, moe_dp=4, moe_ep=1, moe_tp=1), False),               # dp 4, experts moe_dp 4
    (dict(pp=2, attn_dp=2, moe_dp=2, moe_ep=1, moe_tp=1), True),          # tied embedding at pp 2
]
OPT = dict(clip_grad=1.0, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8)
SCHEDULE = LRSchedule(lr=1e-2, min_lr=1e-3, warmup_steps=2, total_steps=10)
STEPS = 2


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


def _reference(tied: bool, steps: int = STEPS):
    """One process, full tensors: gradient norm and parameters after ``steps`` updates."""
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=1, tied=tied)
    opt = TrainOptimizer(params, groups, SCHEDULE, **OPT)
    norms = []
    for step in range(steps):
        opt.zero_grad()
        for name, p in params:  # zero on the vocabulary's padding rows, as the layers give
            p.grad = get_spec(p).take_local(global_tensor(name, seed=2) * (step + 1))
        opt.finish_grad_sync()
        norms.append(opt.grad_norm())
        opt.step(step)
    return norms, {n: get_spec(p).real_part(p.detach()).clone() for n, p in params}


def _check_collectives(log, opt: TrainOptimizer, sizes) -> None:
    """Per bucket: a reduce-scatter over its first axis when sharded (an all-reduce otherwise)
    with the bucket's bytes; later axes all-reduce only the owned slice."""
    want: dict = {}
    for b in opt.buckets:
        if not b.axes:
            continue
        full = b.main_grad.numel() * b.main_grad.element_size()
        first = ("reduce_scatter" if b.shard_axis else "all_reduce", b.axes[0])
        want[first] = want.get(first, 0) + full
        for axis in b.axes[1:]:
            key = ("all_reduce", axis)
            want[key] = want.get(key, 0) + b.shard_size * b.main_grad.element_size()
    got: dict = {}
    for r in log.records:
        got[(r.kind, r.axis)] = got.get((r.kind, r.axis), 0) + r.nbytes
    assert got == want, (sizes, got, want)


def _owned_elements(opt: TrainOptimizer) -> list[tuple[int, int]]:
    out = []
    for b in opt.buckets:
        lo, hi = b.own
        out.append((max(0, min(hi, b.numel) - lo), b.numel))
    return out


def _layout_rank(rank: int, world: int) -> None:
    refs = {tied: _reference(tied) for tied in (False, True)}
    for sizes, tied in LAYOUTS:
        ref_norms, ref_params = refs[tied]
        groups = build_groups(Topology(world=world, **sizes))
        for distributed in (False, True):
            params = build_params(groups, seed=1, tied=tied)
            opt = TrainOptimizer(params, groups, SCHEDULE, **OPT, distributed=distributed,
                                 bucket_bytes=256)  # small buckets: several per axis set
            what = f"{sizes} tied={tied} distributed={distributed}"
            assert any(b.shard_axis for b in opt.buckets) == distributed, what
            for step in range(STEPS):
                opt.zero_grad()
                for name, p in params:
                    p.grad = _grad_share(name, get_spec(p), groups) * (step + 1)
                with count_collectives() as log:
                    opt.finish_grad_sync()
                _check_collectives(log, opt, what)
                for q in opt.pieces:  # every owned piece holds its slice of the global gradient
                    full = global_tensor(q.slot.name, seed=2) * (step + 1)
                    want = q.slot.spec.take_local(full).reshape(-1)[
                        q.local_start:q.local_start + q.main.numel()]
                    torch.testing.assert_close(q.main.grad, want, rtol=1e-5, atol=1e-5,
                                               msg=f"{what} {q.slot.name}: synced gradient")
                norm = opt.grad_norm()
                assert math.isclose(norm, ref_norms[step], rel_tol=1e-6), (what, norm, ref_norms)
                opt.step(step, norm)
            for name, p in params:
                torch.testing.assert_close(p.detach(), get_spec(p).take_local(ref_params[name]),
                                           rtol=1e-5, atol=1e-6, msg=f"{what} {name}: parameters")
            # optimizer state: the owned slices tile each bucket, 1/N of it per rank
            owned = _owned_elements(opt)
            assert opt.state_bytes() == 8 * sum(o for o, _ in owned), what
            for b, (mine, numel) in zip(opt.buckets, owned):
                n = groups.axis(b.shard_axis).size if b.shard_axis else 1
                assert mine <= -(-numel // n), what
                if b.shard_axis:
                    total = torch.tensor([mine])
                    dist.all_reduce(total, group=groups.axis(b.shard_axis).group)
                    assert int(total) == numel, what


def test_sync_norm_clip_adamw_match_single_process_in_6_layouts():
    """World 4: seed layout, attn_dp 2 x moe_ep 2, pp 2 x attn_tp 2, attn_cp 2 x moe_ep 2 x
    moe_tp 2, attn_dp 4, and pp 2 x attn_dp 2 with a tied embedding; each with and without the
    distributed optimizer. Per-rank gradient shares sum to the global gradient over each
    parameter's sync axes; after the bucketed reduction every owned gradient is its slice of the
    global one (one reduce-scatter or all-reduce per bucket with its bytes), the global norm equals
    the one-process norm (no double counting of replicas, shards or owners), two clipped AdamW
    steps give the one-process parameters, and a sharded rank holds exactly its 1/N of the
    optimizer state."""
    run_ranks(_layout_rank, 4, timeout=120)


def test_bf16_params_step_fp32_main_weights_like_fp32_adamw():
    """Mixed precision, one process: the model's parameters are bf16, AdamW runs on fp32 main
    weights initialised from the fp32 values, fed fp32 sums of the bf16 micro-batch gradients;
    after 3 steps of 2 micro-batches the main weights equal plain fp32 AdamW given the same
    gradients, and each parameter is its main weight rounded to bf16."""
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=1)
    reference = [(n, torch.nn.Parameter(p.detach().clone())) for n, p in params]
    opt = TrainOptimizer(params, groups, SCHEDULE, **OPT, param_dtype=torch.bfloat16)
    ref_opt = TrainOptimizer(reference, groups, SCHEDULE, **OPT)
    assert all(p.dtype == torch.bfloat16 for _, p in params)
    assert all(q.main.dtype == torch.float32 for q in opt.pieces)
    hooks = {id(s.param): opt.reducer._make_hook(b, s) for b in opt.buckets for s in b.slots}
    for step in range(3):
        opt.zero_grad(micro_batches=2)
        ref_opt.zero_grad()
        for (name, p), (_, r) in zip(params, reference):
            micro = [get_spec(p).take_local(global_tensor(name, seed=2 + m) * (step + 1))
                     .bfloat16() for m in range(2)]
            for g in micro:  # backward's post-accumulate hook folds each into the fp32 buffer
                p.grad = g
                hooks[id(p)](p)
            r.grad = micro[0].float() + micro[1].float()
        opt.finish_grad_sync()
        ref_opt.finish_grad_sync()
        norm = opt.grad_norm()
        assert norm == ref_opt.grad_norm()
        opt.step(step, norm)
        ref_opt.step(step)
    mains = {q.slot.name: q.main for q in opt.pieces}
    for (name, p), (_, r) in zip(params, reference):
        assert torch.equal(mains[name].view_as(r), r.detach()), name
        assert torch.equal(p.detach(), r.detach().bfloat16()), name


def test_reference_really_clips():
    """The layouts test only means something if clipping is active in the reference."""
    norms, _ = _reference(tied=False)
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
    decayed = {id(m) for g in opt.adamw.param_groups if g["weight_decay"] > 0
               for m in g["params"]}
    for q in opt.pieces:
        assert (id(q.main) in decayed) == (q.slot.param.dim() >= 2), q.slot.name


def test_sync_axes_that_overlap_are_rejected():
    topo = Topology(world=4, attn_tp=2, attn_cp=2, moe_dp=1)
    groups = ParallelGroups(topo, 0, **{
        a: AxisGroup(a, tuple(topo.group_of(a, 0)), topo.group_of(a, 0).index(0), None)
        for a in GROUP_AXES})
    check_axes_independent(("attn_dp_cp", "attn_tp"), groups, "ok")
    with pytest.raises(ValueError, match="double count"):
        check_axes_independent(("attn_dp_cp", "stage"), groups, "norm.weight")
