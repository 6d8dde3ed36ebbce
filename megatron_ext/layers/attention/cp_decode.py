"""Decode attention against a KV cache spread over the CP ranks (serving, design §5).

After a CP prefill every rank keeps the K/V of its own tokens, so cache memory per rank shrinks
with ``cp``. A decode step's new query tokens (the same on every CP rank) attend to each rank's
share of the cache; every rank computes a partial ``(out, lse)`` and one all-gather of those small
tensors lets every rank merge them by log-sum-exp into the exact full-cache result.
Inference only: no autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.layers.attention.attention_math import (MaskKind, accum_dtype, block_forward,
                                                default_scale)
from megatron_ext.communication.raw import all_gather_async
from megatron_ext.layers.attention.cp_plan import check_across_ranks
from megatron_ext.parallel.groups import AxisGroup


def _local_problems(q, k_cache, v_cache, kv_valid) -> list[str]:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return [f"q, k_cache, v_cache must be [b, s, heads, head_dim], got {tuple(q.shape)}, "
                f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"]
    errs = []
    b, sq, hq, d = q.shape
    if k_cache.shape != v_cache.shape:
        errs.append(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        errs.append(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch "
                    f"or head_dim")
    hkv = k_cache.shape[2]
    if hkv < 1 or hq % hkv:
        errs.append(f"mismatched head counts: q has {hq} heads, the cache {hkv}; the number of "
                    f"query heads must be a multiple of the number of key/value heads")
    if kv_valid is not None:
        sk = k_cache.shape[1]
        if kv_valid.dtype != torch.bool or tuple(kv_valid.shape) not in ((b, sk), (b, sq, sk)):
            errs.append(f"kv_valid must be bool [b, s_cache]={(b, sk)} or [b, s_q, s_cache], got "
                        f"{kv_valid.dtype} {tuple(kv_valid.shape)}")
    return errs


@torch.no_grad()
def cp_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cp_group: AxisGroup, *, kv_valid: Optional[torch.Tensor] = None,
                        softmax_scale: Optional[float] = None, check: bool = True) -> torch.Tensor:
    """``q [b, s_q, hq, d]`` (identical on every CP rank) against this rank's cache share
    ``k_cache, v_cache [b, s_cache_local, hkv, d]`` (lengths may differ between ranks).
    ``kv_valid`` ``[b, s_cache_local]`` (filled slots) or ``[b, s_q, s_cache_local]`` (per query,
    e.g. causal among several new tokens); None = every slot valid. Returns ``[b, s_q, hq, d]``
    on every rank; a query that sees no valid slot anywhere gets zeros. Collective over
    ``cp_group``. ``check=False`` skips the cross-rank agreement on shapes (one small all-gather)
    for callers whose shapes cannot change since a checked call, e.g. later steps of one
    generation; local problems still raise."""
    errs = _local_problems(q, k_cache, v_cache, kv_valid)
    if not check and errs:
        raise ValueError("cp_decode_attention: " + "; ".join(errs))
    ok = not errs or q.dim() == 4
    b, sq, hq, d = q.shape if ok else (0, 0, 0, 0)
    if check:
        fields = dict(batch=b, q_len=sq, heads=hq, head_dim=d,
                      kv_heads=k_cache.shape[2] if k_cache.dim() == 4 else 0)
        check_across_ranks(cp_group, q.device, errs, fields, "cp_decode_attention")
    scale = softmax_scale if softmax_scale is not None else default_scale(d)
    acc = accum_dtype(q.dtype)
    sk = k_cache.shape[1]
    if sk == 0:
        out = torch.zeros(b, sq, hq, d, dtype=acc, device=q.device)
        lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=q.device)
    else:
        if kv_valid is None:
            kind, mask = MaskKind.FULL, None
        else:
            kind, mask = MaskKind.GENERAL, kv_valid.expand(b, sq, sk) if kv_valid.dim() == 3 \
                else kv_valid[:, None, :].expand(b, sq, sk)
        out, lse, _ = block_forward(q, k_cache, v_cache, scale, kind, mask)
        out, lse = out.to(acc), lse.to(acc)
    if cp_group.is_trivial:
        return out.to(q.dtype)
    packed = torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], -1)  # [b, sq, hq, d + 1]
    gathered, pending = all_gather_async(packed, cp_group)
    pending.wait()
    outs, lses = gathered[..., :d], gathered[..., d]  # [cp, b, sq, hq, (d)]
    top = lses.amax(0)
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(lses - top)  # 0 for ranks that saw nothing
    total = w.sum(0)
    merged = (outs * w.unsqueeze(-1)).sum(0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return merged.to(q.dtype)
