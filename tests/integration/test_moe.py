"""MoE layer tests.

* Single process vs ``transformers``' ``Qwen3MoeSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock``
  (weights copied in): forward, input and parameter gradients, the load-balancing loss.
* Multi-rank (one 8-rank spawn, six layouts; code in ``tests/helpers/moe_rank_checks.py``): the parallel
  MoE (``local`` dispatcher on MOE_FULL inputs, ``all_to_all`` dispatcher on SCATTERED inputs,
  with uneven token counts) vs the single-process layer on the same global weights and all tokens — forward, aux loss, input grads,
  and every parameter's gradient after summing over its ParamSpec ``grad_sync`` axes.
* Bad inputs raise clear errors.
"""
from __future__ import annotations

import pytest
import torch

from megatron_ext.layers.moe import MoELayer, load_balancing_loss
from megatron_ext.layers.moe.grouped_gemm import grouped_mm, grouped_mm_available
from megatron_ext.parallel.groups import ParallelGroups
from tests.helpers import moe_rank_checks
from tests.helpers.multirank import run_ranks

H, I, E = 16, 8, 8
SINGLE = ParallelGroups.single_process()


def _hf_block(kind: str, top_k: int, norm_topk_prob: bool):
    if kind == "qwen3":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                             num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob)
        cfg._experts_implementation = "eager"
        return Qwen3MoeSparseMoeBlock(cfg), 0
    from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    cfg = Qwen2MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E,
                         num_experts_per_tok=top_k, norm_topk_prob=norm_topk_prob,
                         shared_expert_intermediate_size=12)
    cfg._experts_implementation = "eager"
    return Qwen2MoeSparseMoeBlock(cfg), 12


def _copy_from_hf(ours: MoELayer, hf) -> None:
    with torch.no_grad():
        ours.gate.weight.copy_(hf.gate.weight)
        ours.experts.gate_proj.copy_(hf.experts.gate_up_proj[:, :I])
        ours.experts.up_proj.copy_(hf.experts.gate_up_proj[:, I:])
        ours.experts.down_proj.copy_(hf.experts.down_proj)
        if ours.shared_expert is not None:
            for n in ("gate_proj", "up_proj", "down_proj"):
                getattr(ours.shared_expert.mlp, n).weight.copy_(getattr(hf.shared_expert, n).weight)
            ours.shared_expert.gate.weight.copy_(hf.shared_expert_gate.weight)


@pytest.mark.parametrize("kind,top_k,norm", [("qwen3", 2, True), ("qwen3", 3, False),
                                             ("qwen2", 4, False), ("qwen2", 2, True)])
def test_moe_block_matches_transformers(kind, top_k, norm):
    torch.manual_seed(0)
    hf, shared = _hf_block(kind, top_k, norm)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    ours = MoELayer(H, E, top_k, I, SINGLE, norm_topk_prob=norm,
                    shared_expert_intermediate_size=shared, shared_expert_gate=bool(shared))
    _copy_from_hf(ours, hf)
    x = torch.randn(2, 7, H)
    x_hf, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref = hf(x_hf)
    out, stats = ours(x_ours)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(ref)
    (ref * grad).sum().backward()
    (out * grad).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_hf.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.gate.weight.grad, hf.gate.weight.grad, atol=1e-5, rtol=1e-5)
    gate_up = torch.cat([ours.experts.gate_proj.grad, ours.experts.up_proj.grad], dim=1)
    torch.testing.assert_close(gate_up, hf.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.experts.down_proj.grad, hf.experts.down_proj.grad,
                               atol=1e-5, rtol=1e-5)
    if shared:
        for n in ("gate_proj", "up_proj", "down_proj"):
            torch.testing.assert_close(getattr(ours.shared_expert.mlp, n).weight.grad,
                                       getattr(hf.shared_expert, n).weight.grad,
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.shared_expert.gate.weight.grad,
                                   hf.shared_expert_gate.weight.grad, atol=1e-5, rtol=1e-5)
    # routing identical to HF's router
    logits, weights, ids = hf.gate(x.reshape(-1, H))
    routing = ours.gate(x.reshape(-1, H))
    assert torch.equal(routing.experts, ids)
    torch.testing.assert_close(routing.weights, weights, atol=1e-6, rtol=1e-6)
    assert stats.counts.sum().item() == x.shape[0] * x.shape[1] * top_k


def test_load_balancing_loss_matches_transformers():
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    torch.manual_seed(1)
    ours = [MoELayer(H, E, 2, I, SINGLE) for _ in range(3)]
    x = torch.randn(2, 6, H)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    logits, stats, masked = [], [], []
    for layer in ours:
        logits.append(layer.gate(x.reshape(-1, H)).logits.detach())
        stats.append(layer(x).router_stats)
        masked.append(layer(x, token_mask=mask).router_stats)
    ref = load_balancing_loss_func(tuple(logits), E, 2)
    torch.testing.assert_close(load_balancing_loss(stats), ref, atol=1e-6, rtol=1e-6)
    ref_m = load_balancing_loss_func(tuple(logits), E, 2, attention_mask=mask)
    torch.testing.assert_close(load_balancing_loss(masked), ref_m, atol=1e-6, rtol=1e-6)
    # differentiable w.r.t. the router weights
    load_balancing_loss(stats).backward()
    assert all(layer.gate.weight.grad is not None and layer.gate.weight.grad.abs().sum() > 0
               for layer in ours)


def test_grouped_mm_fallback_exact_with_empty_groups():
    torch.manual_seed(2)
    w = torch.randn(4, 6, 5, dtype=torch.float64, requires_grad=True)
    x = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    counts = [3, 0, 4, 0]
    out = grouped_mm(x, w, counts)
    ref = torch.cat([x[:3] @ w[0], x[3:] @ w[2]])
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    out.sum().backward()
    assert w.grad is not None and torch.equal(w.grad[1], torch.zeros(6, 5, dtype=torch.float64))
    # rows past the groups (a fixed-size dispatch's other-rank rows) are not computed: zeros
    short = grouped_mm(x, w, [3, 0, 3, 0])
    torch.testing.assert_close(short[:6], ref[:6], atol=1e-12, rtol=0)
    assert torch.equal(short[6], torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="counts sum to 8"):
        grouped_mm(x, w, [3, 0, 5, 0])
    with pytest.raises(ValueError, match="3 counts for 4 groups"):
        grouped_mm(x, w, [3, 0, 4])


def test_fixed_size_local_dispatch_equals_the_exact_one():
    """The CUDA-graph-safe dispatch (every assignment gets a row, other experts' rows last and
    zeroed) gives the same combined output as the data-sized one, float64, for a rank holding
    experts 2..3 of 4: without grad (its use: a captured decode step) even when the rows it
    does not compute hold NaN (the fused kernel leaves them unspecified); with grad (the loop
    path leaves them zero) the gradients too."""
    from megatron_ext.layers.moe.dispatch import (combine, drop_foreign_rows, gather_rows,
                                                  local_dispatch, row_weights)

    g = torch.Generator().manual_seed(4)
    tokens, top_k, hidden = 9, 2, 6
    experts = torch.stack([torch.randperm(4, generator=g)[:top_k] for _ in range(tokens)])
    x0 = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    w0 = torch.rand(tokens, top_k, generator=g, dtype=torch.float64)
    stack0 = torch.randn(2, hidden, hidden, generator=g, dtype=torch.float64)

    def run(fixed: bool, garbage: bool):
        x, w, stack = (t.clone().requires_grad_() for t in (x0, w0, stack0))
        a = local_dispatch(experts, 2, 2, 4, fixed_size=fixed)
        assert (a.valid_rows is not None) == fixed
        y = grouped_mm(gather_rows(x, a, top_k), stack, a.counts)
        if garbage:
            y = torch.where(a.valid_rows.unsqueeze(-1), y, float("nan"))
        out = combine(drop_foreign_rows(y * row_weights(w, a).unsqueeze(-1), a), a, top_k)
        if garbage:
            return (out.detach(),)
        out.backward(torch.ones_like(out))
        return out.detach(), x.grad, w.grad, stack.grad

    want = run(False, False)
    for got_all, garbage in ((run(True, False), False), (run(True, True), True)):
        for got, ref in zip(got_all, want):
            torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
        assert torch.isfinite(got_all[0]).all()


@pytest.mark.gpu
def test_grouped_mm_kernel_and_moe_layer_on_cuda():
    """The CUDA path (``torch._grouped_mm`` in bf16): the kernel alone against the float32 loop
    (forward, gradients, an empty group), and a whole bf16 MoE layer with the kernel against the
    same layer with the loop."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    w = torch.randn(4, 64, 32, device=dev)
    x = torch.randn(50, 64, device=dev)
    counts = torch.tensor([10, 0, 25, 15], device=dev)
    wb, xb = w.to(bf16).requires_grad_(), x.to(bf16).requires_grad_()
    wf, xf = wb.detach().float().requires_grad_(), xb.detach().float().requires_grad_()
    assert grouped_mm_available(xb, wb)
    out = grouped_mm(xb, wb.transpose(1, 2).contiguous().transpose(1, 2), counts)
    ref = grouped_mm(xf, wf, counts.tolist(), use_kernel=False)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=2e-2)
    g = torch.randn_like(ref)
    (out.float() * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(xb.grad.float(), xf.grad, atol=0.1, rtol=2e-2)
    torch.testing.assert_close(wb.grad.float(), wf.grad, atol=0.2, rtol=2e-2)
    assert torch.count_nonzero(wb.grad[1]) == 0

    # whole layer, kernel vs loop on the same bf16 routing (the loop is exact on CPU above)
    layer = MoELayer(64, 8, 2, 32, SINGLE, norm_topk_prob=True,
                     shared_expert_intermediate_size=64, shared_expert_gate=True,
                     dtype=bf16, device=dev)
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.2)
    x = torch.randn(300, 64, device=dev, dtype=bf16)
    g = torch.randn(300, 64, device=dev, dtype=bf16)
    results = []
    for use_kernel in (True, False):
        layer.zero_grad()
        layer.experts.use_kernel = use_kernel
        xi = x.clone().requires_grad_()
        out, _ = layer(xi)
        (out * g).sum().backward()
        results.append((out.float(), xi.grad.float(),
                        [p.grad.float() for p in layer.parameters()]))
    (o1, dx1, g1), (o2, dx2, g2) = results
    torch.testing.assert_close(o1, o2, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(dx1, dx2, atol=2e-2, rtol=2e-2)
    for (name, _), a_, b_ in zip(layer.named_parameters(), g1, g2):
        err = (a_ - b_).norm() / b_.norm().clamp_min(1e-6)
        assert err < 1e-2, f"{name}: kernel vs loop relative grad error {err:.3g}"


def test_moe_bad_inputs():
    with pytest.raises(ValueError, match="top_k=9 must be in"):
        MoELayer(H, E, 9, I, SINGLE)
    with pytest.raises(ValueError, match="dispatcher='ring'"):
        MoELayer(H, E, 2, I, SINGLE, dispatcher="ring")
    with pytest.raises(ValueError, match="shared_expert_gate=True needs"):
        MoELayer(H, E, 2, I, SINGLE, shared_expert_gate=True)
    layer = MoELayer(H, E, 2, I, SINGLE)
    with pytest.raises(ValueError, match="expects last dim 16"):
        layer(torch.randn(3, 5))
    with pytest.raises(ValueError, match="token_mask shape"):
        layer(torch.randn(3, H), token_mask=torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="token_counts is only used"):
        layer(torch.randn(3, H), token_counts=[3])
    with pytest.raises(ValueError, match="at least one layer"):
        load_balancing_loss([])


# ------------------------------------------------------------------------------ multi-rank
def test_moe_parallel_layouts_match_single_process():
    """One 8-rank spawn: five 4-rank MoE layouts on two pipeline stages at once (ep2×tp2, ep4,
    tp4, ep2×dp2, tp2×dp2), then ep2×tp2×dp2 on all 8 ranks."""
    results = run_ranks(moe_rank_checks.run_layouts, 8, moe_rank_checks.LAYOUTS, timeout=180)
    assert results == [2 * len(moe_rank_checks.LAYOUTS) * len(moe_rank_checks.CONFIGS)] * 8
