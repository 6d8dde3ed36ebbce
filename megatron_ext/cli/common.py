"""What every command does alike: refuse bad input with one line on rank 0 and exit 2, and tear
its process group down so the process exits 0 instead of aborting in gloo's destructors."""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Optional

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


def run_command(prog: str, body: Callable[[Optional[list[str]]], int],
                argv: Optional[list[str]] = None) -> int:
    """Run a command's ``body`` (which validates, then creates the process groups and works) and
    end it cleanly: on success the groups are torn down and ``body``'s code returned; a
    ``ValueError`` after the groups exist (bad input found while loading, raised alike on every
    rank) is one line on rank 0 and exit 2; anything else a traceback per rank and exit 1. The
    failure paths leave through ``os._exit``: a peer may be dead, and teardown would wait."""
    try:
        code = body(argv)
    except ValueError as err:
        code = refuse(prog, err)
    except BaseException as err:  # noqa: BLE001 - includes KeyboardInterrupt
        if isinstance(err, SystemExit) and not (dist.is_available() and dist.is_initialized()):
            raise  # argparse's --help / usage errors
        print(f"{prog}: rank {env_rank()} failed:\n{traceback.format_exc()}", file=sys.stderr,
              flush=True)
        code = 1
    else:
        teardown_distributed()
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
