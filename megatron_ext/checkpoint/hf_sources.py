"""How one model parameter's *global* tensor is made of Hugging Face checkpoint tensors.

A parameter's :class:`~megatron_ext.parallel.param_meta.ParamSpec` says which slice of its global
tensor a rank holds; an :class:`HFSource` says how that global tensor is laid out in the HF file:

* :class:`HFTensor` — the global tensor *is* one HF tensor (``q_proj.weight``);
* :class:`Stacked` — a new leading-or-inner dimension over several sources (experts: the global
  ``[E, I, H]`` is ``experts.0..E-1.gate_proj.weight`` stacked on dim 0);
* :class:`Concat` — sources concatenated along an existing dimension (a fused ``[q; k; v]``);
* :class:`Unflatten` — a view that splits one global dimension in two (a per-group fused QKV
  ``[G·(q+2kv)·d, H]`` as ``[G, (q+2kv)·d, H]``).

Loading reads only the requested slice: every rule turns a slice of its global tensor into slices
of its children, down to ``safe_open(...).get_slice(key)[...]``. Saving runs the rules backwards on
a gathered global tensor. Rules are pure (no files, no collectives), so they are tested alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch

# reads ``key``'s sub-block given one slice per dimension (safetensors get_slice, a dict lookup)
SliceReader = Callable[[str, tuple[slice, ...]], torch.Tensor]


def _norm(slices: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    out = []
    for s, n in zip(slices, shape):
        start, stop, step = s.indices(n)
        if step != 1:
            raise ValueError(f"only contiguous slices are supported, got {s}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


@dataclass(frozen=True)
class HFTensor:
    """The global tensor equals the HF tensor ``key``."""

    key: str
    shape: tuple[int, ...]

    def keys(self) -> list[str]:
        return [self.key]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.key: tuple(self.shape)}

    def read(self, reader: SliceReader, slices: tuple[slice, ...]) -> torch.Tensor:
        return reader(self.key, _norm(slices, self.shape))

    def split(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.key: full}


@dataclass(frozen=True)
class _Composite:
    """A global tensor made of several sources along ``dim``: its keys are theirs."""

    parts: tuple["HFSource", ...]
    dim: int = 0

    def keys(self) -> list[str]:
        return [k for p in self.parts for k in p.keys()]

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v for p in self.parts for k, v in p.expected_shapes().items()}


@dataclass(frozen=True)
class Stacked(_Composite):
    """The global tensor stacks ``parts`` (equal shapes) along a new dimension ``dim``."""

    @property
    def shape(self) -> tuple[int, ...]:
        inner = list(self.parts[0].shape)
        inner.insert(self.dim, len(self.parts))
        return tuple(inner)

    def __post_init__(self) -> None:
        shapes = {tuple(p.shape) for p in self.parts}
        if len(shapes) != 1:
            raise ValueError(f"stacked HF tensors need equal shapes, got {sorted(shapes)}")

    def read(self, reader: SliceReader, slices: tuple[slice, ...]) -> torch.Tensor:
        slices = _norm(slices, self.shape)
        own = slices[self.dim]
        rest = slices[:self.dim] + slices[self.dim + 1:]
        pieces = [self.parts[i].read(reader, rest) for i in range(own.start, own.stop)]
        if not pieces:
            raise ValueError("empty slice of a stacked tensor")
        return torch.stack(pieces, dim=self.dim)

    def split(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i, part in enumerate(self.parts):
            out.update(part.split(full.select(self.dim, i)))
        return out


@dataclass(frozen=True)
class Concat(_Composite):
    """The global tensor concatenates ``parts`` along existing dimension ``dim``."""

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.parts[0].shape)
        shape[self.dim] = sum(p.shape[self.dim] for p in self.parts)
        return tuple(shape)

    def __post_init__(self) -> None:
        others = {tuple(s for i, s in enumerate(p.shape) if i != self.dim) for p in self.parts}
        if len(others) != 1:
            raise ValueError(f"concatenated HF tensors must agree off dim {self.dim}, got "
                             f"{[tuple(p.shape) for p in self.parts]}")

    def read(self, reader: SliceReader, slices: tuple[slice, ...]) -> torch.Tensor:
        slices = _norm(slices, self.shape)
        own = slices[self.dim]
        pieces, offset = [], 0
        for part in self.parts:
            n = part.shape[self.dim]
            lo, hi = max(own.start, offset), min(own.stop, offset + n)
            if lo < hi:
                sub = list(slices)
                sub[self.dim] = slice(lo - offset, hi - offset)
                pieces.append(part.read(reader, tuple(sub)))
            offset += n
        if not pieces:
            raise ValueError("empty slice of a concatenated tensor")
        return torch.cat(pieces, dim=self.dim)

    def split(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        sizes = [p.shape[self.dim] for p in self.parts]
        for part, piece in zip(self.parts, torch.split(full, sizes, dim=self.dim)):
            out.update(part.split(piece))
        return out


@dataclass(frozen=True)
class Unflatten:
    """The global tensor is ``child`` with dims ``dim`` and ``dim+1`` merged into one.

    A slice of the merged dimension that covers whole rows of ``dim+1`` (every tensor-parallel
    split that keeps groups whole) reads only its rows; any other slice reads the covering rows
    and trims them."""

    child: "HFSource"
    dim: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        shape = list(self.child.shape)
        return tuple(shape[:self.dim] + [shape[self.dim] * shape[self.dim + 1]]
                     + shape[self.dim + 2:])

    def keys(self) -> list[str]:
        return self.child.keys()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.child.expected_shapes()

    def read(self, reader: SliceReader, slices: tuple[slice, ...]) -> torch.Tensor:
        slices = _norm(slices, self.shape)
        own = slices[self.dim]
        inner = self.child.shape[self.dim + 1]
        lo, hi = own.start // inner, -(-own.stop // inner)
        sub = slices[:self.dim] + (slice(lo, hi), slice(0, inner)) + slices[self.dim + 1:]
        block = self.child.read(reader, sub).flatten(self.dim, self.dim + 1)
        return block.narrow(self.dim, own.start - lo * inner, own.stop - own.start)

    def split(self, full: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.child.split(full.unflatten(self.dim, self.child.shape[self.dim:self.dim + 2]))


HFSource = Union[HFTensor, Stacked, Concat, Unflatten]


def stacked_keys(keys: list[str], shape: tuple[int, ...], dim: int = 0) -> Stacked:
    """Shorthand: the HF tensors ``keys`` (each of ``shape``) stacked on ``dim``."""
    return Stacked(tuple(HFTensor(k, tuple(shape)) for k in keys), dim)
