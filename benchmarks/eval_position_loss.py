"""Throughput and peak memory of the eval job's ``position_loss`` (the whole evaluation forward:
embedding → LM head → vocabulary-parallel cross-entropy → per-bucket sums) on one long sequence,
on one GPU and with attention CP over 2 GPUs of the same host:

    python benchmarks/eval_position_loss.py                          # 1 GPU
    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 2 benchmarks/eval_position_loss.py  # attn_cp 2 (moe_ep 2)

Model: the ``qwen3-30b-a3b`` dimensions (hidden 2048, 32 heads / 4 KV heads × 128, 128 experts
top-8 of width 768, vocab 151936) cut to ``--layers`` layers, bf16, random weights (speed only).
Throughput = S / time of one ``evaluate_position_loss`` call (all GPUs together), median of
``--reps`` after one warm-up; a length that does not fit is reported as OOM.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, init_nccl, require_cuda, table,  # noqa: E402
                                time_forward_once, time_long_forward,
                                write_results)
from megatron_ext.evaluation.position_loss import (evaluate_position_loss,  # noqa: E402
                                                   position_buckets)
from megatron_ext.models.config import ModelConfig  # noqa: E402
from megatron_ext.models.decoder import CausalLM  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402


def hf_position_loss(cfg: ModelConfig, seqs, reps: int, device) -> dict:
    """The same work in ``transformers`` on one GPU (random bf16 weights of the same shape):
    logits of the whole sequence, per-position cross-entropy in float32, per-bucket sums."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    with torch.device(device):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d),
                                              dtype=torch.bfloat16).eval()
    out = {}
    for seq in seqs:
        ids = torch.randint(0, cfg.vocab_size, (1, seq), device=device)
        edges = position_buckets(seq, 16)

        def run():
            logits = hf(input_ids=ids).logits[0, :-1]
            loss = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:],
                                                     reduction="none")
            return [loss[lo - 1:hi - 1].sum() for lo, hi in zip(edges[:-1], edges[1:])]
        out[seq] = time_forward_once(run, seq, reps, aligned=False)
    return out   # the model goes with this frame


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, nargs="*", default=[32768, 65536, 131072])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--hf", action="store_true",
                        help="also time transformers (one GPU, rank 0 only) on the same model")
    args = parser.parse_args()
    require_cuda(__file__)
    rank, world, device = init_nccl()
    sizes = dict(attn_cp=world, moe_ep=world, moe_tp=1) if world > 1 else {}
    groups = build_groups(Topology(world=world, **sizes))
    cfg = ModelConfig.preset("qwen3-30b-a3b").replace(
        num_layers=args.layers, sparse_layers=(True,) * args.layers,
        max_position_embeddings=max(131072, max(args.seq)))
    torch.manual_seed(0)
    model = CausalLM(cfg, groups, dtype=torch.bfloat16, device=device).eval()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    layout = f"attn_cp {world}" if world > 1 else "1 GPU"
    results = {}
    for seq in args.seq:
        ids = torch.randint(0, cfg.vocab_size, (1, seq),
                            generator=torch.Generator(device=device).manual_seed(seq),
                            device=device)
        edges = position_buckets(seq, 16)
        res = time_long_forward(lambda: evaluate_position_loss(
            model, groups, ids, edges, vocab_size=cfg.vocab_size), seq, args.reps, world,
            weights_gib)
        results[seq] = res
        if rank == 0:
            print(f"[{layout}] S={seq}: {res}", flush=True)
    if args.hf and rank == 0:
        del model
        torch.cuda.empty_cache()
        hf = hf_position_loss(cfg, args.seq, args.reps, device)
        print(f"\ntransformers (1 GPU): {hf}", flush=True)
        results = {"megatron_ext": results, "transformers_1gpu": hf}
    if rank == 0:
        write_results(f"eval_position_loss_{world}gpu", {"device": device_name(),
                                                          "layers": args.layers,
                                                          "layout": layout, "results": results})
        ours = results["megatron_ext"] if args.hf else results
        rows = [[seq, r.get("tok_per_s", r.get("error")),
                 "/".join(f"{p:.1f}" if p else "-" for p in r["peak_GiB_per_rank"])]
                for seq, r in ours.items()]
        print(f"\nposition_loss, {layout}, {args.layers} layers, {device_name()}")
        print(table(["seq", "tokens/s", "peak GiB per rank"], rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
