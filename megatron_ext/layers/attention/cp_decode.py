"""Decode attention against a KV cache spread over the CP ranks (serving, design §5).

After a CP prefill every rank keeps the K/V of its own tokens, so cache memory per rank shrinks
with ``cp``. A decode step's new query tokens (the same on every CP rank) attend to each rank's
share of the cache; every rank computes a partial ``(out, lse)`` and one all-gather of those small
tensors lets every rank merge them by log-sum-exp into the exact full-cache result.
Inference only: no autograd.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_ext.layers.attention.attention_math import accum_dtype, default_scale
from megatron_ext.communication.collectives import all_gather, all_to_all
from megatron_ext.kernels.launch import sm_count as device_sm_count
from megatron_ext.kernels.triton_loader import kernel_module
from megatron_ext.layers.attention.cp_plan import check_across_ranks
from megatron_ext.parallel.groups import AxisGroup

#: ``auto``: the split-K Triton kernel (:mod:`megatron_ext.kernels.decode_attention`) where it
#: applies (CUDA, fp16/bf16, one new query per row, head_dim a power of two 16..256), else the
#: batched-matmul composition; ``torch``: always the composition (A/B runs, benchmarks).
DECODE_KERNELS = ("auto", "torch")
_decode_kernel = "auto"


def set_decode_kernel(name: str) -> None:
    """Choose the decode-attention implementation for the process (see :data:`DECODE_KERNELS`)."""
    global _decode_kernel
    if name not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {name!r} must be one of {DECODE_KERNELS}")
    _decode_kernel = name


def _triton_applies(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    d = q.shape[-1]
    return (_decode_kernel == "auto" and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and k.dtype == q.dtype == v.dtype and q.shape[1] == 1 and 16 <= d <= 256
            and d & (d - 1) == 0 and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
            and kernel_module("decode_attention") is not None)


def split_plan(rows: int, kv_heads: int, seq: int, sm_count: int, block_n: int,
               min_split: int = 256, programs_per_sm: int = 4) -> tuple[int, int]:
    """``(splits, split_len)`` of a cache of ``seq`` slots: enough programs to fill the GPU
    (``programs_per_sm`` per SM) but no split shorter than ``min_split`` slots; ``split_len`` a
    multiple of ``block_n``. Depends on shapes only (a captured graph keeps it)."""
    want = max(1, min(-(-seq // min_split),
                      -(-programs_per_sm * sm_count // max(1, rows * kv_heads))))
    split_len = -(-(-(-seq // want)) // block_n) * block_n
    return -(-seq // split_len), split_len


def _merge_launch(parts: torch.Tensor, out: torch.Tensor, items: int, num_parts: int,
                  item_stride: int, part_stride: int, out_stride: int, d: int,
                  write_lse: bool) -> None:
    kernel_module("decode_attention").merge_lse_kernel[(items,)](
        parts, out, num_parts, item_stride, part_stride, out_stride, D=d,
        BLOCK_S=max(2, 1 << (num_parts - 1).bit_length()), WRITE_LSE=write_lse)


#: launch settings of the split-K kernel: cache slots per tile, software-pipeline stages, warps,
#: shortest split, programs per SM; from ``benchmarks/decode_attention.py --sweep`` on 2x H200
#: (BENCHMARKS.md §11d: 32-slot tiles fastest at 64 rows, 1K and 8K slots)
DECODE_LAUNCH = dict(block_n=32, num_stages=3, num_warps=4, min_split=256, programs_per_sm=4)
#: (rows × KV heads at least, cache slots at most or None, settings), first match wins: a big
#: batch fills the GPU without splitting the cache, and its best tiles and splits depend on the
#: cache length (``--sweep`` at 16-256 rows, 1K and 8K prompts: BENCHMARKS.md §11e)
DECODE_LAUNCHES: tuple[tuple[int, Optional[int], dict], ...] = (
    (1024, 2048, dict(block_n=64, num_stages=2, num_warps=4, min_split=64, programs_per_sm=4)),
    (1024, None, dict(block_n=32, num_stages=3, num_warps=4, min_split=512, programs_per_sm=16)),
    (512, None, dict(block_n=32, num_stages=3, num_warps=4, min_split=512, programs_per_sm=8)),
    (256, None, DECODE_LAUNCH),
    (0, None, dict(DECODE_LAUNCH, min_split=64)),   # few rows: shorter splits fill the GPU
)


def decode_launch(rows: int, kv_heads: int, slots: int) -> dict:
    """The tabled launch settings for ``rows`` decode rows of ``kv_heads`` KV heads against a
    cache of ``slots`` slots (per rank)."""
    return next(cfg for least, most, cfg in DECODE_LAUNCHES
                if rows * kv_heads >= least and (most is None or slots <= most))


def triton_decode_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         kv_valid: Optional[torch.Tensor], scale: float,
                         sm_count: Optional[int] = None,
                         launch: Optional[dict] = None,
                         kv_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """This rank's partial decode attention for one query per row through the split-K kernel:
    ``q [b, 1, hq, d]``, heads-first ``k, v [b, hkv, s, d]``, ``kv_valid`` ``[b, 1, s]`` /
    ``[b, s]`` bool or None → packed ``[b, 1, hq, d + 1]`` float32 (``out`` then ``lse``:
    what the CP merge exchanges, so no packing copy)."""
    kern = kernel_module("decode_attention")
    b, _, hq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    cfg = {**decode_launch(b, hkv, sk), **(launch or {})}
    block_n = cfg["block_n"] if d <= 128 else min(32, cfg["block_n"])
    if sm_count is None:
        sm_count = device_sm_count(q.device) if q.is_cuda else 8
    splits, split_len = split_plan(b, hkv, sk, sm_count, block_n, cfg["min_split"],
                                   cfg["programs_per_sm"])
    part = torch.empty(b * hq * splits, d + 1, dtype=torch.float32, device=q.device)
    valid = None
    if kv_valid is not None:
        valid = (kv_valid[:, 0] if kv_valid.dim() == 3 else kv_valid).view(torch.uint8)
    kern.decode_split_kernel[(b, hkv, splits)](
        q, k, v, valid if valid is not None else part, part,
        kv_len if kv_len is not None else part, scale,
        q.stride(0), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), valid.stride(0) if valid is not None else 0,
        sk, split_len, hq, splits, G=g, BLOCK_G=max(16, 1 << (g - 1).bit_length()), D=d,
        BLOCK_N=block_n, HAS_MASK=valid is not None, HAS_LEN=kv_len is not None,
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    if splits == 1:   # the one split's partial is already the packed (out, lse)
        return part.view(b, 1, hq, d + 1)
    packed = torch.empty(b, 1, hq, d + 1, dtype=torch.float32, device=q.device)
    _merge_launch(part, packed, b * hq, splits, splits * (d + 1), d + 1, d + 1, d, True)
    return packed


def merge_cp_partials(gathered: torch.Tensor, out_dtype: torch.dtype,
                      use_kernel: bool) -> torch.Tensor:
    """``gathered`` ``[cp, rows, s_q, hq, d + 1]`` (each CP rank's packed partial of the same
    rows) → ``[rows, s_q, hq, d]`` merged by log-sum-exp, in ``out_dtype``; one Triton kernel
    where it applies, the same math in torch ops elsewhere. A query no rank saw gets zeros."""
    d = gathered.shape[-1] - 1
    if use_kernel:
        cp = gathered.shape[0]
        gathered = gathered.contiguous()
        items = gathered[0].numel() // (d + 1)
        out = torch.empty(*gathered.shape[1:-1], d, dtype=out_dtype, device=gathered.device)
        _merge_launch(gathered, out, items, cp, d + 1, items * (d + 1), d, d, False)
        return out
    outs, lses = gathered[..., :d], gathered[..., d]  # [cp, rows, sq, hq, (d)]
    top = lses.amax(0)
    top = torch.where(torch.isinf(top), 0.0, top)
    w = torch.exp(lses - top)  # 0 for ranks that saw nothing
    total = w.sum(0)
    merged = (outs * w.unsqueeze(-1)).sum(0) / torch.where(total > 0, total, 1.0).unsqueeze(-1)
    return merged.to(out_dtype)


def _local_problems(q, k_cache, v_cache, kv_valid, heads_first: bool) -> list[str]:
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        return [f"q, k_cache, v_cache must be 4-d [b, s, heads, head_dim], got {tuple(q.shape)}, "
                f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}"]
    errs = []
    b, sq, hq, d = q.shape
    if k_cache.shape != v_cache.shape:
        errs.append(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.shape[0] != b or k_cache.shape[3] != d:
        errs.append(f"cache {tuple(k_cache.shape)} does not match q {tuple(q.shape)} in batch "
                    f"or head_dim")
    hkv, sk = (k_cache.shape[1], k_cache.shape[2]) if heads_first else k_cache.shape[2:0:-1]
    if hkv < 1 or hq % hkv:
        errs.append(f"mismatched head counts: q has {hq} heads, the cache {hkv}; the number of "
                    f"query heads must be a multiple of the number of key/value heads")
    if kv_valid is not None:
        if kv_valid.dtype != torch.bool or tuple(kv_valid.shape) not in ((b, sk), (b, sq, sk)):
            errs.append(f"kv_valid must be bool [b, s_cache]={(b, sk)} or [b, s_q, s_cache], got "
                        f"{kv_valid.dtype} {tuple(kv_valid.shape)}")
    return errs


def _bmm(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """``a @ b`` over leading dims with results in ``acc``: half-precision CUDA inputs are read
    as they are (no upcast copy of the cache) with float32 accumulation and output."""
    lead = a.shape[:-2]
    a3, b3 = a.reshape(-1, *a.shape[-2:]), b.reshape(-1, *b.shape[-2:])
    if a.dtype == acc:
        out = torch.bmm(a3, b3)
    elif a.is_cuda:
        out = torch.bmm(a3, b3, out_dtype=acc)
    else:
        out = torch.bmm(a3.to(acc), b3.to(acc))
    return out.view(*lead, *out.shape[-2:])


def partial_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             kv_valid: Optional[torch.Tensor], scale: float
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's share of a decode step's attention: ``q [b, s_q, hq, d]`` against a
    heads-first cache ``k, v [b, hkv, s_cache, d]`` (query head ``h`` uses KV head
    ``h // (hq / hkv)``); ``kv_valid`` ``[b, s_q, s_cache]`` bool or None. Returns ``(out
    [b, s_q, hq, d], lse [b, hq, s_q])`` in the accumulation dtype; a query that sees nothing
    gets ``out = 0`` and ``lse = -inf``. The cache is read once, in its own dtype, by two batched
    matmuls (decode is bound by reading it); no host sync, so it can run in a CUDA graph."""
    b, sq, hq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    g = hq // hkv
    acc = accum_dtype(q.dtype)
    qh = q.reshape(b, sq, hkv, g, d).permute(0, 2, 3, 1, 4).reshape(b, hkv, g * sq, d)
    scores = _bmm(qh, k.transpose(-1, -2), acc) * scale            # [b, hkv, g*sq, sk]
    if kv_valid is not None:
        scores = scores.view(b, hkv, g, sq, sk).masked_fill(
            ~kv_valid[:, None, None], float("-inf")).view(b, hkv, g * sq, sk)
    lse = torch.logsumexp(scores, dim=-1)
    p = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    out = _bmm(p.to(v.dtype), v, acc)                               # [b, hkv, g*sq, d]
    out = out.view(b, hkv, g, sq, d).permute(0, 3, 1, 2, 4).reshape(b, sq, hq, d)
    return out, lse.view(b, hq, sq)


@torch.no_grad()
def cp_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        cp_group: AxisGroup, *, kv_valid: Optional[torch.Tensor] = None,
                        softmax_scale: Optional[float] = None, check: bool = True,
                        owner_rows: Optional[Sequence[int]] = None,
                        heads_first_cache: bool = False,
                        kv_len: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``q [b, s_q, hq, d]`` (identical on every CP rank) against this rank's cache share
    ``k_cache, v_cache [b, s_cache_local, hkv, d]`` (``[b, hkv, s_cache_local, d]`` with
    ``heads_first_cache``, the KV cache's own layout; lengths may differ between ranks).
    ``kv_valid`` ``[b, s_cache_local]`` (filled slots) or ``[b, s_q, s_cache_local]`` (per query,
    e.g. causal among several new tokens); None = every slot valid. Returns ``[b, s_q, hq, d]``
    on every rank (one all-gather of the partial ``(out, lse)``) — or, with ``owner_rows`` (rows
    owned by each CP rank, CP order, contiguous blocks summing to ``b``: decode with one owner
    per token), only this rank's own rows (one all-to-all: each rank receives the partials of
    its rows only). A query that sees no valid slot anywhere gets zeros. Collective over
    ``cp_group``. ``kv_len`` (device scalar, optional): every valid slot lies below it — the
    split-K kernel reads no further (the torch composition ignores it: the mask says the same).
    ``check=False`` skips the cross-rank agreement on shapes (one small
    all-gather) for callers whose shapes cannot change since a checked call, e.g. later steps of
    one generation; local problems still raise."""
    errs = _local_problems(q, k_cache, v_cache, kv_valid, heads_first_cache)
    if not check and errs:
        raise ValueError("cp_decode_attention: " + "; ".join(errs))
    ok = not errs or q.dim() == 4
    b, sq, hq, d = q.shape if ok else (0, 0, 0, 0)
    if check:
        kv_heads = (k_cache.shape[1] if heads_first_cache else k_cache.shape[2]) \
            if k_cache.dim() == 4 else 0
        fields = dict(batch=b, q_len=sq, heads=hq, head_dim=d, kv_heads=kv_heads)
        check_across_ranks(cp_group, q.device, errs, fields, "cp_decode_attention")
    scale = softmax_scale if softmax_scale is not None else default_scale(d)
    acc = accum_dtype(q.dtype)
    k, v = (k_cache, v_cache) if heads_first_cache else (k_cache.transpose(1, 2),
                                                         v_cache.transpose(1, 2))
    sk = k.shape[2]
    if owner_rows is not None:
        owner_rows = tuple(int(n) for n in owner_rows)
        if len(owner_rows) != cp_group.size or sum(owner_rows) != b or min(owner_rows) < 0:
            raise ValueError(f"cp_decode_attention: owner_rows={owner_rows} must give each of the "
                             f"{cp_group.size} CP ranks its rows, summing to b={b}")
        start = sum(owner_rows[:cp_group.rank])
        rows = slice(start, start + owner_rows[cp_group.rank])
    else:
        rows = slice(0, b)
    use_kernel = sk > 0 and _triton_applies(q, k, v)
    if use_kernel:
        packed = triton_decode_packed(q, k, v, kv_valid, scale, kv_len=kv_len)
    else:
        if sk == 0:
            out = torch.zeros(b, sq, hq, d, dtype=acc, device=q.device)
            lse = torch.full((b, hq, sq), float("-inf"), dtype=acc, device=q.device)
        else:
            valid = None if kv_valid is None else (
                kv_valid if kv_valid.dim() == 3 else kv_valid[:, None, :].expand(b, sq, sk))
            out, lse = partial_decode_attention(q, k, v, valid, scale)
        packed = torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], -1)  # [b, sq, hq, d + 1]
    if cp_group.is_trivial:
        return packed[rows, ..., :d].to(q.dtype)
    if owner_rows is None:
        # [cp * b, ...] → [cp, b, ...]; through the group's symmetric memory where it serves
        gathered = all_gather(packed.contiguous(), cp_group, backward="own_rows")
        gathered = gathered.view(cp_group.size, *packed.shape)
    else:   # every rank's partials of this rank's rows
        n = rows.stop - rows.start
        gathered = all_to_all(packed, cp_group, [n] * cp_group.size, owner_rows)
        gathered = gathered.view(cp_group.size, n, *packed.shape[1:])
    return merge_cp_partials(gathered, q.dtype, use_kernel)
