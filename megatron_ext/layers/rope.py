"""Rotary position embedding, HF convention (``rotate_half``, frequencies repeated ``cat(f, f)``).

Positions are passed per token instead of being implied by the sequence index: under context
parallelism a rank holds non-contiguous chunks (load-balanced split), and the positions travel with
the tokens, so the same code is exact for any CP layout and for packed documents.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def default_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    """``1 / theta^(2i/d)`` in float32, as HF's ``compute_default_rope_parameters``."""
    if head_dim % 2:
        raise ValueError(f"RoPE head_dim={head_dim} must be even")
    if rope_theta <= 0:
        raise ValueError(f"rope_theta={rope_theta} must be > 0")
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (rope_theta ** exponents)


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
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions.

    ``inv_freq`` / ``attention_scaling`` can be passed precomputed (e.g. from HF's
    ``ROPE_INIT_FUNCTIONS`` for llama3 / yarn scaling) so scaled RoPE variants need no code here.
    """

    def __init__(self, head_dim: int, rope_theta: float = 10000.0,
                 inv_freq: Optional[torch.Tensor] = None, attention_scaling: float = 1.0,
                 device: Optional[torch.device] = None):
        super().__init__()
        if inv_freq is None:
            inv_freq = default_inv_freq(head_dim, rope_theta)
        elif tuple(inv_freq.shape) != (head_dim // 2,):
            raise ValueError(f"inv_freq has shape {tuple(inv_freq.shape)}, expected "
                             f"({head_dim // 2},) for head_dim={head_dim}")
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.attention_scaling = float(attention_scaling)
        # on the model's device: a captured decode step may not copy from the host
        self.register_buffer("inv_freq", inv_freq.float().to(device), persistent=False)

    def forward(self, positions: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)`` of shape ``positions.shape + (head_dim,)``, computed in float32 and cast
        to ``dtype`` (HF does the same)."""
        if positions.is_floating_point():
            raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
        freqs = positions.float()[..., None] * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)
