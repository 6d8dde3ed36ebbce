"""The eval job's passkey grid and position-loss curve computed by ``transformers`` alone (one
process, same prompts, windows and buckets as ``examples/eval.py``), to put beside the job's
numbers in docs and BENCHMARKS:

    python scripts/eval_transformers_reference.py --model runs/hf --lengths 1K,2K \\
        --depths 0,0.25,0.5,0.75,1 --samples-per-cell 2 --seq-len 2048 --num-samples 2 \\
        --output runs/eval/transformers.json

Needs ``transformers`` (not a product dependency). The model directory must hold its tokenizer
(``--tokenizer`` defaults to the model directory).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def main() -> None:
    from transformers import AutoModelForCausalLM

    from megatron_ext.cli.eval import _float_list, _int_list
    from megatron_ext.data.dataset import open_dataset
    from megatron_ext.data.tokenizer import load_tokenizer
    from megatron_ext.evaluation.passkey import PasskeyBuilder
    from megatron_ext.evaluation.position_loss import position_buckets
    from megatron_ext.evaluation.retrieval import cell_key, cell_rng, is_exact_match
    from megatron_ext.evaluation.windows import window_batch

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--lengths", type=_int_list, default=(1024,))
    p.add_argument("--depths", type=_float_list, default=(0.0, 0.25, 0.5, 0.75, 1.0))
    p.add_argument("--samples-per-cell", type=int, default=2)
    p.add_argument("--answer-tokens", type=int, default=16)
    p.add_argument("--passkey-digits", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=0, help="position loss windows (0: skip)")
    p.add_argument("--num-samples", type=int, default=2)
    p.add_argument("--num-buckets", type=int, default=16)
    p.add_argument("--data", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="weights' dtype (the per-position loss is taken in float64 either way)")
    p.add_argument("--output", required=True)
    args = p.parse_args()

    tok = load_tokenizer(args.tokenizer or args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    out: dict = {"model": args.model, "passkey": {}, "position_loss": None}
    builder = PasskeyBuilder(tok, args.passkey_digits)
    start = time.perf_counter()
    for length in args.lengths:
        for j, depth in enumerate(args.depths):
            rng = cell_rng(args.seed, length, j)
            samples = [builder.sample(length, depth, rng) for _ in range(args.samples_per_cell)]
            ids = torch.as_tensor(np.stack([s.prompt_ids for s in samples])).to(args.device)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.answer_tokens, do_sample=False,
                                     eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
            right = 0
            for s, row in zip(samples, gen[:, length:].tolist()):
                row = row[:row.index(tok.eos_id)] if tok.eos_id in row else row
                right += is_exact_match(tok.decode(row), s.answer)
            out["passkey"][cell_key(length, depth)] = right / len(samples)
            print(f"{cell_key(length, depth)}: {right}/{len(samples)} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    if args.seq_len:
        dataset = open_dataset(args.data, tok)
        edges = position_buckets(args.seq_len, args.num_buckets)
        sums, counts = np.zeros(len(edges) - 1), np.zeros(len(edges) - 1, dtype=np.int64)
        for i in range(args.num_samples):
            ids = window_batch(dataset, range(i, i + 1), args.seq_len, args.device)
            with torch.no_grad():
                logits = model(input_ids=ids).logits.double()
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            for b, (lo, hi) in enumerate(zip(edges[:-1], edges[1:])):
                sums[b] += float(loss[lo - 1:hi - 1].sum().cpu())
                counts[b] += hi - lo
        out["position_loss"] = {"edges": list(edges), "loss_sum": sums.tolist(),
                                "tokens": counts.tolist(),
                                "mean_loss": (sums / np.maximum(counts, 1)).tolist()}
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
