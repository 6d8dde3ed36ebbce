"""Triton kernels of the vocab-parallel cross-entropy (see :mod:`megatron_ext.layers.cross_entropy`).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def row_lse(x_ptr, lse_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    base = x_ptr + row * n_cols
    m = tl.max(tl.full([BLOCK], float("-inf"), tl.float32), axis=0)
    total = tl.sum(tl.zeros([BLOCK], tl.float32), axis=0)
    for start in range(0, n_cols, BLOCK):
        x = tl.load(base + start + cols, mask=start + cols < n_cols,
                    other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        total = total * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    tl.store(lse_ptr + row, m + tl.log(total))

@triton.jit
def softmax_grad(x_ptr, lse_ptr, target_ptr, scale_ptr, dx_ptr, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    target = tl.load(target_ptr + row)  # local column of the label, -1 if not here
    scale = tl.load(scale_ptr + row)    # dloss * keep
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        ok = c < n_cols
        x = tl.load(x_ptr + row * n_cols + c, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)
        tl.store(dx_ptr + row * n_cols + c, (p * scale).to(dx_ptr.dtype.element_ty), mask=ok)
