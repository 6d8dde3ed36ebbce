"""Dense layer tests.

* Single process vs ``transformers``: RMSNorm, RoPE (arbitrary per-token positions), the attention
  block (Qwen3 QK-norm + GQA, Qwen2 QKV bias, Llama) with copied weights; vocab-parallel
  cross-entropy vs ``F.cross_entropy``.
* Multi-rank (one 4-rank spawn, code in ``tests/helpers/layer_rank_checks.py``; attn_tp 2 × attn_dp 2,
  attn_tp 4, attn_tp 2 × attn_cp 2 with a padded odd length): column/row linears (incl. replicated partitions), vocab-parallel embedding,
  LM head + cross-entropy (tied and untied), dense MLP and the attention block vs the single-process
  layer on the same global weights — forward, input grads, and every parameter's gradient after
  summing over its ParamSpec ``grad_sync`` axes.
* Bad inputs raise clear errors.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.layers.attention.block import AttentionBlock, check_head_split
from megatron_ext.layers import cross_entropy
from megatron_ext.layers.cross_entropy import vocab_parallel_cross_entropy
from megatron_ext.layers.embedding import VocabParallelEmbedding, VocabParallelLMHead
from megatron_ext.layers.linear import ColumnParallelLinear, RowParallelLinear
from megatron_ext.layers.norm import RMSNorm
from megatron_ext.layers.rope import RotaryEmbedding, apply_rotary
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups
from tests.helpers import layer_rank_checks
from tests.helpers.multirank import run_ranks
from tests.helpers.parallel_check import assert_grads_match, load_from_reference

SINGLE = ParallelGroups.single_process()
F64 = torch.float64


# ------------------------------------------------------------------------- single process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_transformers(dtype):
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

    torch.manual_seed(0)
    hf = Qwen3MoeRMSNorm(32, eps=1e-5).to(dtype)
    ours = RMSNorm(32, 1e-5, dtype=dtype)
    with torch.no_grad():
        hf.weight.normal_(1.0, 0.3)
        ours.weight.copy_(hf.weight)
    x = (3 * torch.randn(4, 5, 32)).to(dtype)
    assert torch.equal(ours(x), hf(x))  # same op order: bit-identical, also in bf16


def test_rope_matches_transformers_for_any_positions():
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import (Qwen3MoeRotaryEmbedding,
                                                                   apply_rotary_pos_emb)

    cfg = Qwen3MoeConfig(hidden_size=64, num_attention_heads=4, head_dim=16, rope_theta=1e6)
    hf = Qwen3MoeRotaryEmbedding(cfg)
    ours = RotaryEmbedding(16, 1e6)
    positions = torch.tensor([[0, 9, 3, 4000, 7], [5, 5, 1, 2, 0]])  # CP chunks: any order
    q, k = torch.randn(2, 5, 4, 16), torch.randn(2, 5, 2, 16)
    cos_h, sin_h = hf(q, positions)
    cos, sin = ours(positions)
    assert torch.equal(cos, cos_h) and torch.equal(sin, sin_h)
    qh, kh = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos_h, sin_h)
    torch.testing.assert_close(apply_rotary(q, cos, sin), qh.transpose(1, 2), atol=0, rtol=0)
    torch.testing.assert_close(apply_rotary(k, cos, sin), kh.transpose(1, 2), atol=0, rtol=0)


def _hf_attention(arch: str):
    if arch == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig as C
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention as A
        cfg = C(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                rope_theta=500.0, rms_norm_eps=1e-6)
        kw = dict(qk_norm=True)
    elif arch == "qwen2_moe":
        from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig as C
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeAttention as A
        cfg = C(hidden_size=32, num_attention_heads=4, num_key_value_heads=4, rope_theta=500.0)
        kw = dict(qkv_bias=True)
    else:
        from transformers.models.llama.configuration_llama import LlamaConfig as C
        from transformers.models.llama.modeling_llama import LlamaAttention as A
        cfg = C(hidden_size=32, num_attention_heads=4, num_key_value_heads=1, rope_theta=500.0,
                attention_bias=True)
        kw = dict(qkv_bias=True, o_bias=True)
    cfg._attn_implementation = "eager"
    return A(cfg, layer_idx=0), cfg, kw


@pytest.mark.parametrize("arch", ["qwen3_moe", "qwen2_moe", "llama"])
def test_attention_block_matches_transformers(arch):
    torch.manual_seed(0)
    hf, cfg, kw = _hf_attention(arch)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ours = AttentionBlock(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads,
                          head_dim, SINGLE, rope_theta=500.0, rms_norm_eps=cfg.rms_norm_eps,
                          name=None, **kw)
    load_from_reference(ours, hf)
    b, s = 2, 6
    x = torch.randn(b, s, cfg.hidden_size)
    positions = torch.arange(s).expand(b, s)
    cos, sin = RotaryEmbedding(head_dim, 500.0)(positions)
    mask = torch.full((s, s), torch.finfo(torch.float32).min).triu(1).expand(b, 1, s, s)
    xh, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, _ = hf(xh, (cos, sin), mask)
    out = ours(xo, positions)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    (ref * g).sum().backward()
    (out * g).sum().backward()
    torch.testing.assert_close(xo.grad, xh.grad, atol=2e-5, rtol=1e-5)
    assert_grads_match(ours, hf, SINGLE, atol=2e-5, rtol=1e-5, what=arch)


def test_vocab_cross_entropy_matches_torch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=F64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    labels[0, 2] = labels[2, 4] = -100
    loss = vocab_parallel_cross_entropy(logits, labels, SINGLE.attn_tp)
    ref = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="none",
                          ignore_index=-100).reshape(3, 5)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=0)
    g = torch.rand(3, 5, dtype=F64)
    (got,) = torch.autograd.grad((loss * g).sum(), logits)
    (want,) = torch.autograd.grad((ref * g).sum(), logits)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_vocab_cross_entropy_without_grad_is_torch_cross_entropy(dtype):
    """Evaluation's path (no gradient wanted: no softmax kept, ``F.cross_entropy`` on one rank)
    gives the training path's loss, padding columns (``-inf``, as the LM head makes them) and
    ignored labels included."""
    torch.manual_seed(1)
    real = (4 * torch.randn(6, 13)).to(dtype)
    logits = torch.cat([real, torch.full((6, 3), float("-inf"), dtype=dtype)], dim=-1)
    labels = torch.randint(0, 13, (6,))
    labels[1] = labels[4] = -100
    with torch.no_grad():
        fast = vocab_parallel_cross_entropy(logits, labels, SINGLE.attn_tp, vocab_size=13)
    trained = vocab_parallel_cross_entropy(logits.clone().requires_grad_(), labels,
                                           SINGLE.attn_tp, vocab_size=13)
    want = F.cross_entropy(real, labels, reduction="none", ignore_index=-100)
    assert fast.dtype == trained.dtype == dtype
    assert torch.equal(fast, want) and fast[1] == fast[4] == 0
    with mock.patch.object(cross_entropy, "_EVAL_CHUNK", 2 * 16), torch.no_grad():  # 2-row chunks
        chunked = vocab_parallel_cross_entropy(logits, labels, SINGLE.attn_tp, vocab_size=13)
    assert torch.equal(chunked, want)
    ulp = torch.finfo(dtype).eps * want.abs().max()
    torch.testing.assert_close(trained.detach(), want, atol=4 * ulp, rtol=0)


def test_bad_inputs_give_clear_errors():
    fake2 = AxisGroup("attn_tp", (0, 1), 0, None)   # construction-time checks need no collective
    fake4 = AxisGroup("attn_tp", (0, 1, 2, 3), 1, None)
    assert VocabParallelEmbedding(11, 8, fake2).padded_vocab == 12   # padded, not refused
    with pytest.raises(ValueError, match="vocab_multiple=0 must be a positive integer"):
        VocabParallelEmbedding(11, 8, fake2, vocab_multiple=0)
    with pytest.raises(ValueError, match="out_features=6 must be divisible by num_partitions=4"):
        ColumnParallelLinear(8, 6, fake4)
    with pytest.raises(ValueError, match="num_partitions=3 must divide the attn_tp size 4"):
        ColumnParallelLinear(8, 6, fake4, num_partitions=3)
    with pytest.raises(ValueError, match="in_features=6 must be divisible by the attn_tp size 4"):
        RowParallelLinear(6, 8, fake4, reduce_results=False)
    with pytest.raises(ValueError, match="num_heads=6 must be divisible by attn_tp=4"):
        check_head_split(6, 2, 4)
    with pytest.raises(ValueError, match="num_kv_heads=6 must be divisible by attn_tp=4"):
        check_head_split(12, 6, 4)
    with pytest.raises(ValueError, match="num_kv_heads=3 < attn_tp=4 replicates KV heads"):
        check_head_split(12, 3, 4)
    with pytest.raises(ValueError, match="num_kv_heads=3 must divide num_heads=8"):
        check_head_split(8, 3, 1)
    emb = VocabParallelEmbedding(10, 4, SINGLE.attn_tp)
    with pytest.raises(ValueError, match="token id 10 out of range for vocab_size=10"):
        emb(torch.tensor([[1, 10]]))
    with pytest.raises(ValueError, match="token id -3 out of range"):
        emb(torch.tensor([-3]))
    with pytest.raises(ValueError, match="label 12 out of range for vocab_size=10"):
        vocab_parallel_cross_entropy(torch.randn(2, 10), torch.tensor([1, 12]), SINGLE.attn_tp)
    with pytest.raises(ValueError, match="does not match labels"):
        vocab_parallel_cross_entropy(torch.randn(2, 10), torch.tensor([1]), SINGLE.attn_tp)
    with pytest.raises(ValueError, match=r"tied embedding is \[10 \(padded 10\), 4\] but the LM"):
        VocabParallelLMHead(8, 10, SINGLE.attn_tp, tied_embedding=emb)
    with pytest.raises(ValueError, match="expects hidden \\[b, s, 8\\]"):
        AttentionBlock(8, 2, 2, 4, SINGLE)(torch.randn(3, 8), torch.arange(3))
    with pytest.raises(ValueError, match="expects this rank's input slice of 8"):
        RowParallelLinear(8, 4, SINGLE.attn_tp, reduce_results=True)(torch.randn(2, 6))


# ----------------------------------------------------------------------------- multi-rank
def test_parallel_layers_match_single_process():
    """One 4-rank spawn (code in ``tests/helpers/layer_rank_checks.py``)."""
    results = run_ranks(layer_rank_checks.run_layouts, 4, timeout=150)
    assert results == [12] * 4
