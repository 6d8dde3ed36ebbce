"""bf16 autocast with attention context parallelism on CPU (gloo), both K/V strategies, attn_cp 2
and 4, against the one-process bf16 run of the same step: loss and every gradient.

The tiny Qwen3-MoE has QK-norm, whose float32 weight makes K float32 under autocast while V stays
bf16; the CP backward once sized the dV exchange by K's dtype (gloo: "16384 vs 8192").
Tolerance: the CP run may differ from the one-process bf16 run by no more than bf16 itself
differs from float32 (times 2): CP must not add error beyond bf16's own rounding.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.training.config import TrainConfig
from tests.helpers.multirank import run_ranks

COMMON = dict(model="tiny-qwen3-moe", seq_len=40, global_batch_size=4, train_steps=1,
              warmup_steps=0, lr=1e-3, progress=False, tensorboard=False, save_at_end=False,
              save_interval=0, dist_timeout_s=60.0)
# name -> (layout, attn_dp); attn_dp x micro_batch_size = 2 everywhere
LAYOUTS = {f"cp{cp}_{strategy}": (dict(attn_cp=cp, moe_dp=4, cp_comm=strategy), 4 // cp)
           for cp in (2, 4) for strategy in ("all_gather", "p2p")}


def _one_step(cfg: TrainConfig, groups: ParallelGroups) -> tuple[float, dict]:
    """Loss and synchronised gradients of the first step (no update)."""
    from megatron_ext.training.trainer import Trainer, validate_launch

    trainer = Trainer(cfg, groups, validate_launch(cfg, groups.topology.world))
    trainer.optimizer.zero_grad()
    lm, aux = trainer._forward_backward(trainer.step_batch(), inject_nan=False)
    trainer.grad_sync.sync()
    loss, _ = trainer._reduce_report(lm, aux)
    return loss, {n: p.grad.detach().float().clone() for n, p in trainer.named_params}


def _rank(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, (layout, attn_dp) in LAYOUTS.items():
        cfg = TrainConfig(**COMMON, **layout, dtype="bf16", micro_batch_size=2 // attn_dp,
                          output_dir=f"{root}/{name}")
        groups = build_groups(cfg.topology(world), timeout_s=60)
        out[name] = _one_step(cfg, groups)
    return out if rank == 0 else {}


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def test_bf16_context_parallel_matches_one_process_bf16(tmp_path):
    ref = {}
    for dtype in ("bf16", "fp32"):
        cfg = TrainConfig(**COMMON, dtype=dtype, micro_batch_size=2,
                          output_dir=str(tmp_path / f"ref_{dtype}"))
        ref[dtype] = _one_step(cfg, ParallelGroups.single_process())
    bf16_loss, bf16_grads = ref["bf16"]
    fp32_loss, fp32_grads = ref["fp32"]
    bf16_error = _rel(bf16_grads, fp32_grads)
    assert 0 < bf16_error < 0.05, bf16_error  # bf16 really ran, and is a sane approximation
    got = run_ranks(_rank, 4, str(tmp_path), timeout=240)[0]
    for name, (loss, grads) in got.items():
        assert set(grads) == set(bf16_grads), name
        assert all(torch.isfinite(g).all() for g in grads.values()), name
        assert abs(loss - bf16_loss) <= 2 * abs(bf16_loss - fp32_loss) + 1e-3, \
            (name, loss, bf16_loss, fp32_loss)
        err = _rel(grads, bf16_grads)
        assert err <= 2 * bf16_error, (name, err, bf16_error)
