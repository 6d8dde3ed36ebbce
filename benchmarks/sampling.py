"""The decode sampler on one GPU at serving batch sizes: µs per call of
:func:`megatron_ext.serving.sampling.sample_tokens` (temperature 0.7, top-p 0.9, a seed per
row; and greedy) on bf16 logits of Qwen3's 151936-token vocabulary, in CUDA graphs, against the
session-4 sampler measured in the same run (the float32 logits divided by the temperature,
then sorted: four radix passes of 32-bit keys instead of two of 16-bit ones). Both must draw
the same tokens (checked).

    python benchmarks/sampling.py [--rows 16 64 128 256]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import device_name, require_cuda, table, time_graph, write_results  # noqa: E402
from megatron_ext.serving import sampling  # noqa: E402
from megatron_ext.serving.sampling import SamplingParams, SamplingTensors, sample_tokens  # noqa: E402

VOCAB = 151936


def session4_filtered_probs(logits: torch.Tensor, params: SamplingTensors):
    """The previous sampler's distribution (same math, the sort on scaled float32 values)."""
    n, vocab = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    temp = torch.where(params.temperature > 0, params.temperature, 1.0).to(acc)
    scaled, order = torch.sort(logits.to(acc) / temp[:, None], dim=-1, descending=True)
    rank = torch.arange(vocab, device=logits.device)
    k = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), vocab)
    scaled = scaled.masked_fill(rank[None] >= k[:, None], float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    before = probs.cumsum(-1) - probs
    keep = (before < params.top_p.to(acc)[:, None]) | (rank[None] == 0)
    return probs * keep, order


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 64, 128, 256])
    args = parser.parse_args()
    require_cuda(__file__)
    dev = torch.device("cuda")
    out, rows_out = [], []
    current = sampling.filtered_probs
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
            sampling.filtered_probs = session4_filtered_probs
            try:
                old_tokens = sample_tokens(logits, sampled, t)
                t_old = time_graph(lambda: sample_tokens(logits, sampled, t))
            finally:
                sampling.filtered_probs = current
        same = bool(torch.equal(new_tokens, old_tokens))
        out.append(dict(rows=rows, greedy_us=t_greedy, sampled_us=t_new,
                        session4_sampled_us=t_old, same_tokens=same))
        rows_out.append([rows, t_greedy, t_old, t_new, None if not (t_old and t_new)
                         else t_old / t_new, same])
    print(f"sampler, vocab {VOCAB}, bf16 logits, CUDA graphs; {device_name()}")
    print(table(["rows", "greedy µs", "sampled µs (session 4)", "sampled µs", "speedup",
                 "same tokens"], rows_out))
    write_results("sampling", {"device": device_name(), "results": out})


if __name__ == "__main__":
    main()
