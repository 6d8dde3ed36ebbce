"""How many tokens every attention group of a stage holds, and what follows for each scatter mode.

Built once per forward (every rank of the stage must build the same one) and passed to the
``LayerCommunicator``; every gather and scatter takes its per-rank sizes from here, so uneven
attention-DP batches (serving) and CP chunks with a padded tail need no size exchange per layer.

Tokens are along dim 0 of the hidden states (``[tokens, H]`` or Megatron's ``[seq, batch, H]``).

**Split rule for SCATTERED** (``split_rows``): an attention group's ``n`` tokens are cut into
``attn_tp`` contiguous slices in attn_tp-rank order, the first ``n % attn_tp`` slices one row
longer (``n = 5, attn_tp = 2 → [3, 2]``; ``n = 1, attn_tp = 4 → [1, 0, 0, 0]``).

**Decode with one owner per token** (``attn_gathers_cp``): a serving decode step gives each new
token to exactly one CP rank of its attention-DP group; ``tokens_per_attn_group`` then counts the
rows each CP rank *owns* (its residual stream, norms, MLP/MoE and LM head), so a ``MOE_FULL``
gather brings every token once. Only attention reads more: each CP rank scores every query of
its CP group against its own KV share, so the attention input is gathered over ``attn_cp``
(``attention_rows`` rows, CP order) and the block keeps this rank's rows of its output
(``attn_cp_sizes`` says whose rows are where).

**Decode with rows replicated over CP** (``cp_replicated``; attn_tp 1, MoE token group = CP
group): every CP rank holds every decode row of its attention-DP group and runs the same
residual stream on them (the dense work is repeated, reading the weights each rank reads
anyway). The MoE shard then already holds its whole token set — MOE_FULL is these rows, no
gather — and each token's expert work is still done once, split over the shard; the MoE sum
completes with one all-reduce, and the attention's CP partials are all-gathered so every rank
merges every row. Two collectives per layer instead of four.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import torch

from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology
from megatron_ext.communication.scatter_modes import ScatterMode


def split_rows(n: int, parts: int) -> tuple[int, ...]:
    """``n`` rows in ``parts`` contiguous slices, the first ``n % parts`` one row longer."""
    base, extra = divmod(n, parts)
    return tuple(base + (1 if i < extra else 0) for i in range(parts))


def cp_replication_applies(topo: Topology) -> bool:
    """Whether decode rows may be replicated over CP (``TokenLayout.cp_replicated``): CP > 1,
    attn_tp 1, and the MoE token group is the CP group (so no expert work is repeated)."""
    return topo.attn_cp > 1 and topo.attn_tp == 1 and topo.token_group_size == topo.attn_cp


@dataclass(frozen=True)
class TokenLayout:
    """Tokens (TP_ATTN_FULL rows) of every attention group of this rank's stage.

    ``tokens_per_attn_group[g]``: rows held by attention group ``g = attn_cp + attn_cp_size ·
    attn_dp`` (stage order, the ``stage_rank // attn_tp`` of its ranks). ``topology`` and
    ``global_rank`` say which of them this rank is.
    """

    topology: Topology
    global_rank: int
    tokens_per_attn_group: tuple[int, ...]
    attn_gathers_cp: bool = False
    cp_replicated: bool = False

    def __post_init__(self) -> None:
        topo = self.topology
        if self.cp_replicated and (self.attn_gathers_cp or not cp_replication_applies(topo)):
            raise ValueError(
                f"cp_replicated (decode rows replicated over the CP group) needs attn_cp > 1, "
                f"attn_tp=1, no attn_gathers_cp, and the MoE token group to be the CP group "
                f"(moe_dp 1 within one attention-DP group); got attn_tp={topo.attn_tp}, attn_cp="
                f"{topo.attn_cp}, token group {topo.token_group_size}, attn_gathers_cp="
                f"{self.attn_gathers_cp}")
        n_groups = self.topology.attn_dp * self.topology.attn_cp
        counts = tuple(self.tokens_per_attn_group)
        if len(counts) != n_groups:
            raise ValueError(f"tokens_per_attn_group has {len(counts)} entries but the stage has "
                             f"attn_dp*attn_cp={n_groups} attention groups")
        if any(isinstance(c, bool) or int(c) != c or c < 0 for c in counts):
            raise ValueError(f"tokens_per_attn_group={counts} must be non-negative integers")
        object.__setattr__(self, "tokens_per_attn_group", tuple(int(c) for c in counts))

    # ------------------------------------------------------------------ constructors
    @classmethod
    def uniform(cls, groups: ParallelGroups, tokens: int) -> "TokenLayout":
        """Every attention group holds ``tokens`` rows (training; CP chunks after padding)."""
        topo = groups.topology
        return cls(topo, groups.global_rank, (tokens,) * (topo.attn_dp * topo.attn_cp))

    @classmethod
    def from_counts(cls, groups: ParallelGroups, tokens_per_attn_group: Sequence[int], *,
                    attn_gathers_cp: bool = False, cp_replicated: bool = False
                    ) -> "TokenLayout":
        return cls(groups.topology, groups.global_rank, tuple(tokens_per_attn_group),
                   attn_gathers_cp, cp_replicated)

    @classmethod
    def exchange(cls, groups: ParallelGroups, local_tokens: int) -> "TokenLayout":
        """Every rank says how many rows its attention group holds; one all-gather over the stage
        (serving with uneven attention-DP batches). Ranks of one attention group must agree."""
        from megatron_ext.communication.collectives import all_gather

        mine = torch.tensor([int(local_tokens)], dtype=torch.int64)
        if groups.stage.group is not None and _stage_is_nccl(groups):
            mine = mine.cuda()
        with torch.no_grad():
            every = all_gather(mine, groups.stage).cpu().tolist()
        A = groups.topology.attn_tp
        per_group = [every[g * A:(g + 1) * A] for g in range(len(every) // A)]
        for g, counts in enumerate(per_group):
            if len(set(counts)) != 1:
                raise ValueError(f"attention group {g} disagrees on its token count: its attn_tp "
                                 f"ranks reported {counts}")
        return cls(groups.topology, groups.global_rank, tuple(c[0] for c in per_group))

    # ------------------------------------------------------------------ this rank's view
    @cached_property
    def _attn_group(self) -> int:
        return self.topology.coords(self.global_rank).stage_rank // self.topology.attn_tp

    @property
    def local_tokens(self) -> int:
        """Rows this rank holds in TP_ATTN_FULL."""
        return self.tokens_per_attn_group[self._attn_group]

    @cached_property
    def attn_tp_sizes(self) -> tuple[int, ...]:
        """SCATTERED rows of every rank of this rank's attn_tp group."""
        return split_rows(self.local_tokens, self.topology.attn_tp)

    @cached_property
    def attn_cp_sizes(self) -> tuple[int, ...]:
        """TP_ATTN_FULL rows of every rank of this rank's attn_cp group (CP order)."""
        return self._aligned_block(self.topology.attn_cp)

    @property
    def attention_rows(self) -> int:
        """Rows the attention block reads: this rank's rows, or with ``attn_gathers_cp`` the rows
        of its whole CP group."""
        return sum(self.attn_cp_sizes) if self.attn_gathers_cp else self.local_tokens

    @cached_property
    def moe_cp_sizes(self) -> tuple[int, ...]:
        """TP_ATTN_FULL rows of every rank of this rank's token group (moe_cp order)."""
        return self._aligned_block(self.topology.token_group_size)

    def _aligned_block(self, size: int) -> tuple[int, ...]:
        """Counts of the ``size`` consecutive attention groups (aligned to ``size``) holding this
        rank's: its CP group, or its token group."""
        first = (self._attn_group // size) * size
        return self.tokens_per_attn_group[first:first + size]

    @cached_property
    def moe_shard_sizes(self) -> tuple[int, ...]:
        """SCATTERED rows of every rank of this rank's MoE shard (shard order = a + attn_tp·j).
        A shard inside an attention-TP group (g > 1) holds the consecutive attn_tp ranks
        ``h·E·M … (h+1)·E·M − 1``: their slices are the shard's MOE_FULL rows."""
        topo = self.topology
        scattered = [s for n in self.moe_cp_sizes for s in split_rows(n, topo.attn_tp)]
        if topo.shards_per_attn_tp_group == 1:
            return tuple(scattered)
        size = topo.moe_shard_size
        first = topo.coords(self.global_rank).attn_tp // size * size
        return tuple(scattered[first:first + size])

    @property
    def scattered_tokens(self) -> int:
        return self.attn_tp_sizes[self.topology.coords(self.global_rank).attn_tp]

    @property
    def moe_full_tokens(self) -> int:
        """Rows of MOE_FULL: every token of this rank's MoE shard (``cp_replicated``: the rows
        this rank holds already are all of them)."""
        return self.local_tokens if self.cp_replicated else sum(self.moe_shard_sizes)

    @property
    def stage_tokens(self) -> int:
        return sum(self.tokens_per_attn_group)

    def rows(self, mode: ScatterMode) -> int:
        """Rows (along dim 0) this rank holds in ``mode``."""
        return {ScatterMode.SCATTERED: self.scattered_tokens,
                ScatterMode.TP_ATTN_FULL: self.local_tokens,
                ScatterMode.MOE_FULL: self.moe_full_tokens,
                ScatterMode.FULL: self.stage_tokens}[ScatterMode(mode)]


def _stage_is_nccl(groups: ParallelGroups) -> bool:
    import torch.distributed as dist

    return dist.get_backend(groups.stage.group) == "nccl"
