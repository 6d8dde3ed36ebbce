"""Pretrain a megatron_ext model. Launch with torchrun (gloo on CPU, NCCL on CUDA):

    torchrun --nproc-per-node 4 examples/pretrain.py                      # defaults, see below
    torchrun --nproc-per-node 4 examples/pretrain.py --attn-cp 2 --moe-dp 2 --moe-ep 2
    torchrun --nproc-per-node 4 examples/pretrain.py --pp 2 --attn-cp 2 --model-override num_layers=4
    torchrun --nproc-per-node 4 examples/pretrain.py --config run.yaml --resume
    python examples/pretrain.py --help

Defaults: the tiny Qwen3-MoE preset (vocabulary grown to hold the byte tokenizer), the embedded
Shakespeare corpus, 40 steps of 8 x 128 tokens, and with no layout flags the seed layout (attention
TP 2 x CP 2, one MoE shard of moe_tp 4) on 4 ranks. Writes ``runs/pretrain/`` (checkpoints/,
metrics.jsonl, tensorboard/ when installed). Settings come from defaults < ``--config`` YAML <
flags. Exit codes: 0 done, 2 invalid launch or input (nothing written; e.g. ``--output-dir`` owned
by another live run, checkpoints there without ``--resume``/``--overwrite``, a corrupted
checkpoint), 3 loss diverged (NaN/inf), 1 other failure (e.g. a rank died: the others fail within
``--dist-timeout-s``). SIGTERM, SIGINT (Ctrl-C) or SIGUSR1 end the run after the current step with a
checkpoint of it and exit 0; a second signal exits at once.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Optional

import torch

from megatron_ext.checkpoint.checkpoint_dirs import checkpoint_path as ckpt_path
from megatron_ext.checkpoint.checkpoint_dirs import describe_checkpoint
from megatron_ext.cli.common import refuse, teardown_distributed
from megatron_ext.parallel.groups import ParallelGroups, build_groups, init_distributed
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.logging import MetricsLogger
from megatron_ext.training.preemption import ExitSignalHandler
from megatron_ext.training.run_dir import RunDirLock
from megatron_ext.training.trainer import (Trainer, TrainingDiverged, validate_launch,
                                           write_settings_yaml)


def _describe(trainer: Trainer) -> str:
    topo, cfg, mc = trainer.groups.topology, trainer.cfg, trainer.plan.model_config
    n_params = sum(int(torch.Size(s).numel()) for s in trainer.model.hf_expected_shapes().values())
    return (f"layout: world={topo.world} pp={topo.pp} attn tp={topo.attn_tp} cp={topo.attn_cp} "
            f"dp={topo.attn_dp} | moe tp={topo.moe_tp} ep={topo.moe_ep} dp={topo.moe_dp} "
            f"({topo.moe_tokens_summary()})\n"
            f"model: {cfg.model} ({mc.architecture}, {mc.num_layers} layers, hidden "
            f"{mc.hidden_size}, {mc.num_experts} experts, vocab {mc.vocab_size}, "
            f"{n_params / 1e6:.2f}M params) on {trainer.device}, "
            f"{'bf16 (fp32 main weights)' if trainer.use_bf16 else trainer.param_dtype_name}, "
            f"distributed "
            f"optimizer {trainer.optimizer.distributed}, recompute {cfg.recompute}\n"
            f"layers: {trainer.model.backend.describe()}\n"
            f"{_memory_line(trainer)}\n"
            f"data: {trainer.plan.dataset.source} ({trainer.plan.dataset.meta.num_tokens} tokens, "
            f"tokenizer {_tokenizer_label(trainer.plan.tokenizer)}); {cfg.train_steps} steps x "
            f"{cfg.global_batch_size} x {cfg.seq_len} tokens, {trainer.micro_batches_per_rank} "
            f"micro-batch(es) per rank"
            + (f", {trainer.pipeline.schedule_name}" if trainer.pipeline else "")
            + f"; lr {cfg.lr:g} -> {cfg.min_lr:g}, warmup {cfg.warmup_steps}"
            + (f"\nvalidation: {trainer.plan.eval_set.count} samples of "
               f"{trainer.plan.eval_set.dataset.source} every {cfg.eval_interval} steps"
               if trainer.plan.eval_set else ""))


def _tokenizer_label(tokenizer) -> str:
    path = getattr(tokenizer, "path", None)
    return f"{path} [{tokenizer.name}]" if path else tokenizer.name


def _memory_line(trainer: Trainer) -> str:
    """The estimator's per-rank figures, and on CUDA the recompute mode that would fit."""
    from megatron_ext.training.memory import advise_recompute, estimate

    cfg = trainer.cfg
    kw = dict(seq_len=cfg.seq_len, micro_batch_size=cfg.micro_batch_size, bf16=trainer.use_bf16,
              distributed=trainer.optimizer.distributed,
              micro_batches=trainer.micro_batches_per_rank, cp_comm=cfg.cp_comm)
    mc, topo = trainer.plan.model_config, trainer.groups.topology
    line = "memory estimate per rank: " + estimate(mc, topo, recompute=cfg.recompute,
                                                   **kw).describe()
    if trainer.device.type == "cuda":
        capacity = torch.cuda.get_device_properties(trainer.device).total_memory
        advice = advise_recompute(mc, topo, capacity, **kw)
        line += (f"; fits {capacity / 2**30:.0f} GiB with --recompute {advice}" if advice else
                 f"; does not fit {capacity / 2**30:.0f} GiB in any recompute mode")
    return line


def _take_run_dir(cfg: TrainConfig, rank: int) -> Optional[RunDirLock]:
    """Rank 0 locks ``output_dir``; the other ranks refuse when another run holds it."""
    lock = RunDirLock(cfg.output_dir)
    if rank == 0:
        return lock.acquire()
    lock.check_not_taken()
    return None


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    lock: Optional[RunDirLock] = None
    try:  # everything checkable without process groups, identically on every rank
        cfg = TrainConfig.from_args(argv)
        plan = validate_launch(cfg, world)  # writes nothing, so an invalid launch leaves no dir
        lock = _take_run_dir(cfg, rank)
    except (ValueError, OSError) as err:
        if lock:
            lock.release()
        return refuse("pretrain.py", err, "invalid launch")
    try:
        if world > 1:
            init_distributed(timeout_s=cfg.dist_timeout_s)
            groups = build_groups(plan.topology, timeout_s=cfg.dist_timeout_s)
        else:
            groups = ParallelGroups.single_process()
        trainer = Trainer(cfg, groups, plan)
        resumed = trainer.resume()
        if rank == 0:
            for note in plan.notes:
                print(note, flush=True)
            settings = write_settings_yaml(cfg, plan)
            print(_describe(trainer) + f"\nsettings: {settings}"
                  + (f"\nresumed from {describe_checkpoint(resumed)}"
                     if resumed else f"\n{trainer.describe_weights()}"),
                  flush=True)
        logger = MetricsLogger(cfg.output_dir, cfg.train_steps, trainer.step, enabled=rank == 0,
                               progress=cfg.progress, tensorboard=cfg.tensorboard)
        with ExitSignalHandler(trainer.device) as signals:
            history = trainer.train(logger, stop=signals.agreed)
        if rank == 0 and trainer.stopped_by:
            print(f"stopped by {signals.name(trainer.stopped_by)} after step {trainer.step}: "
                  f"saved {ckpt_path(cfg.checkpoint_dir, trainer.step)}; continue with --resume",
                  flush=True)
        elif rank == 0:
            last = history[-1] if history else None
            summary = (f"final loss {last.loss:.4f} (first {history[0].loss:.4f}), "
                       f"{sum(m.tokens for m in history) / sum(m.step_time_s for m in history):.0f}"
                       f" tokens/s" if last else "nothing to do")
            print(f"done: {trainer.step} steps, {summary}, checkpoints in {cfg.checkpoint_dir}, "
                  f"metrics in {logger.metrics_path}, {time.perf_counter() - start:.1f}s",
                  flush=True)
        teardown_distributed()
        if lock:
            lock.release()
        return 0
    except TrainingDiverged as err:
        if rank == 0:
            print(f"pretrain.py: training diverged: {err}", file=sys.stderr, flush=True)
        code = 3
    except ValueError as err:  # raised alike on every rank (e.g. a corrupted checkpoint)
        code = refuse("pretrain.py", err)
    except BaseException:  # a dead peer, a timeout, a bug: report and leave without teardown
        print(f"pretrain.py: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        code = 1
    if lock:
        lock.release()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # never block in process-group teardown with dead peers


if __name__ == "__main__":
    sys.exit(main())
