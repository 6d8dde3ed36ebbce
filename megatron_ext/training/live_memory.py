"""Live tensor bytes and their peak on any device, CPU included (``torch.cuda.max_memory_allocated``
exists only on CUDA): a dispatch mode that counts every storage an op creates until it is freed.

Why: the GPU race (BENCHMARKS §12) showed a peak several GiB above the model state; on CPU this
finds which phase of a step (forward, backward, gradient sync, optimizer step) holds the extra
bytes, on a scaled-down model of the same structure, and tests can bound a phase's transients.

    with LiveMemory() as mem:             # tensors created before entering are not counted
        ...
        with mem.phase("optimizer"):
            opt.step()
    mem.peaks["optimizer"], mem.current

Storages are counted once however many views share them (an op's output that aliases one of its
inputs is not new) and released when the storage object is garbage (a weak reference's
callback), so ``current`` is what the allocator would hold, without its caching or
fragmentation.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from typing import Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveMemory(TorchDispatchMode):
    """Bytes of live storages created inside the mode; ``peaks[name]`` = highest ``current``
    inside :meth:`phase` ``name`` (over every time it was entered)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.peaks: dict[str, int] = {}
        self._phase: str | None = None
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._refs.pop(key, None)

    def track(self, t: torch.Tensor) -> None:
        """Count ``t``'s storage (if not yet counted)."""
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = id(st)
        if key in self._refs and self._refs[key]() is st:
            return
        nbytes = st.nbytes()
        self._refs[key] = weakref.ref(st, lambda _r, k=key, n=nbytes: self._release(k, n))
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        if self._phase is not None:
            self.peaks[self._phase] = max(self.peaks.get(self._phase, 0), self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor) and t.device.type != "meta"}
        for t in tree_flatten(out)[0]:  # views and in-place results alias an input: not new
            if isinstance(t, torch.Tensor) and t.device.type != "meta" \
                    and t.untyped_storage().data_ptr() not in inputs:
                self.track(t)
        return out

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Attribute the peak inside the block to ``name`` (starting from the bytes live now)."""
        prev, self._phase = self._phase, name
        self.peaks[name] = max(self.peaks.get(name, 0), self.current)
        try:
            yield
        finally:
            self._phase = prev
