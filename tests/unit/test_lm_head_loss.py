"""The LM head + cross-entropy that keeps no logits (``layers/lm_head_loss.py``) against the
unfused head and loss it replaces in training: float64 values and both gradients, with several
column chunks, ignored labels and padding rows of a vocabulary shard; and what it saves."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.layers.embedding import VocabParallelLMHead
from megatron_ext.layers.lm_head_loss import lm_head_cross_entropy
from megatron_ext.parallel.groups import AxisGroup

GROUP = AxisGroup.single("attn_tp")


def _case(n=37, h=16, rows=53, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64).to(dtype)
    weight = torch.randn(rows, h, generator=g, dtype=torch.float64).to(dtype)
    labels = torch.randint(0, 50, (n,), generator=g)
    labels[::5] = -100
    return hidden, weight, labels


def _unfused(hidden, weight, labels, real):
    logits = F.linear(hidden, weight)
    logits = logits.masked_fill(torch.arange(weight.shape[0]) >= real, float("-inf"))
    return vocab_parallel_cross_entropy(logits, labels, GROUP)


@pytest.mark.parametrize("chunk_bytes", [1, 37 * 8 * 130, 1 << 30])  # 128-col chunks ... one
def test_matches_unfused_head_and_loss_float64(chunk_bytes):
    hidden, weight, labels = _case(rows=300)
    real = 290  # the last 10 rows are vocabulary padding
    labels[3] = 289
    dloss = torch.rand(labels.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = (lm_head_cross_entropy(h, w, labels, GROUP, start=0, real_rows=real,
                                      chunk_bytes=chunk_bytes)
                if fused else _unfused(h, w, labels, real))
        loss.backward(dloss)
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=0, atol=1e-12), (got - want).abs().max()
    assert float(results[0][0][::5].abs().max()) == 0.0  # ignored labels: no loss
    assert float(results[0][2][real:].abs().max()) == 0.0  # padding rows: no gradient


def test_bf16_close_to_unfused():
    hidden, weight, labels = _case(n=64, h=32, rows=200, dtype=torch.bfloat16)
    out = []
    for fused in (True, False):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = (lm_head_cross_entropy(h, w, labels, GROUP, start=0, real_rows=200,
                                      chunk_bytes=64 * 2 * 128)
                if fused else _unfused(h, w, labels, 200))
        loss.sum().backward()
        out.append((loss.detach().double(), h.grad.double(), w.grad.double()))
    for got, want in zip(*out):
        assert float((got - want).norm() / want.norm()) < 1e-2


def test_keeps_no_logits():
    """What autograd keeps for backward: the fused loss saves the hidden states, weight and
    per-token vectors only; the unfused one keeps a [tokens, V] tensor besides."""
    hidden, weight, labels = _case(n=64, h=8, rows=512, dtype=torch.float32)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(h, w)
        own = {h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}
        return sum(n for p, n in seen.items() if p not in own)

    fused = saved_bytes(lambda h, w: lm_head_cross_entropy(h, w, labels, GROUP, start=0,
                                                           real_rows=512))
    unfused = saved_bytes(lambda h, w: _unfused(h, w, labels, 512))
    assert fused <= 64 * 8 * 3  # lse, label column, keep mask: a few bytes per token
    assert unfused >= 64 * 512 * 4  # the float32 logits/softmax


def test_shard_of_only_padding_rows():
    """A TP rank whose vocabulary rows are all padding (real_rows 0, e.g. tp 4 over a small
    vocabulary) computes no logits and gives its rows no gradient (its peers' log-sum-exps make
    the loss; the 4-rank case runs in test_precision_layouts)."""
    from megatron_ext.layers.lm_head_loss import _chunks

    assert _chunks(6, 0, 2, 1 << 20) == []
    assert _chunks(6, 300, 2, 1) == [(0, 128), (128, 256), (256, 300)]
    hidden, weight, labels = _case(n=6, h=4, rows=8)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = lm_head_cross_entropy(h, w, labels, GROUP, start=0, real_rows=0)
    loss.backward(torch.zeros_like(loss))
    assert float(h.grad.abs().max()) == 0.0 and float(w.grad.abs().max()) == 0.0


def test_head_loss_method_equals_forward_then_loss():
    head = VocabParallelLMHead(16, 50, GROUP, vocab_multiple=64, dtype=torch.float64)
    hidden, _, labels = _case(n=12, h=16)
    got = head.loss(hidden, labels)
    want = vocab_parallel_cross_entropy(head(hidden), labels, GROUP, vocab_size=50)
    assert torch.allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        head.loss(hidden, torch.full_like(labels, 50))
