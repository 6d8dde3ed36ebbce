"""bf16 autocast with attention context parallelism on CPU (gloo), both K/V strategies, attn_cp 2
and 4, against the one-process bf16 run of the same step: loss and every gradient.

Tolerance: the CP run may differ from the one-process bf16 run by no more than bf16 itself
differs from float32 (times 2): CP must not add error beyond bf16's own rounding.

Under autocast with float32 weights a QK-norm makes K float32 while V stays bf16; the CP backward
once sized the dV sum and its exchange by K's dtype (gloo: "16384 vs 8192", both strategies).
Training now casts parameters to bf16 (K bf16 too); the old path, autocast over float32
parameters, is checked as well: attention now runs in the autocast dtype (as SDPA does) and dV
takes V's dtype.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.training.config import TrainConfig
from tests.helpers.multirank import run_ranks

COMMON = dict(model="tiny-qwen3-moe", seq_len=40, global_batch_size=4, train_steps=1,
              warmup_steps=0, lr=1e-3, progress=False, tensorboard=False, save_at_end=False,
              save_interval=0, dist_timeout_s=60.0, distributed_optimizer=False)
# name -> (layout, attn_dp); attn_dp x micro_batch_size = 2 everywhere
LAYOUTS = {f"cp{cp}_{strategy}": (dict(attn_cp=cp, moe_dp=4, cp_comm=strategy), 4 // cp)
           for cp in (2, 4) for strategy in ("all_gather", "p2p")}


def _one_step(cfg: TrainConfig, groups: ParallelGroups, autocast_only: bool = False
              ) -> tuple[float, dict]:
    """Loss and synchronised gradients of the first step (no update). ``autocast_only``: float32
    parameters under bf16 autocast (the trainer's bf16 before parameters were cast)."""
    from megatron_ext.training.trainer import Trainer, validate_launch

    trainer = Trainer(cfg, groups, validate_launch(cfg, groups.topology.world))
    if autocast_only:
        trainer.use_bf16 = True  # built as fp32: parameters stay float32, forward autocasts
    trainer.optimizer.zero_grad(trainer.micro_batches_per_rank)
    lm, aux = trainer._forward_backward(trainer.step_batch(), inject_nan=False)
    trainer.optimizer.finish_grad_sync()
    loss, _ = trainer._reduce_report(lm, aux)
    pieces = trainer.optimizer.pieces  # whole parameters: distributed_optimizer=False
    assert all(q.hi - q.lo == q.slot.numel for q in pieces)
    return loss, {q.slot.name: q.main.grad.detach().float().clone() for q in pieces}


def _rank(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, (layout, attn_dp) in LAYOUTS.items():
        for mode, dtype in (("bf16", "bf16"), ("autocast", "fp32")):
            cfg = TrainConfig(**COMMON, **layout, dtype=dtype, micro_batch_size=2 // attn_dp,
                              output_dir=f"{root}/{name}_{mode}")
            groups = build_groups(cfg.topology(world), timeout_s=60)
            out[(name, mode)] = _one_step(cfg, groups, autocast_only=mode == "autocast")
    return out if rank == 0 else {}


def _rel(a: dict, b: dict) -> float:
    num = sum(float((a[k] - b[k]).double().pow(2).sum()) for k in b)
    den = sum(float(b[k].double().pow(2).sum()) for k in b)
    return (num / den) ** 0.5


def test_bf16_context_parallel_matches_one_process_bf16(tmp_path):
    one = ParallelGroups.single_process()
    ref = {}
    for mode, dtype in (("bf16", "bf16"), ("autocast", "fp32"), ("fp32", "fp32")):
        cfg = TrainConfig(**COMMON, dtype=dtype, micro_batch_size=2,
                          output_dir=str(tmp_path / f"ref_{mode}"))
        ref[mode] = _one_step(cfg, one, autocast_only=mode == "autocast")
    fp32_loss, fp32_grads = ref["fp32"]
    got = run_ranks(_rank, 4, str(tmp_path), timeout=240)[0]
    for (name, mode), (loss, grads) in got.items():
        bf16_loss, bf16_grads = ref[mode]
        bf16_error = _rel(bf16_grads, fp32_grads)
        assert 0 < bf16_error < 0.05, (mode, bf16_error)  # bf16 ran, a sane approximation
        assert set(grads) == set(bf16_grads), name
        assert all(torch.isfinite(g).all() for g in grads.values()), name
        assert abs(loss - bf16_loss) <= 2 * abs(bf16_loss - fp32_loss) + 1e-3, \
            (name, mode, loss, bf16_loss, fp32_loss)
        err = _rel(grads, bf16_grads)
        assert err <= 2 * bf16_error, (name, mode, err, bf16_error)
