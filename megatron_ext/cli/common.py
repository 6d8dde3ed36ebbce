"""What every command does alike: refuse bad input with one line on rank 0 and exit 2, and tear
its process group down so the process exits 0 instead of aborting in gloo's destructors."""
from __future__ import annotations

import os
import sys

import torch.distributed as dist

EXIT_INVALID = 2


def env_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def one_line(err: BaseException) -> str:
    """The message of ``err`` on one line (multi-line reports joined with "; ")."""
    parts = [p.strip() for p in str(err).splitlines() if p.strip()]
    return "; ".join(parts) or type(err).__name__


def refuse(prog: str, err: BaseException, what: str = "error") -> int:
    """Print ``prog: what: message`` once (rank 0) and return the exit code for bad input."""
    if env_rank() == 0:
        print(f"{prog}: {what}: {one_line(err)}", file=sys.stderr, flush=True)
    return EXIT_INVALID


def teardown_distributed() -> None:
    """Every rank meets once more, then the default process group is destroyed (a process that
    exits with a live gloo group can abort in its destructors: "terminate called without an
    active exception")."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()
