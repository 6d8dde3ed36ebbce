"""Metrics logging: JSON lines always, TensorBoard scalars (tensorboard is a test dependency)."""
from __future__ import annotations

import json

from megatron_ext.training.logging import MetricsLogger


def _metrics(step: int) -> dict:
    return {"loss": 5.0 - step, "aux_loss": 0.1, "grad_norm": 1.5, "lr": 1e-3,
            "tokens_per_s": 1000.0 * step, "tokens": 1024}


def test_metrics_jsonl_and_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(str(tmp_path), total_steps=3, progress=True, tensorboard=True)
    assert logger.tb is not None
    for step in (1, 2, 3):
        logger.log(step, _metrics(step))
        logger.advance()
    logger.close()
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3] and lines[2]["loss"] == 2.0
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert {"train/grad_norm", "train/lr", "train/tokens_per_s"} <= set(events.Tags()["scalars"])


def test_disabled_logger_writes_nothing(tmp_path):
    logger = MetricsLogger(str(tmp_path / "off"), total_steps=1, enabled=False)
    logger.log(1, _metrics(1))
    logger.close()
    assert not (tmp_path / "off").exists()
