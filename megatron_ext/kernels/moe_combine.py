"""Triton MoE combine (weighted slot sum) and its backward (see :mod:`megatron_ext.layers.moe.dispatch`).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def weighted_slot_sum(rows_ptr, w_ptr, slot_ptr, out_ptr, n_rows, n_cols,
                      TOP_K: tl.constexpr, HAS_W: tl.constexpr, BLOCK: tl.constexpr):
    """out[t, cols] = sum_j w[t, j] * rows[slot[t*k + j], cols] (slot == n_rows: skipped)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        r = tl.load(slot_ptr + t * TOP_K + j)
        v = tl.load(rows_ptr + r * n_cols + cols, mask=col_ok & (r < n_rows),
                    other=0.0).to(tl.float32)
        if HAS_W:
            v = v * tl.load(w_ptr + t * TOP_K + j).to(tl.float32)
        acc += v
    tl.store(out_ptr + t * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

@triton.jit
def combine_backward(grad_ptr, y_ptr, w_ptr, flat_ptr, token_ptr, dy_ptr, dw_ptr, n_cols,
                     BLOCK: tl.constexpr):
    """Sorted row i: dy[i] = w[flat_i] * grad[token_i]; dw[flat_i] = <grad[token_i], y[i]>."""
    i = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    flat = tl.load(flat_ptr + i)
    token = tl.load(token_ptr + i)
    g = tl.load(grad_ptr + token * n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + i * n_cols + cols, mask=col_ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + flat).to(tl.float32)
    tl.store(dy_ptr + i * n_cols + cols, (g * w).to(dy_ptr.dtype.element_ty), mask=col_ok)
    tl.store(dw_ptr + flat, tl.sum(g * y, axis=0).to(dw_ptr.dtype.element_ty))
