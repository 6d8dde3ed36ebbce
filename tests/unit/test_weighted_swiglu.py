"""Row-weighted SwiGLU (the routed experts' activation): float64 against plain autograd of
``(silu(g) · u) · w``, the specified bf16 rounding bitwise, what it saves for backward, and
selective recompute through ``swiglu_projected`` (bitwise the same, no copy of the activation)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.layers.mlp import swiglu_projected
from megatron_ext.layers.weighted_swiglu import weighted_swiglu


def _inputs(dtype: torch.dtype, w_dtype: torch.dtype, n: int = 23, cols: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gate = (2 * torch.randn(n, cols, generator=g, dtype=torch.float64)).to(dtype)
    up = torch.randn(n, cols, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(n, generator=g, dtype=torch.float64).to(w_dtype)
    dout = torch.randn(n, cols, generator=g, dtype=torch.float64).to(dtype)
    return [t.requires_grad_() for t in (gate, up, w)], dout


def test_float64_matches_plain_autograd():
    (gate, up, w), dout = _inputs(torch.float64, torch.float64)
    out = weighted_swiglu(gate, up, w)
    grads = torch.autograd.grad(out, (gate, up, w), dout)
    ref = (F.silu(gate) * up) * w[:, None]
    ref_grads = torch.autograd.grad(ref, (gate, up, w), dout)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_bf16_rounding_as_specified(w_dtype):
    """out = round(float(swiglu) · w); d_act = round(dout · w); dgate/dup = torch's swiglu
    backward given d_act (bitwise); dw = Σ float(dout) · float(swiglu) in float32."""
    (gate, up, w), dout = _inputs(torch.bfloat16, w_dtype, seed=1)
    out = weighted_swiglu(gate, up, w)
    dgate, dup, dw = torch.autograd.grad(out, (gate, up, w), dout)
    g, u = gate.detach().requires_grad_(), up.detach().requires_grad_()
    act = F.silu(g) * u                                   # today's swiglu rounding
    assert torch.equal(out, (act.float() * w.float()[:, None]).to(torch.bfloat16))
    d_act = (dout.float() * w.float()[:, None]).to(torch.bfloat16)
    ref_dg, ref_du = torch.autograd.grad(act, (g, u), d_act)
    assert torch.equal(dgate, ref_dg) and torch.equal(dup, ref_du)
    assert dw.dtype == w_dtype
    torch.testing.assert_close(dw, (dout.float() * act.float()).sum(-1).to(w_dtype),
                               atol=0, rtol=1e-6)


def test_saves_only_its_inputs():
    (gate, up, w), _ = _inputs(torch.float32, torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        weighted_swiglu(gate, up, w)
    assert {t.untyped_storage().data_ptr() for t in saved} == {
        t.untyped_storage().data_ptr() for t in (gate, up, w)}


def test_selective_recompute_keeps_no_activation_and_is_bitwise():
    """``swiglu_projected(..., recompute=True, row_weight=w)``: the same values and gradients as
    without recompute; the down projection keeps no copy of the weighted activation."""
    (gate, up, w), dout = _inputs(torch.bfloat16, torch.float32, seed=2)
    proj = torch.randn(40, 12, dtype=torch.bfloat16, requires_grad=True)
    results = {}
    for recompute in (False, True):
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = swiglu_projected(gate, up, lambda a: a @ proj, recompute, row_weight=w)
        grads = torch.autograd.grad(out, (gate, up, w, proj), dout[:, :12])
        inputs = {t.untyped_storage().data_ptr() for t in (gate, up, w, proj)}
        results[recompute] = (out, grads, sum(n for k, n in saved.items() if k not in inputs))
    (out0, g0, extra0), (out1, g1, extra1) = results[False], results[True]
    assert torch.equal(out0, out1) and all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert extra0 == gate.numel() * 2 and extra1 == 0  # the activation, or nothing


def test_bad_shapes_are_refused():
    (gate, up, w), _ = _inputs(torch.float32, torch.float32)
    with pytest.raises(ValueError, match="row_weight"):
        weighted_swiglu(gate, up, w[:-1])
    with pytest.raises(ValueError, match="same"):
        weighted_swiglu(gate, up[:, :-1], w)
