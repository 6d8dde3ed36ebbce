"""Pure rank math: group lists against the design §2 formulas, validation, Megatron parity, CLI."""
import functools
import itertools
import subprocess
import sys
from typing import Iterator

import pytest

from tests.helpers.cli import checkout_env
from megatron_ext.parallel.topology import GROUP_AXES, Topology, main

# (world, pp, attn_tp, attn_cp, moe_tp, moe_ep) -> moe_dp and attn_dp derived
LAYOUTS = [
    dict(world=1),
    dict(world=2, attn_tp=2),
    dict(world=2, attn_cp=2, moe_tp=2, moe_dp=1),
    dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),          # seed: MoE TP 4, k=2
    dict(world=4, attn_tp=2, attn_cp=2, moe_ep=4, moe_dp=1),
    dict(world=4, attn_tp=2, attn_cp=2, moe_ep=2, moe_tp=1),  # k=1
    dict(world=4, attn_cp=4, moe_ep=4, moe_dp=1),            # k=4
    dict(world=4, attn_cp=2, moe_dp=2, moe_ep=2, moe_tp=1),  # attn_dp 2 ... k=1
    dict(world=4, attn_cp=4, moe_dp=2, moe_ep=2, moe_tp=1),  # k=2
    dict(world=8, attn_tp=2, attn_cp=2, moe_ep=2, moe_dp=1),  # attn_dp 2, k=4
    dict(world=8, attn_tp=2, attn_cp=2, moe_ep=2, moe_tp=2, moe_dp=2),  # k=2, attn_dp 2
    dict(world=8, attn_tp=2, attn_cp=4, moe_ep=2, moe_tp=2, moe_dp=2),
    dict(world=8, attn_tp=1, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=2),
    dict(world=8, attn_tp=4, attn_cp=2, moe_ep=8, moe_tp=1, moe_dp=1),
    dict(world=8, attn_tp=8, moe_ep=2, moe_tp=4, moe_dp=1),
    dict(world=8, attn_tp=2, moe_ep=4, moe_tp=1, moe_dp=2),  # attn_dp 4, k=2
    dict(world=8, pp=2, attn_tp=2, attn_cp=2, moe_dp=1),     # pp 2 seed stages
    dict(world=8, pp=2, attn_cp=2, attn_tp=1, moe_ep=2, moe_dp=1),
    dict(world=8, pp=4, attn_tp=2, moe_ep=2, moe_tp=1),
    dict(world=16, pp=2, attn_tp=2, attn_cp=2, moe_ep=4, moe_tp=1, moe_dp=2),
    dict(world=16, pp=4, attn_cp=4, moe_ep=2, moe_tp=1, moe_dp=2),
    dict(world=16, pp=2, attn_tp=2, attn_cp=4, moe_ep=8, moe_tp=1, moe_dp=1),  # k=4
    dict(world=16, attn_tp=4, attn_cp=2, moe_tp=2, moe_ep=4, moe_dp=2),
    dict(world=16, attn_tp=2, attn_cp=2, moe_tp=1, moe_ep=4, moe_dp=4),  # attn_dp 4
    dict(world=24, pp=2, attn_tp=2, attn_cp=3, moe_ep=3, moe_tp=2, moe_dp=2),
    dict(world=32, pp=4, attn_tp=2, attn_cp=2, moe_ep=4, moe_tp=2, moe_dp=1),
    dict(world=32, pp=2, attn_tp=4, attn_cp=2, moe_ep=4, moe_tp=1, moe_dp=4),
    dict(world=32, pp=2, attn_tp=1, attn_cp=8, moe_ep=8, moe_tp=1, moe_dp=2),
    dict(world=48, pp=4, attn_tp=2, attn_cp=3, moe_ep=6, moe_tp=1, moe_dp=2),
    dict(world=64, pp=4, attn_tp=2, attn_cp=2, moe_ep=4, moe_tp=2, moe_dp=2),
    dict(world=64, pp=2, attn_tp=4, attn_cp=4, moe_ep=8, moe_tp=2, moe_dp=2),
    dict(world=64, pp=2, attn_tp=2, attn_cp=4, moe_ep=2, moe_tp=2, moe_dp=8),
    dict(world=64, pp=8, attn_tp=2, attn_cp=4, moe_ep=8, moe_tp=1, moe_dp=1),
    # MoE shards smaller than an attention-TP group (g = attn_tp / shard > 1)
    dict(world=4, attn_tp=4, moe_ep=2, moe_tp=1),                         # g=2
    dict(world=4, attn_tp=4, moe_ep=1, moe_tp=1),                         # g=4
    dict(world=8, attn_tp=4, attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=4),    # g=2, cp 2
    dict(world=8, pp=2, attn_tp=4, moe_ep=2, moe_tp=1),                   # g=2, pp 2
    dict(world=16, attn_tp=8, attn_dp=2, moe_ep=2, moe_tp=2, moe_dp=4),   # g=2, ep x tp
    dict(world=24, attn_tp=6, attn_cp=2, moe_ep=3, moe_tp=1, moe_dp=8),   # g=2, not 2^n
]


def _expected(topo: Topology, axis: str) -> list[list[int]]:
    """Independent reference: group = all ranks agreeing on the coordinates the axis does not span,
    ordered by the spanned coordinates (fastest first, as in design §2)."""
    coords = [topo.coords(r) for r in range(topo.world)]
    k, A, E, M = topo.token_group_size, topo.attn_tp, topo.moe_ep, topo.moe_tp
    S = topo.stage_size
    spec = {  # axis -> (key that identifies the group, order key inside the group)
        "attn_tp": (lambda c: (c.pp, c.attn_cp, c.attn_dp), lambda c: c.attn_tp),
        "attn_cp": (lambda c: (c.pp, c.attn_tp, c.attn_dp), lambda c: c.attn_cp),
        "attn_dp": (lambda c: (c.pp, c.attn_tp, c.attn_cp), lambda c: c.attn_dp),
        "attn_dp_cp": (lambda c: (c.pp, c.attn_tp), lambda c: (c.attn_dp, c.attn_cp)),
        "attn_tp_cp": (lambda c: (c.pp, c.attn_dp), lambda c: (c.attn_cp, c.attn_tp)),
        "moe_tp": (lambda c: (c.pp, c.moe_ep, c.moe_dp), lambda c: c.moe_tp),
        "moe_ep": (lambda c: (c.pp, c.moe_tp, c.moe_dp), lambda c: c.moe_ep),
        "moe_dp": (lambda c: (c.pp, c.moe_tp, c.moe_ep), lambda c: c.moe_dp),
        "moe_shard": (lambda c: (c.pp, c.moe_dp), lambda c: (c.moe_ep, c.moe_tp)),
        # token group: same shard, same attention-TP index; ordered by (cp, dp) flattened
        "moe_cp": (lambda c: (c.pp, c.moe_dp, c.attn_tp), lambda c: (c.attn_dp, c.attn_cp)),
        "stage": (lambda c: c.pp, lambda c: c.stage_rank),
        "pp": (lambda c: c.stage_rank, lambda c: c.pp),
        "model": (lambda c: (c.attn_cp, c.attn_dp), lambda c: (c.pp, c.attn_tp)),
    }
    if axis == "embedding":
        return sorted(sorted({s, s + S * (topo.pp - 1)}) for s in range(S))
    key, order = spec[axis]
    groups: dict = {}
    for c in coords:
        groups.setdefault(key(c), []).append(c)
    out = [[c.rank for c in sorted(g, key=order)] for g in groups.values()]
    if axis == "moe_cp":
        assert all(len(g) == k for g in out), (axis, out)
        assert all(len(g) == E * M for g in _expected(topo, "moe_shard"))
        assert k * A == E * M or A == E * M * topo.shards_per_attn_tp_group
    return sorted(out, key=lambda g: g[0])


@pytest.mark.parametrize("sizes", LAYOUTS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_group_lists_match_formulas(sizes):
    topo = Topology(**sizes)
    for axis in GROUP_AXES:
        lists = topo.group_lists(axis)
        assert lists == _expected(topo, axis), axis
        # every rank in exactly one group of the axis (embedding: first and last stages only)
        flat = sorted(itertools.chain.from_iterable(lists))
        if axis == "embedding":
            S = topo.stage_size
            ends = {0, topo.pp - 1}
            assert flat == [r for r in range(topo.world) if r // S in ends]
        else:
            assert flat == list(range(topo.world)), axis
    # token group sizes and rank-in-group
    for r in range(topo.world):
        c = topo.coords(r)
        assert topo.group_of("moe_cp", r)[c.token_group_rank] == r
        assert topo.group_of("attn_tp", r)[c.attn_tp] == r
        assert topo.group_of("moe_shard", r)[c.moe_ep * topo.moe_tp + c.moe_tp] == r


def test_layout_coverage():
    """The list above covers attn_dp > 1, k = 1, 2, 4 and pp = 2, 4 (issue 2)."""
    topos = [Topology(**s) for s in LAYOUTS]
    assert len(topos) >= 30
    assert any(t.attn_dp > 1 for t in topos)
    assert {1, 2, 4} <= {t.token_group_size for t in topos}
    assert {2, 4} <= {t.shards_per_attn_tp_group for t in topos}
    assert {2, 4} <= {t.pp for t in topos}


@pytest.mark.parametrize("sizes", LAYOUTS, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_no_group_crosses_pipeline_stages(sizes):
    """Seed 003's reviewed bug: its first _MOE_CP grouped ranks across pipeline stages."""
    topo = Topology(**sizes)
    S = topo.stage_size
    for axis in GROUP_AXES:
        if axis in ("pp", "embedding", "model"):
            continue
        for ranks in topo.group_lists(axis):
            assert len({r // S for r in ranks}) == 1, (axis, ranks)


def test_seed_layout_token_groups():
    topo = Topology(world=4, attn_tp=2, attn_cp=2, moe_dp=1)
    assert (topo.moe_tp, topo.moe_ep, topo.token_group_size) == (4, 1, 2)
    assert topo.group_lists("moe_cp") == [[0, 2], [1, 3]]
    # with attn_dp = moe_dp = 1 the token group is the attention-CP group
    assert topo.group_lists("moe_cp") == topo.group_lists("attn_cp")


def test_derivation_defaults():
    t = Topology(world=8)
    assert (t.attn_tp, t.attn_cp, t.attn_dp, t.moe_tp, t.moe_ep, t.moe_dp) == (1, 1, 8, 1, 1, 8)
    t = Topology(world=8, attn_tp=2, moe_ep=2)  # Megatron default: expert TP = TP
    assert (t.moe_tp, t.moe_dp, t.attn_dp) == (2, 2, 4)
    t = Topology(attn_tp=2, attn_cp=2, attn_dp=2, pp=2, moe_dp=1)
    assert t.world == 16 and t.moe_tp == 8
    t = Topology(world=8, attn_cp=2, attn_dp=2)
    assert t.attn_tp == 2
    assert "attn_tp" in t.derived


INVALID = [
    (dict(world=0), "world=0 must be >= 1"),
    (dict(world=-4), "world=-4 must be >= 1"),
    (dict(world=4.0), "world=4.0 must be a positive integer"),
    (dict(world=4, attn_tp=True), "attn_tp=True must be a positive integer"),
    (dict(world=6, pp=4), "pp=4 must divide world=6"),
    (dict(world=6, attn_tp=4), r"attn_tp\*attn_cp=4 must divide world/pp=6"),
    (dict(world=8, attn_tp=2, attn_cp=3), r"attn_tp\*attn_cp=6 must divide world/pp=8"),
    (dict(world=8, attn_tp=2, attn_cp=2, attn_dp=4), r"attn_tp\*attn_cp\*attn_dp=16 must equal world/pp=8"),
    (dict(world=8, attn_cp=3, attn_dp=2), r"attn_cp\*attn_dp=6 must divide world/pp=8 to derive attn_tp"),
    (dict(world=8, moe_tp=2, moe_ep=2, moe_dp=4), r"moe_tp\*moe_ep\*moe_dp=16 must equal world/pp=8"),
    (dict(world=8, moe_ep=3, moe_dp=1), r"moe_ep=3, moe_dp=1 \(3\) must divide world/pp=8 to derive moe_tp"),
    (dict(world=12, attn_tp=3, attn_cp=4, moe_dp=3, moe_ep=4, moe_tp=1),
     r"moe_ep\*moe_tp=4 ranks\) must cover whole attention-TP groups or tile one \(attn_tp=3\)"),
    (dict(world=6, attn_tp=3, moe_ep=2, moe_tp=1), r"moe_ep\*moe_tp=2 ranks\) .* \(attn_tp=3\)"),
    (dict(world=12, attn_tp=4, attn_dp=3, moe_ep=3, moe_tp=1),
     r"one of moe_ep\*moe_tp and attn_tp must divide the other \(moe_dp=4, attn_dp\*attn_cp=3\)"),
    (dict(world=12, pp=2, attn_tp=2, moe_ep=3, moe_tp=1), r"moe_ep\*moe_tp=3 ranks\) .* \(attn_tp=2\)"),
    (dict(attn_tp=2), "world is not given and cannot be derived"),
    (dict(world=8, moe_tp=0), "moe_tp=0 must be >= 1"),
    (dict(world=8, pp=0), "pp=0 must be >= 1"),
    (dict(world=4, attn_dp=3), r"attn_tp\*attn_cp\*attn_dp=3 must equal world/pp=4"),
]


@pytest.mark.parametrize("sizes,message", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_layouts_name_sizes_and_rule(sizes, message):
    with pytest.raises(ValueError, match=message):
        Topology(**sizes)


def test_at_least_fifteen_invalid_cases():
    assert len({m for _, m in INVALID}) >= 15


def test_coords_rejects_out_of_range_rank():
    with pytest.raises(ValueError, match="rank=4 out of range for world=4"):
        Topology(world=4).coords(4)


# --------------------------------------------------------------------- megatron-core parity
DENSE_TOKENS = {"attn_tp": "tp", "attn_cp": "cp", "attn_dp": "dp", "attn_dp_cp": "dp-cp",
                "attn_tp_cp": "tp-cp", "pp": "pp", "model": "tp-pp"}
EXPERT_TOKENS = {"moe_tp": "tp", "moe_ep": "ep", "moe_dp": "dp", "moe_shard": "tp-ep"}


def _factorizations(n: int) -> list[tuple[int, int, int]]:
    """Every ordered ``(x, y, z)`` with ``x·y·z == n``."""
    return [(x, y, n // (x * y)) for x in range(1, n + 1) if n % x == 0
            for y in range(1, n // x + 1) if (n // x) % y == 0]


@functools.lru_cache(maxsize=None)
def _megatron_lists(tp: int, ep: int, dp: int, pp: int, cp: int, tokens: tuple) -> tuple:
    """megatron-core's rank lists (one ``RankGenerator``, its default order), sorted like ours."""
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=tp, ep=ep, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    return tuple(sorted(gen.get_ranks(t), key=lambda g: g[0]) for t in tokens)


def _megatron_sweep() -> Iterator[tuple[Topology, tuple, tuple]]:
    """Every size combination megatron-core's decoder + expert ``RankGenerator`` pair accepts for
    world 4..64 (powers of two) x pp 1/2/4 — the issue-15 sweep — with their rank lists."""
    for world, pp in itertools.product((4, 8, 16, 32, 64), (1, 2, 4)):
        stage = world // pp
        for (tp, cp, dp), (mtp, ep, mdp) in itertools.product(_factorizations(stage), repeat=2):
            yield ((world, pp, tp, cp, dp, mtp, ep, mdp),
                   _megatron_lists(tp, 1, dp, pp, cp, tuple(DENSE_TOKENS.values())),
                   _megatron_lists(mtp, ep, mdp, pp, 1, tuple(EXPERT_TOKENS.values())))


def test_every_layout_megatron_accepts_is_accepted_with_its_rank_lists():
    """All 2768 combinations: accepted, and every dense / expert group list equals megatron-core's
    (433 of them have MoE shards smaller than an attention-TP group, g > 1)."""
    total = sub_shard = 0
    for (world, pp, tp, cp, dp, mtp, ep, mdp), dense, expert in _megatron_sweep():
        topo = Topology(world=world, pp=pp, attn_tp=tp, attn_cp=cp, attn_dp=dp, moe_tp=mtp,
                        moe_ep=ep, moe_dp=mdp)
        for axes, theirs in ((DENSE_TOKENS, dense), (EXPERT_TOKENS, expert)):
            for axis, lists in zip(axes, theirs):
                assert topo.group_lists(axis) == lists, (topo, axis)
        total += 1
        sub_shard += topo.shards_per_attn_tp_group > 1
    assert (total, sub_shard) == (2768, 433)


# --------------------------------------------------------------------- CLI
CLI_LAYOUTS = [
    # the seed layout: one shard of MoE-TP 4 over two attention-TP groups (token groups of 2)
    (["--attn-tp", "2", "--attn-cp", "2", "--moe-dp", "1"],
     ["MoE: tp=4 ep=1 dp=1", "moe_cp: [0, 2] [1, 3]", "token group k=2 (MOE_FULL)"]),
    # attention TP 4 with experts EP 2 x moe_dp 2: two shards tile each attention-TP group
    (["--attn-tp", "4", "--moe-ep", "2", "--moe-tp", "1"],
     ["MoE: tp=1 ep=2 dp=2 | shard=2 ranks, 2 shards per attention-TP group",
      "moe_shard: [0, 1] [2, 3]", "moe_cp: [0] [1] [2] [3]"]),
]


@pytest.mark.parametrize("flags,lines", CLI_LAYOUTS, ids=["seed", "shards-inside-attn-tp"])
def test_cli_prints_layout(capsys, flags, lines):
    assert main(["--world", "4", *flags]) == 0
    out = capsys.readouterr().out
    for line in lines:
        assert line in out


def test_cli_rejects_invalid_layout_nonzero():
    proc = subprocess.run([sys.executable, "-m", "megatron_ext.parallel.topology", "--world", "6",
                           "--attn-tp", "3", "--moe-ep", "2", "--moe-tp", "1"],
                          capture_output=True, text=True, env=checkout_env())
    assert proc.returncode == 2
    assert "one of moe_ep*moe_tp and attn_tp must divide the other" in proc.stderr

