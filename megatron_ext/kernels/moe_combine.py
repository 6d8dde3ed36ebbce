"""Triton MoE combine: the unweighted slot sum (see :mod:`megatron_ext.layers.moe.dispatch`).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def slot_sum(rows_ptr, slot_ptr, out_ptr, n_rows, n_cols, TOP_K: tl.constexpr,
             BLOCK: tl.constexpr):
    """out[t, cols] = sum_j rows[slot[t*k + j], cols] in float32 (slot == n_rows: skipped)."""
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        r = tl.load(slot_ptr + t * TOP_K + j)
        acc += tl.load(rows_ptr + r * n_cols + cols, mask=col_ok & (r < n_rows),
                       other=0.0).to(tl.float32)
    tl.store(out_ptr + t * n_cols + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
