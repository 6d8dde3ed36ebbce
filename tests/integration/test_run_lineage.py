"""Run directories keep the newest saves and resume the lineage the user means: a forgotten
``--resume`` is refused, a rollback's fresh saves survive rotation and become "latest", an
``--overwrite`` run rotates the old run out; checkpoints carry a manifest and a flipped byte is an
error naming the file; YAML values get the flags' types."""
from __future__ import annotations

import math
import os

import pytest

from megatron_ext.checkpoint import training_state as ckpt
from megatron_ext.checkpoint.checkpoint_dirs import saved_checkpoints
from megatron_ext.checkpoint.manifest import ChecksumMismatch, read_manifest
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.run_dir import RunDirBusy, RunDirLock
from megatron_ext.training.trainer import Trainer, validate_launch

JOB = dict(seq_len=16, global_batch_size=2, micro_batch_size=2, warmup_steps=1, progress=False,
           tensorboard=False, model_overrides={"num_layers": 1})


def _run(out: str, **values) -> tuple[Trainer, list[float]]:
    cfg = TrainConfig(**{**JOB, **values}, output_dir=out)
    trainer = Trainer(cfg, ParallelGroups.single_process(), validate_launch(cfg, 1))
    trainer.resume()
    return trainer, [m.loss for m in trainer.train()]


def _steps(root: str) -> list[int]:
    return [c.step for c in saved_checkpoints(root)]


def test_forgotten_resume_rollback_and_overwrite_keep_the_newest_saves(tmp_path):
    out = str(tmp_path / "run")
    root = os.path.join(out, "checkpoints")
    first, losses_a = _run(out, train_steps=6, save_interval=2, keep_checkpoints=3)
    assert _steps(root) == [2, 4, 6]

    # a forgotten --resume: refused before anything is built, nothing deleted
    with pytest.raises(ValueError, match=r"already holds checkpoints .*step_00000006 \(step 6, "
                                         r"saved .* by run " + first.run_id):
        validate_launch(TrainConfig(**JOB, train_steps=6, output_dir=out), 1)
    assert _steps(root) == [2, 4, 6]

    # rollback to step 2: continues run A's numbers exactly; its saves are the newest, step_4
    # replaces A's, and "latest" is the rollback's step 4, not A's higher step 6
    rollback, losses_b = _run(out, train_steps=4, save_interval=1, keep_checkpoints=3,
                              resume=ckpt.checkpoint_path(root, 2))
    assert math.isclose(losses_b[0], losses_a[2], rel_tol=1e-6), (losses_b, losses_a)
    assert _steps(root) == [6, 3, 4]  # save order: A's 6, then the rollback's 3 and 4
    latest = ckpt.resolve_resume("latest", root)
    assert latest == ckpt.checkpoint_path(root, 4)
    records = {c.step: c for c in saved_checkpoints(root)}
    assert records[4].run_id == records[3].run_id == rollback.run_id != records[6].run_id
    assert records[3].resumed_from == ckpt.checkpoint_path(root, 2)
    assert ckpt.read_train_state(latest)["step"] == 4

    # --resume latest follows the rollback's lineage
    resumed, losses_c = _run(out, train_steps=5, save_interval=0, keep_checkpoints=3,
                             resume="latest")
    assert len(losses_c) == 1 and resumed.step == 5
    assert _steps(root) == [3, 4, 5]
    assert saved_checkpoints(root)[-1].resumed_from == latest

    # --overwrite: a new run from scratch; its first save is kept, the oldest one rotated out
    _run(out, train_steps=1, save_interval=0, keep_checkpoints=3, overwrite=True)
    assert _steps(root) == [4, 5, 1]
    assert ckpt.latest_checkpoint(root) == ckpt.checkpoint_path(root, 1)


def test_resume_refuses_changed_settings_and_a_flipped_byte_names_the_file(tmp_path):
    out = str(tmp_path / "run")
    _run(out, train_steps=1, save_interval=0)
    path = ckpt.latest_checkpoint(os.path.join(out, "checkpoints"))

    base = dict(JOB, train_steps=2, output_dir=out, resume="latest")
    experts = {**JOB["model_overrides"], "num_experts_per_tok": 1}
    for change, message in (({"seq_len": 12}, "seq_len: 16 -> 12"),
                            ({"model_overrides": experts}, "num_experts_per_tok: 2 -> 1")):
        with pytest.raises(ValueError, match=f"resuming {path} with changed settings "
                                             f"\\({message}.*--allow-resume-changes"):
            validate_launch(TrainConfig(**{**base, **change}), 1)
        intended = TrainConfig(**{**base, **change, "allow_resume_changes": True})
        assert validate_launch(intended, 1).resume_from == path

    recorded = read_manifest(path)
    assert set(recorded) == set(os.listdir(path)) - {"manifest.json"}
    data = next(n for n in sorted(recorded) if n.endswith(".distcp"))
    with open(os.path.join(path, data), "r+b") as f:  # flip one byte in the middle
        f.seek(recorded[data]["bytes"] // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x10]))
    with pytest.raises(ChecksumMismatch, match=f"{data} is corrupted"):
        _run(out, train_steps=2, resume="latest")
    with open(os.path.join(path, data), "r+b") as f:  # truncated
        f.truncate(recorded[data]["bytes"] - 7)
    with pytest.raises(ChecksumMismatch, match=f"{data} has .* bytes.*truncated"):
        ckpt.verify_checkpoint(path)


def test_run_dir_lock_refuses_a_second_owner_and_frees_on_release(tmp_path):
    out = str(tmp_path / "run")
    first = RunDirLock(out, run_id="A").acquire()
    with pytest.raises(RunDirBusy, match=f"output_dir {out} is in use by run A \\(pid {os.getpid()}"):
        RunDirLock(out, run_id="B").acquire()
    with pytest.raises(RunDirBusy, match="in use by run A"):
        RunDirLock(out, run_id="B").check_not_taken()
    RunDirLock(out, run_id="A").check_not_taken()  # a rank of the owning run passes
    first.release()
    assert not os.path.exists(os.path.join(out, ".owner"))
    RunDirLock(out, run_id="B").check_not_taken()
    RunDirLock(out, run_id="B").acquire().release()


def test_yaml_values_get_the_flags_types(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text('lr: 1e-3\nshuffle: "false"\nseed: "7"\ntrain-steps: 5.0\n')
    cfg = TrainConfig.from_args(["--config", str(path)])
    assert (cfg.lr, cfg.shuffle, cfg.seed, cfg.train_steps) == (0.001, False, 7, 5)
    assert isinstance(cfg.lr, float) and cfg.shuffle is False
    for text, message in (("seed: abc\n", "seed='abc' must be an integer"),
                          ("shuffle: maybe\n", "shuffle='maybe' must be a boolean"),
                          ("lr: [1]\n", r"lr=\[1\] must be a number"),
                          ("model_overrides: 3\n", "model_overrides=3 must be a mapping"),
                          ("lr: 1e-3\n  bad: [\n", "not a valid YAML file")):
        path.write_text(text)
        with pytest.raises(ValueError, match=f"{path}: {message}"):
            TrainConfig.from_args(["--config", str(path)])
