"""Split-K decode attention (flash-decoding) for one new query per row against a KV cache.

Decode attention is bound by reading the cache. The batched-matmul composition
(``cp_decode.partial_decode_attention``) materialises the float32 scores and passes over them
five times (mask, logsumexp, exp, cast, P·V) with batched GEMMs of 8 rows per KV head, which
reads the cache far below bandwidth. Here one program takes one (row, KV head, split of the
cache): it loads the ``G`` query heads of that KV head once, streams its K/V tiles once with an
online softmax, and writes its normalised partial output and log-sum-exp. A second kernel merges
the splits of each (row, query head) by log-sum-exp, which gives the same ``(out, lse)`` the
composition returns, so the CP merge across ranks is unchanged.

Splits exist so that a small batch still fills the GPU (``rows × kv_heads × splits`` programs);
their number depends only on shapes, so a captured CUDA graph keeps it.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def decode_split_kernel(q_ptr, k_ptr, v_ptr, valid_ptr, out_ptr, len_ptr, scale,
                        stride_qb, stride_qh, stride_kb, stride_kh, stride_ks,
                        stride_vb, stride_vh, stride_vs, stride_mb, seq_len, split_len,
                        num_q_heads, num_splits,
                        G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr,
                        BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr,
                        HAS_LEN: tl.constexpr):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, D)
    g_ok = offs_g < G
    heads = kv_head * G + offs_g
    q = tl.load(q_ptr + row * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_ok[:, None], other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    start = split * split_len
    stop = tl.minimum(start + split_len, seq_len)
    if HAS_LEN:   # no valid slot at or past len: read no further (a split may read nothing)
        stop = tl.minimum(stop, tl.load(len_ptr).to(tl.int32))
    k_base = k_ptr + row * stride_kb + kv_head * stride_kh
    v_base = v_ptr + row * stride_vb + kv_head * stride_vh
    for n0 in range(start, stop, BLOCK_N):        # the last tile of a split is masked
        offs_n = n0 + tl.arange(0, BLOCK_N)
        in_range = offs_n < stop
        keep = in_range
        if HAS_MASK:
            keep = keep & (tl.load(valid_ptr + row * stride_mb + offs_n, mask=in_range,
                                   other=0) != 0)
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * scale                                # [BLOCK_G, BLOCK_N]
        s = tl.where(keep[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)             # nothing seen yet
        alpha = tl.exp(m - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :],
                    mask=in_range[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    seen = l_sum > 0
    lse = tl.where(seen, m + tl.log(tl.where(seen, l_sum, 1.0)), float("-inf"))
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    slot = ((row * num_q_heads + heads) * num_splits + split) * (D + 1)   # packed: lse at D
    tl.store(out_ptr + slot[:, None] + offs_d[None, :], out, mask=g_ok[:, None])
    tl.store(out_ptr + slot + D, lse, mask=g_ok)


@triton.jit
def merge_lse_kernel(part_ptr, out_ptr, num_parts, item_stride, part_stride, out_stride,
                     D: tl.constexpr, BLOCK_S: tl.constexpr, WRITE_LSE: tl.constexpr):
    """One item (a row's query head): ``num_parts`` packed partials ``[out (D), lse]`` at
    ``part_ptr + item·item_stride + i·part_stride`` merged by log-sum-exp,
    ``out = Σ_i e^{lse_i - lse} out_i`` (zeros, ``lse = -inf`` where no part saw a valid slot),
    written to ``out_ptr + item·out_stride`` in the output's dtype (with ``lse`` at column ``D``
    when ``WRITE_LSE``). Merges a row's cache splits, and the CP ranks' partials."""
    item = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, D)
    s_ok = offs_s < num_parts
    base = part_ptr + item * item_stride + offs_s * part_stride
    lses = tl.load(base + D, mask=s_ok, other=float("-inf")).to(tl.float32)
    top = tl.max(lses, 0)
    top_ref = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lses - top_ref)                                   # 0 for empty parts
    total = tl.sum(w, 0)
    parts = tl.load(base[:, None] + offs_d[None, :], mask=s_ok[:, None], other=0.0)
    merged = tl.sum(parts.to(tl.float32) * w[:, None], 0) / tl.where(total > 0, total, 1.0)
    dst = out_ptr + item * out_stride
    tl.store(dst + offs_d, merged.to(out_ptr.dtype.element_ty))
    if WRITE_LSE:
        tl.store(dst + D, tl.where(total > 0, top_ref + tl.log(tl.where(total > 0, total, 1.0)),
                                   float("-inf")))
