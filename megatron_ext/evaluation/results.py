"""``results.json``: every number an evaluation produced, with the model, the layout and the
command, written after every finished cell so ``--resume`` can skip what is done.

Layout::

    {"model": {...}, "layout": {...}, "command": "...", "started": "...", "updated": "...",
     "tasks": {"passkey": {"settings": {...}, "cells": {"L=1024,d=0.5": {...}, ...},
                           "summary": {...}}, ...}}

Only rank 0 writes (atomically: a temporary file renamed over the old one). A resumed run must
evaluate the same model with the same task settings as the file it resumes; anything else is a
``ValueError`` before any work, and the file is left as it was.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Optional

RESULTS_FILE = "results.json"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _json_safe(value: Any) -> Any:
    """NaN/inf become ``null`` (JSON has no such numbers)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


class ResultsStore:
    """The results file of one output directory (see the module doc)."""

    def __init__(self, output_dir: Optional[str], model: dict, *, resume: bool = False,
                 writer: bool = False) -> None:
        """``output_dir=None``: results kept in memory only (nothing to resume or write)."""
        self.path = os.path.join(output_dir, RESULTS_FILE) if output_dir else None
        self.writer = writer
        self.data: dict = {}
        if self.path and os.path.isfile(self.path):
            if not resume:
                raise ValueError(f"{self.path} exists: pass --resume to continue it, or choose "
                                 f"another --output")
            with open(self.path) as f:
                try:
                    self.data = json.load(f)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path} is not valid JSON ({err}); move it away or "
                                     f"choose another --output") from err
            saved = {k: v for k, v in self.data.get("model", {}).items() if k != "path"}
            wanted = {k: v for k, v in _json_safe(model).items() if k != "path"}
            if saved != wanted:
                raise ValueError(f"--resume: {self.path} was written for another model "
                                 f"({self.data.get('model', {}).get('path')}); choose another "
                                 f"--output")
        self.data.setdefault("started", _now())
        self.data["model"] = _json_safe(model)
        self.data.setdefault("tasks", {})

    def begin(self, layout: dict, command: str) -> None:
        """Record this run's layout and command (a resumed run keeps the earlier ones in
        ``runs``)."""
        runs = self.data.setdefault("runs", [])
        runs.append({"layout": layout, "command": command, "started": _now()})
        self.data["layout"], self.data["command"] = layout, command
        self._write()

    def task(self, name: str, settings: dict) -> dict:
        """The entry of task ``name``; a resumed entry must have the same ``settings``."""
        settings = _json_safe(settings)
        entry = self.data["tasks"].get(name)
        if entry is None:
            entry = self.data["tasks"][name] = {"settings": settings, "cells": {}}
        elif entry.get("settings") != settings:
            changed = sorted(k for k in set(settings) | set(entry.get("settings", {}))
                             if settings.get(k) != entry.get("settings", {}).get(k))
            raise ValueError(f"--resume: task {name!r} in {self.path} ran with other settings "
                             f"({', '.join(changed)} differ); choose another --output")
        return entry

    def cells(self, name: str) -> dict:
        return self.data["tasks"][name]["cells"]

    def put_cell(self, name: str, key: str, value: dict) -> None:
        self.data["tasks"][name]["cells"][key] = _json_safe(value)
        self._write()

    def put_summary(self, name: str, summary: dict) -> None:
        self.data["tasks"][name]["summary"] = _json_safe(summary)
        self._write()

    def _write(self) -> None:
        if not self.writer or self.path is None:
            return
        self.data["updated"] = _now()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1)
        os.replace(tmp, self.path)


def load_results(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, RESULTS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)
