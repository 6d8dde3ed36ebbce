"""The choices a model is built or run with, each spelled once.

* :class:`CPStrategy` — how context-parallel attention exchanges K/V: ``all_gather`` (gather K,V;
  backward reduce-scatters dK,dV) or ``p2p`` (ring of cp-1 steps merged by log-sum-exp).
* :class:`MoEDispatcher` — how tokens reach the experts: ``local`` (the token group's gathered
  tokens, one reduction over the shard) or ``all_to_all`` (SCATTERED tokens exchanged over moe_ep).
* :class:`Recompute` — activation recomputation in training: ``none``, ``selective`` (the SwiGLU
  activation of the experts and MLPs) or ``full`` (every decoder layer).

Both are ``StrEnum``s, equal to their plain names, so configs and flags keep their spelling.
"""
from __future__ import annotations

from enum import StrEnum


class CPStrategy(StrEnum):
    ALL_GATHER = "all_gather"
    P2P = "p2p"


class MoEDispatcher(StrEnum):
    LOCAL = "local"
    ALL_TO_ALL = "all_to_all"


class Recompute(StrEnum):
    NONE = "none"
    SELECTIVE = "selective"
    FULL = "full"


CP_STRATEGIES: tuple[str, ...] = tuple(CPStrategy)
RECOMPUTE_MODES: tuple[str, ...] = tuple(Recompute)
MOE_DISPATCHERS: tuple[str, ...] = tuple(MoEDispatcher)


def check_choice(setting: str, value: str, choices: tuple[str, ...]) -> None:
    """ValueError naming the setting and its choices unless ``value`` is one of them."""
    if value not in choices:
        raise ValueError(f"{setting}={value!r} must be one of {', '.join(choices)}")
