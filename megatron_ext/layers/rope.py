"""Rotary position embedding, HF convention (``rotate_half``, frequencies repeated ``cat(f, f)``).

Positions are passed per token instead of being implied by the sequence index: under context
parallelism a rank holds non-contiguous chunks (load-balanced split), and the positions travel with
the tokens, so the same code is exact for any CP layout and for packed documents.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from megatron_ext.communication.raw import all_reduce_
from megatron_ext.kernels.triton_loader import kernel_module
from megatron_ext.layers.rope_scaling import (RopeScaling, default_inv_freq,
                                              dynamic_ntk_inv_freq, scaled_inv_freq)
from megatron_ext.parallel.groups import AxisGroup

__all__ = ["RotaryEmbedding", "apply_rotary", "default_inv_freq", "rope_sequence_length",
           "rotate_half"]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[b, s, heads, d]`` by ``cos``/``sin`` of shape ``[b, s, d]`` or
    ``[s, d]`` (broadcast over heads)."""
    if x.dim() != 4:
        raise ValueError(f"apply_rotary expects x of shape [b, s, heads, d], got {tuple(x.shape)}")
    if cos.shape[-1] != x.shape[-1] or cos.shape[-2] != x.shape[1]:
        raise ValueError(f"apply_rotary: cos/sin shape {tuple(cos.shape)} does not match x "
                         f"{tuple(x.shape)} (need [..., s={x.shape[1]}, d={x.shape[-1]}])")
    if _fused_applies(x, cos, sin):
        return fused_rotary(x, cos, sin)
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


def _fused_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """The one-pass kernel serves inference on CUDA (no autograd through it): half-precision
    ``x`` with contiguous heads, per-token tables of the same leading shape, even power-of-two
    head_dim."""
    d = x.shape[-1]
    return (x.is_cuda and not torch.is_grad_enabled() and x.dtype in (torch.float16, torch.bfloat16)
            and cos.shape == sin.shape == x.shape[:2] + (d,) and cos.is_contiguous()
            and sin.is_contiguous() and d >= 16 and d & (d - 1) == 0 and x.stride(-1) == 1
            and x.stride(1) == x.shape[2] * x.stride(2) and x.stride(0) == x.shape[1] * x.stride(1)
            and kernel_module("rotary") is not None)


def fused_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """:func:`apply_rotary` in one Triton pass (float32 math, one rounding): ``x`` ``[b, s, h,
    d]`` with tokens at a fixed stride, ``cos``/``sin`` ``[b, s, d]`` contiguous."""
    b, s, h, d = x.shape
    out = torch.empty((b, s, h, d), dtype=x.dtype, device=x.device)
    if out.numel():
        kernel_module("rotary").rotary_kernel[(b * s,)](
            x, cos, sin, out, h, x.stride(1), x.stride(2), d, h * d, d, HALF=d // 2,
            BLOCK_H=max(1, 1 << (h - 1).bit_length()))
    return out


def rope_sequence_length(positions: torch.Tensor,
                         cp_group: Optional[AxisGroup] = None) -> torch.Tensor:
    """``1 + the largest RoPE position`` of the batch rows held by ``cp_group`` (``None``:
    ``positions`` are the whole input already), as an int64 0-d tensor (no host sync), for
    dynamic NTK scaling.

    ``transformers`` takes ``1 + max(position_ids)`` of the whole input of a forward. Under CP
    each rank holds chunks of the sequence (the load-balanced split gives the last chunk to CP
    rank 0 only), so the local maximum would give every rank other frequencies: one MAX
    all-reduce over ``attn_cp`` makes it the full sequence's length on every rank. Padding slots
    carry position 0 and never raise it."""
    local = positions.amax() if positions.numel() else positions.new_zeros(())
    length = (local + 1).to(torch.int64).reshape(())
    if cp_group is not None:
        all_reduce_(length, cp_group, op=dist.ReduceOp.MAX)
    return length


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, unscaled or with a :class:`RopeScaling`.

    ``inv_freq`` / ``attention_scaling`` may be passed precomputed instead. Static scalings
    (linear, yarn, llama3) are one table computed here; ``dynamic`` needs the input's sequence
    length in :meth:`forward` (``seq_len``) and uses the plain table when that is at most
    ``max_position_embeddings``, as ``transformers`` does.
    """

    def __init__(self, head_dim: int, rope_theta: float = 10000.0,
                 inv_freq: Optional[torch.Tensor] = None, attention_scaling: float = 1.0,
                 device: Optional[torch.device] = None, *,
                 scaling: Optional[RopeScaling] = None,
                 max_position_embeddings: Optional[int] = None):
        super().__init__()
        if scaling is not None:
            if inv_freq is not None:
                raise ValueError("pass either scaling or a precomputed inv_freq, not both")
            if max_position_embeddings is None:
                raise ValueError(f"RoPE scaling {scaling.rope_type!r} needs "
                                 f"max_position_embeddings")
            inv_freq, attention_scaling = scaled_inv_freq(scaling, head_dim, rope_theta,
                                                          max_position_embeddings)
        elif inv_freq is None:
            inv_freq = default_inv_freq(head_dim, rope_theta)
        elif tuple(inv_freq.shape) != (head_dim // 2,):
            raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, expected "
                             f"({head_dim // 2},) for head_dim={head_dim}")
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.scaling = scaling
        self.max_position_embeddings = max_position_embeddings
        self.attention_scaling = float(attention_scaling)
        # on the model's device: a captured decode step may not copy from the host
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)

    @property
    def is_dynamic(self) -> bool:
        """The frequencies depend on the input's length (pass ``seq_len`` to :meth:`forward`)."""
        return self.scaling is not None and self.scaling.rope_type == "dynamic"

    def frequencies(self, seq_len: Optional[torch.Tensor]) -> torch.Tensor:
        """``inv_freq`` for an input of ``seq_len`` tokens (only dynamic NTK depends on it)."""
        if not self.is_dynamic:
            return self.inv_freq
        if seq_len is None:
            raise ValueError("dynamic NTK RoPE needs the input's sequence length (seq_len)")
        grown = dynamic_ntk_inv_freq(self.scaling, self.head_dim, self.rope_theta,
                                     self.max_position_embeddings, seq_len)
        return torch.where(seq_len > self.max_position_embeddings, grown, self.inv_freq)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32,
                seq_len: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (head_dim,)``, computed in float32 and cast
        to ``dtype`` (HF does the same). ``seq_len`` (0-d int64 tensor): the input's length for
        dynamic NTK (:func:`rope_sequence_length`); ignored by the other types."""
        if positions.is_floating_point():
            raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
        inv_freq = self.frequencies(seq_len)
        freqs = positions.float()[..., None] * inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if self.attention_scaling != 1.0:  # scaled RoPE variants (x 1.0 is the identity)
            cos, sin = cos * self.attention_scaling, sin * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
