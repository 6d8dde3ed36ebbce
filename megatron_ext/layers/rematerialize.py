"""Apply a projection to an activation without keeping the activation for backward: the projection's
saved copy of its input is replaced by a recipe, and the activation is recomputed from its own
(already saved) inputs when backward first needs it.

Why: with selective recompute the SwiGLU of the experts is recomputed in backward, but the down
projection still saves the SwiGLU output as its input for the weight gradient ([rows, I] per
layer, ~0.6 GiB over the 12-layer Qwen3-30B-A3B slice at seq 4096) — so checkpointing the
activation alone frees nothing on the GPU. Megatron's ``moe_act`` recompute discards that output
too (``CheckpointWithoutOutput``); this is the same with saved-tensor hooks: whatever the
projection saves that lives in the activation's storage is packed as (shape, stride, offset) and
unpacked as a view of one recomputation, cached until the projection's saved tensors are freed.
The recomputation runs the same function on the same inputs, so the values are bitwise those of
the forward. Collective-free by construction (the activation is elementwise: ``swiglu``, or the
routed experts' ``weighted_swiglu``, whose row weights are one more input).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch


@dataclass(frozen=True)
class _Recipe:
    shape: torch.Size
    stride: tuple[int, ...]
    offset: int


class _Rematerialize:
    def __init__(self, act: torch.Tensor, fn: Callable[..., torch.Tensor],
                 inputs: tuple[torch.Tensor, ...]) -> None:
        storage = act.untyped_storage()
        self.key = (storage.data_ptr(), storage.nbytes())
        self.fn, self.inputs = fn, inputs
        self.full: Optional[torch.Tensor] = None

    def pack(self, t: torch.Tensor):
        st = t.untyped_storage()
        if (st.data_ptr(), st.nbytes()) == self.key:
            return _Recipe(t.shape, t.stride(), t.storage_offset())
        return t

    def unpack(self, packed):
        if not isinstance(packed, _Recipe):
            return packed
        if self.full is None:
            with torch.no_grad():
                self.full = self.fn(*self.inputs)
        return self.full.as_strided(packed.shape, packed.stride, packed.offset)


def project_without_saving(fn: Callable[..., torch.Tensor], inputs: tuple[torch.Tensor, ...],
                           act: torch.Tensor, project: Callable[[torch.Tensor], torch.Tensor]
                           ) -> torch.Tensor:
    """``project(act)`` where ``act == fn(*inputs)`` (contiguous, its own storage), saving no
    part of ``act`` for backward (see the module doc). ``inputs`` must stay alive for backward
    anyway (``act``'s own backward saves them), so referencing them costs no memory."""
    hold = _Rematerialize(act, fn, tuple(t.detach() for t in inputs))
    with torch.autograd.graph.saved_tensors_hooks(hold.pack, hold.unpack):
        return project(act)
