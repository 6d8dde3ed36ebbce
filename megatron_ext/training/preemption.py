"""Stop cleanly when the scheduler or the user asks: SIGTERM (preemption, ``kill``, torchrun
forwarding), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's warning before a time limit, with
``--signal=USR1@<seconds>``) make the run finish its current step, save, and exit 0.

A signal may reach one rank only (or the ranks at different steps), so after every step the ranks
agree: a one-element MAX all-reduce of "received" over the world; all stop after the same step
and save together (the save is collective). A second signal leaves at once (exit 128 + signal),
like Megatron-LM's exit-signal handler; the atomic publish of saves keeps the last complete
checkpoint intact even then.
"""
from __future__ import annotations

import os
import signal
from typing import Optional

import torch
import torch.distributed as dist

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class ExitSignalHandler:
    """Records the first exit signal; call :meth:`agreed` once per step on every rank."""

    def __init__(self, device: Optional[torch.device] = None):
        self.device = device if device is not None and device.type == "cuda" else \
            torch.device("cpu")
        self.received: int = 0
        self._previous: dict = {}

    def __enter__(self) -> "ExitSignalHandler":
        for sig in EXIT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.received:  # the second one: no more waiting
            os._exit(128 + signum)
        self.received = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none); the same value on every rank."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    @staticmethod
    def name(signum: int) -> str:
        return signal.Signals(signum).name
