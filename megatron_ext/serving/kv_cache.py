"""This rank's KV cache for serving: per attention layer, the K/V of the tokens this CP rank owns
(design §5 "Serving"). No collectives here.

Placement rules (every rank applies them alike, so nobody needs to ask where a token lives):

* **Prefill**: a CP rank keeps the K/V of exactly the prompt tokens it computed under the
  training CP split (:mod:`megatron_ext.data.cp_split`: chunks ``c`` and ``2cp-1-c`` of the
  prompt padded to a multiple of ``2·cp``) — ``prefill_slots = padded_len / cp`` slots per row,
  padding slots marked invalid. Nothing moves after the prefill, so KV memory per rank is
  ``1/cp`` of the prompt (and ``1/attn_tp`` of the KV heads when ``num_kv_heads >= attn_tp``).
* **Decode**: the token fed at decode step ``t`` (0-based) is appended to CP rank
  ``t mod cp`` only — the rank holding the fewest slots, lowest CP rank on ties, because the
  prefill leaves every rank the same slot count. Every rank's cache then stays within one slot
  of ``(padded_len + t) / cp``.

Attention-TP ranks of one CP rank cache their own KV heads (the same tokens). Buffers are
allocated once, at the first write, for the whole generation (``prefill_slots + decode slots``
of this rank, plus one scratch slot), heads first (``[b, kv_heads, slots, head_dim]``: each
head's keys are one contiguous matrix, read in place by the decode attention).

**A decode step without host syncs** (so it can be captured in a CUDA graph): the step counter
and the filled length live on the device; every CP rank writes the new K/V at slot ``length``
(the owner's write counts, the others' land in a slot that stays invalid and is overwritten
later — the scratch slot when a rank is full), and the attention reads the whole buffer with a
validity mask computed on the device. The host keeps the same counters for accounting
(:meth:`KVCache.host_step_end`); nothing on the device path reads them.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.parallel.groups import AxisGroup


def decode_owner(step: int, cp_size: int) -> int:
    """CP rank that caches the K/V of the token fed at decode step ``step`` (module doc)."""
    if step < 0 or cp_size < 1:
        raise ValueError(f"decode_owner needs step >= 0 and cp_size >= 1, got {step}, {cp_size}")
    return step % cp_size


def decode_slots(cp_rank: int, cp_size: int, steps: int) -> int:
    """Decode tokens CP rank ``cp_rank`` caches over ``steps`` decode steps."""
    return max(0, (steps - cp_rank + cp_size - 1) // cp_size)


class LayerKVCache:
    """One attention layer's share of the cache on this rank (the protocol
    :class:`~megatron_ext.layers.attention.block.AttentionBlock` calls: ``decoding``,
    ``first_step``, ``store``, ``append``). Buffers ``[b, local_kv_heads, capacity + 1,
    head_dim]`` (post-RoPE K)."""

    def __init__(self, parent: "KVCache", layer_idx: int):
        self._parent, self.layer_idx = parent, layer_idx
        self.k: Optional[torch.Tensor] = None
        self.v: Optional[torch.Tensor] = None

    @property
    def decoding(self) -> bool:
        return self._parent.decoding

    @property
    def first_step(self) -> bool:
        """The first decode step of this cache (callers validate shapes across ranks once)."""
        return self._parent.step == 0

    def _alloc(self, like: torch.Tensor) -> None:
        p = self._parent
        if self.k is None:
            shape = (p.batch, like.shape[2], p.capacity + 1, like.shape[3])
            device = p.base_valid.device if like.is_meta else like.device
            self.k = torch.zeros(shape, dtype=like.dtype, device=device)
            self.v = torch.zeros(shape, dtype=like.dtype, device=device)
        elif (like.shape[2], like.shape[3]) != (self.k.shape[1], self.k.shape[3]) \
                or like.dtype != self.k.dtype:
            raise ValueError(f"layer {self.layer_idx}: K/V {tuple(like.shape)} {like.dtype} do "
                             f"not match the cache {tuple(self.k.shape)} {self.k.dtype}")

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: this rank's K/V ``[b, prefill_slots, kv_heads, head_dim]`` of its prompt
        tokens."""
        p = self._parent
        if p.decoding:
            raise ValueError(f"layer {self.layer_idx}: store() is for the prefill; the cache is "
                             f"already decoding")
        if tuple(k.shape[:2]) != (p.batch, p.prefill_slots) or k.shape != v.shape:
            raise ValueError(f"layer {self.layer_idx}: prefill K/V {tuple(k.shape)}, "
                             f"{tuple(v.shape)} must be [b={p.batch}, "
                             f"prefill_slots={p.prefill_slots}, kv_heads, head_dim]")
        self._alloc(k)
        self.k[:, :, :p.prefill_slots] = k.detach().transpose(1, 2)
        self.v[:, :, :p.prefill_slots] = v.detach().transpose(1, 2)
        p.stored.add(self.layer_idx)

    def append(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode step: write the new tokens' K/V ``[b, 1, kv_heads, head_dim]`` at slot
        ``length`` (module doc) and return this rank's whole buffers ``(k, v, valid)`` (heads
        first; ``valid`` ``[b, capacity + 1]`` bool: the filled slots, the new token's on its
        owner). No host sync."""
        p = self._parent
        if tuple(k.shape[:2]) != (p.batch, 1) or k.shape != v.shape:
            raise ValueError(f"layer {self.layer_idx}: a decode step feeds one token per row: "
                             f"K/V must be [b={p.batch}, 1, kv_heads, head_dim], got "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        self._alloc(k)
        self.k.index_copy_(2, p.length_t.view(1), k.detach().transpose(1, 2))
        self.v.index_copy_(2, p.length_t.view(1), v.detach().transpose(1, 2))
        return self.k, self.v, p.step_valid()

    def reserve(self, batch: int, kv_heads: int, head_dim: int, dtype: torch.dtype
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Decode step, for a caller that writes the new K/V itself (one fused kernel):
        ``(k, v, slot)`` — this rank's buffers and the device scalar slot to write (what
        :meth:`append` would write at). Follow with :meth:`appended`."""
        p = self._parent
        if batch != p.batch:
            raise ValueError(f"layer {self.layer_idx}: a decode step of {batch} rows, the cache "
                             f"has {p.batch}")
        self._alloc(torch.empty((batch, 1, kv_heads, head_dim), dtype=dtype, device="meta"))
        return self.k, self.v, p.length_t

    def appended(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """After :meth:`reserve` and the write: ``(k, v, valid)`` as :meth:`append` returns."""
        return self.k, self.v, self._parent.step_valid()

    def valid_slots(self) -> torch.Tensor:
        """Device scalar: this step's valid slots all lie below it (the attention reads no
        further; the buffers are allocated for the whole generation)."""
        return self._parent.step_filled()

    def select_rows(self, index: torch.Tensor) -> None:
        if self.k is not None:
            self.k, self.v = self.k.index_select(0, index), self.v.index_select(0, index)

    def nbytes(self) -> int:
        """Bytes of this layer's K/V buffers on this rank (allocated capacity)."""
        if self.k is None:
            return 0
        return 2 * self.k.numel() * self.k.element_size()


class KVCache:
    """Every layer's share of the cache on this rank, and the step state the placement rule
    needs. ``batch``: this attention group's rows; ``prefill_slots``: local prompt slots per row
    (``padded_len / cp``, 0 without a prefill); ``slot_valid`` ``[batch, prefill_slots]`` bool
    (False = CP padding), default all real; ``max_new_tokens``: decode steps to make room for.

    Call order: the prefill forward (``decoding`` False: layers ``store``), then
    :meth:`start_decoding`; per decode step a forward (layers ``append``), then
    :meth:`device_step_end` (device counters; part of a captured step) and
    :meth:`host_step_end` (host counters) — :meth:`end_step` does both.
    :meth:`select_rows` keeps some rows (finished requests leave the batch).
    """

    def __init__(self, cp_group: AxisGroup, batch: int, prefill_slots: int, max_new_tokens: int,
                 slot_valid: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None):
        if batch < 1 or prefill_slots < 0 or max_new_tokens < 1:
            raise ValueError(f"KVCache needs batch >= 1, prefill_slots >= 0, max_new_tokens >= 1; "
                             f"got {batch}, {prefill_slots}, {max_new_tokens}")
        self.cp_size, self.cp_rank = cp_group.size, cp_group.rank
        self.batch, self.prefill_slots, self.max_new_tokens = batch, prefill_slots, max_new_tokens
        self.capacity = prefill_slots + decode_slots(self.cp_rank, self.cp_size, max_new_tokens)
        # [batch, capacity + 1]: prefill slots as given (CP padding False), decode slots True
        self.base_valid = torch.ones(batch, self.capacity + 1, dtype=torch.bool, device=device)
        if slot_valid is not None:
            if tuple(slot_valid.shape) != (batch, prefill_slots) or slot_valid.dtype != torch.bool:
                raise ValueError(f"slot_valid must be bool [batch={batch}, prefill_slots="
                                 f"{prefill_slots}], got {slot_valid.dtype} "
                                 f"{tuple(slot_valid.shape)}")
            self.base_valid[:, :prefill_slots] = slot_valid.to(self.base_valid.device)
        self.slot_ids = torch.arange(self.capacity + 1, device=device)
        self.decoding = False
        self.length = 0          # host: slots filled on this rank (per row)
        self.step = 0            # host: decode steps completed (over every CP rank)
        self.length_t = torch.zeros((), dtype=torch.long, device=device)   # device mirrors
        self.step_t = torch.zeros((), dtype=torch.long, device=device)
        self.stored: set[int] = set()
        self._layers: dict[int, LayerKVCache] = {}
        self._valid: Optional[torch.Tensor] = None
        self._filled: Optional[torch.Tensor] = None

    def layer(self, layer_idx: int) -> LayerKVCache:
        if layer_idx not in self._layers:
            self._layers[layer_idx] = LayerKVCache(self, layer_idx)
        return self._layers[layer_idx]

    def start_decoding(self) -> None:
        """After the prefill (or instead of it when ``prefill_slots == 0``)."""
        if self.prefill_slots and (not self._layers or len(self.stored) != len(self._layers)):
            missing = sorted(set(self._layers) - self.stored)
            raise ValueError(f"the prefill did not fill every layer's cache (missing layers "
                             f"{missing or 'all'})")
        self.length, self.decoding = self.prefill_slots, True
        self.length_t.fill_(self.prefill_slots)

    # ------------------------------------------------------------------ device step state
    def owns_step_t(self) -> torch.Tensor:
        """Device bool: this CP rank caches the current step's token (:func:`decode_owner`)."""
        return torch.remainder(self.step_t, self.cp_size) == self.cp_rank

    def step_valid(self) -> torch.Tensor:
        """``[batch, capacity + 1]`` slots attended to this step (computed once per step, shared
        by every layer)."""
        if self._valid is None:
            self._valid = self.base_valid & (self.slot_ids < self.step_filled())[None]
        return self._valid

    def step_filled(self) -> torch.Tensor:
        """Device scalar: slots filled on this rank this step (the new token's counted on its
        owner); computed once per step."""
        if self._filled is None:
            self._filled = self.length_t + self.owns_step_t().to(torch.long)
        return self._filled

    def device_step_end(self) -> None:
        """Close a decode step on the device: the owner's new slot counts from now on."""
        self.length_t.add_(self.owns_step_t().to(torch.long))
        self.step_t.add_(1)
        self._valid = self._filled = None

    def host_step_end(self) -> None:
        """The host's mirror of :meth:`device_step_end` (accounting, ``first_step``)."""
        if not self.decoding:
            raise ValueError("end_step() before start_decoding()")
        if decode_owner(self.step, self.cp_size) == self.cp_rank:
            self.length += 1
        self.step += 1
        self._valid = self._filled = None

    def end_step(self) -> None:
        self.device_step_end()
        self.host_step_end()

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep rows ``index`` (in that order) of every buffer: requests that finished leave."""
        for layer in self._layers.values():
            layer.select_rows(index)
        self.base_valid = self.base_valid.index_select(0, index)
        self.batch = int(index.numel())
        self._valid = self._filled = None

    # ------------------------------------------------------------------ accounting
    @property
    def slots(self) -> int:
        """Filled slots per row on this rank (prefill share + owned decode tokens)."""
        return self.length

    def tokens(self) -> torch.Tensor:
        """Real (non-padding) cached tokens per row on this rank, ``[batch]``."""
        return self.base_valid[:, :self.length].sum(1)

    def nbytes(self) -> int:
        """Bytes of every layer's K/V buffers on this rank."""
        return sum(layer.nbytes() for layer in self._layers.values())
