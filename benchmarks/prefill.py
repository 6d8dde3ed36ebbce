"""Prefill throughput of a Qwen3-MoE-shaped model on 2 GPUs, one sequence of 8K–64K tokens, under
several layouts of the same 2 ranks, with peak GPU memory per rank.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 2 benchmarks/prefill.py [--layers 12] [--seq 8192 16384 ...]

Model: preset ``bench-qwen3-moe`` (hidden 2048, 16 heads / 4 KV heads × 128, 64 experts top-8,
expert width 768, vocab 32000), ``--layers`` layers, bf16, random weights (routing roughly
uniform). Forward under ``no_grad`` of the whole model (embedding → LM head) on a
single ``[1, S]`` sequence; throughput = S / time (both GPUs together), median of ``--reps``
after one warm-up. Layouts:

* ``cp2 moe_dp1``  — attn_cp 2, MoE shard of 2 (moe_ep 2): MOE_FULL, token group k = 2;
* ``cp2 moe_dp2``  — attn_cp 2, every rank holds all experts (moe_dp 2): no MoE communication;
* ``tp2``          — attn_tp 2, moe_ep 2 (k = 1), NCCL reductions;
* ``tp2 symm``     — the same with the symmetric-memory fused reduce + residual + RMSNorm hook.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, init_nccl, require_cuda, table, time_long_forward,  # noqa: E402
                                write_results)
from megatron_ext.communication.fused_reduce_norm import build_symm_mem_reduce_add_norm  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.communication.symm_mem import SymmMemConfig  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402
from megatron_ext.models.config import ModelConfig  # noqa: E402
from megatron_ext.models.decoder import CausalLM  # noqa: E402
from megatron_ext.communication.local_batch import split_batch  # noqa: E402

LAYOUTS = {
    "cp2 moe_dp1": (dict(attn_cp=2, moe_ep=2, moe_tp=1), False),
    "cp2 moe_dp2": (dict(attn_cp=2, moe_dp=2, moe_ep=1, moe_tp=1), False),
    "tp2": (dict(attn_tp=2, moe_ep=2, moe_tp=1), False),
    "tp2 symm": (dict(attn_tp=2, moe_ep=2, moe_tp=1), True),
}

# 4 GPUs (issue 8): the seed's decoupled layout vs MoE DP = attention CP vs attention TP 4.
LAYOUTS_4GPU = {
    "tp2cp2 moe_dp1": (dict(attn_tp=2, attn_cp=2, moe_ep=4, moe_tp=1), False),  # k = 2
    "tp2cp2 moe_dp1 moe_tp4": (dict(attn_tp=2, attn_cp=2, moe_dp=1), False),    # seed: MoE TP 4
    "tp2cp2 moe_dp2": (dict(attn_tp=2, attn_cp=2, moe_ep=2, moe_tp=1), False),  # k = 1
    "tp4": (dict(attn_tp=4, moe_ep=4, moe_tp=1), False),
}


def run_layout(name, sizes, symm, cfg, seqs, reps, rank, world, device):
    groups = build_groups(Topology(world=world, **sizes))
    hook = None
    if symm:
        # one slot must hold a whole 64K-token partial: 64K × 2048 × 2 B = 256 MB
        hook = build_symm_mem_reduce_add_norm(groups, device, SymmMemConfig(
            slot_bytes=256 * 2**20, one_shot_max_bytes=4 * 2**20, two_shot_max_bytes=256 * 2**20))
    torch.manual_seed(0)
    model = CausalLM(cfg, groups, fused_reduce_add_norm=hook, dtype=torch.bfloat16,
                     device=device).eval()
    weights_gib = torch.cuda.memory_allocated() / 2**30
    out = {}
    for seq in seqs:
        gen = torch.Generator(device=device).manual_seed(seq)
        ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=gen, device=device)
        kwargs = split_batch(groups, ids).model_kwargs()
        res = time_long_forward(lambda: model(**kwargs, return_logits=False), seq, reps, world,
                                weights_gib)
        out[seq] = res
        if rank == 0:
            print(f"[{name}] S={seq}: {res}", flush=True)
    del model, hook
    gc.collect()
    torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, nargs="*", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--layouts", nargs="*", default=None,
                        help=f"2 GPUs: {list(LAYOUTS)}; 4 GPUs: {list(LAYOUTS_4GPU)}")
    args = parser.parse_args()
    require_cuda(__file__)
    rank, world, device = init_nccl()
    layouts = LAYOUTS_4GPU if world == 4 else LAYOUTS
    args.layouts = args.layouts or list(layouts)
    cfg = ModelConfig.preset("bench-qwen3-moe").replace(
        num_layers=args.layers, sparse_layers=(True,) * args.layers,
        max_position_embeddings=max(131072, max(args.seq)))
    if rank == 0:
        print(f"device: {device_name()}; model {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
              f"{cfg.num_experts} experts top-{cfg.num_experts_per_tok}", flush=True)
    results = {}
    for name in args.layouts:
        sizes, symm = layouts[name]
        try:
            results[name] = run_layout(name, sizes, symm, cfg, args.seq, args.reps, rank, world,
                                       device)
        except Exception as exc:  # noqa: BLE001 - name the layout, then stop both ranks
            print(f"[{name}] rank {rank} failed: {type(exc).__name__}: {str(exc)[:300]}",
                  flush=True)
            raise
    if rank == 0:
        write_results("prefill", {"device": device_name(), "layers": args.layers,
                                  "results": results})
        rows = []
        for seq in args.seq:
            row = [seq]
            for name in args.layouts:
                r = results.get(name, {}).get(seq, {})
                row.append(r.get("tok_per_s", r.get("error")))
            base = results.get("cp2 moe_dp2", {}).get(seq, {}).get("tok_per_s")
            ours = results.get("cp2 moe_dp1", {}).get(seq, {}).get("tok_per_s")
            row.append(ours / base if ours and base else None)
            row.append(" / ".join(
                "/".join(f"{p:.1f}" if p else "-" for p in
                         results.get(n, {}).get(seq, {}).get("peak_GiB_per_rank", []))
                for n in args.layouts))
            rows.append(row)
        print(f"\nprefill throughput (tokens/s, 2 GPUs together), {args.layers} layers, "
              f"{device_name()}")
        print(table(["seq"] + args.layouts + ["cp2 moe_dp1 / cp2 moe_dp2",
                                              "peak GiB per rank (" + ", ".join(args.layouts) + ")"],
                    rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
