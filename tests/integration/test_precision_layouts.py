"""Issue 14's precision contract in 8 parallel layouts, with the distributed optimizer and every
recompute mode: the first 5 steps' losses and every parameter after each step equal the
one-process run — float64 to 1e-12, and bf16 with fp32 main weights within a small factor of the
one-process bf16 run's own distance from float64.

Why a factor for bf16: a layout sums in other orders (attention TP/CP partial sums, expert
shards, gradient reduce-scatters), so its bf16 rounding errors are different draws of the same
size as the one-process run's, not the same values. Two independent draws of one error
distribution stay within 2x of each other's worst case over a handful of steps; a real bug
(a missed gradient share, a stale main weight, a double-counted replica) moves the parameters by
the learning rate, orders of magnitude more — the float64 half shows there is none to 1e-12.

One spawn of 4 ranks: each rank first runs one of the four one-process references (float64 and
bf16, untied and tied embeddings) and they are shared by broadcast, then all 10 layouts run twice
(float64, bf16) and each rank compares its own parameter slices.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.trainer import Trainer, validate_launch
from tests.helpers.multirank import run_ranks

STEPS = 5
WORLD = 4
BF16_FACTOR, BF16_LOSS_EPS = 2.0, 1e-4
COMMON = dict(model="tiny-qwen3-moe", seq_len=16, global_batch_size=4, train_steps=STEPS,
              warmup_steps=1, lr=3e-3, progress=False, tensorboard=False, save_at_end=False,
              save_interval=0, dist_timeout_s=90.0, device="cpu")
# The load-balancing loss is global per micro-batch step (token counts summed over the stage, so
# over attention data-parallel ranks: router.load_balancing_loss), so its value depends on which
# samples share a step — a definition, not a precision question, which no one-process run can
# reproduce for attn_dp > 1. It is switched off here; routing, gating and everything else train.
NO_AUX = {"router_aux_loss_coef": 0.0}
TIED = {**NO_AUX, "tie_word_embeddings": True}
# name -> (layout, micro_batch_size, recompute, model_overrides); each mode in 2-3 layouts
LAYOUTS = {
    "pp2_cp2": (dict(pp=2, attn_cp=2), 1, "full", NO_AUX),
    "cp2_moedp2": (dict(attn_cp=2, moe_ep=2, moe_dp=2), 1, "selective", NO_AUX),
    "ep2_x_moetp2": (dict(attn_dp=2, attn_tp=2, moe_ep=2, moe_tp=2, moe_dp=1), 1, "none", NO_AUX),
    "dp2_moedp1": (dict(attn_dp=2, attn_cp=2, moe_ep=4, moe_dp=1), 1, "selective", NO_AUX),
    "tied_pp2": (dict(pp=2, attn_dp=2, moe_dp=2), 1, "full", TIED),
    "microbatch_x2": (dict(attn_dp=2, attn_tp=2, moe_dp=2), 1, "none", NO_AUX),  # 2 per rank
    "seed_tp2_cp2": (dict(attn_tp=2, attn_cp=2, moe_dp=1), 1, "selective", NO_AUX),
    "dp4_zero4": (dict(attn_dp=4, moe_dp=4), 1, "full", NO_AUX),
    # K/V heads (2) fewer than attn_tp (4): replicated K/V pieces under the sharded optimizer
    "tp4_kv_replicated": (dict(attn_tp=4, moe_ep=4, moe_dp=1), 1, "none", NO_AUX),
    # MoE shards (2 ranks) inside one attention-TP group (4 ranks): moe_dp 2 > attn_dp*attn_cp
    "tp4_moe_subshard": (dict(attn_tp=4, moe_ep=2, moe_dp=2), 1, "selective", NO_AUX),
}
REFERENCES = [("float64", False), ("bf16", False), ("float64", True), ("bf16", True)]


def _run(cfg: TrainConfig, groups) -> tuple[list[float], list[dict], dict]:
    """Losses and ``{name: parameter (real part, float64)}`` after each step, and the specs."""
    trainer = Trainer(cfg, groups, validate_launch(cfg, groups.topology.world))
    if groups.topology.world > 1:  # the distributed optimizer really shards something
        assert trainer.optimizer.distributed
        assert any(b.shard_axis for b in trainer.optimizer.buckets)
    losses, params = [], []
    for _ in range(STEPS):
        losses.append(trainer.train_step().loss)
        trainer.optimizer.wait_params()
        params.append({n: get_spec(p).real_part(p.detach()).double().clone()
                       for n, p in trainer.named_params})
    return losses, params, {n: get_spec(p) for n, p in trainer.named_params}


def _reference(rank: int, root: str) -> tuple[list[float], list[dict]]:
    dtype, tied = REFERENCES[rank]
    cfg = TrainConfig(**COMMON, dtype=dtype, micro_batch_size=1,
                      model_overrides=TIED if tied else NO_AUX, output_dir=f"{root}/ref{rank}")
    losses, params, _ = _run(cfg, ParallelGroups.single_process())
    return losses, params


def _compare(run64, run16, ref64, ref16) -> list[dict]:
    """Per step: the float64 run's largest parameter error, and per parameter the bf16 run's
    and the one-process bf16 run's squared distance from float64 on this rank's slice."""
    (losses64, params64, specs), (losses16, params16, _) = run64, run16
    (ref_losses64, ref_params64), (ref_losses16, ref_params16) = ref64, ref16
    stats = []
    for k in range(STEPS):
        f64_err, sq = 0.0, {}
        for n, spec in specs.items():
            where = spec.global_slices()
            want = ref_params64[k][n][where]
            if want.numel() == 0:   # a rank holding only vocabulary padding of this parameter
                continue
            f64_err = max(f64_err, float((params64[k][n] - want).abs().max()))
            sq[n] = (float((params16[k][n] - want).pow(2).sum()),
                     float((ref_params16[k][n][where] - want).pow(2).sum()),
                     float(want.pow(2).sum()))
        stats.append(dict(f64_err=f64_err, sq=sq, loss64=(losses64[k], ref_losses64[k]),
                          loss16=(losses16[k], ref_losses16[k], ref_losses64[k])))
    return stats


def _rank(rank: int, world: int, root: str) -> dict:
    gathered = [None] * world
    dist.all_gather_object(gathered, _reference(rank, root))
    refs = dict(zip(REFERENCES, gathered))
    out = {}
    for name, (layout, mbs, mode, overrides) in LAYOUTS.items():
        tied, groups, runs = overrides is TIED, None, {}
        for dtype in ("float64", "bf16"):
            cfg = TrainConfig(**COMMON, **layout, dtype=dtype, micro_batch_size=mbs,
                              recompute=mode, model_overrides=overrides,
                              output_dir=f"{root}/{name}-{dtype}")
            groups = groups or build_groups(cfg.topology(world), timeout_s=90)
            runs[dtype] = _run(cfg, groups)
        out[name] = _compare(runs["float64"], runs["bf16"], refs[("float64", tied)],
                             refs[("bf16", tied)])
    return out


def _bf16_distances(per_rank: list[dict]) -> tuple[dict, float, float]:
    """Per parameter: the layout's relative distance from float64 and the one-process bf16 run's
    (over the union of every rank's slices); and both over all parameters together."""
    names = set().union(*(s["sq"] for s in per_rank))  # pp: stages hold different parameters
    per_param, totals = {}, [0.0, 0.0, 0.0]
    for n in names:
        mine, one, norm = (sum(s["sq"][n][i] for s in per_rank if n in s["sq"]) for i in range(3))
        per_param[n] = (math.sqrt(mine / norm), math.sqrt(one / norm))
        totals = [totals[0] + mine, totals[1] + one, totals[2] + norm]
    return per_param, math.sqrt(totals[0] / totals[2]), math.sqrt(totals[1] / totals[2])


def test_losses_and_parameters_match_one_process_in_10_layouts(tmp_path):
    """float64: every parameter after each of 5 steps within 1e-12 of the one-process run, losses
    within 1e-12 relative. bf16 (fp32 main weights), per step: every parameter's distance from
    the one-process float64 run is at most 2x the one-process bf16 run's (its largest over the
    parameters: one parameter's error after the first AdamW step is a count of sign flips of
    near-zero gradients, too few for a per-parameter ratio), all parameters together at most 2x
    the one-process run's, and the loss's error at most 2x the one-process run's largest over the
    5 steps (+1e-4 relative)."""
    results = run_ranks(_rank, WORLD, str(tmp_path), timeout=600)
    ratios = {}
    for name in LAYOUTS:
        one_loss_err = max(abs(results[0][name][j]["loss16"][1] - results[0][name][j]["loss16"][2])
                           for j in range(STEPS))
        for k in range(STEPS):
            per_rank = [r[name][k] for r in results]
            for s in per_rank:
                assert s["f64_err"] <= 1e-12, (name, k, s["f64_err"])
                got, want = s["loss64"]
                assert abs(got - want) <= 1e-12 * abs(want), (name, k, got, want)
            got, _, want64 = per_rank[0]["loss16"]
            assert abs(got - want64) <= BF16_FACTOR * one_loss_err + BF16_LOSS_EPS * want64, \
                (name, k, got, want64, one_loss_err)
            per_param, total, total_one = _bf16_distances(per_rank)
            worst_one = max(one for _, one in per_param.values())
            for n, (mine, _) in per_param.items():
                assert mine <= BF16_FACTOR * worst_one, (name, k, n, mine, worst_one)
            assert total <= BF16_FACTOR * total_one, (name, k, total, total_one)
            ratios[name] = max(ratios.get(name, 0.0), total / total_one)
    print("bf16 distance from float64, all parameters, layout / one process (worst step):",
          {k: round(v, 3) for k, v in ratios.items()})
