"""Which checkpoints a run directory holds, in the order they were *saved*.

Step numbers do not order saves: a run restarted without ``--resume`` (with ``--overwrite``) or
rolled back (``--resume .../step_00000020`` in a directory that also holds ``step_00000040``)
writes lower steps after higher ones. Every published checkpoint therefore carries
``lineage.json``: a per-directory save sequence number, the save time, the id of the run that
wrote it and the checkpoint that run resumed from. "Latest", rotation and ``--resume latest``
follow the sequence number; checkpoints from before lineage records count as older than any
recorded one, among themselves by step.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from typing import Optional

STEP_DIR = re.compile(r"^step_(\d{8})$")
PARTIAL_SUFFIX = ".partial"
LINEAGE_FILE = "lineage.json"
DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class SavedCheckpoint:
    """One published checkpoint and its lineage record (``seq`` 0: none recorded)."""

    step: int
    path: str
    seq: int = 0
    saved_at: str = ""
    run_id: str = ""
    resumed_from: Optional[str] = None

    def describe(self) -> str:
        who = f", saved {self.saved_at} by run {self.run_id}" if self.seq else ""
        return f"{self.path} (step {self.step}{who})"


def checkpoint_path(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def is_complete(path: str) -> bool:
    """DCP writes ``.metadata`` last; a published directory without it is not a checkpoint."""
    return os.path.isfile(os.path.join(path, DCP_METADATA))


def read_lineage(path: str, step: int) -> SavedCheckpoint:
    record_path = os.path.join(path, LINEAGE_FILE)
    if not os.path.isfile(record_path):
        return SavedCheckpoint(step, path)
    try:
        with open(record_path, encoding="utf-8") as f:
            record = json.load(f)
        return SavedCheckpoint(step, path, int(record["seq"]), str(record["saved_at"]),
                               str(record["run_id"]), record.get("resumed_from"))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{record_path} is unreadable ({err}); move that checkpoint away") \
            from None


def saved_checkpoints(root: str) -> list[SavedCheckpoint]:
    """Every published checkpoint under ``root``, oldest save first."""
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        match = STEP_DIR.match(name)
        path = os.path.join(root, name)
        if match and is_complete(path):
            found.append(read_lineage(path, int(match.group(1))))
    return sorted(found, key=lambda c: (c.seq, c.step))


def complete_checkpoints(root: str) -> list[tuple[int, str]]:
    """``(step, path)`` of every published checkpoint under ``root``, oldest save first."""
    return [(c.step, c.path) for c in saved_checkpoints(root)]


def latest_checkpoint(root: str) -> Optional[str]:
    """The most recently saved complete checkpoint under ``root`` (not the highest step)."""
    found = saved_checkpoints(root)
    return found[-1].path if found else None


def next_lineage(root: str, step: int, run_id: str, saved_at: str,
                 resumed_from: Optional[str]) -> dict:
    """The lineage record of the next save under ``root``."""
    seq = max((c.seq for c in saved_checkpoints(root)), default=0) + 1
    return {"seq": seq, "step": step, "saved_at": saved_at, "run_id": run_id,
            "resumed_from": resumed_from}


def resolve_resume(resume: Optional[str], root: str) -> Optional[str]:
    """``None``: start fresh; ``"latest"``: the last saved complete checkpoint under ``root``
    (fresh when there is none); else a checkpoint directory, which must be complete."""
    if resume is None:
        return None
    if resume == "latest":
        return latest_checkpoint(root)
    if not is_complete(resume):
        raise ValueError(f"resume={resume!r} is not a complete checkpoint (no {DCP_METADATA})")
    return resume


def describe_checkpoint(path: str) -> str:
    """``path (step N, saved <time> by run <id>)`` for messages."""
    match = STEP_DIR.match(os.path.basename(os.path.normpath(path)))
    return read_lineage(path, int(match.group(1)) if match else -1).describe()
