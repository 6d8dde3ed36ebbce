"""Failure behaviour of the pretraining job: a killed rank, a diverged loss, an invalid launch."""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.checkpoint import training_state as ckpt
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.trainer import Trainer, TrainingDiverged, validate_launch
from tests.helpers.cli import REPO, checkout_env
from tests.helpers.multirank import free_port

PRETRAIN = os.path.join(REPO, "examples", "pretrain.py")
JOB = dict(seq_len=30, global_batch_size=4, micro_batch_size=2, warmup_steps=1, train_steps=400,
           save_interval=2, progress=False, tensorboard=False)


def _flags(values: dict) -> list[str]:
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


def _steps(cfg: TrainConfig, n: int, resume=None) -> list[float]:
    """Losses of the next ``n`` steps of a one-process run (optionally resumed)."""
    cfg = TrainConfig(**{**cfg.to_dict(), "resume": resume})
    trainer = Trainer(cfg, ParallelGroups.single_process(), validate_launch(cfg, 1))
    trainer.resume()
    return [trainer.train_step().loss for _ in range(n)]


def _two_ranks(job: dict, out: str) -> list[subprocess.Popen]:
    """examples/pretrain.py as ranks 0 and 1 of a 2-rank world, plain processes (no torchrun
    agent to clean up)."""
    port = free_port()
    return [subprocess.Popen(
        [sys.executable, PRETRAIN, *_flags(job), "--output-dir", out, "--dist-timeout-s", "30"],
        env=checkout_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                         LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in range(2)]


def test_killed_rank_fails_the_other_and_the_last_checkpoint_resumes_exactly(tmp_path):
    """Two ranks of examples/pretrain.py (attention TP 2) started as plain processes (no torchrun
    agent to clean up). Once a checkpoint is published, rank 1 gets SIGKILL: rank 0 must exit
    with an error by itself (gloo sees the dead peer; the collective timeout is the backstop).
    The newest complete checkpoint then resumes in one process and continues exactly like an
    uninterrupted one-process run."""
    out = str(tmp_path / "run")
    procs = _two_ranks(JOB, out)
    try:
        deadline = time.monotonic() + 150
        while not ckpt.complete_checkpoints(os.path.join(out, "checkpoints")):
            assert time.monotonic() < deadline, "no checkpoint published in time"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGKILL)
        start = time.monotonic()
        _, err = procs[0].communicate(timeout=60)
        waited = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 1, err
    assert "rank 0 failed" in err
    assert waited < 45, f"rank 0 needed {waited:.1f}s to notice the dead peer"

    latest = ckpt.latest_checkpoint(os.path.join(out, "checkpoints"))
    step = ckpt.read_train_state(latest)["step"]
    assert step >= 2 and step % 2 == 0
    cfg = TrainConfig(**JOB, output_dir=str(tmp_path / "single"))
    uninterrupted = _steps(cfg, step + 2)
    resumed = _steps(cfg, 2, resume=latest)
    for a, b in zip(resumed, uninterrupted[step:]):
        assert math.isclose(a, b, rel_tol=2e-6), (resumed, uninterrupted[step:])


def test_second_writer_is_refused_and_sigterm_saves_the_current_step(tmp_path):
    """Two ranks of examples/pretrain.py own their --output-dir: a second run pointed at it exits
    2 with one line naming the directory and the owner, and writes nothing. SIGTERM to one rank
    only: both finish the same step, save it (not a multiple of --save-interval), release the
    directory and exit 0; the checkpoint continues exactly like an uninterrupted run."""
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    job = {**JOB, "save_interval": 3}
    procs = _two_ranks(job, out)
    try:
        deadline = time.monotonic() + 150
        while not os.path.exists(os.path.join(out, ".owner")):
            assert time.monotonic() < deadline, "the run never took its directory"
            time.sleep(0.05)
        for p in procs:  # paused while the second run tries (the lock stays held)
            p.send_signal(signal.SIGSTOP)
        second = subprocess.run([sys.executable, PRETRAIN, *_flags(job), "--output-dir", out,
                                 "--resume"], env=checkout_env(OMP_NUM_THREADS="1"),
                                capture_output=True, text=True, timeout=120)
        for p in procs:
            p.send_signal(signal.SIGCONT)
        while not ckpt.complete_checkpoints(root):
            assert time.monotonic() < deadline, "no checkpoint published in time"
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        before = {s for s, _ in ckpt.complete_checkpoints(root)}
        procs[1].send_signal(signal.SIGTERM)
        results = [p.communicate(timeout=90) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"output_dir {out} is in use by run" in lines[0] \
        and f"pid {procs[0].pid}" in lines[0], second.stderr
    assert second.stdout == ""
    assert [p.returncode for p in procs] == [0, 0], results
    stopped = [line for line in results[0][0].splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0], results[0]
    latest = ckpt.latest_checkpoint(root)
    step = ckpt.read_train_state(latest)["step"]
    assert f"after step {step}: saved {latest}" in stopped[0]
    assert step >= max(before)
    assert not os.path.exists(os.path.join(out, ".owner"))
    assert ckpt.read_train_state(latest)["consumed_samples"] == step * job["global_batch_size"]
    cfg = TrainConfig(**job, output_dir=str(tmp_path / "single"))
    uninterrupted = _steps(cfg, step + 2)
    resumed = _steps(cfg, 2, resume=latest)
    for a, b in zip(resumed, uninterrupted[step:]):
        assert math.isclose(a, b, rel_tol=5e-6), (step, resumed, uninterrupted[step:])


def test_nan_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = TrainConfig(**{**JOB, "train_steps": 6, "inject_nan_at_step": 3},
                      output_dir=str(tmp_path))
    trainer = Trainer(cfg, ParallelGroups.single_process(), validate_launch(cfg, 1))
    with pytest.raises(TrainingDiverged, match=r"step 4: loss=nan .* not finite; stopping before "
                                               r"the update .* last good one is .*step_00000002"):
        trainer.train()
    assert trainer.step == 3
    assert [s for s, _ in ckpt.complete_checkpoints(cfg.checkpoint_dir)] == [2]
    assert all(math.isfinite(float(p.detach().abs().max())) for _, p in trainer.named_params)


def test_invalid_launch_is_rejected_before_any_process_group(tmp_path):
    """Four 'ranks' that can never meet (no master listening): an invalid layout must still exit
    at once with the validation message instead of waiting for a rendezvous."""
    env = checkout_env(WORLD_SIZE="4", RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
    proc = subprocess.run([sys.executable, PRETRAIN, "--attn-tp", "3", "--output-dir",
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "invalid launch" in proc.stderr and "attn_tp*attn_cp=3 must divide" in proc.stderr
    bad = [
        (dict(attn_tp=2, attn_cp=2, moe_dp=3), "moe_dp=3"),
        (dict(attn_tp=2, global_batch_size=6, micro_batch_size=4), "micro_batch_size=4"),
        (dict(pp=4, attn_tp=1), "num_layers=2 < pp=4"),
        (dict(moe_ep=3, moe_tp=1, moe_dp=1, attn_tp=3), "must divide world/pp=4"),
        (dict(attn_cp=4, seq_len=600), "max_position_embeddings=512"),
        (dict(attn_tp=4, model_overrides={"num_heads": 2, "num_kv_heads": 2}),
         "num_heads=2 must be divisible by attn_tp=4"),
    ]
    for values, message in bad:
        with pytest.raises(ValueError, match=message):
            validate_launch(TrainConfig(**values, output_dir=str(tmp_path)), 4)
    with pytest.raises(ValueError, match="nope.bin / .*nope.json not found"):
        TrainConfig(data=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="unknown setting"):
        TrainConfig.from_dict({"attn_tpp": 2})
