"""Real process groups on 8 CPU ranks: every group of several layouts checked with a collective."""
import pytest
import torch
import torch.distributed as dist

from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.topology import GROUP_AXES, Topology
from tests.helpers.multirank import run_ranks

WORLD8_LAYOUTS = [
    dict(world=8, attn_tp=2, attn_cp=2, moe_ep=2, moe_dp=1),             # k=4, attn_dp 2
    dict(world=8, attn_tp=2, attn_cp=4, moe_ep=2, moe_tp=2, moe_dp=2),   # k=2
    dict(world=8, pp=2, attn_tp=2, attn_cp=2, moe_dp=1),                 # seed per stage
    dict(world=8, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=2),              # k=4... shard 4, tp 1
    dict(world=8, pp=4, attn_tp=2, moe_ep=2, moe_tp=1),                  # pp 4
]


def _check_groups(rank, world):
    checked = []
    for sizes in WORLD8_LAYOUTS:
        topo = Topology(**sizes)
        groups = build_groups(topo)
        for axis in GROUP_AXES:
            ax = groups.axis(axis)
            expected_ranks = [r for g in topo.group_lists(axis) if rank in g for r in g] or [rank]
            assert list(ax.ranks) == expected_ranks, (sizes, axis)
            assert ax.ranks[ax.rank] == rank
            if ax.group is None:
                assert ax.is_trivial
                continue
            assert dist.get_world_size(ax.group) == ax.size, (sizes, axis)
            assert dist.get_rank(ax.group) == ax.rank, (sizes, axis)
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=ax.group)
            assert t.item() == float(sum(ax.ranks)), (sizes, axis, t.item())
        if rank not in (0, 3):  # importing megatron-core costs ~5 s per process: two ranks suffice
            checked.append(len(GROUP_AXES))
            continue
        pgc = groups.to_megatron()
        assert (pgc.embd is None) == (topo.pp > 2 and rank // topo.stage_size not in (0, topo.pp - 1))
        assert dist.get_world_size(pgc.tp) == topo.attn_tp
        assert dist.get_world_size(pgc.cp) == topo.attn_cp
        assert dist.get_world_size(pgc.ep) == topo.moe_ep
        assert dist.get_world_size(pgc.expt_tp) == topo.moe_tp
        assert dist.get_world_size(pgc.expt_dp) == topo.moe_dp
        assert dist.get_world_size(pgc.tp_ep) == topo.moe_shard_size
        assert dist.get_world_size(pgc.dp_cp) == topo.attn_dp * topo.attn_cp
        assert dist.get_world_size(pgc.pp) == topo.pp
        checked.append(len(GROUP_AXES))
    # a topology that does not match the launched world is an error, not a hang
    try:
        build_groups(Topology(world=4))
    except ValueError as err:
        assert "does not match the launched world size 8" in str(err)
    else:
        raise AssertionError("mismatched world accepted")
    return checked


def test_real_groups_world8_several_layouts():
    results = run_ranks(_check_groups, 8, timeout=240)
    assert all(len(r) == len(WORLD8_LAYOUTS) for r in results)


def test_single_process_groups_need_no_distributed():
    groups = ParallelGroups.single_process()
    assert all(groups.axis(a).is_trivial for a in GROUP_AXES)
    with pytest.raises(ValueError, match="unknown axis"):
        groups.axis("tp")
