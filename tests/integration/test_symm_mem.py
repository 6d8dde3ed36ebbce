"""Symmetric-memory all-reduce: it switches off cleanly (CPU, one rank, gloo, uneven token counts,
environment switch) and the fallback sums correctly, with an identity adjoint.

The symmetric kernels themselves need 2 CUDA GPUs: ``benchmarks/reduction_latency.py`` checks
them against a float64 sum before timing (BENCHMARKS.md)."""
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.communication.symm_mem import (LOCAL, NCCL, SymmMemAllReduce, SymmMemConfig,
                                            _RowParallelLinearInto, all_reduce_sum,
                                            group_unavailable_reason, rank_unavailable_reason,
                                            row_parallel_linear_into)
from tests.helpers.multirank import run_ranks


def test_config_validation_names_the_bad_value():
    with pytest.raises(ValueError, match="slot_bytes=100 must be a positive multiple of 256"):
        SymmMemConfig(slot_bytes=100)
    with pytest.raises(ValueError, match="one_shot_max_bytes=2048 must be <= two_shot_max_bytes"):
        SymmMemConfig(slot_bytes=4096, one_shot_max_bytes=2048, two_shot_max_bytes=1024)
    with pytest.raises(ValueError, match="two_shot_max_bytes=8192 must be <= slot_bytes=4096"):
        SymmMemConfig(slot_bytes=4096, one_shot_max_bytes=0, two_shot_max_bytes=8192)
    with pytest.raises(ValueError, match="must be an integer >= 0"):
        SymmMemConfig(one_shot_max_bytes=-1)
    with pytest.raises(ValueError, match="one_shot_kernel='cuda' must be 'auto', 'triton'"):
        SymmMemConfig(one_shot_kernel="cuda")
    cfg = SymmMemConfig()
    assert cfg.one_shot_limit(2) == cfg.slot_bytes and cfg.one_shot_limit(8) == 2**20
    assert SymmMemConfig(one_shot_max_bytes=4096).one_shot_limit(2) == 4096
    with pytest.raises(ValueError, match="config must be a SymmMemConfig"):
        SymmMemAllReduce(AxisGroup.single("attn_tp"), "cpu", config={"slot_bytes": 256})


def test_one_rank_group_is_local_and_free():
    reducer = SymmMemAllReduce(AxisGroup.single("attn_tp"), "cpu")
    assert not reducer.enabled and "one-rank" in reducer.reason
    assert reducer.method_for(1024) == LOCAL
    x = torch.randn(3, 8, dtype=torch.float64)
    with count_collectives() as log:
        assert reducer.all_reduce(x) is x
        assert all_reduce_sum(x, reducer) is x
    assert len(log) == 0  # trivial groups issue (and count) nothing
    buf = reducer.partial_buffer((3, 8), torch.bfloat16)
    assert buf.shape == (3, 8) and buf.dtype == torch.bfloat16 and not reducer.in_buffer(buf)


def test_environment_switch_and_token_rule():
    import os
    old = os.environ.get("MEGATRON_EXT_SYMM_MEM")
    try:
        os.environ["MEGATRON_EXT_SYMM_MEM"] = "0"
        assert "disabled by MEGATRON_EXT_SYMM_MEM=0" in rank_unavailable_reason()
        os.environ["MEGATRON_EXT_SYMM_MEM"] = "1"
        assert rank_unavailable_reason() is None  # the module imports even on CPU builds
    finally:
        if old is None:
            os.environ.pop("MEGATRON_EXT_SYMM_MEM", None)
        else:
            os.environ["MEGATRON_EXT_SYMM_MEM"] = old
    fake = AxisGroup("attn_dp", (0, 1), 0, object())  # never used: the rule fires first
    assert "different token counts" in group_unavailable_reason(fake, torch.device("cuda"))
    tp = AxisGroup("attn_tp", (0, 1), 0, object())
    assert "different token counts" in group_unavailable_reason(tp, "cuda", uniform_tokens=False)
    assert "is not CUDA" in group_unavailable_reason(tp, "cpu")


def test_row_parallel_linear_into_matches_linear_fwd_bwd():
    """The custom autograd function (used when the output goes to a symmetric slot) against
    ``F.linear``; with the reducer off it falls back to ``F.linear`` itself."""
    torch.manual_seed(0)
    reducer = SymmMemAllReduce(AxisGroup.single("attn_tp"), "cpu")
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, 4, dtype=torch.float64)
    ref = F.linear(x, w)
    gx_ref, gw_ref = torch.autograd.grad(ref, (x, w), g)
    out = _RowParallelLinearInto.apply(x, w, reducer)
    gx, gw = torch.autograd.grad(out, (x, w), g)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gw, gw_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(row_parallel_linear_into(x, w, reducer), ref, rtol=0, atol=0)


def _fallback_ranks(rank, world):
    group = dist.new_group(list(range(world)))
    tp = AxisGroup("attn_tp", tuple(range(world)), rank, group)
    reducer = SymmMemAllReduce(tp, "cpu")
    dp = SymmMemAllReduce(AxisGroup("attn_dp", tp.ranks, rank, group), "cpu")
    out = {"reason": reducer.reason, "dp_reason": dp.reason, "enabled": reducer.enabled,
           "method": reducer.method_for(4096), "repr": repr(reducer)}
    gen = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    with count_collectives() as log:
        s = reducer.all_reduce(x)
    out["x"], out["sum"] = x, s
    out["input_untouched"] = torch.equal(x, torch.randn(5, 7, generator=torch.Generator()
                                                        .manual_seed(100 + rank),
                                                        dtype=torch.float64))
    out["log"] = log.by_kind_axis()
    xg = x.clone().requires_grad_()
    y = all_reduce_sum(xg, reducer)
    (y * (rank + 2.0)).sum().backward()  # rank-dependent upstream grad: identity must pass it
    out["grad"] = xg.grad
    out["empty"] = tuple(reducer.all_reduce(torch.empty(0, 3)).shape)
    return out


def test_two_rank_cpu_fallback_sums_and_has_identity_adjoint():
    res = run_ranks(_fallback_ranks, 2, timeout=90)
    expected = res[0]["x"] + res[1]["x"]
    for rank, r in enumerate(res):
        assert not r["enabled"]
        assert "not CUDA" in r["reason"] and "fallback" in r["repr"]
        assert "different token counts" in r["dp_reason"]
        assert r["method"] == NCCL
        torch.testing.assert_close(r["sum"], expected, rtol=1e-14, atol=1e-14)
        assert r["input_untouched"]
        assert r["log"] == {("all_reduce", "attn_tp"): 1}
        torch.testing.assert_close(r["grad"], torch.full((5, 7), rank + 2.0, dtype=torch.float64))
        assert tuple(r["empty"]) == (0, 3)
