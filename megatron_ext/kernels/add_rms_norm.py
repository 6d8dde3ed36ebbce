"""Triton (reduce over symmetric peers +) residual add + RMSNorm, one row per program (see
:mod:`megatron_ext.communication.fused_reduce_norm`).

``FROM_PEERS`` sums every rank's partial from the symmetric buffer. With ``COPY_IN`` the kernel
first copies this rank's partial rows into its own buffer (each program the rows it will read
back), so a decode step's MoE sum, residual add and next norm are one kernel with one barrier,
as in :mod:`megatron_ext.kernels.symm_exchange` (the caller alternates two buffer slots).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl

from megatron_ext.kernels.symm_barrier import peer_buffer, symm_barrier


@triton.jit
def add_rmsnorm_rows(x_ptr, peers_ptr, signals_ptr, residual_ptr, h_out_ptr, y_out_ptr,
                     w_ptr, n_rows, n_cols, eps, nprog,
                     RANK: tl.constexpr, WORLD: tl.constexpr, FROM_PEERS: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
                     COPY_IN: tl.constexpr = False):
    pid = tl.program_id(0)  # nprog = grid size, passed in
    out_ty = h_out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    if COPY_IN:
        own = peer_buffer(peers_ptr, RANK, out_ty)
        for start in range(0, n_rows, nprog):
            off = (start + pid).to(tl.int64) * n_cols + cols
            mask = col_ok & (start + pid < n_rows)
            tl.store(own + off, tl.load(x_ptr + off, mask=mask), mask=mask)
        tl.debug_barrier()   # every thread's copy-in before the flag's release
    if FROM_PEERS:
        symm_barrier(signals_ptr, pid, RANK, WORLD)  # opening barrier, per program
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(0, n_rows, nprog):
        row = start + pid
        mask = col_ok & (row < n_rows)
        off = row.to(tl.int64) * n_cols + cols
        if FROM_PEERS:
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for r in tl.static_range(WORLD):  # rank order: identical bits on every rank
                src = peer_buffer(peers_ptr, r, out_ty)
                acc += tl.load(src + off, mask=mask, other=0.0,
                               volatile=COPY_IN).to(tl.float32)
        else:
            acc = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        h = acc.to(out_ty).to(tl.float32)
        if HAS_RESIDUAL:
            h = h + tl.load(residual_ptr + off, mask=mask, other=0.0).to(tl.float32)
            h = h.to(out_ty).to(tl.float32)
        tl.store(h_out_ptr + off, h.to(out_ty), mask=mask)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols + eps)
        xhat = (h * rstd).to(out_ty).to(tl.float32)
        tl.store(y_out_ptr + off, (xhat * w).to(y_out_ptr.dtype.element_ty), mask=mask)
