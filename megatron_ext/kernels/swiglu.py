"""Triton SwiGLU forward/backward, plain and row-weighted (see :mod:`megatron_ext.layers.mlp` and
:mod:`megatron_ext.layers.weighted_swiglu`).

Imported only through :func:`megatron_ext.kernels.triton_loader.kernel_module` (needs Triton)."""
import triton
import triton.language as tl


@triton.jit
def swiglu_fwd(g_ptr, u_ptr, out_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + off, (act * u).to(out_ptr.dtype.element_ty), mask=ok)

@triton.jit
def swiglu_bwd(g_ptr, u_ptr, dout_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + off, mask=ok, other=0.0).to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    act = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)
    tl.store(du_ptr + off, (dout * act).to(du_ptr.dtype.element_ty), mask=ok)
    dact = (dout * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
    dg = dact * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=ok)


@triton.jit
def weighted_swiglu_fwd(g_ptr, u_ptr, w_ptr, out_ptr, n, n_cols, BLOCK: tl.constexpr):
    """out = round(float(swiglu(g, u)) * w[row]) over a contiguous [rows, n_cols]."""
    off = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = off < n
    g = tl.load(g_ptr + off, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + off, mask=ok, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + off // n_cols, mask=ok, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty).to(tl.float32)
    act = (act * u).to(out_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + off, (act * w).to(out_ptr.dtype.element_ty), mask=ok)

@triton.jit
def weighted_swiglu_bwd(g_ptr, u_ptr, w_ptr, dout_ptr, dg_ptr, du_ptr, dw_ptr, n_cols,
                        BLOCK: tl.constexpr):
    """One row per program: d_act = round(dout * w); dg/du as :func:`swiglu_bwd` with d_act;
    dw[row] = sum(float(dout) * float(act)) in float32."""
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
        sig = 1.0 / (1.0 + tl.exp(-g))
        silu = (g * sig).to(du_ptr.dtype.element_ty).to(tl.float32)
        acc += dout * (silu * u).to(du_ptr.dtype.element_ty).to(tl.float32)
        dact = (dout * w).to(du_ptr.dtype.element_ty).to(tl.float32)
        tl.store(du_ptr + off, (dact * silu).to(du_ptr.dtype.element_ty), mask=ok)
        dsilu = (dact * u).to(dg_ptr.dtype.element_ty).to(tl.float32)
        dg = dsilu * sig * (1.0 + g * (1.0 - sig))
        tl.store(dg_ptr + off, dg.to(dg_ptr.dtype.element_ty), mask=ok)
    tl.store(dw_ptr + row, tl.sum(acc, axis=0).to(dw_ptr.dtype.element_ty))
