"""1-rank CPU forward of an HF model, megatron_ext vs transformers doing the same work: the
logits of one ``--seq-len`` window and the next-token loss over them (ours: ``CausalLM`` with
shifted labels, per-token loss; transformers: ``model(ids, labels=ids)``, which shifts inside),
under ``torch.no_grad`` as evaluation runs. The two run interleaved in one process (ours,
theirs, ours, …) so load from other processes hits both alike; each side's best of
``--repeats`` after a warm-up in wall-clock seconds and in CPU seconds of the process (user +
system, all threads: less sensitive to being descheduled on a shared machine), and the mean
losses side by side (BENCHMARKS §14).

    python benchmarks/cpu_forward.py --model <HF dir> [--seq-len 2048] [--repeats 5] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch

from megatron_ext.communication.local_batch import split_batch
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.groups import ParallelGroups


def _cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_SELF)
    return use.ru_utime + use.ru_stime


def seconds(fn) -> tuple[float, float, object]:
    """``(wall seconds, CPU seconds, result)`` of one call."""
    cpu, start = _cpu(), time.perf_counter()
    out = fn()
    return time.perf_counter() - start, _cpu() - cpu, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    groups = ParallelGroups.single_process()
    model = CausalLM.from_pretrained(args.model, groups).eval()
    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, args.seq_len),
                        generator=torch.Generator().manual_seed(0))
    labels = torch.cat([ids[:, 1:], torch.full((1, 1), -100)], dim=1)
    batch = split_batch(groups, ids, labels)

    def ours() -> float:
        out = model(**batch.model_kwargs())
        return float(out.loss.sum() / (labels != -100).sum())

    def theirs() -> float:
        return float(hf(ids, labels=ids).loss)

    wall: dict[str, list[float]] = {"ours": [], "transformers": []}
    cpu: dict[str, list[float]] = {"ours": [], "transformers": []}
    losses = {}
    load = os.getloadavg()[0]
    with torch.no_grad():
        ours(), theirs()  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("transformers", theirs)):
                t, c, losses[name] = seconds(fn)
                wall[name].append(round(t, 3))
                cpu[name].append(round(c, 3))
    best, best_cpu = ({k: min(v) for k, v in d.items()} for d in (wall, cpu))
    print(json.dumps({"seq_len": args.seq_len, "threads": args.threads,
                      "repeats": args.repeats, "load_avg_1m": [load, os.getloadavg()[0]],
                      "ours_s": best["ours"], "transformers_s": best["transformers"],
                      "ratio": round(best["ours"] / best["transformers"], 3),
                      "ours_cpu_s": best_cpu["ours"],
                      "transformers_cpu_s": best_cpu["transformers"],
                      "cpu_ratio": round(best_cpu["ours"] / best_cpu["transformers"], 3),
                      "wall_s": wall, "cpu_s": cpu,
                      "loss_ours": losses["ours"], "loss_transformers": losses["transformers"]}))


if __name__ == "__main__":
    main()
