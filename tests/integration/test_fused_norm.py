"""Reduce + residual add + RMSNorm: the CPU path (reference ops) against transformers' RMSNorm and
a single-process float64 oracle, forward and gradients; the backward formula used by the CUDA
kernels against autograd; method selection errors.

The Triton kernels (``fused``: peer loads from symmetric memory; ``composed``) are checked on 2
GPUs against a float64 oracle by ``benchmarks/fused_reduce_norm.py`` (values and gradients)."""
import pytest
import torch
import torch.distributed as dist

from megatron_ext.communication.fused_reduce_norm import (COMPOSED, FUSED, REFERENCE, SymmMemReduceAddNorm,
                                            add_rms_norm,
                                            add_rms_norm_reference, choose_method,
                                            reduce_add_rms_norm, rms_norm_backward,
                                            rms_norm_reference)
from megatron_ext.parallel.comm_counter import count_collectives
from megatron_ext.parallel.groups import AxisGroup
from megatron_ext.communication.symm_mem import SymmMemAllReduce
from tests.helpers.multirank import run_ranks

EPS = 1e-6


def test_rms_norm_matches_transformers_qwen3():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    torch.manual_seed(0)
    hf = Qwen3MoeRMSNorm(16, eps=EPS)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.3 * torch.randn(16))
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(4, 3, 16).to(dtype)
        w = hf.weight.detach().to(dtype)
        hf_d = hf.to(dtype)
        torch.testing.assert_close(rms_norm_reference(x, w, EPS), hf_d(x), rtol=0, atol=0)


def test_backward_formula_matches_autograd():
    """``rms_norm_backward`` (the CUDA methods' backward) vs autograd of the reference."""
    torch.manual_seed(1)
    h = torch.randn(6, 32, dtype=torch.float64, requires_grad=True)
    w = (1 + 0.2 * torch.randn(32, dtype=torch.float64)).requires_grad_()
    gy = torch.randn(6, 32, dtype=torch.float64)
    dh_ref, dw_ref = torch.autograd.grad(rms_norm_reference(h, w, EPS), (h, w), gy)
    dh, dw = rms_norm_backward(gy, h.detach(), w.detach(), EPS)
    torch.testing.assert_close(dh, dh_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, dw_ref, rtol=1e-12, atol=1e-12)


def test_local_add_rms_norm_fwd_bwd_and_no_residual():
    torch.manual_seed(2)
    x = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    r = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    w = torch.randn(24, dtype=torch.float64, requires_grad=True)
    y, h = add_rms_norm(x, r, w, EPS)
    hh = x + r
    y_ref = hh * torch.rsqrt(hh.pow(2).mean(-1, keepdim=True) + EPS) * w  # plain formula
    torch.testing.assert_close(h, hh)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), (x, r, w), (gy, gh))
    want = torch.autograd.grad((y_ref, hh), (x, r, w), (gy, gh))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    y2, h2 = add_rms_norm(x, None, w, EPS)
    assert h2 is x
    torch.testing.assert_close(y2, rms_norm_reference(x, w, EPS))


def test_method_choice_and_errors_on_cpu():
    x = torch.randn(3, 8)
    w = torch.ones(8)
    reducer = SymmMemAllReduce(AxisGroup.single("attn_tp"), "cpu")
    assert choose_method(x, reducer) == REFERENCE
    with pytest.raises(ValueError, match="fused reduce\\+RMSNorm needs CUDA"):
        choose_method(x, reducer, FUSED)
    with pytest.raises(ValueError, match="composed reduce\\+RMSNorm needs CUDA"):
        choose_method(x, None, COMPOSED)
    with pytest.raises(ValueError, match="unknown fused-norm method 'fast'"):
        choose_method(x, None, "fast")
    with pytest.raises(ValueError, match="residual \\(3, 4\\).* must match the partial sum"):
        reduce_add_rms_norm(x, torch.randn(3, 4), w, EPS)
    with pytest.raises(ValueError, match="norm weight shape \\(7,\\) must be \\(8,\\)"):
        reduce_add_rms_norm(x, None, torch.ones(7), EPS)


def _two_rank_reduce_norm(rank, world):
    group = dist.new_group(list(range(world)))
    reducer = SymmMemAllReduce(AxisGroup("attn_tp", tuple(range(world)), rank, group), "cpu")
    gen = torch.Generator().manual_seed(10 + rank)
    partial = torch.randn(2, 3, 16, generator=gen, dtype=torch.float64).requires_grad_()
    shared = torch.Generator().manual_seed(99)  # residual, weight, upstream grads: replicated
    residual = torch.randn(2, 3, 16, generator=shared, dtype=torch.float64).requires_grad_()
    weight = (1 + 0.2 * torch.randn(16, generator=shared, dtype=torch.float64)).requires_grad_()
    gy = torch.randn(2, 3, 16, generator=shared, dtype=torch.float64)
    gh = torch.randn(2, 3, 16, generator=shared, dtype=torch.float64)
    with count_collectives() as log:
        y, h = reduce_add_rms_norm(partial, residual, weight, EPS, reducer)
    torch.autograd.backward((y, h), (gy, gh))
    # the communicator hook (no symmetric group on CPU: NCCL/gloo reducer made on demand)
    from megatron_ext.layers.norm import RMSNorm
    norm = RMSNorm(16, EPS, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(weight)
    hook = SymmMemReduceAddNorm()
    y_hook, h_hook = hook(partial.detach(), residual.detach(), norm, reducer.axis)
    assert hook.symmetric_groups == []
    assert torch.equal(y_hook, y.detach()) and torch.equal(h_hook, h.detach())
    # bf16 autocast keeps a wider residual than the partial sums: reduce, then add + norm promote
    with count_collectives() as mixed_log:
        y_mix, h_mix = hook(partial.detach().float(), residual.detach(), norm, reducer.axis)
    assert mixed_log.by_kind_axis() == {("all_reduce", "attn_tp"): 1}
    assert h_mix.dtype == torch.float64
    torch.testing.assert_close(h_mix, h.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y_mix, y.detach(), rtol=1e-6, atol=1e-6)
    return dict(partial=partial.detach(), residual=residual.detach(), weight=weight.detach(),
                gy=gy, gh=gh, y=y.detach(), h=h.detach(), d_partial=partial.grad,
                d_residual=residual.grad, d_weight=weight.grad, log=log.by_kind_axis())


def test_two_rank_reduce_add_norm_matches_single_process():
    res = run_ranks(_two_rank_reduce_norm, 2, timeout=90)
    r0 = res[0]
    total = (res[0]["partial"] + res[1]["partial"]).requires_grad_()
    residual = r0["residual"].clone().requires_grad_()
    weight = r0["weight"].clone().requires_grad_()
    y_ref, h_ref = add_rms_norm_reference(total, residual, weight, EPS)
    d_total, d_res, d_w = torch.autograd.grad((y_ref, h_ref), (total, residual, weight),
                                              (r0["gy"], r0["gh"]))
    for r in res:
        assert r["log"] == {("all_reduce", "attn_tp"): 1}  # exactly one reduction
        torch.testing.assert_close(r["y"], y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["h"], h_ref, rtol=1e-12, atol=1e-12)
        # the sum's adjoint is the identity: every rank's partial gets the whole dL/dh
        torch.testing.assert_close(r["d_partial"], d_total, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["d_residual"], d_res, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["d_weight"], d_w, rtol=1e-12, atol=1e-12)
