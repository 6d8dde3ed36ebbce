"""Run a function on N spawned CPU ranks (gloo) and collect what each returns.

``run_ranks(fn, world, *args, timeout=...)`` starts ``world`` processes, initialises gloo on a free
port, calls ``fn(rank, world, *args)`` on each and returns the per-rank results in rank order.
An exception on any rank fails the call with that rank's traceback; a rank that has not finished
when ``timeout`` expires (a hung collective) fails it too, and every process is killed — CI never
hangs. ``fn`` must be importable (a module-level function) because ranks are spawned.
"""
from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable


class RankFailure(AssertionError):
    """A rank raised; the message holds its traceback."""


class RankTimeout(AssertionError):
    """Ranks did not finish in time (a hang)."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_main(payload: bytes, rank: int, world: int, port: int, pg_timeout: float,
               results: "mp.Queue") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        fn, args = pickle.loads(payload)
        dist.init_process_group("gloo", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout))
        try:
            value = fn(rank, world, *args)
        finally:
            dist.destroy_process_group()
        # plain pickle: torch's multiprocessing reducers would pass tensors as shared-memory fds
        results.put((rank, "ok", pickle.dumps(value)))
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit
        results.put((rank, "error", traceback.format_exc()))


def _context() -> mp.context.BaseContext:
    """A forkserver that imported torch once: ranks fork from it instead of each importing torch
    (spawning 8 fresh interpreters costs ~10 s on 2 cores). It never runs torch ops, so no thread
    pool exists when it forks."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch.distributed", "megatron_ext"])
    return ctx


def run_ranks(fn: Callable, world: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    # collectives time out a little before the harness does, so a hang names the collective
    pg_timeout = max(5.0, timeout * 0.8)
    payload = pickle.dumps((fn, args))  # tensors in args travel as bytes, not as fds
    procs = [ctx.Process(target=_rank_main, args=(payload, r, world, port, pg_timeout, results),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    done: dict[int, Any] = {}
    try:
        while len(done) < world:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world)) - set(done))
                raise RankTimeout(f"ranks {missing} of {world} did not finish within {timeout}s "
                                  f"(hung collective?)")
            try:
                rank, status, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs)
                        if r not in done and p.exitcode is not None and p.exitcode != 0]
                if dead:
                    time.sleep(0.5)  # let a queued traceback arrive first
                    try:
                        rank, status, value = results.get_nowait()
                    except queue.Empty:
                        raise RankFailure(f"rank {dead[0]} died with exit code "
                                          f"{procs[dead[0]].exitcode} without a result") from None
                else:
                    continue
            if status == "error":
                raise RankFailure(f"rank {rank} of {world} failed:\n{value}")
            done[rank] = pickle.loads(value)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(timeout=5)
        results.close()
    return [done[r] for r in range(world)]
