"""Triton routed-expert GEMMs for batched decode (see :mod:`megatron_ext.layers.moe.decode_experts`).

Decode reads every local expert's weights once per step for a handful of rows each, so these
kernels are weight-read bound: one program per (local expert, output column block) walks all of
its expert's rows in ``BLOCK_M`` chunks (the weight tile of a chunk after the first comes from
L2), finds its row range from ``counts`` itself (no cumsum kernel, no host sync: capturable in a
CUDA graph) and reads no weight at all when its expert got no rows. ``gate_up`` reads the token
rows of ``x`` by ``token_index`` (no gather kernel) and applies the (row-weighted) SwiGLU in its
epilogue with :mod:`megatron_ext.kernels.swiglu`'s rounding.

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl

from megatron_ext.kernels.grid_dependency import release_dependents, wait_prior_grid
from megatron_ext.kernels.swiglu import _act


@triton.jit
def _expert_rows(counts_ptr, e, E_POW2: tl.constexpr):
    """``(first row, row count)`` of local expert ``e``: rows are grouped by expert in order."""
    offs = tl.arange(0, E_POW2)
    start = tl.sum(tl.load(counts_ptr + offs, mask=offs < e, other=0), axis=0)
    return start, tl.load(counts_ptr + e)


@triton.jit
def _chunk(start, count, m0, BLOCK_M: tl.constexpr):
    """Rows ``m0 .. m0 + BLOCK_M`` of an expert whose rows start at ``start``, and which exist."""
    m = m0 + tl.arange(0, BLOCK_M)
    return start + m, m < count


@triton.jit
def gate_up_act(x_ptr, tok_ptr, counts_ptr, rw_ptr, rw_index_ptr, g_ptr, u_ptr, out_ptr, H, I,
                HAS_W: tl.constexpr, W_INDEX: tl.constexpr, E_POW2: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                RELEASE: tl.constexpr = False):
    """out[r, n] = act(x[tok[r]] @ gate[e, n]ᵀ, x[tok[r]] @ up[e, n]ᵀ) (· rw[r] with ``HAS_W``;
    ``rw[rw_index[r]]`` with ``W_INDEX``: the routing weights read in place, no gather kernel)
    for the rows r of local expert e = program_id(0), columns n of block program_id(1).
    x [T, H], gate/up [E, I, H], out [N, I], all contiguous. ``RELEASE``: a PDL-launched
    ``down`` may start as this kernel's last programs run."""
    if RELEASE:
        release_dependents()
    e = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < I
    start, count = _expert_rows(counts_ptr, e, E_POW2)
    w_off = e * I * H + cols[None, :].to(tl.int64) * H          # [1, BLOCK_N]
    dtype = out_ptr.dtype.element_ty
    for m0 in range(0, count, BLOCK_M):
        rows, row_ok = _chunk(start, count, m0, BLOCK_M)
        tok = tl.load(tok_ptr + rows, mask=row_ok, other=0)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < H
            xs = tl.load(x_ptr + tok[:, None] * H + k[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & col_ok[None, :]
            wg = tl.load(g_ptr + w_off + k[:, None], mask=w_mask, other=0.0)
            wu = tl.load(u_ptr + w_off + k[:, None], mask=w_mask, other=0.0)
            acc_g = tl.dot(xs, wg, acc_g)
            acc_u = tl.dot(xs, wu, acc_u)
        # the grouped GEMMs' outputs are rounded to the weight dtype before the activation
        act = _act(acc_g.to(dtype).to(tl.float32), acc_u.to(dtype).to(tl.float32), dtype)
        if HAS_W:
            at = rows
            if W_INDEX:
                at = tl.load(rw_index_ptr + rows, mask=row_ok, other=0)
            act = act * tl.load(rw_ptr + at, mask=row_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + rows[:, None] * I + cols[None, :], act.to(dtype),
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def down(a_ptr, counts_ptr, w_ptr, out_ptr, H, I, E_POW2: tl.constexpr, BLOCK_M: tl.constexpr,
         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AFTER_PRIOR: tl.constexpr = False):
    """out[r, n] = a[r] @ w[e, n]ᵀ for the rows r of local expert e = program_id(0), columns n
    of block program_id(1). a [N, I], w [E, H, I], out [N, H], all contiguous. ``AFTER_PRIOR``
    (launched with PDL after ``gate_up_act``): the counts (written before ``gate_up_act``
    started) are read at once, the activations only after ``gate_up_act`` completes."""
    e = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < H
    start, count = _expert_rows(counts_ptr, e, E_POW2)
    if AFTER_PRIOR:
        wait_prior_grid()
    w_off = e * H * I + cols[None, :].to(tl.int64) * I          # [1, BLOCK_N]
    for m0 in range(0, count, BLOCK_M):
        rows, row_ok = _chunk(start, count, m0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < I
            a = tl.load(a_ptr + rows[:, None] * I + k[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + w_off + k[:, None], mask=k_ok[:, None] & col_ok[None, :],
                        other=0.0)
            acc = tl.dot(a, w, acc)
        tl.store(out_ptr + rows[:, None] * H + cols[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])
