"""Pure rank math for megatron_ext's two layouts inside a pipeline stage (design §2).

``world = pp × S``; inside a stage the same ``S`` ranks are tiled twice:

* attention: ``S = attn_dp × attn_cp × attn_tp``, local rank ``s = a + A·(c + C·d)``;
* MoE:       ``S = moe_dp × moe_ep × moe_tp``,    local rank ``s = m + M·(e + E·q)``.

Global rank ``= s + S·p``. An MoE shard (the ``E·M`` ranks holding every expert once) covers whole
attention-TP groups (``E·M = k·A``) or tiles one (``A = g·E·M``, megatron-core's folding with a
small expert group inside a large attention-TP group); a shard straddling two groups is refused.
Nothing here touches ``torch.distributed``: every rank list can be
checked (and printed by the CLI, ``python -m megatron_ext.parallel.topology``) before a launch.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional

from megatron_ext.parallel.axes import GROUP_AXES, Axis



def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}={value!r} must be a positive integer")
    if value < 1:
        raise ValueError(f"{name}={value} must be >= 1")


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in both layouts."""

    rank: int
    pp: int          # pipeline stage p
    stage_rank: int  # s
    attn_tp: int     # a
    attn_cp: int     # c
    attn_dp: int     # d
    moe_tp: int      # m
    moe_ep: int      # e
    moe_dp: int      # q (= MoE shard index)
    token_group_rank: int  # j: position inside the MOE_FULL token group


@dataclass(frozen=True)
class Topology:
    """Validated parallel sizes. Sizes left as ``None`` are derived where unambiguous.

    Derivation rules: ``world`` defaults to the product of the given sizes; ``attn_tp`` and
    ``attn_cp`` default to 1 and ``attn_dp`` fills the stage; of the MoE sizes, one missing size is
    derived from the other two; with two or three missing, ``moe_ep`` defaults to 1 and then
    ``moe_tp`` to ``attn_tp`` (Megatron's default expert-TP), the last one fills the stage.
    """

    world: Optional[int] = None
    pp: int = 1
    attn_tp: Optional[int] = None
    attn_cp: Optional[int] = None
    attn_dp: Optional[int] = None
    moe_tp: Optional[int] = None
    moe_ep: Optional[int] = None
    moe_dp: Optional[int] = None
    _derived: tuple = field(default=(), repr=False, compare=False)

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        given = {k: getattr(self, k) for k in
                 ("world", "pp", "attn_tp", "attn_cp", "attn_dp", "moe_tp", "moe_ep", "moe_dp")}
        for name, value in given.items():
            if value is not None:
                _check_positive_int(name, value)
        derived: list[str] = []
        world, pp = given["world"], given["pp"]

        attn = {k: given[k] for k in (Axis.ATTN_TP, Axis.ATTN_CP, Axis.ATTN_DP)}
        moe = {k: given[k] for k in (Axis.MOE_TP, Axis.MOE_EP, Axis.MOE_DP)}
        if world is None:
            full = next((sizes for sizes in (attn, moe) if None not in sizes.values()), None)
            if full is None:
                raise ValueError(
                    "world is not given and cannot be derived: give world, or every attention "
                    f"size (attn_tp, attn_cp, attn_dp) or every MoE size (moe_tp, moe_ep, moe_dp); "
                    f"got {', '.join(f'{k}={v}' for k, v in given.items() if v is not None)}")
            world = pp
            for v in full.values():
                world *= v
            derived.append("world")
        if world % pp:
            raise ValueError(f"pp={pp} must divide world={world}")
        stage = world // pp

        # attention layout
        if attn[Axis.ATTN_DP] is not None and \
                (attn[Axis.ATTN_TP] is None) != (attn[Axis.ATTN_CP] is None):
            missing = Axis.ATTN_TP if attn[Axis.ATTN_TP] is None else Axis.ATTN_CP
            other = Axis.ATTN_CP if missing == Axis.ATTN_TP else Axis.ATTN_TP
            denom = attn[other] * attn[Axis.ATTN_DP]
            if stage % denom:
                raise ValueError(f"{other}*attn_dp={denom} must divide world/pp={stage} "
                                 f"to derive {missing}")
            attn[missing] = stage // denom
            derived.append(missing)
        for k in (Axis.ATTN_TP, Axis.ATTN_CP):
            if attn[k] is None:
                attn[k] = 1
                derived.append(k)
        tp_cp = attn[Axis.ATTN_TP] * attn[Axis.ATTN_CP]
        if attn[Axis.ATTN_DP] is None:
            if stage % tp_cp:
                raise ValueError(f"attn_tp*attn_cp={tp_cp} must divide world/pp={stage} "
                                 f"(attn_tp={attn['attn_tp']}, attn_cp={attn['attn_cp']}, "
                                 f"world={world}, pp={pp})")
            attn[Axis.ATTN_DP] = stage // tp_cp
            derived.append(Axis.ATTN_DP)
        if tp_cp * attn[Axis.ATTN_DP] != stage:
            raise ValueError(
                f"attn_tp*attn_cp*attn_dp={tp_cp * attn['attn_dp']} must equal world/pp={stage} "
                f"(attn_tp={attn['attn_tp']}, attn_cp={attn['attn_cp']}, "
                f"attn_dp={attn['attn_dp']}, world={world}, pp={pp})")

        # MoE layout
        missing = [k for k, v in moe.items() if v is None]
        if len(missing) >= 2 and moe[Axis.MOE_EP] is None:
            moe[Axis.MOE_EP] = 1
            derived.append(Axis.MOE_EP)
            missing.remove(Axis.MOE_EP)
        if len(missing) == 2:  # moe_tp and moe_dp
            moe[Axis.MOE_TP] = attn[Axis.ATTN_TP]
            derived.append(Axis.MOE_TP)
            missing.remove(Axis.MOE_TP)
        if len(missing) == 1:
            name = missing[0]
            denom = 1
            for k, v in moe.items():
                if k != name:
                    denom *= v
            if stage % denom:
                others = ", ".join(f"{k}={v}" for k, v in moe.items() if k != name)
                raise ValueError(f"the product of {others} ({denom}) must divide world/pp={stage} "
                                 f"to derive {name}")
            moe[name] = stage // denom
            derived.append(name)
        product = moe[Axis.MOE_TP] * moe[Axis.MOE_EP] * moe[Axis.MOE_DP]
        if product != stage:
            raise ValueError(
                f"moe_tp*moe_ep*moe_dp={product} must equal world/pp={stage} "
                f"(moe_tp={moe['moe_tp']}, moe_ep={moe['moe_ep']}, moe_dp={moe['moe_dp']})")
        shard, A = moe[Axis.MOE_EP] * moe[Axis.MOE_TP], attn[Axis.ATTN_TP]
        if shard % A and A % shard:
            raise ValueError(
                f"an MoE shard (moe_ep*moe_tp={shard} ranks) must cover whole attention-TP "
                f"groups or tile one (attn_tp={A}): one of moe_ep*moe_tp and attn_tp must divide "
                f"the other (moe_dp={moe['moe_dp']}, attn_dp*attn_cp="
                f"{attn[Axis.ATTN_DP] * attn[Axis.ATTN_CP]})")

        object.__setattr__(self, "world", world)
        for k, v in {**attn, **moe}.items():
            object.__setattr__(self, k, v)
        object.__setattr__(self, "_derived", tuple(derived))

    # ------------------------------------------------------------------ sizes
    @property
    def stage_size(self) -> int:
        """S: ranks in one pipeline stage."""
        return self.world // self.pp

    @property
    def moe_shard_size(self) -> int:
        """E·M: ranks holding one full copy of the experts."""
        return self.moe_ep * self.moe_tp

    @property
    def token_group_size(self) -> int:
        """k = E·M / A: attention groups whose tokens one MoE shard processes together (1 when
        the shard lies inside one attention-TP group)."""
        return max(1, self.moe_shard_size // self.attn_tp)

    @property
    def shards_per_attn_tp_group(self) -> int:
        """g = A / (E·M): MoE shards tiling one attention-TP group (1 unless the shard is smaller
        than the group). With g > 1 each shard processes the SCATTERED slices of its own members
        — 1/g of the attention group's tokens (design §2)."""
        return max(1, self.attn_tp // self.moe_shard_size)

    @property
    def moe_full_is_tp_attn_full(self) -> bool:
        """The shard's tokens are exactly its attention group's tokens (E·M == A): MOE_FULL and
        TP_ATTN_FULL are the same rows."""
        return self.moe_shard_size == self.attn_tp

    @property
    def uses_moe_full(self) -> bool:
        """A MoE reads rows no attention-TP rank holds as they are (MOE_FULL ≠ TP_ATTN_FULL)."""
        return not self.moe_full_is_tp_attn_full

    @property
    def derived(self) -> tuple[str, ...]:
        return self._derived

    def moe_tokens_summary(self) -> str:
        """Which tokens one MoE shard processes, in a few words (CLI and launch logs)."""
        g = self.shards_per_attn_tp_group
        if g > 1:
            return (f"{g} shards per attention-TP group (each its members' SCATTERED slices, "
                    f"MOE_FULL)")
        return (f"token group k={self.token_group_size}"
                + (" (MOE_FULL)" if self.uses_moe_full else ""))

    # ------------------------------------------------------------------ coordinates
    def coords(self, rank: int) -> RankCoords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank={rank} out of range for world={self.world}")
        S, A, C, M, E = self.stage_size, self.attn_tp, self.attn_cp, self.moe_tp, self.moe_ep
        p, s = divmod(rank, S)
        a, rest = s % A, s // A
        c, d = rest % C, rest // C
        m, rest = s % M, s // M
        e, q = rest % E, rest // E
        j = (s - q * self.moe_shard_size) // A
        return RankCoords(rank, p, s, a, c, d, m, e, q, j)

    def _attn_rank(self, p: int, a: int, c: int, d: int) -> int:
        return a + self.attn_tp * (c + self.attn_cp * d) + self.stage_size * p

    def _moe_rank(self, p: int, m: int, e: int, q: int) -> int:
        return m + self.moe_tp * (e + self.moe_ep * q) + self.stage_size * p

    # ------------------------------------------------------------------ groups
    def group_lists(self, axis: str) -> list[list[int]]:
        """Every rank list of ``axis`` (each list in group-rank order), sorted by first rank."""
        if axis not in GROUP_AXES:
            raise ValueError(f"unknown axis {axis!r}; known: {', '.join(GROUP_AXES)}")
        return sorted(self._lists(axis), key=lambda r: r[0])

    def _lists(self, axis: str) -> Iterator[list[int]]:
        A, C, D = self.attn_tp, self.attn_cp, self.attn_dp
        M, E, Q = self.moe_tp, self.moe_ep, self.moe_dp
        S, P = self.stage_size, self.pp
        k = self.token_group_size
        if axis == Axis.PP:
            yield from ([s + S * p for p in range(P)] for s in range(S))
            return
        if axis == Axis.EMBEDDING:
            # first and last stage of each pipeline (tied embedding / LM head)
            yield from (sorted({s, s + S * (P - 1)}) for s in range(S))
            return
        if axis == Axis.MODEL:  # tp x pp: one copy of the dense model (Megatron's "mp")
            for c in range(C):
                for d in range(D):
                    yield [self._attn_rank(p, a, c, d) for p in range(P) for a in range(A)]
            return
        for p in range(P):
            if axis == Axis.ATTN_TP:
                yield from ([self._attn_rank(p, a, c, d) for a in range(A)]
                            for c in range(C) for d in range(D))
            elif axis == Axis.ATTN_CP:
                yield from ([self._attn_rank(p, a, c, d) for c in range(C)]
                            for a in range(A) for d in range(D))
            elif axis == Axis.ATTN_DP:
                yield from ([self._attn_rank(p, a, c, d) for d in range(D)]
                            for a in range(A) for c in range(C))
            elif axis == Axis.ATTN_DP_CP:
                yield from ([self._attn_rank(p, a, c, d) for d in range(D) for c in range(C)]
                            for a in range(A))
            elif axis == Axis.ATTN_TP_CP:
                yield from ([self._attn_rank(p, a, c, d) for c in range(C) for a in range(A)]
                            for d in range(D))
            elif axis == Axis.MOE_TP:
                yield from ([self._moe_rank(p, m, e, q) for m in range(M)]
                            for e in range(E) for q in range(Q))
            elif axis == Axis.MOE_EP:
                yield from ([self._moe_rank(p, m, e, q) for e in range(E)]
                            for m in range(M) for q in range(Q))
            elif axis == Axis.MOE_DP:
                yield from ([self._moe_rank(p, m, e, q) for q in range(Q)]
                            for m in range(M) for e in range(E))
            elif axis == Axis.MOE_SHARD:
                yield from ([self._moe_rank(p, m, e, q) for e in range(E) for m in range(M)]
                            for q in range(Q))
            elif axis == Axis.MOE_CP:
                # the shard's ranks with one attention-TP index (a single rank when g > 1)
                yield from ([q * E * M + a + A * j + S * p for j in range(k)]
                            for q in range(Q) for a in range(min(A, E * M)))
            elif axis == Axis.STAGE:
                yield list(range(S * p, S * (p + 1)))

    def group_of(self, axis: str, rank: int) -> list[int]:
        """The rank list of ``axis`` that contains ``rank``."""
        for ranks in self.group_lists(axis):
            if rank in ranks:
                return ranks
        raise AssertionError(f"rank {rank} is in no {axis} group")  # pragma: no cover

    def describe(self) -> str:
        """A readable table of every rank and every group, for the CLI."""
        lines = [
            f"world={self.world} pp={self.pp} stage={self.stage_size} | attention: "
            f"tp={self.attn_tp} cp={self.attn_cp} dp={self.attn_dp} | MoE: tp={self.moe_tp} "
            f"ep={self.moe_ep} dp={self.moe_dp} | shard={self.moe_shard_size} ranks, "
            + self.moe_tokens_summary(),
        ]
        if self.derived:
            lines.append("derived: " + ", ".join(f"{k}={getattr(self, k)}" for k in self.derived))
        header = ("rank", "pp", "attn_tp", "attn_cp", "attn_dp", "moe_tp", "moe_ep", "moe_dp",
                  "token_group", "shard")
        rows = []
        for r in range(self.world):
            c = self.coords(r)
            rows.append((r, c.pp, c.attn_tp, c.attn_cp, c.attn_dp, c.moe_tp, c.moe_ep, c.moe_dp,
                         str(self.group_of(Axis.MOE_CP, r)), str(self.group_of(Axis.MOE_SHARD, r))))
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        fmt = "  ".join(f"{{:>{w}}}" for w in widths)
        lines += ["", fmt.format(*header)] + [fmt.format(*row) for row in rows] + [""]
        for axis in GROUP_AXES:
            lines.append(f"{axis:>11}: " + " ".join(str(g) for g in self.group_lists(axis)))
        return "\n".join(lines)


LAYOUT_SIZES: tuple[str, ...] = ("pp", "attn_tp", "attn_cp", "attn_dp", "moe_tp", "moe_ep",
                                  "moe_dp")


def add_layout_arguments(parser: argparse.ArgumentParser,
                         sizes: tuple[str, ...] = LAYOUT_SIZES) -> None:
    """``--attn-tp``, ``--attn-cp``, … flags (default: derived) for the scripts users launch."""
    for name in sizes:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)


def topology_from_args(args: argparse.Namespace, world: Optional[int]) -> Topology:
    """The validated :class:`Topology` of the layout flags in ``args`` (``ValueError`` otherwise)."""
    sizes = {k: getattr(args, k) for k in LAYOUT_SIZES if getattr(args, k, None) is not None}
    if world is not None:
        sizes["world"] = world
    return Topology(**sizes)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_ext.parallel.topology",
        description="Print the rank layout and process-group lists of a megatron_ext launch.")
    parser.add_argument("--world", type=int, default=None)
    add_layout_arguments(parser)
    args = parser.parse_args(argv)
    try:
        topo = topology_from_args(args, args.world)
    except ValueError as err:
        print(f"invalid layout: {err}", file=sys.stderr)
        return 2
    print(topo.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
