"""Resuming continues *the same* run: a changed model field (experts per token, hidden size, ...)
or a changed sample stream (sequence length, batch size, tokenizer, shuffling) would silently
continue a different experiment from the saved weights and position. Checked before any process
group from the checkpoint's saved training state; ``--allow-resume-changes`` accepts them."""
from __future__ import annotations

from typing import Any

# settings that change which tokens each step sees (seed and data are checked at load)
# (the tokenizer is compared by content, not by its setting: trainer.check_resumable)
SAMPLE_STREAM = ("seq_len", "global_batch_size", "shuffle")


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def resume_changes(saved: dict, cfg, model_config) -> list[str]:
    """``field: saved -> now`` for every model field and sample-stream setting that differs."""
    changes = []
    before = saved.get("model", {})
    now = model_config.to_dict()
    for key in sorted(set(before) | set(now)):
        if _plain(before.get(key)) != _plain(now.get(key)):
            changes.append(f"{key}: {before.get(key)!r} -> {now.get(key)!r}")
    run = saved.get("config", {})
    for key in SAMPLE_STREAM:
        if key in run and _plain(run[key]) != _plain(getattr(cfg, key)):
            changes.append(f"{key}: {run[key]!r} -> {getattr(cfg, key)!r}")
    return changes


def check_resume_matches(path: str, saved: dict, cfg, model_config) -> None:
    changes = resume_changes(saved, cfg, model_config)
    if changes and not cfg.allow_resume_changes:
        raise ValueError(f"resuming {path} with changed settings ({'; '.join(changes[:4])}"
                         f"{' ...' if len(changes) > 4 else ''}); pass --allow-resume-changes if "
                         f"that is intended")
