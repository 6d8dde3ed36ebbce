"""1-rank CPU forward of an HF model: megatron_ext (`CausalLM`, with the loss) vs transformers
(logits only), one window, best of ``--repeats`` after a warm-up (BENCHMARKS §14).

    python benchmarks/cpu_forward.py --model <HF dir> --seq-len 2048
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from megatron_ext.communication.local_batch import split_batch
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.groups import ParallelGroups


def best_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(args.model, groups).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    batch = split_batch(groups, ids, ids)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        ours = best_seconds(lambda: model(**batch.model_kwargs()), args.repeats)
        theirs = best_seconds(lambda: hf(ids), args.repeats)
    print(json.dumps({"seq_len": args.seq_len, "ours_s": ours, "transformers_s": theirs,
                      "ratio": ours / theirs}))


if __name__ == "__main__":
    main()
