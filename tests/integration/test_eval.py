"""Long-context evaluation under CP/TP/DP layouts equals transformers' loss on the same sequences."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_ext.evaluation.loss import evaluate_loss
from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.parallel.topology import Topology
from megatron_ext.models.config import ModelConfig
from tests.helpers.multirank import run_ranks

LAYOUTS = [
    dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),            # seed: MOE_FULL k=2
    dict(world=4, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=1),   # k=4, long sequence over 4 ranks
    dict(world=4, attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=2),   # attn_dp 2: 3 rows split 2 + 1
]


def _eval_rank(rank, world, path, input_ids):
    from megatron_ext.models.decoder import CausalLM

    out = []
    for sizes in LAYOUTS:
        groups = build_groups(Topology(**sizes))
        for strategy in ("all_gather", "p2p"):
            model = CausalLM.from_pretrained(path, groups, cp_strategy=strategy)
            result = evaluate_loss(model, groups, input_ids, vocab_size=model.config.vocab_size)
            out.append((result.loss_sum, result.tokens))
    return out


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    from tests.helpers.hf_oracle import build_hf_model

    path = str(tmp_path_factory.mktemp("hf"))
    model = build_hf_model(ModelConfig.preset("tiny-qwen3-moe"), path)
    return model, path


def test_eval_matches_transformers_in_every_layout(hf_model):
    model, path = hf_model
    input_ids = torch.randint(0, 128, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
    want = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                           input_ids[:, 1:].reshape(-1), reduction="sum").item()
    results = run_ranks(_eval_rank, 4, path, input_ids, timeout=180)
    for per_rank in zip(*results):
        assert len(set(per_rank)) == 1  # every rank reports the same totals
        loss_sum, tokens = per_rank[0]
        assert tokens == 3 * 36
        assert abs(loss_sum - want) <= 2e-5 * abs(want), (loss_sum, want)


def test_eval_rejects_bad_input(hf_model):
    from megatron_ext.models.decoder import CausalLM

    _, path = hf_model
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(path, groups)
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=f"token id {vocab} is outside the model's vocabulary"):
        evaluate_loss(model, groups, torch.tensor([[1, 2, vocab]]), vocab_size=vocab)
    with pytest.raises(ValueError, match="must be \\[B, S\\] with S >= 2"):
        evaluate_loss(model, groups, torch.tensor([1, 2, 3]), vocab_size=vocab)
