"""LayerCommunicator: a 5-layer stack (dense, sparse, sparse, dense, sparse) under 9 layouts on 4
and 8 CPU ranks; forward logits and the gradients of the input and of every parameter (after
summing over its ParamSpec grad_sync axes) equal the single-process reference; exact collective
counts per layer step and in backward; one reduction per MLP; deferral adds none.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist

from megatron_ext.communication.communicator import LayerCommunicator
from megatron_ext.communication import collectives as C
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.parallel.topology import Topology
from megatron_ext.communication.pending import PendingReduction
from megatron_ext.communication.scatter_modes import LayerScatterModes, ScatterMode
from megatron_ext.communication.token_layout import TokenLayout, split_rows
from tests.helpers import _comm_blocks as B
from tests.helpers.expected_collectives import backward_counter, expected_ops, forward_counter
from tests.helpers.multirank import run_ranks

S, T, MF = ScatterMode.SCATTERED, ScatterMode.TP_ATTN_FULL, ScatterMode.MOE_FULL
SPEC = B.StackSpec(5, frozenset({1, 2, 4}))


@dataclass(frozen=True)
class Case:
    name: str
    topo: dict
    counts: tuple          # tokens per attention group
    grad: bool             # False: inference (uneven attention-DP batches), forward only
    # (allow_reduce_scatter, defer_reductions, dispatcher[, fused hook[, mixed residual modes]])
    configs: tuple


BOTH = ((True, True, "local"), (False, True, "local"))
CASES_4 = (
    Case("seed: tp2 cp2 moe_dp1 (moe_tp4, k=2)", dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),
         (5, 5), True, BOTH + ((True, False, "local"), (False, False, "local"),
                               (False, True, "all_to_all"), (False, True, "local", True),
                               (True, True, "local", False, "TST"),
                               (False, True, "all_to_all", False, "STS"),
                               (True, False, "all_to_all", False, "TST"))),
    Case("tp2 dp2, moe_ep2 x moe_tp2 (k=2), uneven", dict(world=4, attn_tp=2, attn_dp=2,
                                                          moe_ep=2, moe_tp=2, moe_dp=1),
         (6, 3), True, BOTH),
    Case("tp1 cp4, moe_ep2 x moe_tp2 (k=4)", dict(world=4, attn_tp=1, attn_cp=4, moe_ep=2,
                                                  moe_tp=2, moe_dp=1), (3, 3, 3, 3), True,
         BOTH + ((False, True, "local", False, "STS"),)),
    Case("tp2 dp2 moe_dp2 (k=1), uneven, inference", dict(world=4, attn_tp=2, attn_dp=2,
                                                          moe_dp=2), (7, 1), False, BOTH),
    Case("tp4, moe_ep4 (k=1)", dict(world=4, attn_tp=4, moe_ep=4, moe_tp=1), (6,), True,
         BOTH + ((True, True, "all_to_all"), (False, True, "local", True))),
    # MoE shards smaller than an attention-TP group
    Case("tp4, moe_ep2 x moe_dp2 (g=2), uneven slices", dict(world=4, attn_tp=4, moe_ep=2,
                                                             moe_tp=1), (7,), True,
         BOTH + ((True, False, "local"), (False, False, "local"), (False, True, "local", True),
                 (True, True, "all_to_all"), (True, True, "local", False, "TST"),
                 (False, True, "local", False, "STS"))),
    Case("tp4, one-rank shards (g=4)", dict(world=4, attn_tp=4, moe_ep=1, moe_tp=1), (6,), True,
         BOTH),
)
CASES_8 = (
    Case("tp2 cp4, moe_ep4 x moe_tp2 (k=4)", dict(world=8, attn_tp=2, attn_cp=4, moe_ep=4,
                                                  moe_tp=2, moe_dp=1), (3, 3, 3, 3), True, BOTH),
    Case("tp2 cp2 dp2, moe_ep2 x moe_tp2 x moe_dp2 (k=2)",
         dict(world=8, attn_tp=2, attn_cp=2, attn_dp=2, moe_ep=2, moe_tp=2, moe_dp=2),
         (4, 4, 5, 5), True, BOTH),
    Case("tp2 dp4, moe_ep8 (k=4), uneven, inference", dict(world=8, attn_tp=2, attn_dp=4,
                                                           moe_ep=8, moe_tp=1, moe_dp=1),
         (6, 0, 3, 1), False, BOTH),
    Case("tp4 cp2, moe_tp8 (k=2)", dict(world=8, attn_tp=4, attn_cp=2, moe_tp=8, moe_dp=1),
         (5, 5), True, BOTH),
    Case("tp4 cp2, moe_ep2 x moe_dp4 (g=2)", dict(world=8, attn_tp=4, attn_cp=2, moe_ep=2,
                                                  moe_tp=1, moe_dp=4), (5, 5), True, BOTH),
    Case("tp8, moe_ep2 x moe_tp2 x moe_dp2 (g=2), inference",
         dict(world=8, attn_tp=8, moe_ep=2, moe_tp=2, moe_dp=2), (9,), False,
         BOTH + ((False, True, "all_to_all"),)),
)


# ------------------------------------------------------------------ one layout, one config
def _plain_fused_hook(calls: list):
    """A stand-in for the fused all-reduce + add + RMSNorm kernel (same math, records calls)."""
    def hook(partial, residual, norm, group):
        calls.append(group.name)
        h = C.all_reduce(partial, group)
        h = h if residual is None else h + residual
        return norm(h), h
    return hook


def _mixed(modes: list[LayerScatterModes], pattern: str) -> list[LayerScatterModes]:
    """Hand-built modes whose residual changes mode inside every layer ("TST": input and output
    TP_ATTN_FULL, middle SCATTERED; "STS" the other way round): covers the residual moves."""
    r_in, r_mid, r_out = (S if c == "S" else T for c in pattern)
    return [dataclasses.replace(m, layer_input_mode=r_in, middle_residual_mode=r_mid,
                                layer_output_mode=r_out) for m in modes]


def _check(groups: ParallelGroups, case: Case, allow_rs: bool, defer: bool, dispatcher: str,
           fused: bool = False, mixed: str = "", *, seed: int) -> None:
    topo, me = groups.topology, groups.coords
    what = (f"[{case.name} | reduce_scatter={allow_rs} defer={defer} {dispatcher} fused={fused} "
            f"mixed={mixed}]")
    counts = list(case.counts)
    layout = TokenLayout.from_counts(groups, counts)
    w = B.global_weights(seed, SPEC)
    modes = LayerScatterModes.for_stack(SPEC.num_layers, SPEC.sparse_layers, topo, allow_rs,
                                        dispatcher, defer)
    if mixed:
        modes = _mixed(modes, mixed)
    hook_calls: list = []
    model = B.Stack(w, SPEC, groups, modes, dispatcher,
                    _plain_fused_hook(hook_calls) if fused else None)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    x, target = B.rand(gen, sum(counts), B.DIN), B.rand(gen, sum(counts), B.VOCAB)

    ref_w = {k: v.clone().requires_grad_(case.grad) for k, v in w.items()}
    ref_x = x.clone().requires_grad_(case.grad)
    with torch.set_grad_enabled(case.grad):
        ref_logits = B.reference(ref_w, SPEC, ref_x, counts)
        if case.grad:
            (ref_logits * target).sum().backward()

    g = me.stage_rank // topo.attn_tp
    rows = slice(sum(counts[:g]), sum(counts[:g + 1]))
    A, a = topo.attn_tp, me.attn_tp
    cols = slice(a * B.DIN // A, (a + 1) * B.DIN // A)
    vocab = slice(a * B.VOCAB // A, (a + 1) * B.VOCAB // A)
    x_local = x[rows, cols].clone().requires_grad_(case.grad)
    logs, probe = {}, []
    with torch.set_grad_enabled(case.grad):
        logits = model(x_local, layout, logs, probe)
        B.assert_close(logits, ref_logits.detach()[rows, vocab], f"{what} logits")
        if case.grad:
            with count_collectives() as bwd:
                (logits * target[rows, vocab]).sum().backward()

    # the deferred MoE sum on MOE_FULL rows carries its scatter back to the residual's rows
    for l, (hidden, residual) in enumerate(probe):
        if modes[l].defer_mlp_reduction:
            assert isinstance(hidden, PendingReduction), what
            assert hidden.target_mode is modes[l].layer_output_mode, what
            assert residual.shape[0] == layout.rows(modes[l].layer_output_mode), what
            if modes[l].mlp_mode is MF:
                assert hidden.partial.shape[0] == layout.moe_full_tokens, what
            with torch.no_grad():  # what a pipeline send would do
                assert model.comms[l].flush(hidden).shape == residual.shape, what
        else:
            assert isinstance(hidden, torch.Tensor) and hidden.shape == residual.shape, what
            assert model.comms[l].flush(hidden) is hidden, what

    # exact collectives per step (forward) and in total (backward)
    trivial = {ax for ax in ("attn_tp", "moe_shard", "moe_cp") if groups.axis(ax).is_trivial}
    expect = expected_ops(modes, topo)
    if fused:  # every plain all-reduce completed by a prepare step went through the hook
        plain = [ax for key, ops in expect.items() if key[1] in ("prepare_attn", "prepare_mlp")
                 for op, ax in ops if op == "all_reduce"
                 and (ax == "attn_tp" or not topo.uses_moe_full)]
        assert hook_calls == plain and plain, (what, hook_calls, plain)
    assert set(logs) == set(expect), what
    for key, ops in expect.items():
        got = logs[key].by_kind_axis()
        assert got == forward_counter(ops, trivial), f"{what} {key}: {got} != {ops}"
    fwd_all = Counter()
    for log in logs.values():
        fwd_all += log.by_kind_axis()
    reductions = Counter(ax for (kind, ax), n in fwd_all.items() for _ in range(n)
                         if kind in ("all_reduce", "reduce_scatter"))
    n_sparse = len(SPEC.sparse_layers) if dispatcher == "local" else 0
    n_dense = SPEC.num_layers - len(SPEC.sparse_layers)
    # one reduction per block output: embedding + attention + dense MLP over attn_tp; MoE: shard
    assert reductions["attn_tp"] == (0 if "attn_tp" in trivial
                                     else 1 + SPEC.num_layers + n_dense), (what, fwd_all)
    assert reductions["moe_shard"] == (0 if "moe_shard" in trivial else n_sparse), (what, fwd_all)
    if case.grad:
        want = Counter()
        for ops in expect.values():
            want += backward_counter(ops, trivial)
        assert bwd.by_kind_axis() == want, f"{what} backward: {bwd.by_kind_axis()} != {want}"
        assert bwd.count(phase="forward") == 0, what

        B.assert_close(x_local.grad, ref_x.grad[rows, cols], f"{what} input grad")
        # sum every gradient over its grad_sync axes (one flat all-reduce per axis set)
        by_axes: dict = {}
        for p in model.parameters():
            by_axes.setdefault(get_spec(p).grad_sync, []).append(p)
        for axes, params in by_axes.items():
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in params])
            for axis in axes:
                if not groups.axis(axis).is_trivial:
                    dist.all_reduce(flat, group=groups.axis(axis).group)
            for p, grad in zip(params, torch.split(flat, [p.numel() for p in params])):
                spec = get_spec(p)
                B.assert_close(grad.view_as(p), spec.take_local(ref_w[spec.name].grad),
                               f"{what} grad of {spec.name}")


def _run_cases(rank: int, world: int, cases: tuple) -> int:
    checked = 0
    for i, case in enumerate(cases):
        groups = build_groups(Topology(**case.topo), timeout_s=60)
        for j, config in enumerate(case.configs):
            _check(groups, case, *config, seed=100 * i + j)
            checked += 1
    # serving: ranks only know their own count; one exchange builds the same layout everywhere
    counts = tuple(range(1, world // 2 + 1))
    topo = Topology(world=world, attn_tp=2)
    groups = build_groups(topo, timeout_s=60)
    mine = counts[groups.coords.attn_dp]
    with count_collectives() as log:
        layout = TokenLayout.exchange(groups, mine)
    assert layout.tokens_per_attn_group == counts and log.by_kind_axis() == {
        ("all_gather", "stage"): 1}
    # a complete (replicated) embedding enters a SCATTERED stack as own rows; adjoint all-gather
    layout = TokenLayout.uniform(groups, 5)
    norm = B.Norm({"n": torch.ones(B.H, dtype=B.DT)}, "n")
    comm = LayerCommunicator(LayerScatterModes.for_stack(1, (), topo, True)[0], groups, norm, norm)
    gen = torch.Generator(device="cpu").manual_seed(5)
    x = B.rand(gen, 5, B.H).requires_grad_()
    ws = [B.rand(gen, n, B.H) for n in layout.attn_tp_sizes]
    a = groups.attn_tp.rank
    with count_collectives() as log:
        hidden = comm.embedding_output(x, layout, is_partial=False)
        (hidden * ws[a]).sum().backward()
    own = slice(sum(layout.attn_tp_sizes[:a]), sum(layout.attn_tp_sizes[:a + 1]))
    B.assert_close(hidden, x.detach()[own], "complete embedding entry")
    B.assert_close(x.grad, torch.cat(ws), "complete embedding entry grad")
    assert log.by_kind_axis(phase="backward") == {("all_gather", "attn_tp"): 1}
    assert log.count(phase="forward") == 0
    return checked


def test_stack_matches_reference_on_4_ranks():
    n = sum(len(c.configs) for c in CASES_4)
    assert run_ranks(_run_cases, 4, CASES_4, timeout=150) == [n] * 4


def test_stack_matches_reference_on_8_ranks():
    n = sum(len(c.configs) for c in CASES_8)
    assert run_ranks(_run_cases, 8, CASES_8, timeout=200) == [n] * 8


# ------------------------------------------------------------------ single process
@pytest.mark.parametrize("allow_rs,dispatcher", [(True, "local"), (False, "local"),
                                                 (False, "all_to_all")])
def test_every_size_one_issues_no_collective(allow_rs, dispatcher):
    groups = ParallelGroups.single_process()
    w = B.global_weights(7, SPEC)
    modes = LayerScatterModes.for_stack(SPEC.num_layers, SPEC.sparse_layers, groups.topology,
                                        allow_rs, dispatcher)
    model = B.Stack(w, SPEC, groups, modes, dispatcher)
    x = torch.randn(6, B.DIN, dtype=B.DT, generator=torch.Generator().manual_seed(3))
    ref_w = {k: v.clone().requires_grad_() for k, v in w.items()}
    ref = B.reference(ref_w, SPEC, x, [6])
    ref.sum().backward()
    with count_collectives() as log:
        out = model(x, TokenLayout.uniform(groups, 6))
        out.sum().backward()
    assert len(log) == 0, log.records
    B.assert_close(out, ref.detach(), "single-process logits")
    for name, p in model.named_parameters():
        B.assert_close(p.grad, ref_w[get_spec(p).name].grad, f"grad of {name}")


def test_modes_per_layer():
    seed = Topology(world=4, attn_tp=2, attn_cp=2, moe_dp=1)
    modes = LayerScatterModes.for_stack(4, {1, 2}, seed, allow_reduce_scatter=True)
    assert [m.mlp_mode for m in modes] == [T, MF, MF, T]
    assert [m.mlp_partial_axis for m in modes] == ["attn_tp", "moe_shard", "moe_shard", "attn_tp"]
    assert all(m.layer_input_mode is m.middle_residual_mode is m.layer_output_mode is S
               for m in modes)
    assert [m.defer_mlp_reduction for m in modes] == [True, True, True, False]
    assert (modes[1].is_previous_layer_sparse, modes[1].is_next_layer_sparse) == (False, True)
    no_rs = LayerScatterModes.for_stack(4, {1, 2}, seed, allow_reduce_scatter=False)
    assert all(m.layer_output_mode is T for m in no_rs)
    k1 = LayerScatterModes.for_stack(2, {1}, Topology(world=2, attn_tp=2), True)
    assert k1[1].mlp_mode is T and k1[1].mlp_partial_axis == "moe_shard"
    a2a = LayerScatterModes.for_stack(2, {1}, seed, False, moe_dispatcher="all_to_all")
    assert a2a[1].mlp_mode is S and a2a[1].mlp_partial_axis is None
    assert a2a[0].layer_output_mode is S and not a2a[1].defer_mlp_reduction
    undeferred = LayerScatterModes.for_stack(3, {1}, seed, True, defer_reductions=False)
    assert not any(m.defer_mlp_reduction for m in undeferred)


def test_token_layout_sizes():
    assert split_rows(5, 2) == (3, 2) and split_rows(1, 4) == (1, 0, 0, 0)
    topo = Topology(world=8, attn_tp=2, attn_cp=2, attn_dp=2, moe_ep=2, moe_tp=2, moe_dp=2)
    # rank 5: stage rank 5 → attention group 2 (cp 0, dp 1), attn_tp 1, shard 1, token rank 0
    layout = TokenLayout(topo, 5, (4, 3, 5, 2))
    assert layout.local_tokens == 5 and layout.attn_tp_sizes == (3, 2)
    assert layout.scattered_tokens == 2
    assert layout.moe_cp_sizes == (5, 2) and layout.moe_full_tokens == 7
    assert layout.moe_shard_sizes == (3, 2, 1, 1)
    assert [layout.rows(m) for m in (S, T, MF, ScatterMode.FULL)] == [2, 5, 7, 14]
    with pytest.raises(ValueError, match="attention groups"):
        TokenLayout(topo, 0, (1, 2))
    with pytest.raises(ValueError, match="non-negative"):
        TokenLayout(topo, 0, (1, 2, -1, 3))


def _seed_layout():
    topo = Topology(world=4, attn_tp=2, attn_cp=2, moe_dp=1)
    return topo, TokenLayout(topo, 0, (4, 4))


def test_moe_full_deferral_without_scatter_is_refused():
    """The seed-000 hazard: a MoE sum on MOE_FULL rows deferred as a plain reduction would give
    hidden states k× longer than the residual. Refused where it could be built; the supported
    deferral (which includes the scatter) is exercised by the stack tests above."""
    topo, layout = _seed_layout()
    partial = torch.zeros(8, B.H, dtype=B.DT)  # MOE_FULL rows of the seed layout (k = 2)
    with pytest.raises(ValueError, match="must include the scatter"):
        PendingReduction(partial, "moe_shard", MF, MF, layout)
    ok = PendingReduction(partial, "moe_shard", MF, S, layout)  # includes the scatter: fine
    assert ok.plain_all_reduce_group(ParallelGroups.single_process()) is None
    with pytest.raises(ValueError, match="residual lives in SCATTERED or TP_ATTN_FULL"):
        LayerScatterModes(layer_input_mode=S, middle_residual_mode=S, mlp_mode=MF,
                          layer_output_mode=MF, mlp_partial_axis="moe_shard",
                          allow_reduce_scatter=True, defer_mlp_reduction=True)
    with pytest.raises(ValueError, match="expected 8 rows"):
        PendingReduction(torch.zeros(4, B.H), "moe_shard", MF, S, layout)


def test_communicator_refuses_mismatched_inputs():
    groups = ParallelGroups.single_process()
    layout = TokenLayout.uniform(groups, 4)
    norm = B.Norm({"n": torch.ones(B.H, dtype=B.DT)}, "n")
    comm = LayerCommunicator(LayerScatterModes.for_stack(2, {1}, groups.topology, True)[0],
                             groups, norm, norm)
    wrong_target = PendingReduction(torch.zeros(4, B.H, dtype=B.DT), "attn_tp", T, T, layout)
    with pytest.raises(ValueError, match="completes into TP_ATTN_FULL but the residual lives in "
                                         "SCATTERED"):
        comm.prepare_attn(wrong_target, torch.zeros(4, B.H, dtype=B.DT), layout)
    with pytest.raises(ValueError, match="expected 4 rows"):
        comm.prepare_attn(torch.zeros(3, B.H, dtype=B.DT), torch.zeros(4, B.H, dtype=B.DT),
                          layout)
    with pytest.raises(ValueError, match="expected 4 rows"):
        comm.prepare_mlp(torch.zeros(4, B.H, dtype=B.DT), torch.zeros(5, B.H, dtype=B.DT),
                         layout)
    # a MoE on TP_ATTN_FULL when the shard spans two attention groups (k = 2)
    seed_topo, _ = _seed_layout()
    bad = LayerScatterModes(layer_input_mode=S, middle_residual_mode=S, mlp_mode=T,
                            layer_output_mode=S, mlp_partial_axis="moe_shard",
                            allow_reduce_scatter=True, defer_mlp_reduction=False)
    with pytest.raises(ValueError, match="use MOE_FULL"):
        bad.check_topology(seed_topo)
    with pytest.raises(ValueError, match="FULL"):
        LayerScatterModes(layer_input_mode=S, middle_residual_mode=S,
                          mlp_mode=ScatterMode.FULL, layer_output_mode=S,
                          mlp_partial_axis="moe_shard", allow_reduce_scatter=True,
                          defer_mlp_reduction=False)


def test_norm_grad_sync_follows_the_residual_mode():
    groups = ParallelGroups.single_process()
    for allow_rs, axes in ((True, ("stage",)), (False, ("attn_dp_cp",))):
        n1 = B.Norm({"a": torch.ones(B.H)}, "a")
        n2 = B.Norm({"b": torch.ones(B.H)}, "b")
        modes = LayerScatterModes.for_stack(1, set(), groups.topology, allow_rs)[0]
        LayerCommunicator(modes, groups, n1, n2)
        assert get_spec(n1.weight).grad_sync == axes == get_spec(n2.weight).grad_sync
        assert get_spec(n1.weight).name == "a"


def test_token_layout_sizes_with_shards_inside_an_attention_tp_group():
    """attn_tp 4 tiled by two shards of moe_ep 2 (g = 2): a shard's MOE_FULL rows are its two
    members' SCATTERED slices, and the MoE reads MOE_FULL (never TP_ATTN_FULL)."""
    topo = Topology(world=8, attn_tp=4, attn_dp=2, moe_ep=2, moe_tp=1)
    assert (topo.moe_dp, topo.token_group_size, topo.shards_per_attn_tp_group) == (4, 1, 2)
    # rank 6: attention group 1 (11 tokens → slices 3, 3, 3, 2), attn_tp 2, second shard of it
    layout = TokenLayout(topo, 6, (5, 11))
    assert layout.attn_tp_sizes == (3, 3, 3, 2) and layout.scattered_tokens == 3
    assert layout.moe_cp_sizes == (11,)
    assert layout.moe_shard_sizes == (3, 2) and layout.moe_full_tokens == 5
    assert [layout.rows(m) for m in (S, T, MF)] == [3, 11, 5]
    assert TokenLayout(topo, 1, (5, 11)).moe_shard_sizes == (2, 1)  # group 0: slices 2, 1, 1, 1
    for rs in (True, False):
        modes = LayerScatterModes.for_stack(3, {1}, topo, rs)
        assert modes[1].mlp_mode is MF and modes[1].mlp_partial_axis == "moe_shard"
    with pytest.raises(ValueError, match="use MOE_FULL"):
        dataclasses.replace(modes[1], mlp_mode=T).check_topology(topo)
