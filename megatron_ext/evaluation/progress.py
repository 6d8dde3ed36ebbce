"""Progress of a long evaluation on rank 0: cells done, tokens/s and an ETA from the tokens still
to run (cells of a length × depth grid differ in cost by their length)."""
from __future__ import annotations

import sys
import time
from typing import IO, Optional


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


class Progress:
    """``advance(tokens)`` after each cell; prints one line per update (a carriage-return bar on
    a terminal). ``enabled=False`` (other ranks) prints nothing."""

    def __init__(self, label: str, cells: int, tokens: int, *, enabled: bool,
                 stream: Optional[IO[str]] = None, unit: str = "tokens") -> None:
        self.label, self.cells, self.tokens, self.unit = label, cells, tokens, unit
        self.enabled = enabled and cells > 0
        self.stream = stream or sys.stderr
        self.done_cells = self.done_tokens = 0
        self.start = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done_tokens / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.tokens_per_second
        left = self.tokens - self.done_tokens
        eta = _duration(left / rate) if rate > 0 else "?"
        pct = 100.0 * self.done_tokens / self.tokens if self.tokens else 100.0
        shown = f"{rate:,.2f}" if rate < 10 else f"{rate:,.0f}"
        return (f"[{self.label}] {self.done_cells}/{self.cells} cells {pct:5.1f}% | "
                f"{shown} {self.unit}/s | elapsed "
                f"{_duration(time.perf_counter() - self.start)} | ETA {eta}")

    def advance(self, tokens: int) -> None:
        self.done_cells += 1
        self.done_tokens += tokens
        if not self.enabled:
            return
        end = "\n" if not self.tty or self.done_cells == self.cells else "\r"
        self.stream.write(self.line() + end)
        self.stream.flush()
