"""The host-side choices of the symmetric-memory decode paths, with stand-ins for the GPU objects.

* When a pending sum completes through the reduce + add + RMSNorm kernel
  (:func:`megatron_ext.communication.collectives.fused_all_reduce_add_norm`): only with a
  residual, a norm with the RMSNorm contract and a group whose fast collectives take the partial;
  counted once as the all-reduce it replaces.
* Which buffers a CUDA-graph runner aligns to slot 0 at graph boundaries
  (:func:`megatron_ext.communication.symm_collectives.align_slots`).

The kernels are checked on two GPUs (``scripts/symm_collectives_check.py``: bit-equal to the
unfused path) and by the decode benchmark (tokens equal to the NCCL run)."""
import torch
from torch import nn

from megatron_ext.communication.collectives import fused_all_reduce_add_norm
from megatron_ext.layers.norm import RMSNorm
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import AxisGroup


class FastStandIn:
    """Answers like ``SymmCollectives.all_reduce_add_rms_norm``: as if the peer held the same
    partial, or ``None`` (does not serve) when ``serves`` is False."""

    def __init__(self, serves: bool = True):
        self.serves, self.calls = serves, []

    def all_reduce_add_rms_norm(self, partial, residual, weight, eps):
        self.calls.append((partial, residual, weight, eps))
        if not self.serves:
            return None
        h = 2 * partial + residual
        return torch.nn.functional.rms_norm(h, (h.shape[-1],), weight, eps), h


def _group(fast) -> AxisGroup:
    return AxisGroup("moe_shard", (0, 1), 0, None, fast=fast)


def test_fused_sum_takes_partial_residual_and_norm_and_counts_one_all_reduce():
    fast, norm = FastStandIn(), RMSNorm(8, 1e-5)
    partial, residual = torch.randn(3, 8), torch.randn(3, 8)
    with count_collectives() as log:
        y, h = fused_all_reduce_add_norm(partial, residual, norm, _group(fast))
    assert len(fast.calls) == 1
    got_partial, got_residual, weight, eps = fast.calls[0]
    assert got_partial is partial and got_residual is residual
    assert weight is norm.weight and eps == norm.eps
    torch.testing.assert_close(h, 2 * partial + residual)
    torch.testing.assert_close(y, norm(2 * partial + residual))
    assert log.by_kind_axis() == {("all_reduce", "moe_shard"): 1}
    assert log.nbytes() == partial.numel() * partial.element_size()


def test_fused_sum_declines_without_residual_other_norms_or_a_serving_group():
    partial, residual = torch.randn(3, 8), torch.randn(3, 8)
    norm = RMSNorm(8, 1e-5)
    with count_collectives() as log:
        fast = FastStandIn()
        # a first layer's embedding sum has no residual: norm(h) rounds unlike add + norm
        assert fused_all_reduce_add_norm(partial, None, norm, _group(fast)) is None
        # a norm without the RMSNorm contract (e.g. TransformerEngine's)
        assert fused_all_reduce_add_norm(partial, residual, nn.LayerNorm(8), _group(fast)) is None
        assert fast.calls == []
        # no fast collectives, a one-rank group, or fast ones that do not serve this partial
        assert fused_all_reduce_add_norm(partial, residual, norm, _group(None)) is None
        assert fused_all_reduce_add_norm(partial, residual, norm,
                                         AxisGroup.single("moe_shard")) is None
        declining = FastStandIn(serves=False)
        assert fused_all_reduce_add_norm(partial, residual, norm, _group(declining)) is None
        assert len(declining.calls) == 1
    assert len(log) == 0   # nothing counted: the caller's all-reduce will be


# ---------------------------------------------------------------- slot turns at graph boundaries
class ReducerStandIn:
    """Records ``align_slot`` calls (the real one launches a barrier-only kernel when the turn is
    elsewhere)."""

    def __init__(self):
        self.aligned = []

    def align_slot(self, slot: int = 0) -> None:
        self.aligned.append(slot)


class FastWithReducer:
    def __init__(self, reducer, enabled: bool = True):
        self.reducer, self.enabled = reducer, enabled


def test_align_slots_visits_each_symmetric_buffer_once():
    """A CUDA-graph runner aligns every distinct buffer behind the groups (axes with the same
    ranks share one) to slot 0; disabled fast collectives have no buffer to align."""
    import dataclasses

    from megatron_ext.communication.symm_collectives import align_slots, symm_reducers
    from megatron_ext.parallel.groups import ParallelGroups

    shared, other, off = ReducerStandIn(), ReducerStandIn(), ReducerStandIn()
    groups = ParallelGroups.single_process()
    groups = dataclasses.replace(
        groups,
        attn_cp=dataclasses.replace(groups.attn_cp, fast=FastWithReducer(shared)),
        moe_shard=dataclasses.replace(groups.moe_shard, fast=FastWithReducer(shared)),
        attn_tp=dataclasses.replace(groups.attn_tp, fast=FastWithReducer(other)),
        moe_ep=dataclasses.replace(groups.moe_ep, fast=FastWithReducer(off, enabled=False)))
    assert {id(r) for r in symm_reducers(groups)} == {id(shared), id(other)}
    align_slots(groups)
    assert shared.aligned == [0] and other.aligned == [0] and off.aligned == []
    align_slots(ParallelGroups.single_process())   # no fast collectives: nothing to do
