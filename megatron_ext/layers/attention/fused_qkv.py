"""Inference fast path of a decode step's q/k/v: one GEMM and one Triton pass.

The q, k and v projections are three column-parallel linears (three checkpoint tensors, three
ParamSpecs). For inference their weights become views of one ``[nq + 2·nkv, H]`` buffer (made on
the first no-grad call, the old storage freed: no extra memory), so the three projections run as
one GEMM; :mod:`megatron_ext.kernels.qkv_decode` then applies the QK-norm and RoPE and writes the
new K/V into the cache in one kernel. Only weights that own their storage are re-pointed: a
trainer's gradient buckets make parameters views of flat buffers the optimizer updates, and such
a model keeps the separate projections. Training never takes this path (autograd needs the three
parameters' own products), and a parameter whose storage was replaced since (a checkpoint loaded
with ``assign``, ``.to()``) is noticed and fused again.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ext.kernels.triton_loader import kernel_module
from megatron_ext.layers.linear import ColumnParallelLinear
from megatron_ext.layers.norm import RMSNorm
from megatron_ext.layers.skinny_linear import linear


class FusedQKV:
    """The fused projection of ``q_proj``, ``k_proj``, ``v_proj`` (native column-parallel
    linears of one attention block) and its decode pass."""

    def __init__(self, q_proj: nn.Module, k_proj: nn.Module, v_proj: nn.Module,
                 q_norm: Optional[nn.Module], k_norm: Optional[nn.Module]):
        self.linears = (q_proj, k_proj, v_proj)
        self.norms = (q_norm, k_norm)
        self.supported = (all(type(m) is ColumnParallelLinear for m in self.linears)
                          and (q_norm is None) == (k_norm is None)
                          and all(n is None or type(n) is RMSNorm for n in self.norms)
                          and (q_norm is None or q_norm.eps == k_norm.eps)
                          and len({m.bias is None for m in self.linears}) == 1)
        self._weight: Optional[torch.Tensor] = None
        self._bias: Optional[torch.Tensor] = None

    def applies(self, x: torch.Tensor, seq: int, head_dim: int) -> bool:
        """Inference on CUDA in half precision, one new token per row, a native block."""
        w = self.linears[0].weight
        return (self.supported and seq == 1 and x.is_cuda and not torch.is_grad_enabled()
                and not torch.is_autocast_enabled() and x.dtype == w.dtype
                and x.dtype in (torch.float16, torch.bfloat16) and head_dim >= 16
                and head_dim & (head_dim - 1) == 0 and kernel_module("qkv_decode") is not None
                and (self._fused() or (self.standalone()
                                       and not torch.cuda.is_current_stream_capturing())))

    def standalone(self) -> bool:
        """Whether each weight (and bias) owns its whole storage, so re-pointing it at a part of
        the fused buffer cannot cut a link someone else holds — a trainer's gradient buckets make
        parameters views of their flat buffers, which the optimizer updates (such a model keeps
        the separate projections)."""
        tensors = [t for m in self.linears for t in (m.weight, m.bias) if t is not None]
        return all(t.storage_offset() == 0 and t.is_contiguous()
                   and t.untyped_storage().nbytes() == t.numel() * t.element_size()
                   for t in tensors)

    def _fused(self) -> bool:
        """Whether the three weights (and biases) are still the parts of the fused buffers."""
        if self._weight is None:
            return False
        offset = 0
        for m in self.linears:
            n = m.weight.shape[0]
            if m.weight.data_ptr() != self._weight[offset:offset + n].data_ptr() or (
                    m.bias is not None and m.bias.data_ptr() != self._bias[offset].data_ptr()):
                return False
            offset += n
        return True

    def _fuse(self) -> None:
        """Concatenate the weights (and biases) and make each projection's a view of the result."""
        with torch.no_grad():
            self._weight = torch.cat([m.weight for m in self.linears])
            has_bias = self.linears[0].bias is not None
            self._bias = torch.cat([m.bias for m in self.linears]) if has_bias else None
            offset = 0
            for m in self.linears:
                n = m.weight.shape[0]
                m.weight.data = self._weight[offset:offset + n]
                if has_bias:
                    m.bias.data = self._bias[offset:offset + n]
                offset += n

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_heads: int,
               kv_heads: int, head_dim: int, kv_cache) -> torch.Tensor:
        """``x`` ``[b, 1, H]`` → ``q`` ``[b, 1, q_heads, head_dim]`` (normalised, rotated); the
        step's K/V (normalised and rotated K) written into ``kv_cache``'s slot."""
        if not self._fused():
            self._fuse()
        b = x.shape[0]
        qkv = linear(x.reshape(b, -1), self._weight, self._bias)   # [b, (hq + 2 hkv) d]
        k_buf, v_buf, slot = kv_cache.reserve(b, kv_heads, head_dim, x.dtype)
        q = torch.empty(b, 1, q_heads, head_dim, dtype=x.dtype, device=x.device)
        q_norm, k_norm = self.norms
        has_norm = q_norm is not None
        kernel_module("qkv_decode").qkv_decode_kernel[(b,)](
            qkv, q_norm.weight if has_norm else qkv, k_norm.weight if has_norm else qkv,
            cos.reshape(b, head_dim), sin.reshape(b, head_dim), q, k_buf, v_buf, slot,
            qkv.stride(0), k_buf.stride(0), k_buf.stride(1), k_buf.stride(2), q_heads, kv_heads,
            q_norm.eps if has_norm else 0.0, HAS_NORM=has_norm, HALF=head_dim // 2,
            BLOCK_HQ=1 << (q_heads - 1).bit_length(), BLOCK_HK=1 << (kv_heads - 1).bit_length())
        return q
