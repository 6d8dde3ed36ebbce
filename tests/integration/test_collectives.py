"""Autograd collectives: forward and backward of each one against a single-process reference.

Every rank builds every rank's inputs from seeds, so each rank can run the reference (plain torch
autograd over all ranks' tensors at once) itself and compare its own slice. The upstream gradient
differs per rank (a per-rank weight ``w_r`` in the loss ``sum_r <w_r, y_r>``) wherever consumers
compute different parts, so a wrong adjoint cannot pass by symmetry.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import pytest

from megatron_ext.communication import collectives as C
from megatron_ext.parallel.comm_counter import count_collectives, record
from megatron_ext.parallel.groups import AxisGroup
from tests.helpers._comm_blocks import assert_close
from tests.helpers.multirank import run_ranks

DT = torch.float64


def _rand(seed: int, *shape: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=DT, device="cpu").to(torch.get_default_device())


def _groups(rank: int, world: int = 4) -> dict[str, AxisGroup]:
    """Groups of a 4-rank world: the whole world, a pair without rank 0, and a 2×2 split
    (a 2-rank world, for the NCCL script: just the whole world)."""
    lists = ({"world": [[0, 1, 2, 3]], "odd": [[1, 3], [0, 2]], "tp": [[0, 1], [2, 3]],
              "tok": [[0, 2], [1, 3]]} if world == 4 else {"world": [list(range(world))]})
    made = {}
    for name, ranks_lists in lists.items():
        for ranks in ranks_lists:
            pg = dist.group.WORLD if len(ranks) == world else dist.new_group(ranks)
            if rank in ranks:
                made[name] = AxisGroup(name, tuple(ranks), ranks.index(rank), pg)
    return made


def _close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert_close(a, b, what, rtol=1e-12, atol=1e-12)


def _check_all_gather(rank: int, g: AxisGroup, sizes, dim: int, mode: str, tag: int) -> None:
    n = g.size
    lens = sizes or [3] * n
    shape = lambda L: (2, L, 4) if dim == 1 else (L, 2, 4)  # noqa: E731
    xs = [_rand(tag * 100 + i, *shape(lens[i])).requires_grad_() for i in range(n)]
    full = sum(lens)
    # consumers: "reduce_scatter" -> each rank weights the gathered tensor differently
    ws = [_rand(tag * 100 + 50 + (i if mode == "reduce_scatter" else 0), *shape(full))
          for i in range(n)]
    y_ref = torch.cat(xs, dim=dim)
    loss_ref = (sum((w * y_ref).sum() for w in ws) if mode == "reduce_scatter"
                else (ws[0] * y_ref).sum())
    loss_ref.backward()
    x = xs[g.rank].detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.all_gather(x, g, dim=dim, sizes=sizes, backward=mode)
        _close(y, y_ref.detach(), f"all_gather fwd {g.name} sizes={sizes}")
        (ws[g.rank] * y).sum().backward()
    _close(x.grad, xs[g.rank].grad, f"all_gather bwd {mode} {g.name} sizes={sizes}")
    expect = {("all_gather", g.name): 1}
    if mode == "reduce_scatter":
        expect[("reduce_scatter", g.name)] = 1
    assert dict(log.by_kind_axis()) == expect, log.records
    assert log.count(phase="forward") == 1


def _check_reduce_scatter(rank: int, g: AxisGroup, sizes, dim: int, tag: int) -> None:
    n = g.size
    lens = sizes or [2] * n
    full = sum(lens)
    shape = lambda L: (3, L) if dim == 1 else (L, 3)  # noqa: E731
    xs = [_rand(tag * 100 + i, *shape(full)).requires_grad_() for i in range(n)]
    ws = [_rand(tag * 100 + 50 + i, *shape(lens[i])) for i in range(n)]
    total = sum(xs)
    pieces = torch.split(total, lens, dim=dim)
    sum((w * p).sum() for w, p in zip(ws, pieces)).backward()
    x = xs[g.rank].detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.reduce_scatter(x, g, dim=dim, sizes=sizes)
        _close(y, pieces[g.rank].detach(), f"reduce_scatter fwd {g.name} sizes={sizes}")
        (ws[g.rank] * y).sum().backward()
    _close(x.grad, xs[g.rank].grad, f"reduce_scatter bwd {g.name} sizes={sizes}")
    assert log.by_kind_axis(phase="forward") == {("reduce_scatter", g.name): 1}
    assert log.by_kind_axis(phase="backward") == {("all_gather", g.name): 1}


def _check_all_reduce_and_copy(rank: int, g: AxisGroup, tag: int) -> None:
    n = g.size
    # all_reduce: partials in, identical consumers (same w on every rank)
    xs = [_rand(tag + i, 5, 3).requires_grad_() for i in range(n)]
    w = _rand(tag + 40, 5, 3)
    (w * sum(xs)).sum().backward()
    x = xs[g.rank].detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.all_reduce(x, g)
        (w * y).sum().backward()
    _close(y, sum(xs).detach(), "all_reduce fwd")
    _close(x.grad, xs[g.rank].grad, "all_reduce bwd")
    assert log.by_kind_axis() == {("all_reduce", g.name): 1}
    # copy_to_region: replicated input, consumers compute different parts
    x_ref = _rand(tag + 60, 5, 3).requires_grad_()
    ws = [_rand(tag + 70 + i, 5, 3) for i in range(n)]
    sum((wi * x_ref).sum() for wi in ws).backward()
    x = x_ref.detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.copy_to_region(x, g)
        (ws[g.rank] * y).sum().backward()
    _close(y, x_ref.detach(), "copy_to_region fwd")
    _close(x.grad, x_ref.grad, "copy_to_region bwd")
    assert log.by_kind_axis(phase="backward") == {("all_reduce", g.name): 1}
    assert log.count(phase="forward") == 0


def _check_take_own_rows(rank: int, g: AxisGroup, sizes, dim: int, tag: int) -> None:
    n = g.size
    lens = sizes or [2] * n
    shape = lambda L: (3, L) if dim == 1 else (L, 3)  # noqa: E731
    x_ref = _rand(tag, *shape(sum(lens))).requires_grad_()
    ws = [_rand(tag + 10 + i, *shape(lens[i])) for i in range(n)]
    pieces = torch.split(x_ref, lens, dim=dim)
    sum((w * p).sum() for w, p in zip(ws, pieces)).backward()
    x = x_ref.detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.take_own_rows(x, g, dim=dim, sizes=sizes)
        _close(y, pieces[g.rank].detach(), "take_own_rows fwd")
        (ws[g.rank] * y).sum().backward()
    _close(x.grad, x_ref.grad, f"take_own_rows bwd sizes={sizes}")
    assert log.by_kind_axis() == {("all_gather", g.name): 1}
    assert log.count(phase="backward") == 1


def _check_all_to_all(rank: int, g: AxisGroup, tag: int) -> None:
    n = g.size
    # splits[i][j]: rows rank i sends to rank j (some zero)
    splits = [[(i + 2 * j) % 3 for j in range(n)] for i in range(n)]
    xs = [_rand(tag + i, sum(splits[i]), 2).requires_grad_() for i in range(n)]
    chunks = [torch.split(xs[i], splits[i]) for i in range(n)]
    outs = [torch.cat([chunks[i][j] for i in range(n)]) for j in range(n)]
    ws = [_rand(tag + 30 + j, outs[j].shape[0], 2) for j in range(n)]
    sum((w * o).sum() for w, o in zip(ws, outs)).backward()
    me = g.rank
    x = xs[me].detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.all_to_all(x, g, output_split_sizes=[splits[i][me] for i in range(n)],
                         input_split_sizes=splits[me])
        (ws[me] * y).sum().backward()
    _close(y, outs[me].detach(), "all_to_all fwd")
    _close(x.grad, xs[me].grad, "all_to_all bwd")
    assert log.by_kind_axis(phase="backward") == {("all_to_all", g.name): 1}


def _check_worked_case(rank: int, tok: AxisGroup, tp: AxisGroup) -> None:
    """design §4: gather over the token group (k=2), consumers sharded over tok × tp (4 ranks)."""
    chunks = [_rand(900 + j, 3, 4).requires_grad_() for j in range(tok.size)]
    ws = [_rand(950 + r, 6, 4) for r in range(4)]  # every rank consumes a different part
    y_ref = torch.cat(chunks)
    sum((w * y_ref).sum() for w in ws).backward()
    j = tok.rank  # this rank holds chunk j, identical across tp
    x = chunks[j].detach().clone().requires_grad_()
    with count_collectives() as log:
        y = C.all_gather(x, tok, grad_sum_group=tp)
        (ws[rank] * y).sum().backward()
    _close(y, y_ref.detach(), "worked case fwd")
    _close(x.grad, chunks[j].grad, "worked case bwd")
    assert log.by_kind_axis(phase="backward") == {("reduce_scatter", "tok"): 1,
                                                  ("all_reduce", "tp"): 1}
    # the same grads without grad_sum_group would be partial over tp: make sure the test sees it
    x2 = chunks[j].detach().clone().requires_grad_()
    (ws[rank] * C.all_gather(x2, tok)).sum().backward()
    assert not torch.allclose(x2.grad, chunks[j].grad)


def _check_errors(rank: int, g: AxisGroup) -> None:
    x = torch.zeros(5, 2, dtype=DT)
    with pytest.raises(ValueError, match="sizes"):
        C.all_gather(x, g, sizes=[5] * (g.size + 1))
    with pytest.raises(ValueError, match="sizes"):
        C.all_gather(x, g, sizes=[4] * g.size)
    with pytest.raises(ValueError, match="evenly"):
        C.reduce_scatter(torch.zeros(4 * g.size + 1, 2), g)
    with pytest.raises(ValueError, match="sum to"):
        C.take_own_rows(x, g, sizes=[1] * g.size)
    with pytest.raises(ValueError, match="backward"):
        C.all_gather(x, g, backward="identity")
    with pytest.raises(ValueError, match="input_split_sizes"):
        C.all_to_all(x, g, [1] * g.size, [1] * g.size)


def _ranks_main(rank: int, world: int) -> bool:
    groups = _groups(rank)
    _check_everything(rank, groups)
    # again through the NCCL code path (single-tensor ops, padded variable sizes), run on gloo
    C._use_native = lambda group: True
    _check_everything(rank, groups)
    return True


def _check_everything(rank: int, groups: dict) -> None:
    tag = 1
    for name in [n for n in ("world", "odd") if n in groups]:
        g = groups[name]
        for sizes in (None, [3, 0, 2, 5][:g.size] if g.size == 4 else [4, 1]):
            for dim in (0, 1):
                for mode in C.BACKWARD_MODES:
                    _check_all_gather(rank, g, sizes, dim, mode, tag)
                    tag += 1
                _check_reduce_scatter(rank, g, sizes, dim, tag)
                _check_take_own_rows(rank, g, sizes, dim, tag + 1)
                tag += 2
        _check_all_reduce_and_copy(rank, g, tag)
        _check_all_to_all(rank, g, tag + 100)
        tag += 200
    if "tok" in groups:
        _check_worked_case(rank, groups["tok"], groups["tp"])
    _check_errors(rank, groups["world"])


def test_collectives_forward_backward_match_reference():
    """Both code paths (gloo's portable one and NCCL's single-tensor one) in one spawn."""
    assert run_ranks(_ranks_main, 4, timeout=90) == [True] * 4


def test_trivial_group_returns_input_and_records_nothing():
    g = AxisGroup.single("attn_tp")
    x = torch.randn(4, 3, requires_grad=True)
    with count_collectives() as log:
        outs = [C.all_gather(x, g, sizes=[4]), C.reduce_scatter(x, g), C.all_reduce(x, g),
                C.copy_to_region(x, g), C.take_own_rows(x, g), C.all_to_all(x, g, [4], [4])]
        sum(o.sum() for o in outs).backward()
    assert all(o is x for o in outs)
    assert len(log) == 0
    _close(x.grad, torch.full_like(x, 6.0), "trivial-group grads")


def test_counter_is_off_by_default_and_nests():
    record("all_reduce", "attn_tp", 8)  # nothing open: ignored
    with count_collectives() as outer:
        record("all_reduce", "attn_tp", 8)
        with count_collectives() as inner:
            record("all_gather", "moe_cp", 16, phase="backward")
        record("all_reduce", "moe_shard", 4)
    assert inner.by_kind_axis() == {("all_gather", "moe_cp"): 1}
    assert outer.count() == 3 and outer.count(kind="all_reduce") == 2
    assert outer.nbytes(axis="attn_tp") == 8 and outer.count(phase="backward") == 1
    assert outer.by_axis() == {"attn_tp": 1, "moe_cp": 1, "moe_shard": 1}
    with pytest.raises(ValueError, match="phase"):
        with count_collectives():
            record("all_reduce", "x", 1, phase="sideways")
