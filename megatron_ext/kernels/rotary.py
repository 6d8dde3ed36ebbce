"""Rotary embedding applied in one pass (inference): ``x·cos + rotate_half(x)·sin``.

The torch composition is five kernels per tensor (negate, concatenate, two products, a sum), each
a pass over ``x``; a decode step runs it for q and k of every layer, where those tiny kernels cost
more in launches than in bytes. One program rotates all heads of one token: it loads the token's
cos/sin row once, computes in float32 and rounds once.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rotary_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, num_heads, stride_xt, stride_xh,
                  stride_ct, stride_ot, stride_oh,
                  HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0)
    offs_h = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF)
    h_ok = offs_h < num_heads
    c_lo = tl.load(cos_ptr + token * stride_ct + offs).to(tl.float32)
    c_hi = tl.load(cos_ptr + token * stride_ct + HALF + offs).to(tl.float32)
    s_lo = tl.load(sin_ptr + token * stride_ct + offs).to(tl.float32)
    s_hi = tl.load(sin_ptr + token * stride_ct + HALF + offs).to(tl.float32)
    x_at = x_ptr + token * stride_xt + offs_h[:, None] * stride_xh + offs[None, :]
    x_lo = tl.load(x_at, mask=h_ok[:, None], other=0.0).to(tl.float32)
    x_hi = tl.load(x_at + HALF, mask=h_ok[:, None], other=0.0).to(tl.float32)
    out_lo = x_lo * c_lo[None, :] - x_hi * s_lo[None, :]
    out_hi = x_hi * c_hi[None, :] + x_lo * s_hi[None, :]
    o_at = out_ptr + token * stride_ot + offs_h[:, None] * stride_oh + offs[None, :]
    dtype = out_ptr.dtype.element_ty
    tl.store(o_at, out_lo.to(dtype), mask=h_ok[:, None])
    tl.store(o_at + HALF, out_hi.to(dtype), mask=h_ok[:, None])
