"""The decode sampler: its filtered distribution equals transformers' temperature → top-k →
top-p warpers, its draws follow that distribution, greedy rows are the argmax, and parameters are
validated."""
from __future__ import annotations

import pytest
import torch

from megatron_ext.serving.sampling import (SamplingParams, SamplingTensors, filtered_probs,
                                           request_uniform, sample_tokens)

CASES = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=7),
         SamplingParams(temperature=0.9, top_p=0.8), SamplingParams(temperature=2.0, top_k=12,
                                                                    top_p=0.6),
         SamplingParams(temperature=1.0, top_p=0.05)]


def _vocab_order(probs: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    full = torch.zeros_like(probs).scatter(1, order, probs)
    return full / full.sum(-1, keepdim=True)


def test_filtered_distribution_matches_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64) * 3
    for p in CASES:
        scores = TemperatureLogitsWarper(p.temperature)(None, logits.clone())
        if p.top_k:
            scores = TopKLogitsWarper(p.top_k)(None, scores)
        if p.top_p < 1:
            scores = TopPLogitsWarper(p.top_p)(None, scores)
        want = torch.softmax(scores, -1)
        got = _vocab_order(*filtered_probs(logits, p))
        assert torch.equal(got > 0, want > 0), p
        torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_draws_follow_the_filtered_distribution():
    """20000 requests with the same logits and seeds 0..19999 (one batched call): token
    frequencies within 4 sigma of the filtered probabilities; filtered tokens never come up."""
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.2, -1.0, 0.7]], dtype=torch.float64)
    n = 20000
    for p in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.8, top_k=3),
              SamplingParams(temperature=1.2, top_p=0.7)):
        params = SamplingTensors.build([p] * n, "cpu")
        params.seed = torch.arange(n)
        tokens = sample_tokens(logits.expand(n, -1), params, torch.tensor(5))
        freq = torch.bincount(tokens, minlength=6).double() / n
        want = _vocab_order(*filtered_probs(logits, p))[0]
        sigma = (want * (1 - want) / n).sqrt()
        assert ((freq - want).abs() <= 4 * sigma + 1e-12).all(), (p, freq, want)


def test_uniforms_are_a_pure_function_of_seed_and_counter():
    seeds = torch.tensor([0, 1, 2 ** 62, 12345] * 2500)
    counters = torch.arange(10000)
    u = request_uniform(seeds, counters)
    assert torch.equal(u, request_uniform(seeds.clone(), counters.clone()))
    assert u.min() >= 0 and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.005
    assert not torch.equal(request_uniform(seeds + 1, counters), u)


def test_greedy_rows_take_the_argmax_in_a_mixed_batch():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(1))
    params = SamplingTensors.build([SamplingParams(), SamplingParams(temperature=1.0, seed=3),
                                    SamplingParams(top_k=1, temperature=5.0),
                                    SamplingParams(temperature=0.5, seed=9)], "cpu")
    got = sample_tokens(logits, params, torch.tensor(4))
    assert got[0] == logits[0].argmax() and got[2] == logits[2].argmax()


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_new_tokens=0), "max_new_tokens=0 must be a positive int"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number >= 0"),
    (dict(top_k=-1), "top_k=-1 must be an int >= 0"),
    (dict(top_p=1.5), "top_p=1.5 must be in \\(0, 1\\]"),
    (dict(seed=-2), "seed=-2 must be an int in \\[0, 2\\*\\*63\\)"),
])
def test_bad_sampling_parameters_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_equal_logits_are_ordered_by_vocabulary_index():
    """The sampler's order (the inverse CDF walks it) is descending logit, ties in vocabulary
    order, for logits of any dtype — bf16 logits are sorted as they come, before the
    temperature: the same order as their float64 values divided by it."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        logits = (torch.randint(-4, 5, (3, 50), generator=g) / 4).to(dtype)   # many ties
        params = SamplingTensors.build([SamplingParams(temperature=t, top_p=0.9)
                                        for t in (0.3, 1.0, 7.0)], "cpu")
        _, order = filtered_probs(logits, params)
        for row, temp in enumerate((0.3, 1.0, 7.0)):
            scaled = logits[row].double() / temp
            want = sorted(range(50), key=lambda i: (-scaled[i].item(), i))
            assert order[row].tolist() == want, (dtype, row)


def test_chunked_running_sum_matches_cumsum():
    """The sampler's running sum in chunks equals a float64 cumsum to rounding, is monotone for
    non-negative input, and equals torch's cumsum when a row fits one chunk."""
    from megatron_ext.serving.sampling import SCAN_CHUNK, cumsum_rows

    g = torch.Generator().manual_seed(6)
    for vocab in (7, SCAN_CHUNK, SCAN_CHUNK + 1, 3 * SCAN_CHUNK + 17):
        x = torch.rand(3, vocab, generator=g) ** 4
        got = cumsum_rows(x)
        assert got.shape == x.shape
        torch.testing.assert_close(got.double(), x.double().cumsum(-1), rtol=1e-6, atol=1e-5)
        assert (got[:, 1:] >= got[:, :-1]).all()
        if vocab <= SCAN_CHUNK:
            assert torch.equal(got, x.cumsum(-1))
