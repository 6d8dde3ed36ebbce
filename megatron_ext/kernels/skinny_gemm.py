"""``x @ w.T`` for a few rows (a decode batch) in one launch: float32 accumulation, one rounding.

A decode step's projections multiply 16–256 rows by a weight read once; cuBLAS picks split-K
kernels plus a reduction kernel for several of these shapes (the router's ``[T, 2048] × [128,
2048]``, the fused q/k/v), each a separate launch. One program here takes ``BLOCK_M`` rows ×
``BLOCK_N`` output columns and walks the whole reduction, so the result is rounded once, as
cuBLAS rounds (the summation order differs).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def skinny_gemm(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K,
                HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """``out[m, n] = Σ_k x[m, k] · w[n, k] (+ b[n])``; ``x`` ``[M, K]``, ``w`` ``[N, K]``,
    ``out`` ``[M, N]``, contiguous."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        xs = tl.load(x_ptr + rows[:, None].to(tl.int64) * K + k[None, :],
                     mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        ws = tl.load(w_ptr + cols[None, :].to(tl.int64) * K + k[:, None],
                     mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(xs, ws, acc)
    dtype = out_ptr.dtype.element_ty
    if HAS_BIAS:   # added in float32 before the one rounding (cuBLAS's bias epilogue)
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], acc.to(dtype),
             mask=row_ok[:, None] & col_ok[None, :])
