"""Grouped GEMM over tokens sorted by expert: ``out[rows of g] = x[rows of g] @ w[g]``.

On CUDA with bf16 and 16-byte-aligned shapes this is one ``torch._grouped_mm`` kernel (autograd
supported by torch); elsewhere (CPU, float32/64 tests, odd shapes) a loop of plain matmuls over the
groups, which is exact and keeps every group's weight in the graph even when it got no rows (its
gradient is then zero instead of ``None``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

Counts = Union[Sequence[int], torch.Tensor]


def grouped_mm_available(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether the fused kernel applies: CUDA, bf16, ``torch._grouped_mm`` present, dims % 8."""
    return (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == torch.bfloat16
            and hasattr(torch, "_grouped_mm") and x.shape[-1] % 8 == 0 and w.shape[-1] % 8 == 0)


def group_offsets(counts: Counts, device) -> torch.Tensor:
    """The fused kernel's ``offs``: int32 running end row of every group (on ``device``)."""
    c = counts if isinstance(counts, torch.Tensor) else torch.tensor(list(counts), device=device)
    return torch.cumsum(c.to(device=device, dtype=torch.int64), 0).to(torch.int32)


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: Counts,
               use_kernel: bool = True, offsets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` ``[N, K]`` rows sorted by group, ``w`` ``[G, K, M]`` (a transposed view is fine),
    ``counts`` ``[G]`` rows per group (sum at most ``N``: rows past the groups are not computed;
    their outputs are zeros here, unspecified in the fused kernel) → ``[N, M]``. ``offsets``: the
    :func:`group_offsets` of ``counts`` when the caller runs several GEMMs over the same groups."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"grouped_mm: x {tuple(x.shape)} and w {tuple(w.shape)} must be "
                         f"[N, K] and [G, K, M]")
    if len(counts) != w.shape[0]:
        raise ValueError(f"grouped_mm: {len(counts)} counts for {w.shape[0]} groups")
    if use_kernel and grouped_mm_available(x, w):
        offs = offsets if offsets is not None else group_offsets(counts, x.device)
        return torch._grouped_mm(x, w, offs=offs)
    sizes = counts.tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts]
    if sum(sizes) > x.shape[0]:
        raise ValueError(f"grouped_mm: counts sum to {sum(sizes)} but x has {x.shape[0]} rows")
    rest = x.shape[0] - sum(sizes)  # rows past the groups (a fixed-size dispatch): zeros here
    parts = [chunk @ w[g] for g, chunk in enumerate(torch.split(x, sizes + [rest])[:len(sizes)])]
    return torch.cat(parts + [x.new_zeros(rest, w.shape[-1])])
