"""The decode sampler on one GPU at serving batch sizes: µs per call of
:func:`megatron_ext.serving.sampling.sample_tokens` (temperature 0.7, top-p 0.9, a seed per
row; and greedy) on bf16 logits of Qwen3's 151936-token vocabulary, in CUDA graphs, against the
session-4 sampler measured in the same run (the float32 logits divided by the temperature,
then sorted without a tie rule; two torch cumsums over whole rows). "same draw": both picked
tokens of the same logit in every row (bf16 logits tie often: the session-4 sort left equal
logits in any order, the sampler now keeps them in vocabulary order); "same tokens": the same
token ids.

    python benchmarks/sampling.py [--rows 16 64 128 256]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import device_name, require_cuda, table, time_graph, write_results  # noqa: E402
from megatron_ext.serving.sampling import (SamplingParams, SamplingTensors,  # noqa: E402
                                           request_uniform, sample_tokens)

VOCAB = 151936


def session4_sample_tokens(logits: torch.Tensor, params: SamplingTensors,
                           counter: torch.Tensor) -> torch.Tensor:
    """The session-4 sampler, the same math: float32 logits divided by the temperature and
    sorted, the filtered mass and the CDF each one torch cumsum over the whole row."""
    greedy = logits.argmax(-1)
    n, vocab = logits.shape
    temp = torch.where(params.temperature > 0, params.temperature, 1.0).float()
    scaled, order = torch.sort(logits.float() / temp[:, None], dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), vocab)
    scaled = scaled.masked_fill(rank[None] >= k[:, None], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    keep = (probs.cumsum(-1) - probs < params.top_p.float()[:, None]) | (rank[None] == 0)
    probs = probs * keep
    cdf = probs.cumsum(-1)
    u = request_uniform(params.seed, counter.expand(n)).to(cdf.dtype) * cdf[:, -1]
    pick = torch.searchsorted(cdf, u[:, None].contiguous(), right=True)
    pick = torch.minimum(pick, (probs > 0).sum(-1, keepdim=True) - 1)
    sampled = order.gather(1, pick).squeeze(1)
    return torch.where(params.temperature > 0, sampled, greedy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 64, 128, 256])
    args = parser.parse_args()
    require_cuda(__file__)
    dev = torch.device("cuda")
    out, rows_out = [], []
    for rows in args.rows:
        logits = (torch.randn(rows, VOCAB, device=dev) * 3).bfloat16()
        sampled = SamplingTensors.build([SamplingParams(temperature=0.7, top_p=0.9, seed=r)
                                         for r in range(rows)], dev)
        greedy = SamplingTensors.build([SamplingParams()] * rows, dev)
        t = torch.tensor(7, device=dev)
        with torch.no_grad():
            new_tokens = sample_tokens(logits, sampled, t)
            t_new = time_graph(lambda: sample_tokens(logits, sampled, t))
            t_greedy = time_graph(lambda: sample_tokens(logits, greedy, t))
            old_tokens = session4_sample_tokens(logits, sampled, t)
            t_old = time_graph(lambda: session4_sample_tokens(logits, sampled, t))
        same = bool(torch.equal(new_tokens, old_tokens))
        same_draw = bool(torch.equal(logits.gather(1, new_tokens[:, None]),
                                     logits.gather(1, old_tokens[:, None])))
        out.append(dict(rows=rows, greedy_us=t_greedy, sampled_us=t_new,
                        session4_sampled_us=t_old, same_draw=same_draw, same_tokens=same))
        rows_out.append([rows, t_greedy, t_old, t_new, None if not (t_old and t_new)
                         else t_old / t_new, same_draw, same])
    print(f"sampler, vocab {VOCAB}, bf16 logits, CUDA graphs; {device_name()}")
    print(table(["rows", "greedy µs", "sampled µs (session 4)", "sampled µs", "speedup",
                 "same draw", "same tokens"], rows_out))
    write_results("sampling", {"device": device_name(), "results": out})


if __name__ == "__main__":
    main()
