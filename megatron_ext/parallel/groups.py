"""Process groups of a :class:`Topology`, held in an explicit object (no module globals).

Every rank creates every group in the same order (gloo hangs silently otherwise); identical rank
lists share one process group. The object converts to megatron-core's ``ProcessGroupCollection``
so Megatron modules can run on the same groups.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from megatron_ext.parallel.axes import GROUP_AXES, Axis
from megatron_ext.parallel.topology import RankCoords, Topology


@dataclass(frozen=True)
class AxisGroup:
    """This rank's group along one axis: the global rank list, own index in it, the process group."""

    name: str
    ranks: tuple[int, ...]
    rank: int
    group: Optional[dist.ProcessGroup]
    # small-message collectives through symmetric memory (inference on one NVLink host), set by
    # ``communication.symm_collectives.with_symm_collectives``; None: every call goes to NCCL/gloo
    fast: Optional[Any] = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def is_trivial(self) -> bool:
        """A one-rank group: collectives over it are skipped."""
        return len(self.ranks) == 1

    @classmethod
    def single(cls, name: str = "single", rank: int = 0) -> "AxisGroup":
        """A one-rank stand-in (single-process runs): no process group needed."""
        return cls(name, (rank,), 0, None)


@dataclass(frozen=True)
class ParallelGroups:
    """All groups of one rank. Layers and the communicator take this object explicitly."""

    topology: Topology
    global_rank: int
    attn_tp: AxisGroup
    attn_cp: AxisGroup
    attn_dp: AxisGroup
    attn_dp_cp: AxisGroup
    attn_tp_cp: AxisGroup
    moe_tp: AxisGroup
    moe_ep: AxisGroup
    moe_dp: AxisGroup
    moe_shard: AxisGroup
    moe_cp: AxisGroup
    stage: AxisGroup
    pp: AxisGroup
    embedding: AxisGroup
    model: AxisGroup

    @property
    def world(self) -> AxisGroup:
        """Every rank of the run (loss reports, the global gradient norm)."""
        if self.topology.world == 1:
            return AxisGroup.single("world", self.global_rank)
        return AxisGroup("world", tuple(range(self.topology.world)), self.global_rank,
                         dist.group.WORLD)

    @property
    def coords(self) -> RankCoords:
        return self.topology.coords(self.global_rank)

    def axis(self, name: str) -> AxisGroup:
        if name not in GROUP_AXES:
            raise ValueError(f"unknown axis {name!r}; known: {', '.join(GROUP_AXES)}")
        return getattr(self, name)

    @classmethod
    def single_process(cls) -> "ParallelGroups":
        """Groups of a one-rank run (every axis trivial); needs no ``torch.distributed``."""
        topo = Topology(world=1)
        return cls(topo, 0, **{a: AxisGroup.single(a) for a in GROUP_AXES})

    @classmethod
    def without_process_groups(cls, topology: Topology, rank: int) -> "ParallelGroups":
        """Rank ``rank``'s groups of ``topology`` with their rank lists but no process groups:
        enough to build (not run) layers, e.g. to check what they would refuse before launch."""
        mine = {}
        for axis in GROUP_AXES:
            ranks = next((tuple(r) for r in topology.group_lists(axis) if rank in r), (rank,))
            mine[axis] = AxisGroup(axis, ranks, ranks.index(rank), None)
        return cls(topology, rank, **mine)

    def to_megatron(self):
        """megatron-core's ``ProcessGroupCollection`` over these groups (tp=attn_tp, ep=moe_ep, …)."""
        try:
            from megatron.core.process_groups_config import ProcessGroupCollection
        except ImportError as err:
            raise ImportError("ParallelGroups.to_megatron needs megatron-core: "
                              "pip install 'megatron_ext[interop]'") from err

        def pg(axis: AxisGroup):
            if axis.group is None and axis.name == Axis.EMBEDDING:
                return None  # middle pipeline stages are in no embedding group (as in Megatron)
            if axis.group is None:
                raise RuntimeError(f"axis {axis.name} has no process group (single-process groups)")
            return axis.group

        return ProcessGroupCollection(
            tp=pg(self.attn_tp), cp=pg(self.attn_cp), tp_cp=pg(self.attn_tp_cp),
            dp=pg(self.attn_dp), dp_cp=pg(self.attn_dp_cp), pp=pg(self.pp), mp=pg(self.model),
            embd=pg(self.embedding), ep=pg(self.moe_ep), expt_tp=pg(self.moe_tp),
            expt_dp=pg(self.moe_dp), tp_ep=pg(self.moe_shard), tp_dp_cp=pg(self.stage),
            intra_dp_cp=pg(self.attn_dp_cp), intra_expt_dp=pg(self.moe_dp),
            # one distributed-optimizer instance spans the run (megatron-core's default)
            intra_dist_opt=self.world.group,
            # expert tp x ep x pp: the MoE shard when there is one stage (no such axis across stages)
            tp_ep_pp=pg(self.moe_shard) if self.topology.pp == 1 else None,
        )


def build_groups(topology: Topology, timeout_s: Optional[float] = None) -> ParallelGroups:
    """Create every group of ``topology`` (collective: every rank must call it, in any order of
    other work but with the same topology). Checks the world size first so a mismatch is an error,
    not a hang."""
    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call init_distributed() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world != topology.world:
        raise ValueError(f"topology world={topology.world} does not match the launched "
                         f"world size {world}")
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    created: dict[tuple[int, ...], dist.ProcessGroup] = {}
    mine: dict[str, AxisGroup] = {}
    for axis in GROUP_AXES:
        for ranks in topology.group_lists(axis):
            key = tuple(ranks)
            if key not in created:
                if len(key) == world:
                    created[key] = dist.group.WORLD
                else:
                    kwargs = {"timeout": timeout} if timeout else {}
                    created[key] = dist.new_group(list(key), **kwargs)
            if rank in key:
                mine[axis] = AxisGroup(axis, key, key.index(rank), created[key])
        # middle pipeline stages hold no tied embedding: a trivial axis, no group
        mine.setdefault(axis, AxisGroup.single(axis, rank))
    return ParallelGroups(topology, rank, **mine)


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(backend: Optional[str] = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise ``torch.distributed`` from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT). Returns ``(rank, world)``. A one-process run without torchrun's
    variables starts a world of one."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    backend = backend or default_backend()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if backend == "nccl":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world
