"""Triton SwiGLU forward/backward (see :mod:`megatron_ext.layers.mlp`).

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
