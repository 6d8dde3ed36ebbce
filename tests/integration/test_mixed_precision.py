"""bf16 training with fp32 main weights against the fp32 run of the same job (one process, tiny
Qwen3-MoE): it must track fp32 far better than training the bf16 parameters directly."""
from __future__ import annotations

import torch

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.optimizer import TrainOptimizer
from megatron_ext.training.trainer import Trainer, validate_launch

STEPS = 8
COMMON = dict(model="tiny-qwen3-moe", seq_len=32, global_batch_size=4, micro_batch_size=2,
              train_steps=STEPS, warmup_steps=1, lr=1e-3, min_lr=1e-3, progress=False,
              tensorboard=False, save_at_end=False, save_interval=0, device="cpu")


def _trainer(dtype: str, tmp_path) -> Trainer:
    cfg = TrainConfig(**COMMON, dtype=dtype, output_dir=str(tmp_path / dtype))
    return Trainer(cfg, ParallelGroups.single_process(), validate_launch(cfg, 1))


def _pure_bf16(tmp_path) -> Trainer:
    """The same job with bf16 parameters updated in bf16 (no main weights): the baseline."""
    t = _trainer("fp32", tmp_path / "pure")
    cfg = t.cfg
    t.model.to(torch.bfloat16)
    t.use_bf16 = True
    t.optimizer = TrainOptimizer(t.named_params, t.groups, t.schedule, cfg.clip_grad,
                                 cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    return t


def _distance(params: dict, reference: dict) -> float:
    """Largest relative distance of any parameter tensor from the fp32 run."""
    return max(float((params[n].double() - r.double()).norm() / r.double().norm())
               for n, r in reference.items())


def test_bf16_with_fp32_main_weights_tracks_fp32(tmp_path):
    runs = {"fp32": _trainer("fp32", tmp_path), "bf16": _trainer("bf16", tmp_path),
            "pure_bf16": _pure_bf16(tmp_path)}
    assert all(p.dtype == torch.bfloat16 for _, p in runs["bf16"].named_params)
    losses = {k: [t.train_step().loss for _ in range(STEPS)] for k, t in runs.items()}
    ref = {n: p.detach().clone() for n, p in runs["fp32"].named_params}
    main = {q.slot.name: q.main.detach().view_as(q.slot.param)
            for q in runs["bf16"].optimizer.pieces}
    mixed = _distance(main, ref)
    pure = _distance({n: p.detach() for n, p in runs["pure_bf16"].named_params}, ref)
    print(f"after {STEPS} steps, relative parameter distance from fp32: bf16+fp32 main "
          f"{mixed:.2e}, pure bf16 {pure:.2e}; losses {losses}")
    assert mixed * 5 < pure, (mixed, pure)
    for name, p in runs["bf16"].named_params:  # the bf16 copy is refreshed from the main weight
        assert torch.equal(p.detach(), main[name].bfloat16()), name
    for got, want in zip(losses["bf16"], losses["fp32"]):
        assert abs(got - want) < 2e-2 * abs(want)
