"""Triton merge of two partial attention results by log-sum-exp (see
:func:`megatron_ext.layers.attention.attention_math.merge_partial`).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def merge_two(oa_ptr, ob_ptr, la_ptr, lb_ptr, out_ptr, lse_ptr, L, H,
              oa_sb, oa_st, ob_sb, ob_st, out_sb, out_st, la_sb, la_sh, lb_sb, lb_sh,
              D: tl.constexpr, BLOCK_H: tl.constexpr):
    """Token ``t`` of row ``b``, heads of one block: ``out = (e^la·oa + e^lb·ob) / (e^la + e^lb)``,
    ``lse = log(e^la + e^lb)`` in float32 (a side with ``-inf`` adds nothing; both: zeros and
    ``-inf``). ``o*`` are ``[b, L, H, D]`` with each token's ``H·D`` values contiguous; ``l*``
    are ``[b, H, L]`` with unit stride over tokens; ``lse`` is written contiguous."""
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hok = hs < H
    la = tl.load(la_ptr + b * la_sb + hs * la_sh + t, mask=hok, other=float("-inf"))
    lb = tl.load(lb_ptr + b * lb_sb + hs * lb_sh + t, mask=hok, other=float("-inf"))
    top = tl.maximum(la, lb)
    top = tl.where(top == float("-inf"), 0.0, top)
    wa = tl.exp(la - top)
    wb = tl.exp(lb - top)
    total = wa + wb
    inv = tl.where(total > 0, 1.0 / total, 0.0)
    offs = hs[:, None] * D + tl.arange(0, D)[None, :]
    ok = hok[:, None]
    oa = tl.load(oa_ptr + b * oa_sb + t * oa_st + offs, mask=ok, other=0.0).to(tl.float32)
    ob = tl.load(ob_ptr + b * ob_sb + t * ob_st + offs, mask=ok, other=0.0).to(tl.float32)
    out = oa * (wa * inv)[:, None] + ob * (wb * inv)[:, None]
    tl.store(out_ptr + b * out_sb + t * out_st + offs, out.to(out_ptr.dtype.element_ty), mask=ok)
    lse = tl.where(total > 0, top + tl.log(total), float("-inf"))
    tl.store(lse_ptr + (b * H + hs) * L + t, lse, mask=hok)
