"""The multi-rank harness reports failing and hung ranks instead of hanging CI."""
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.multirank import RankFailure, RankTimeout, run_ranks


def _sum_ranks(rank, world):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t.item()


def _one_rank_raises(rank, world):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def _one_rank_hangs(rank, world):
    if rank == 0:
        time.sleep(600)
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()


def test_results_in_rank_order():
    assert run_ranks(_sum_ranks, 3, timeout=60) == [3.0, 3.0, 3.0]


def test_failing_rank_reports_its_traceback():
    with pytest.raises(RankFailure, match="rank 1 of 2 failed(.|\n)*boom on rank one"):
        run_ranks(_one_rank_raises, 2, timeout=60)


def test_hung_rank_fails_within_timeout():
    start = time.monotonic()
    with pytest.raises((RankTimeout, RankFailure)):
        run_ranks(_one_rank_hangs, 2, timeout=8)
    assert time.monotonic() - start < 30


def _echo_tensors(rank, world, tensors):
    return [t * (rank + 1) for t in tensors]


def test_tensors_travel_as_arguments_and_results():
    inputs = [torch.arange(6.0).reshape(2, 3) for _ in range(64)]
    out = run_ranks(_echo_tensors, 2, inputs, timeout=60)
    assert torch.equal(out[1][5], inputs[5] * 2) and len(out[0]) == 64
