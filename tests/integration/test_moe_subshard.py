"""MoE shards smaller than an attention-TP group (issue 15): whole Qwen3-MoE and Qwen2-MoE models
(shared expert, a dense layer between sparse ones) in layouts with ``moe_ep·moe_tp < attn_tp``
equal the one-process run in float64 — logits, loss (token and load-balancing parts) and every
parameter's gradient after gradient sync, to 1e-12 — and each decoder layer issues exactly the
collectives design §3–4 prescribe (one reduction over the shard per MoE layer).

Two spawns (4 and 8 ranks) run every layout with both models (tests/helpers/subshard_checks.py).
"""
from __future__ import annotations

from collections import Counter

import pytest
import torch

from megatron_ext.parallel.topology import Topology
from tests.helpers.expected_collectives import backward_counter, expected_ops, forward_counter
from tests.helpers.multirank import run_ranks
from tests.helpers.subshard_checks import Layout, models, reference_case, run_layouts

TOL = 1e-12
RS, A2A = dict(allow_reduce_scatter=True), dict(moe_dispatcher="all_to_all")
ONE = dict(moe_ep=1, moe_tp=1)      # one-rank MoE shards

LAYOUTS_4 = [
    Layout("tp4, ep2 (g=2)", dict(attn_tp=4, moe_ep=2, moe_tp=1)),
    Layout("tp4, ep2 (g=2), reduce-scatter", dict(attn_tp=4, moe_ep=2, moe_tp=1), RS),
    Layout("tp4, ep2 (g=2), all-to-all", dict(attn_tp=4, moe_ep=2, moe_tp=1), A2A),
    Layout("tp4, ep2 (g=2), no deferral", dict(attn_tp=4, moe_ep=2, moe_tp=1),
           dict(defer_reductions=False)),
    Layout("tp4, moe_tp2 (g=2)", dict(attn_tp=4, moe_ep=1, moe_tp=2)),
    Layout("tp4, moe_tp2 (g=2), all-to-all", dict(attn_tp=4, moe_ep=1, moe_tp=2), A2A),
    Layout("tp4, one-rank shards (g=4)", dict(attn_tp=4, **ONE)),
    Layout("tp2 cp2 (g=2)", dict(attn_tp=2, attn_cp=2, **ONE)),
    Layout("tp2 cp2 (g=2), reduce-scatter", dict(attn_tp=2, attn_cp=2, **ONE), RS),
    Layout("tp2 dp2 (g=2)", dict(attn_tp=2, attn_dp=2, **ONE)),
    Layout("pp2 tp2 (g=2)", dict(pp=2, attn_tp=2, **ONE)),
    Layout("pp2 tp2 (g=2), reduce-scatter", dict(pp=2, attn_tp=2, **ONE), RS),
    Layout("pp2 tp2 (g=2), all-to-all", dict(pp=2, attn_tp=2, **ONE), A2A),
]
LAYOUTS_8 = [
    Layout("tp8, ep2 x moe_tp2 (g=2)", dict(attn_tp=8, moe_ep=2, moe_tp=2)),
    Layout("tp8, ep2 x moe_tp2 (g=2), all-to-all", dict(attn_tp=8, moe_ep=2, moe_tp=2), A2A),
    Layout("tp8, ep4 (g=2)", dict(attn_tp=8, moe_ep=4, moe_tp=1)),
    Layout("tp8, moe_tp4 (g=2)", dict(attn_tp=8, moe_ep=1, moe_tp=4)),
    Layout("tp8, ep2 (g=4)", dict(attn_tp=8, moe_ep=2, moe_tp=1)),
    Layout("tp8, one-rank shards (g=8)", dict(attn_tp=8, **ONE)),
    Layout("tp4 cp2, ep2 (g=2)", dict(attn_tp=4, attn_cp=2, moe_ep=2, moe_tp=1)),
    Layout("tp4 cp2, one-rank shards (g=4)", dict(attn_tp=4, attn_cp=2, **ONE)),
    Layout("tp4 dp2, moe_tp2 (g=2)", dict(attn_tp=4, attn_dp=2, moe_ep=1, moe_tp=2)),
    Layout("tp4 dp2, ep2 (g=2), reduce-scatter", dict(attn_tp=4, attn_dp=2, moe_ep=2,
                                                      moe_tp=1), RS),
    Layout("tp2 cp2 dp2 (g=2)", dict(attn_tp=2, attn_cp=2, attn_dp=2, **ONE)),
    Layout("tp2 cp4 (g=2)", dict(attn_tp=2, attn_cp=4, **ONE)),
    Layout("pp2 tp4, ep2 (g=2)", dict(pp=2, attn_tp=4, moe_ep=2, moe_tp=1)),
    Layout("pp2 tp4, one-rank shards (g=4)", dict(pp=2, attn_tp=4, **ONE)),
    Layout("pp2 tp2 cp2 (g=2)", dict(pp=2, attn_tp=2, attn_cp=2, **ONE)),
]


@pytest.fixture(scope="module")
def cases_file(tmp_path_factory) -> str:
    """The one-process references, in a file the spawned ranks load."""
    path = str(tmp_path_factory.mktemp("subshard") / "cases.pt")
    torch.save({name: reference_case(cfg, seed) for seed, (name, cfg)
                in enumerate(models().items())}, path)
    return path


# ----------------------------------------------------------------------------- expected counts
def _moe_internal(layout: Layout, topo: Topology, shared: bool) -> Counter:
    """Forward collectives inside an all-to-all MoE layer (the "local" one issues none): tokens
    (and the router's padding mask) gathered and the output reduce-scattered over moe_tp, the
    count exchange + two all-to-alls over moe_ep, the shared expert's gather + reduce-scatter
    over the shard."""
    if layout.options.get("moe_dispatcher") != "all_to_all":
        return Counter()
    out = Counter()
    if topo.moe_tp > 1:
        out.update({("all_gather", "moe_tp"): 2, ("reduce_scatter", "moe_tp"): 1})
    if topo.moe_ep > 1:
        out[("all_to_all", "moe_ep")] = 4
    if shared and topo.moe_shard_size > 1:
        out.update({("all_gather", "moe_shard"): 1, ("reduce_scatter", "moe_shard"): 1})
    return out


def _trivial_axes(topo: Topology) -> set:
    """Axes of one rank: their collectives are skipped (and not recorded)."""
    sizes = {"attn_tp": topo.attn_tp, "moe_shard": topo.moe_shard_size,
             "moe_cp": topo.token_group_size}
    return {axis for axis, size in sizes.items() if size == 1}


def _expected_spans(layout: Layout, topo: Topology, res: dict, config) -> list[Counter]:
    """Every decoder layer's forward collectives: the communicator's steps (design §3–4 model,
    tests/helpers/expected_collectives.py), the CP attention's K/V all-gather and the MoE's own."""
    modes = res["modes"]
    steps = expected_ops(modes, topo, "attn_tp" if res["stage"] == 0 else None)
    spans = []
    for l, m in enumerate(modes):
        ops = steps[(l, "prepare_attn")] + steps[(l, "prepare_mlp")] + steps[(l, "postprocess")]
        want = forward_counter(ops, _trivial_axes(topo))
        if topo.attn_cp > 1:
            want[("all_gather", "attn_cp")] += 1
        if m.is_layer_sparse:
            want += _moe_internal(layout, topo, config.shared_expert_intermediate_size > 0)
        spans.append(want)
    return spans


def _check(results: list, layouts: list, world: int, cfgs: dict) -> None:
    failures = []
    for rank, per_rank in enumerate(results):
        assert set(per_rank) == {(lay.label, m) for lay in layouts for m in cfgs}
        for layout in layouts:
            topo = Topology(world=world, **layout.sizes)
            assert topo.shards_per_attn_tp_group > 1, layout.label
            for name, cfg in cfgs.items():
                res = per_rank[(layout.label, name)]
                what = f"rank {rank} [{layout.label}] {name}"
                for key, err in res["errors"].items():
                    if not err <= TOL:
                        failures.append(f"{what}: {key} differs by {err:.3g}")
                want = _expected_spans(layout, topo, res, cfg)
                got = [Counter(span) for span in res["spans"]]
                if got != want:
                    failures.append(f"{what}: per-layer forward collectives {got} != {want}")
                # one reduction over the shard per MoE layer: forward spans + tail together
                shard_sums = sum(1 for span in res["spans"] + [res["tail"]] for kind, ax in span
                                 if ax == "moe_shard" and kind in ("all_reduce", "reduce_scatter")
                                 and layout.options.get("moe_dispatcher") != "all_to_all")
                sparse = sum(m.is_layer_sparse for m in res["modes"])
                if topo.moe_shard_size > 1 and shard_sums != sparse and \
                        layout.options.get("moe_dispatcher") != "all_to_all":
                    failures.append(f"{what}: {shard_sums} shard reductions, {sparse} MoE layers")
                # backward over the MoE axes: the adjoints of the forward moves, nothing else
                steps = expected_ops(res["modes"], topo, "attn_tp" if res["stage"] == 0 else None)
                want_bwd = Counter()
                for ops in steps.values():
                    want_bwd += backward_counter(ops, _trivial_axes(topo) | {"attn_tp", "moe_cp"})
                got_bwd = Counter(op for op in res["backward"] if op[1] == "moe_shard")
                if layout.options.get("moe_dispatcher") != "all_to_all" and got_bwd != want_bwd:
                    failures.append(f"{what}: backward over moe_shard {got_bwd} != {want_bwd}")
    assert not failures, "\n".join(failures[:20])


def test_four_rank_layouts(cases_file):
    results = run_ranks(run_layouts, 4, cases_file, LAYOUTS_4, timeout=300)
    _check(results, LAYOUTS_4, 4, models())


def test_eight_rank_layouts(cases_file):
    results = run_ranks(run_layouts, 8, cases_file, LAYOUTS_8, timeout=400)
    _check(results, LAYOUTS_8, 8, models())


def test_layout_coverage():
    """The issue's must-show: at least 20 newly accepted layouts (topologies), among them pp 2,
    attn_cp > 1, attn_dp > 1, moe_ep x moe_tp hybrids and the all-to-all dispatcher."""
    topos = {(w, tuple(sorted(lay.sizes.items()))): Topology(world=w, **lay.sizes)
             for w, lays in ((4, LAYOUTS_4), (8, LAYOUTS_8)) for lay in lays}
    assert len(topos) >= 20
    assert all(t.shards_per_attn_tp_group > 1 for t in topos.values())
    assert any(t.pp == 2 for t in topos.values()) and any(t.attn_cp > 1 for t in topos.values())
    assert any(t.attn_dp > 1 for t in topos.values())
    assert any(t.moe_ep > 1 and t.moe_tp > 1 for t in topos.values())
    assert any(lay.options.get("moe_dispatcher") == "all_to_all"
               for lay in LAYOUTS_4 + LAYOUTS_8)
