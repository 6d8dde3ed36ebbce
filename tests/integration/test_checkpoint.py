"""Layout-independent DCP checkpoints: save in one layout, load in others (and in one process),
every local tensor equals its slice of the global tensor; atomic publish under a crash mid-save."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp

from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.parallel.topology import Topology
from megatron_ext.checkpoint import training_state as ckpt
from megatron_ext.training.optimizer import LRSchedule, TrainOptimizer
from tests.helpers.multirank import run_ranks
from tests.helpers.pretrain_standin import all_global_shapes, build_params, global_tensor

SAVE_LAYOUT = dict(pp=2, attn_tp=2, moe_ep=2, moe_tp=1, moe_dp=1)
LOAD_LAYOUTS = [dict(attn_tp=2, attn_cp=2, moe_dp=1),
                dict(attn_cp=2, attn_dp=2, attn_tp=1, moe_ep=2, moe_tp=2, moe_dp=1),
                dict(pp=4, attn_tp=1)]
SCHED = LRSchedule(1e-3, 1e-4, 1, 10)


def _optimizer(params, groups, distributed: bool):
    return TrainOptimizer(params, groups, SCHED, clip_grad=1.0, weight_decay=0.0,
                          betas=(0.9, 0.95), eps=1e-8, distributed=distributed,
                          bucket_bytes=200)  # several buckets, pieces cut mid-row


def _want_piece(key: str, spec, start: int, n: int) -> torch.Tensor:
    """The slice of the global tensor behind an owned flat piece."""
    name = key.split("/")[1]
    seed = 1 if key.startswith("model/") else _seed(key)
    return spec.take_local(global_tensor(name, seed=seed)).reshape(-1)[start:start + n]


def _fill_moments(opt: TrainOptimizer) -> None:
    for key, spec, start, flat in opt.checkpoint_tensors():
        if key.startswith("optim/"):
            flat.copy_(_want_piece(key, spec, start, flat.numel()))


def _seed(key: str) -> int:
    return 11 if key.endswith("exp_avg") else 12


def _save_then_load_rank(rank: int, world: int, root: str) -> None:
    groups = build_groups(Topology(world=world, **SAVE_LAYOUT))
    params = build_params(groups, seed=1)
    opt = _optimizer(params, groups, distributed=True)
    assert any(b.shard_axis for b in opt.buckets)
    _fill_moments(opt)
    torch.manual_seed(100 + rank)
    expected_rng = torch.rand(3)
    torch.manual_seed(100 + rank)
    ckpt.save_checkpoint(root, 7, ckpt.collect_shards(opt.checkpoint_tensors()),
                         {"step": 7, "consumed_samples": 56})
    assert ckpt.latest_checkpoint(root) == ckpt.checkpoint_path(root, 7)
    torch.manual_seed(0)  # scramble; loading restores this rank's RNG state
    for i, sizes in enumerate(LOAD_LAYOUTS):
        groups = build_groups(Topology(world=world, **sizes))
        params = build_params(groups, seed=5)  # other values: must be overwritten
        opt = _optimizer(params, groups, distributed=i % 2 == 0)
        pieces = opt.checkpoint_tensors()
        state = ckpt.load_checkpoint(ckpt.checkpoint_path(root, 7), ckpt.collect_shards(pieces))
        opt.after_load(7)
        assert state == {"step": 7, "consumed_samples": 56}
        assert torch.equal(torch.rand(3), expected_rng)
        torch.manual_seed(0)
        for name, p in params:
            assert torch.equal(p.data, get_spec(p).take_local(global_tensor(name, seed=1))), \
                (sizes, name)
        for key, spec, start, flat in pieces:
            assert torch.equal(flat, _want_piece(key, spec, start, flat.numel())), (sizes, key)


def test_save_in_one_layout_load_in_three_others_and_in_one_process(tmp_path):
    """Saved at pp 2 x attn_tp 2 x moe_ep 2 with the distributed optimizer (each rank writes the
    flat pieces it owns as rectangular chunks); loaded at the seed layout, attn_cp 2 x attn_dp 2 x
    moe_ep 2 x moe_tp 2, and pp 4 (4 ranks; sharded, unsharded, sharded optimizer: state resharded),
    then in one process: parameters, Adam moments,
    train state and each rank's RNG state come back exactly."""
    root = str(tmp_path / "ckpts")
    run_ranks(_save_then_load_rank, 4, root, timeout=120)
    path = ckpt.checkpoint_path(root, 7)
    tensors = ckpt.load_global_tensors(path)
    shapes = all_global_shapes()
    assert {k for k in tensors if k.startswith("model/")} == {f"model/{n}" for n in shapes}
    for name in shapes:
        assert torch.equal(tensors[f"model/{name}"], global_tensor(name, seed=1)), name
        assert torch.equal(tensors[f"optim/{name}/exp_avg_sq"], global_tensor(name, seed=12))
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=3)
    state = ckpt.load_checkpoint(path, ckpt.collect_shards(ckpt.param_pieces(params)))
    assert state["consumed_samples"] == 56
    for name, p in params:
        assert torch.equal(p.data, get_spec(p).take_local(global_tensor(name, seed=1))), name


class _CrashingWriter(dcp.FileSystemWriter):
    """Writes every data file, then dies before the metadata (the commit point) is written."""

    def finish(self, metadata, results) -> None:
        raise RuntimeError("simulated crash during save")


def test_crash_mid_save_leaves_previous_checkpoint_loadable(tmp_path):
    root = str(tmp_path)
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=1)
    ckpt.save_checkpoint(root, 2, ckpt.collect_shards(ckpt.param_pieces(params)), {"step": 2})
    for _, p in params:
        p.data.add_(1.0)
    partial = ckpt.checkpoint_path(root, 4) + ckpt.PARTIAL_SUFFIX
    with pytest.raises(BaseException) as failure:  # DCP wraps it: CheckpointException
        ckpt.save_checkpoint(root, 4, ckpt.collect_shards(ckpt.param_pieces(params)), {"step": 4},
                             storage_writer=_CrashingWriter(partial))
    assert "simulated crash" in str(getattr(failure.value, "failures", failure.value))
    assert os.path.isdir(partial) and os.listdir(partial)  # data files written, not published
    assert not os.path.exists(ckpt.checkpoint_path(root, 4))
    assert ckpt.latest_checkpoint(root) == ckpt.checkpoint_path(root, 2)
    assert ckpt.resolve_resume("latest", root) == ckpt.checkpoint_path(root, 2)
    fresh = build_params(groups, seed=9)
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(root), ckpt.collect_shards(ckpt.param_pieces(fresh))) == \
        {"step": 2}
    for name, p in fresh:
        assert torch.equal(p.data, get_spec(p).take_local(global_tensor(name, seed=1))), name
    # the next save removes the leftover and publishes; keep=2 prunes the oldest
    ckpt.save_checkpoint(root, 6, ckpt.collect_shards(ckpt.param_pieces(params)), {"step": 6}, keep=2)
    ckpt.save_checkpoint(root, 8, ckpt.collect_shards(ckpt.param_pieces(params)), {"step": 8}, keep=2)
    assert not os.path.exists(partial)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [6, 8]


def test_load_rejects_wrong_shapes_missing_entries_and_incomplete_dirs(tmp_path):
    root = str(tmp_path)
    groups = ParallelGroups.single_process()
    params = build_params(groups, seed=1)
    path = ckpt.save_checkpoint(root, 1, ckpt.collect_shards(ckpt.param_pieces(params)), {"step": 1})
    bigger = [(n, torch.nn.Parameter(torch.zeros(3, 3))) for n, _ in params[:1]]
    with pytest.raises(ValueError, match=r"global shape \(13, 8\), the model expects \(3, 3\)"):
        ckpt.load_checkpoint(path, ckpt.collect_shards(ckpt.param_pieces(bigger)))
    extra = [("not.in.checkpoint", torch.nn.Parameter(torch.zeros(2)))]
    with pytest.raises(ValueError, match="no entry 'model/not.in.checkpoint'"):
        ckpt.load_checkpoint(path, ckpt.collect_shards(ckpt.param_pieces(extra)))
    os.makedirs(os.path.join(root, "step_00000005"))  # no .metadata: never complete
    assert ckpt.latest_checkpoint(root) == path
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.resolve_resume(os.path.join(root, "step_00000005"), root)
    assert ckpt.resolve_resume("latest", str(tmp_path / "empty")) is None
    assert ckpt.read_train_state(path) == {"step": 1}


def test_flat_ranges_become_rectangles_that_tile_them_exactly():
    """Every flat range of 1-, 2- and 3-d tensors: the chunks are rectangles (offsets + sizes)
    whose elements are exactly the range, in order."""
    for shape in ((7,), (3, 5), (2, 3, 4), (4, 1, 3)):
        full = torch.arange(torch.Size(shape).numel()).reshape(shape)
        n = full.numel()
        for start in range(n):
            for stop in range(start + 1, n + 1):
                chunks = ckpt.flat_range_chunks(shape, start, stop)
                assert len(chunks) <= max(1, 2 * len(shape) - 1)
                got = []
                for lo, hi, offsets, sizes in chunks:
                    block = full[tuple(slice(o, o + z) for o, z in zip(offsets, sizes))]
                    assert block.reshape(-1).tolist() == list(range(lo, hi)), (shape, lo, hi)
                    got += block.reshape(-1).tolist()
                assert got == list(range(start, stop)), (shape, start, stop)
