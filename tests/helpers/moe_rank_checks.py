"""Multi-rank MoE checks, run inside spawned ranks by ``tests/test_moe.py`` (kept free of pytest so
ranks import little): the parallel MoE layer vs the single-process layer on the same global
weights, for the ``local`` (MOE_FULL) and ``all_to_all`` (SCATTERED) dispatchers."""
from __future__ import annotations

import torch

from megatron_ext.layers.moe import MoELayer, load_balancing_loss
from megatron_ext.communication.collectives import all_reduce
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.topology import Topology
from tests.helpers.parallel_check import assert_close, assert_grads_match, load_from_reference, sum_over

H, I, E = 16, 8, 8
SINGLE = ParallelGroups.single_process()

LAYOUTS = [  # (pp, moe_ep, moe_tp, moe_dp) on 8 ranks; pp=2: two independent 4-rank stages
    (2, 2, 2, 1), (2, 4, 1, 1), (2, 1, 4, 1), (2, 2, 1, 2), (2, 1, 2, 2), (1, 2, 2, 2),
]
CONFIGS = [  # (top_k, norm_topk_prob, shared_intermediate, gated)
    (2, True, 0, False), (3, False, 16, True),
]
AUX_COEF = 0.7


def _reference(cfg, seed):
    top_k, norm, shared, gated = cfg
    torch.manual_seed(seed)
    ref = MoELayer(H, E, top_k, I, SINGLE, norm_topk_prob=norm,
                   shared_expert_intermediate_size=shared, shared_expert_gate=gated,
                   dtype=torch.float64)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.4)
    return ref


def _check_local(groups, cfg, seed, sync_input_grad):
    """MOE_FULL: every shard rank holds its shard's tokens; shards hold distinct tokens."""
    top_k, norm, shared, gated = cfg
    topo = groups.topology
    n_shards, tokens = topo.moe_dp, 6
    g = torch.Generator().manual_seed(seed + 1)
    x_all = torch.randn(n_shards, tokens, H, generator=g, dtype=torch.float64)
    gy_all = torch.randn(n_shards, tokens, H, generator=g, dtype=torch.float64)
    ref = _reference(cfg, seed)
    xr = x_all.reshape(-1, H).clone().requires_grad_()
    out_r, stats_r = ref(xr)
    aux_r = load_balancing_loss([stats_r])
    ((out_r * gy_all.reshape(-1, H)).sum() + AUX_COEF * aux_r).backward()

    layer = MoELayer(H, E, top_k, I, groups, norm_topk_prob=norm,
                     shared_expert_intermediate_size=shared, shared_expert_gate=gated,
                     sync_input_grad=sync_input_grad, dtype=torch.float64)
    load_from_reference(layer, ref)
    q = groups.coords.moe_dp
    x = x_all[q].clone().requires_grad_()
    with count_collectives() as log:
        partial, stats = layer(x)
    assert len(log) == 0, f"local dispatcher issued collectives: {log.records}"
    out = all_reduce(partial, groups.moe_shard)        # the communicator's single reduction
    aux = load_balancing_loss([stats], sum_groups=(groups.stage,))
    ((out * gy_all[q]).sum() + AUX_COEF * aux).backward()
    what = f"local {topo} cfg={cfg}"
    assert_close(out, out_r[q * tokens:(q + 1) * tokens], atol=1e-10, rtol=0,
                 what=f"{what} forward")
    assert_close(sum_over(aux, "stage", groups), aux_r.detach(), atol=1e-12,
                 rtol=0, what=f"{what} aux")
    dx = x.grad if sync_input_grad else sum_over(x.grad, "moe_shard", groups)
    assert_close(dx, xr.grad[q * tokens:(q + 1) * tokens], atol=1e-10, rtol=0,
                 what=f"{what} input grad")
    assert_grads_match(layer, ref, groups, atol=1e-10, what=what)


def _check_all_to_all(groups, cfg, seed, counts):
    """SCATTERED: every stage rank holds distinct tokens (``counts[s]`` of them)."""
    top_k, norm, shared, gated = cfg
    topo = groups.topology
    s = groups.stage.rank
    g = torch.Generator().manual_seed(seed + 2)
    total = sum(counts)
    x_all = torch.randn(total, H, generator=g, dtype=torch.float64)
    gy_all = torch.randn(total, H, generator=g, dtype=torch.float64)
    mask_all = torch.rand(total, generator=g) > 0.2
    start = sum(counts[:s])
    mine = slice(start, start + counts[s])
    ref = _reference(cfg, seed)
    xr = x_all.clone().requires_grad_()
    out_r, stats_r = ref(xr, token_mask=mask_all)
    aux_r = load_balancing_loss([stats_r])
    ((out_r * gy_all).sum() + AUX_COEF * aux_r).backward()

    layer = MoELayer(H, E, top_k, I, groups, norm_topk_prob=norm,
                     shared_expert_intermediate_size=shared, shared_expert_gate=gated,
                     dispatcher="all_to_all", dtype=torch.float64)
    load_from_reference(layer, ref)
    x = x_all[mine].clone().requires_grad_()
    shard = groups.moe_shard
    first = groups.stage.rank - shard.rank
    shard_counts = counts[first:first + shard.size]
    out, stats = layer(x, token_mask=mask_all[mine], token_counts=shard_counts)
    aux = load_balancing_loss([stats], sum_groups=(groups.stage,))
    ((out * gy_all[mine]).sum() + AUX_COEF * aux).backward()
    what = f"all_to_all {topo} cfg={cfg} counts={counts}"
    assert_close(out, out_r[mine], atol=1e-10, rtol=0, what=f"{what} forward")
    assert_close(sum_over(aux, "stage", groups), aux_r.detach(), atol=1e-12,
                 rtol=0, what=f"{what} aux")
    assert_close(x.grad, xr.grad[mine], atol=1e-10, rtol=0, what=f"{what} input grad")
    assert_grads_match(layer, ref, groups, atol=1e-10, what=what)


def run_layouts(rank: int, world: int, layouts: list) -> int:
    """Every layout × config × dispatcher; returns how many checks passed on this rank."""
    torch.manual_seed(0)
    checked = 0
    for li, (pp, ep, tp, dp) in enumerate(layouts):
        groups = build_groups(Topology(world=world, pp=pp, moe_ep=ep, moe_tp=tp, moe_dp=dp))
        for ci, cfg in enumerate(CONFIGS):
            seed = 100 * li + ci
            _check_local(groups, cfg, seed, sync_input_grad=(li + ci) % 2 == 1)
            pattern = [5, 3, 0, 6] if li % 2 == 0 else [4, 4, 4, 4]
            counts = pattern * (groups.stage.size // 4)
            _check_all_to_all(groups, cfg, seed, counts)
            checked += 2
    return checked
