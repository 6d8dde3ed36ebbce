"""Collective accounting: which collectives ran, over which axis, how many bytes.

Off by default. ``record()`` is called by every collective in ``collectives.py`` and may be called
by any other module that issues its own collectives (CP attention, symmetric memory, pipeline
send/recv). When no ``count_collectives()`` block is open, ``record()`` is one truthiness check.

    with count_collectives() as log:
        out = model(x)
        out.sum().backward()
    log.count(kind="all_reduce", axis="moe_shard", phase="forward")

The active logs are a module-level list (not thread-local) on purpose: on CUDA the autograd engine
runs backward on its own device threads, and their collectives must be counted too.

``nbytes`` convention: bytes of the whole logical tensor of the collective on this rank — the
gathered output of an all-gather, the unreduced input of a reduce-scatter, the tensor of an
all-reduce, the input this rank sends in an all-to-all or point-to-point op.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

PHASES = ("forward", "backward")

_ACTIVE: list["CollectiveLog"] = []


@dataclass(frozen=True)
class CollectiveRecord:
    """One collective issued by this rank."""

    kind: str    # "all_gather", "reduce_scatter", "all_reduce", "all_to_all", ...
    axis: str    # AxisGroup.name, e.g. "attn_tp", "moe_shard"
    nbytes: int
    phase: str   # "forward" or "backward"


@dataclass(eq=False)  # identity: nested empty logs must stay distinct
class CollectiveLog:
    """Records of one ``count_collectives()`` block, with small query helpers."""

    records: list[CollectiveRecord] = field(default_factory=list)

    def select(self, kind: Optional[str] = None, axis: Optional[str] = None,
               phase: Optional[str] = None) -> list[CollectiveRecord]:
        return [r for r in self.records
                if (kind is None or r.kind == kind) and (axis is None or r.axis == axis)
                and (phase is None or r.phase == phase)]

    def count(self, kind: Optional[str] = None, axis: Optional[str] = None,
              phase: Optional[str] = None) -> int:
        return len(self.select(kind, axis, phase))

    def nbytes(self, kind: Optional[str] = None, axis: Optional[str] = None,
               phase: Optional[str] = None) -> int:
        return sum(r.nbytes for r in self.select(kind, axis, phase))

    def by_kind(self, phase: Optional[str] = None) -> Counter:
        return Counter(r.kind for r in self.select(phase=phase))

    def by_axis(self, phase: Optional[str] = None) -> Counter:
        return Counter(r.axis for r in self.select(phase=phase))

    def by_kind_axis(self, phase: Optional[str] = None) -> Counter:
        """``Counter({(kind, axis): n})`` — the usual thing a test pins down."""
        return Counter((r.kind, r.axis) for r in self.select(phase=phase))

    def clear(self) -> None:
        self.records.clear()

    def __len__(self) -> int:
        return len(self.records)


def is_counting() -> bool:
    return bool(_ACTIVE)


def _current_phase() -> str:
    # -1 outside an autograd graph task; inside backward the engine sets a task id.
    get_id = getattr(torch._C, "_current_graph_task_id", None)
    return "backward" if get_id is not None and get_id() != -1 else "forward"


def record(kind: str, axis: str, nbytes: int, phase: Optional[str] = None) -> None:
    """Log one collective into every open ``count_collectives()`` block (no-op when none is open).

    ``phase`` defaults to "backward" when called from inside an autograd backward pass."""
    if not _ACTIVE:
        return
    if phase is None:
        phase = _current_phase()
    elif phase not in PHASES:
        raise ValueError(f"phase={phase!r} must be one of {PHASES}")
    rec = CollectiveRecord(kind, axis, int(nbytes), phase)
    for log in _ACTIVE:
        log.records.append(rec)


@contextlib.contextmanager
def count_collectives() -> Iterator[CollectiveLog]:
    """Record every collective issued inside the block (blocks nest; each sees its own records)."""
    log = CollectiveLog()
    _ACTIVE.append(log)
    try:
        yield log
    finally:
        _ACTIVE.remove(log)
