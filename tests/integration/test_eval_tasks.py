"""The long-context eval tasks against independent references: position-resolved loss equals
transformers' per-token loss on the same windows, passkey answers equal transformers' greedy
generation for the same prompts, in CP/TP/DP layouts; a training checkpoint evaluates in another
layout without conversion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from megatron_ext.data.tokenizer import ByteTokenizer
from megatron_ext.evaluation.passkey import PasskeyBuilder
from megatron_ext.evaluation.position_loss import (PositionLoss, evaluate_position_loss,
                                                   position_buckets)
from megatron_ext.evaluation.retrieval import RetrievalSample, answer_samples, is_exact_match
from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology
from tests.helpers.multirank import run_ranks

LAYOUTS = [
    dict(world=4, attn_cp=4, moe_ep=4, moe_tp=1, moe_dp=1),   # one sequence over 4 CP ranks
    dict(world=4, attn_tp=2, attn_cp=2, moe_dp=1),            # tp 2 x cp 2
    dict(world=4, attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=2),   # cp 2 x attn_dp 2 (rows 2 + 1)
]
PASSKEY_LAYOUTS = (0, 2)     # cp 4, and cp 2 with rows split over attn_dp 2
WINDOW = 41
BUCKETS = 6
PASSKEY_LEN = 420
ANSWER_TOKENS = 6
EXACT = 1e-10    # any layout vs the single-process run, both float64
# single process vs transformers (float64 with float32 islands: RoPE tables, MoE router softmax),
# relative to each bucket's loss sum
HF_TOL = {"tiny-llama": 1e-7, "tiny-qwen3-moe": 2e-5}


def _config(preset: str) -> ModelConfig:
    return ModelConfig.preset(preset).replace(vocab_size=258)   # the byte tokenizer's vocabulary


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from tests.helpers.hf_oracle import build_hf_model

    out = {}
    for preset in ("tiny-llama", "tiny-qwen3-moe"):
        path = str(tmp_path_factory.mktemp(preset))
        out[preset] = (build_hf_model(_config(preset), path), path)
    return out


@pytest.fixture(scope="module")
def training_checkpoint(models, tmp_path_factory):
    """The llama's weights as a training checkpoint (saved by one process)."""
    from tests.helpers.training_checkpoint import save_as_training_checkpoint

    root = str(tmp_path_factory.mktemp("ckpt"))
    save_as_training_checkpoint(models["tiny-llama"][1], root)
    return root


def _windows() -> torch.Tensor:
    return torch.randint(0, 258, (3, WINDOW), generator=torch.Generator().manual_seed(5))


def _passkey_samples() -> list[RetrievalSample]:
    builder = PasskeyBuilder(ByteTokenizer(), digits=5)
    rng = np.random.default_rng(0)
    return [builder.sample(PASSKEY_LEN, d, rng) for d in (0.0, 0.5, 1.0)]


def _eval_rank(rank, world, paths, ckpt, windows, samples):
    from megatron_ext.evaluation.model_source import open_model_source
    from megatron_ext.parallel.groups import build_groups

    edges = position_buckets(WINDOW, BUCKETS)
    out = []
    for li, sizes in enumerate(LAYOUTS):
        groups = build_groups(Topology(**sizes))
        for name, path in paths.items():
            model = open_model_source(path).load(groups, dtype=torch.float64)
            pl = evaluate_position_loss(model, groups, windows, edges, vocab_size=258)
            item = dict(layout=li, model=name, position_loss=pl)
            if name == "tiny-llama" and li in PASSKEY_LAYOUTS:
                item["answers"] = answer_samples(model, groups, ByteTokenizer(), samples,
                                                 ANSWER_TOKENS, batch_size=2)
            out.append(item)
        if li == 1:   # the training checkpoint, saved by one process, in a tp 2 x cp 2 layout
            model = open_model_source(ckpt).load(groups, dtype=torch.float64)
            out.append(dict(layout=li, model="training",
                            position_loss=evaluate_position_loss(model, groups, windows, edges,
                                                                 vocab_size=258)))
    return out


def _hf_position_loss(hf_model, windows: torch.Tensor, edges) -> PositionLoss:
    from tests.helpers.hf_oracle import to_dtype

    ref = to_dtype(hf_model, torch.float64)
    with torch.no_grad():
        logits = ref(input_ids=windows).logits
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), windows[:, 1:], reduction="none")
    sums, counts = [], []
    for a, b in zip(edges[:-1], edges[1:]):   # context length t predicts token t (index t-1)
        part = losses[:, a - 1:b - 1]
        sums.append(float(part.sum()))
        counts.append(part.numel())
    return PositionLoss(tuple(edges), tuple(sums), tuple(counts))


def _check_position_loss(got: PositionLoss, want: PositionLoss, tol: float) -> None:
    assert got.edges == want.edges and got.tokens == want.tokens
    for g, w in zip(got.loss_sum, want.loss_sum):
        assert abs(g - w) <= tol * abs(w), (got.loss_sum, want.loss_sum)


def test_position_loss_and_passkey_match_transformers(models, training_checkpoint):
    from megatron_ext.models.decoder import CausalLM

    windows, samples = _windows(), _passkey_samples()
    edges = position_buckets(WINDOW, BUCKETS)
    # one process vs transformers; every layout below vs the one process
    groups, want = ParallelGroups.single_process(), {}
    for name, (hf, path) in models.items():
        model = CausalLM.from_pretrained(path, groups, dtype=torch.float64)
        want[name] = evaluate_position_loss(model, groups, windows, edges, vocab_size=258)
        _check_position_loss(want[name], _hf_position_loss(hf, windows, edges), HF_TOL[name])
    want["training"] = want["tiny-llama"]
    # transformers' greedy answers to the same prompts
    hf = models["tiny-llama"][0].double()
    ids = torch.as_tensor(np.stack([s.prompt_ids for s in samples]))
    with torch.no_grad():
        ref_tokens = hf.generate(ids, max_new_tokens=ANSWER_TOKENS, do_sample=False,
                                 eos_token_id=ByteTokenizer.eos_id,
                                 pad_token_id=ByteTokenizer.pad_id)[:, PASSKEY_LEN:].tolist()
    ref_tokens = [row[:row.index(256)] if 256 in row else row for row in ref_tokens]

    paths = {name: path for name, (_, path) in models.items()}
    results = run_ranks(_eval_rank, 4, paths, training_checkpoint, windows, samples, timeout=240)
    seen = set()
    for per_rank in results:
        for item in per_rank:
            _check_position_loss(item["position_loss"], want[item["model"]], EXACT)
            seen.add((item["layout"], item["model"]))
            if "answers" in item:
                got = [a["generated_ids"] for a in item["answers"]]
                assert got == ref_tokens, (item["layout"], got, ref_tokens)
                for a, s, ref in zip(item["answers"], samples, ref_tokens):
                    assert a["correct"] == is_exact_match(ByteTokenizer().decode(ref), s.answer)
    assert len(seen) == len(LAYOUTS) * len(models) + 1
