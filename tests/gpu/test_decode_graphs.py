"""The decode step as CUDA graphs (one per batch shape) gives exactly the tokens of the same step
run eagerly on the GPU — greedy and sampled, with requests leaving the batch (new shapes, new
captures), also with dynamic NTK RoPE recomputing its table inside every step — and the eager
GPU run agrees with the float64 CPU run of the same weights on the greedy tokens' logits. Marked ``gpu`` (``pytest -m gpu`` on a CUDA machine)."""
from __future__ import annotations

import pytest
import torch

from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel.groups import ParallelGroups

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


# dynamic NTK: every decode step past position 8 recomputes the RoPE table inside the graph
DYNAMIC = dict(max_position_embeddings=8, rope_scaling={"rope_type": "dynamic", "factor": 4.0})


def _model(dtype, device, **changes):
    from megatron_ext.models.decoder import CausalLM

    groups = ParallelGroups.single_process()
    model = CausalLM(ModelConfig.preset("tiny-qwen3-moe").replace(**changes), groups,
                     dtype=dtype, device=device, transformer_impl="native")
    model.init_weights(seed=3, std=0.1)
    return model.eval(), groups


def _prompts():
    g = torch.Generator().manual_seed(0)
    lengths = [7, 3, 12, 5, 9]
    ids = torch.randint(1, 100, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, ids.shape[1] - n:] = 1
        ids[i, :ids.shape[1] - n] = 0
    return ids, mask


@pytest.mark.parametrize("changes", [{}, DYNAMIC], ids=["plain", "dynamic-ntk"])
def test_graphed_decode_equals_eager_decode(changes):
    from megatron_ext.serving import SamplingParams, cuda_graphs_supported, generate_batch

    model, groups = _model(torch.bfloat16, "cuda", **changes)
    ok, why = cuda_graphs_supported(model)
    assert ok, why
    ids, mask = _prompts()
    params = [SamplingParams(12), SamplingParams(4, temperature=0.9, top_p=0.8, seed=5),
              SamplingParams(9, temperature=1.2, top_k=20, seed=6), SamplingParams(2),
              SamplingParams(12, temperature=0.7, seed=7)]
    eager = generate_batch(model, groups, ids, params, attention_mask=mask, check_every=2,
                           use_cuda_graphs=False, return_logits=True)
    graphed = generate_batch(model, groups, ids, params, attention_mask=mask, check_every=2,
                             use_cuda_graphs=True, return_logits=True)
    assert graphed.cuda_graphs >= 2          # the batch shrank: more than one shape captured
    assert eager.cuda_graphs == 0
    assert torch.equal(graphed.tokens, eager.tokens)
    torch.testing.assert_close(graphed.last_logits, eager.last_logits, atol=0, rtol=0)
    assert graphed.rows_per_step[0] == 5 and graphed.rows_per_step[-1] < 5


def test_gpu_greedy_logits_agree_with_the_cpu_float64_run():
    from megatron_ext.serving import greedy_generate

    ids, mask = _prompts()
    model, groups = _model(torch.float64, "cpu")
    ref = greedy_generate(model, groups, ids, 1, attention_mask=mask)
    model, groups = _model(torch.bfloat16, "cuda")
    got = greedy_generate(model, groups, ids, 1, attention_mask=mask, use_cuda_graphs=True)
    rel = (got.last_logits - ref.last_logits).norm() / ref.last_logits.norm()
    assert rel < 3e-2, rel
