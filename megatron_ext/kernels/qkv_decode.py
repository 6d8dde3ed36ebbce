"""One decode-step pass over the fused q/k/v projection output: QK-norm, RoPE, and the new K/V
written into the KV cache.

Per attention layer a decode step otherwise runs q-norm, k-norm, RoPE of q, RoPE of k and two
cache writes: six kernels over a few KB each, whose launch and ramp cost more than their bytes.
One program takes one token: it reads the token's q, k, v heads from the fused projection row,
normalises q and k per head (float32 statistics, rounded where the RMSNorm kernel rounds:
``x·rstd`` to the input dtype, then times the weight), rotates them (float32, one rounding, as
the rotary kernel does), stores q, and stores k and v at the cache slot the step writes
(``slot_ptr``, a device scalar: no host sync, capturable).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def _norm_rope(x_ptr, w_ptr, c_lo, c_hi, s_lo, s_hi, num_heads, eps,
               HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr):
    """``[BLOCK_H, HALF]`` low and high halves (float32) of ``num_heads`` heads at ``x_ptr``
    (contiguous heads of ``2·HALF``), RMS-normalised (``HAS_NORM``) then rotated."""
    offs_h = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, HALF)
    h_ok = offs_h[:, None] < num_heads
    at = x_ptr + offs_h[:, None] * (2 * HALF) + offs[None, :]
    x_lo = tl.load(at, mask=h_ok, other=0.0).to(tl.float32)
    x_hi = tl.load(at + HALF, mask=h_ok, other=0.0).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    if HAS_NORM:
        rstd = tl.rsqrt((tl.sum(x_lo * x_lo, 1) + tl.sum(x_hi * x_hi, 1)) / (2 * HALF) + eps)
        w_lo = tl.load(w_ptr + offs).to(tl.float32)
        w_hi = tl.load(w_ptr + HALF + offs).to(tl.float32)
        x_lo = ((x_lo * rstd[:, None]).to(dtype).to(tl.float32) * w_lo[None, :]).to(dtype)
        x_hi = ((x_hi * rstd[:, None]).to(dtype).to(tl.float32) * w_hi[None, :]).to(dtype)
        x_lo, x_hi = x_lo.to(tl.float32), x_hi.to(tl.float32)
    out_lo = x_lo * c_lo[None, :] - x_hi * s_lo[None, :]
    out_hi = x_hi * c_hi[None, :] + x_lo * s_hi[None, :]
    return out_lo.to(dtype), out_hi.to(dtype)


@triton.jit
def qkv_decode_kernel(qkv_ptr, q_norm_ptr, k_norm_ptr, cos_ptr, sin_ptr, q_out_ptr,
                      k_cache_ptr, v_cache_ptr, slot_ptr, stride_t, stride_cb, stride_ch,
                      stride_cs, num_q_heads, num_kv_heads, eps,
                      HAS_NORM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
                      BLOCK_HK: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    d = 2 * HALF
    offs = tl.arange(0, HALF)
    c_lo = tl.load(cos_ptr + token * d + offs).to(tl.float32)
    c_hi = tl.load(cos_ptr + token * d + HALF + offs).to(tl.float32)
    s_lo = tl.load(sin_ptr + token * d + offs).to(tl.float32)
    s_hi = tl.load(sin_ptr + token * d + HALF + offs).to(tl.float32)
    row = qkv_ptr + token * stride_t
    # q: normalised, rotated, stored [token, heads, d]
    q_lo, q_hi = _norm_rope(row, q_norm_ptr, c_lo, c_hi, s_lo, s_hi, num_q_heads, eps,
                            HAS_NORM, HALF, BLOCK_HQ)
    hq = tl.arange(0, BLOCK_HQ)
    q_at = q_out_ptr + token * num_q_heads * d + hq[:, None] * d + offs[None, :]
    q_ok = hq[:, None] < num_q_heads
    tl.store(q_at, q_lo, mask=q_ok)
    tl.store(q_at + HALF, q_hi, mask=q_ok)
    # k: normalised, rotated; v as it is: both into the cache slot of this step
    k_lo, k_hi = _norm_rope(row + num_q_heads * d, k_norm_ptr, c_lo, c_hi, s_lo, s_hi,
                            num_kv_heads, eps, HAS_NORM, HALF, BLOCK_HK)
    hk = tl.arange(0, BLOCK_HK)
    k_ok = hk[:, None] < num_kv_heads
    slot = tl.load(slot_ptr)
    cache_at = token * stride_cb + hk[:, None] * stride_ch + slot * stride_cs + offs[None, :]
    tl.store(k_cache_ptr + cache_at, k_lo, mask=k_ok)
    tl.store(k_cache_ptr + cache_at + HALF, k_hi, mask=k_ok)
    v_row = row + (num_q_heads + num_kv_heads) * d + hk[:, None] * d + offs[None, :]
    tl.store(v_cache_ptr + cache_at, tl.load(v_row, mask=k_ok), mask=k_ok)
    tl.store(v_cache_ptr + cache_at + HALF, tl.load(v_row + HALF, mask=k_ok), mask=k_ok)
