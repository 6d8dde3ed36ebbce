"""Per-parameter layout metadata: which slice of the global tensor a rank holds, and over which
groups its gradient is summed (design §4).

Layers attach a :class:`ParamSpec` to every parameter they create. Gradient sync, the global
gradient norm, layout-independent checkpoints and HF conversion all read it, so none of them needs
to know which layer a parameter came from.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron_ext.parallel.axes import Axis

_ATTR = "_megatron_ext_spec"


@dataclass(frozen=True)
class Split:
    """Along ``dim`` the global tensor is cut into ``chunks`` equal pieces; this rank holds ``index``."""

    dim: int
    chunks: int
    index: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.chunks:
            raise ValueError(f"split index {self.index} out of range for {self.chunks} chunks")


@dataclass(frozen=True)
class ParamSpec:
    """Where a local parameter sits in its global tensor and how its gradient is synced.

    * ``global_shape`` and ``splits``: the local tensor is the slice given by the splits (a tensor
      with no splits is replicated).
    * ``grad_sync``: axes of :class:`ParallelGroups` over which the gradient is summed after
      backward (``attn_dp_cp`` for dense parameters, ``moe_dp`` for experts, ``stage`` for
      replicated parameters whose gradient is partial per rank, plus ``embedding`` for tied weights
      across pipeline stages).
    * ``shard_axis``: the axis whose ranks hold the distinct pieces (``attn_tp``, ``moe_shard``,
      or ``None``): the global gradient norm sums over it once and skips replicas.
    * ``padded_shape``: the splits cut this shape instead of ``global_shape`` (a padded
      vocabulary): elements past ``global_shape`` are padding that exists only in memory, zero and
      never trained; checkpoints and HF files hold ``global_shape`` (see :meth:`real_part`).
    """

    global_shape: tuple[int, ...]
    splits: tuple[Split, ...] = ()
    grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,)
    shard_axis: Optional[str] = None
    name: Optional[str] = field(default=None, compare=False)
    padded_shape: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if self.padded_shape is not None and (
                len(self.padded_shape) != len(self.global_shape)
                or any(p < g for p, g in zip(self.padded_shape, self.global_shape))):
            raise ValueError(f"padded shape {self.padded_shape} must not be smaller than the "
                             f"global shape {self.global_shape}")
        for split in self.splits:
            if self.split_shape[split.dim] % split.chunks:
                raise ValueError(f"dim {split.dim} of global shape {self.split_shape} does not "
                                 f"split into {split.chunks} chunks")

    @property
    def split_shape(self) -> tuple[int, ...]:
        """The shape the splits cut: ``padded_shape`` if any, else ``global_shape``."""
        return self.padded_shape if self.padded_shape is not None else self.global_shape

    @property
    def local_shape(self) -> tuple[int, ...]:
        shape = list(self.split_shape)
        for split in self.splits:
            shape[split.dim] //= split.chunks
        return tuple(shape)

    def global_slices(self) -> tuple[slice, ...]:
        """The slices of the global tensor that this rank's local tensor holds (without padding:
        a rank may hold fewer real rows than its local tensor, or none)."""
        slices = [slice(0, n) for n in self.global_shape]
        for split in self.splits:
            size = self.split_shape[split.dim] // split.chunks
            end = self.global_shape[split.dim]
            slices[split.dim] = slice(min(split.index * size, end),
                                      min((split.index + 1) * size, end))
        return tuple(slices)

    def real_part(self, local: torch.Tensor) -> torch.Tensor:
        """The view of a local tensor (parameter, gradient, optimizer moment) that holds real
        elements of the global tensor, i.e. ``global[global_slices()]``; the rest is padding."""
        if self.padded_shape is None:
            return local
        return local[tuple(slice(0, s.stop - s.start) for s in self.global_slices())]

    @property
    def distinct_pieces(self) -> int:
        """How many distinct local pieces make up the global tensor."""
        n = 1
        for split in self.splits:
            n *= split.chunks
        return n

    def take_local(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's piece of the global tensor ``full`` (shape checked, names the tensor)."""
        if tuple(full.shape) != self.global_shape:
            raise ValueError(f"tensor {self.name or '?'}: expected global shape "
                             f"{self.global_shape}, got {tuple(full.shape)}")
        piece = full[self.global_slices()]
        if self.padded_shape is None:
            return piece
        local = piece.new_zeros(self.local_shape)
        self.real_part(local).copy_(piece)
        return local


def set_spec(param: torch.Tensor, spec: ParamSpec) -> torch.Tensor:
    if tuple(param.shape) != spec.local_shape:
        raise ValueError(f"parameter {spec.name or '?'} has shape {tuple(param.shape)} but its "
                         f"spec says local shape {spec.local_shape}")
    setattr(param, _ATTR, spec)
    return param


def get_spec(param: torch.Tensor) -> ParamSpec:
    """The parameter's spec; a parameter without one is a replicated dense parameter."""
    spec = getattr(param, _ATTR, None)
    return spec if spec is not None else ParamSpec(tuple(param.shape))
