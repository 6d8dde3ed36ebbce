"""One owner per run directory: two runs writing one ``--output-dir`` interleave their saves and
rotations (a published ``step_N`` from one, its files from the other).

Rank 0 of a run holds an exclusive ``flock`` on ``<output_dir>/.owner`` for the whole run and
writes its host, pid, run id and start time into the file. The kernel drops the lock when the
process dies, however it dies, so a lock left by a dead run is recognised by simply being free.
The other ranks, before any process group exists, only look: a lock held by a *different* run
(another run id) refuses the launch on them too, so every rank of the second run exits 2 at once.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

OWNER_FILE = ".owner"


class RunDirBusy(ValueError):
    """Another live run owns the output directory."""


def launch_run_id() -> str:
    """The same string on every rank of one launch, different between concurrent launches
    (torchrun's run id with the rendezvous endpoint; plain processes: the endpoint)."""
    endpoint = f"{os.environ.get('MASTER_ADDR', 'local')}:{os.environ.get('MASTER_PORT', '')}"
    if "WORLD_SIZE" not in os.environ or os.environ.get("WORLD_SIZE") == "1":
        endpoint += f"/pid{os.getpid()}"
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}@{endpoint}"


def _describe(owner: dict, path: str) -> str:
    return (f"run {owner.get('run_id', '?')} (pid {owner.get('pid', '?')} on host "
            f"{owner.get('host', '?')}, started {owner.get('started', '?')})"
            if owner else f"another process (no owner details in {path} yet)")


def _read_owner(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        return json.loads(raw.decode("utf-8")) if raw.strip() else {}
    except (ValueError, UnicodeDecodeError):
        return {}


class RunDirLock:
    """The exclusive lock of one run directory (see the module doc)."""

    def __init__(self, output_dir: str, run_id: Optional[str] = None):
        self.output_dir = output_dir
        self.path = os.path.join(output_dir, OWNER_FILE)
        self.run_id = run_id or launch_run_id()
        self._fd: Optional[int] = None
        self.previous: dict = {}

    def _busy(self, owner: dict) -> RunDirBusy:
        return RunDirBusy(f"output_dir {self.output_dir} is in use by {_describe(owner, self.path)}"
                          f"; wait for it to finish or use another --output-dir")

    def acquire(self) -> "RunDirLock":
        """Take the lock (rank 0); :class:`RunDirBusy` naming the owner when another run holds
        it. ``previous`` is what a run that died holding it had written (empty if none)."""
        os.makedirs(self.output_dir, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read_owner(fd)
                os.close(fd)
                raise self._busy(owner) from None
            try:  # the file may have been unlinked by its releasing owner meanwhile: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.previous = _read_owner(fd)
        record = {"run_id": self.run_id, "pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode("utf-8"))
        os.fsync(fd)
        self._fd = fd
        return self

    def check_not_taken(self) -> None:
        """For the ranks that do not take the lock: :class:`RunDirBusy` when a run with another
        id holds it (no lock is taken; no file is created)."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            for _ in range(50):  # the holder writes its record right after locking
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    fcntl.flock(fd, fcntl.LOCK_UN)
                    return  # nobody holds it
                except BlockingIOError:
                    owner = _read_owner(fd)
                if owner:
                    break
                time.sleep(0.05)
            if owner.get("run_id") != self.run_id:
                raise self._busy(owner)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
