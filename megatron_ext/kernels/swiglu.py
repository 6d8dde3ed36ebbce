"""Triton SwiGLU forward/backward, plain and row-weighted (see :mod:`megatron_ext.layers.mlp` and
:mod:`megatron_ext.layers.weighted_swiglu`). Both round where torch rounds ``silu(gate) * up``:
``silu`` to the output dtype, then the product; the backward rounds ``d_act * up`` before the
``silu`` derivative.

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def _act(g, u, dtype: tl.constexpr):
    """float32 value of round(round(silu(g)) * u) in ``dtype``."""
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (silu * u).to(dtype).to(tl.float32)


@triton.jit
def _grads(g, u, dact, dtype: tl.constexpr):
    """``(rounded silu(g) as float32, dg, du)`` of ``silu(g) * u`` given its gradient ``dact``."""
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = (g * sig).to(dtype).to(tl.float32)
    dsilu = (dact * u).to(dtype).to(tl.float32)
    return silu, (dsilu * sig * (1.0 + g * (1.0 - sig))).to(dtype), (dact * silu).to(dtype)


@triton.jit
def swiglu_fwd(g_ptr, u_ptr, w_ptr, out_ptr, n, n_cols, HAS_W: tl.constexpr,
               BLOCK: tl.constexpr):
    """out = swiglu(g, u), or with ``HAS_W`` round(float(swiglu(g, u)) * w[row]) over a
    contiguous [rows, n_cols]."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
    out = _act(g, u, out_ptr.dtype.element_ty)
    if HAS_W:
        out = out * tl.load(w_ptr + off // n_cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + off, out.to(out_ptr.dtype.element_ty), mask=ok)

@triton.jit
def swiglu_bwd(g_ptr, u_ptr, dout_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32)
    _, dg, du = _grads(g, u, dout, dg_ptr.dtype.element_ty)
    tl.store(du_ptr + off, du, mask=ok)
    tl.store(dg_ptr + off, dg, mask=ok)

@triton.jit
def weighted_swiglu_bwd(g_ptr, u_ptr, w_ptr, dout_ptr, dg_ptr, du_ptr, dw_ptr, n_cols,
                        BLOCK: tl.constexpr):
    """One row per program: d_act = round(dout * w); dg/du as :func:`swiglu_bwd` given d_act;
    dw[row] = sum(float(dout) * float(swiglu)) in float32."""
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(w_ptr + row).to(tl.float32)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        ok = cols < n_cols
        off = row * n_cols + cols
        g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32)
        dact = (dout * w).to(dg_ptr.dtype.element_ty).to(tl.float32)
        silu, dg, du = _grads(g, u, dact, dg_ptr.dtype.element_ty)
        acc += dout * (silu * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + off, du, mask=ok)
        tl.store(dg_ptr + off, dg, mask=ok)
    tl.store(dw_ptr + row, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty))
