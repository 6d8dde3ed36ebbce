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
of this rank), so a decode step never reallocates.
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
    :class:`~megatron_ext.layers.attention.block.AttentionBlock` calls: ``decoding``, ``store``,
    ``append``). Tensors are ``[b, slots, local_kv_heads, head_dim]`` (post-RoPE K)."""

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
            shape = (p.batch, p.capacity) + tuple(like.shape[2:])
            self.k = like.new_zeros(shape)
            self.v = like.new_zeros(shape)
        elif tuple(like.shape[2:]) != tuple(self.k.shape[2:]) or like.dtype != self.k.dtype:
            raise ValueError(f"layer {self.layer_idx}: K/V {tuple(like.shape)} {like.dtype} do "
                             f"not match the cache {tuple(self.k.shape)} {self.k.dtype}")

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Prefill: this rank's K/V of its ``[b, prefill_slots]`` prompt tokens."""
        p = self._parent
        if p.decoding:
            raise ValueError(f"layer {self.layer_idx}: store() is for the prefill; the cache is "
                             f"already decoding")
        if tuple(k.shape[:2]) != (p.batch, p.prefill_slots) or k.shape != v.shape:
            raise ValueError(f"layer {self.layer_idx}: prefill K/V {tuple(k.shape)}, "
                             f"{tuple(v.shape)} must be [b={p.batch}, "
                             f"prefill_slots={p.prefill_slots}, kv_heads, head_dim]")
        self._alloc(k)
        self.k[:, :p.prefill_slots] = k.detach()
        self.v[:, :p.prefill_slots] = v.detach()
        p.stored.add(self.layer_idx)

    def append(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Decode step: write the new tokens' K/V ``[b, 1, kv_heads, head_dim]`` if this rank owns
        the step, and return this rank's cache ``(k, v, valid)`` including them (``valid``
        ``[b, slots]`` bool, or None when every slot is filled)."""
        p = self._parent
        if tuple(k.shape[:2]) != (p.batch, 1) or k.shape != v.shape:
            raise ValueError(f"layer {self.layer_idx}: a decode step feeds one token per row: "
                             f"K/V must be [b={p.batch}, 1, kv_heads, head_dim], got "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        self._alloc(k)
        n = p.length
        if p.owns_step:
            if n >= p.capacity:
                raise ValueError(f"layer {self.layer_idx}: the cache of CP rank {p.cp_rank} is "
                                 f"full ({p.capacity} slots): more decode steps than "
                                 f"max_new_tokens={p.max_new_tokens}")
            self.k[:, n] = k[:, 0].detach()
            self.v[:, n] = v[:, 0].detach()
            n += 1
        valid = None if p.all_valid else p.valid[:, :n]
        return self.k[:, :n], self.v[:, :n], valid

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
    :meth:`start_decoding`; per decode step a forward (layers ``append``) then :meth:`end_step`.
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
        self.valid = torch.ones(batch, self.capacity, dtype=torch.bool, device=device)
        if slot_valid is not None:
            if tuple(slot_valid.shape) != (batch, prefill_slots) or slot_valid.dtype != torch.bool:
                raise ValueError(f"slot_valid must be bool [batch={batch}, prefill_slots="
                                 f"{prefill_slots}], got {slot_valid.dtype} "
                                 f"{tuple(slot_valid.shape)}")
            self.valid[:, :prefill_slots] = slot_valid.to(self.valid.device)
        self.all_valid = bool(self.valid.all())
        self.decoding = False
        self.length = 0          # slots filled on this rank (per row)
        self.step = 0            # decode steps completed (over every CP rank)
        self.stored: set[int] = set()
        self._layers: dict[int, LayerKVCache] = {}

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

    @property
    def owner(self) -> int:
        """CP rank caching the token of the current decode step."""
        return decode_owner(self.step, self.cp_size)

    @property
    def owns_step(self) -> bool:
        return self.owner == self.cp_rank

    def end_step(self) -> None:
        """Close a decode step: the owner's new slot counts from now on."""
        if not self.decoding:
            raise ValueError("end_step() before start_decoding()")
        if self.owns_step:
            self.length += 1
        self.step += 1

    # ------------------------------------------------------------------ accounting
    @property
    def slots(self) -> int:
        """Filled slots per row on this rank (prefill share + owned decode tokens)."""
        return self.length

    def tokens(self) -> torch.Tensor:
        """Real (non-padding) cached tokens per row on this rank, ``[batch]``."""
        return self.valid[:, :self.length].sum(1)

    def nbytes(self) -> int:
        """Bytes of every layer's K/V buffers on this rank."""
        return sum(layer.nbytes() for layer in self._layers.values())
