"""One MoE layer on 2 GPUs (MoE shard = 2 ranks, ``"local"`` dispatcher, identical tokens on both
ranks): ONE reduction of (routed + shared) added locally vs routed and shared reduced separately.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 2 benchmarks/moe_layer.py [--moe-tp]

Shape: hidden 2048, 64 experts top-8, expert width 768, gated shared expert of width 4096
(Qwen2-MoE style: Qwen3-MoE has no shared expert, and without one there is nothing to merge),
bf16. Default layout: moe_ep 2 (32 experts per rank); ``--moe-tp`` splits every expert's width.
Columns (ms per call, median of 5 repeats of 10 calls; forward under ``no_grad``; fwd+bwd with a
fixed output gradient):

* ``two``      — routed partial and shared partial each all-reduced (NCCL), then added;
* ``one``      — routed + shared added locally, one NCCL all-reduce (the project's layer);
* ``one symm`` — the same single reduction through the symmetric-memory reducer.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, init_nccl, require_cuda, table, time_eager,  # noqa: E402
                                write_results)
from megatron_ext.layers.moe.moe_layer import MoELayer  # noqa: E402
from megatron_ext.communication.collectives import all_reduce  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.communication.symm_mem import SymmMemAllReduce, SymmMemConfig, all_reduce_sum  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402

TOKENS = [512, 1024, 2048, 4096, 8192, 16384]


def routed_and_shared(layer: MoELayer, x: torch.Tensor, with_stats: bool = True):
    """The layer's two partial sums, before ``MoELayer`` adds them (its own two parts)."""
    return layer.routed(x, with_stats=with_stats)[0], layer.shared_expert(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--moe-tp", action="store_true")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--expert-width", type=int, default=768)
    parser.add_argument("--shared-width", type=int, default=4096)
    parser.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    args = parser.parse_args()
    require_cuda(__file__)
    rank, world, device = init_nccl()
    sizes = dict(moe_tp=world, moe_ep=1) if args.moe_tp else dict(moe_ep=world, moe_tp=1)
    topo = Topology(world=world, attn_tp=world, **sizes)
    groups = build_groups(topo)
    shard = groups.moe_shard
    torch.manual_seed(0)  # same router/gate weights on every rank (replicated parameters)
    layer = MoELayer(args.hidden, args.experts, args.top_k, args.expert_width, groups,
                     shared_expert_intermediate_size=args.shared_width, shared_expert_gate=True,
                     dtype=torch.bfloat16, device=device)
    # k == 1: every shard rank holds the same tokens, so symmetric memory is allowed here
    reducer = SymmMemAllReduce(shard, device, SymmMemConfig(slot_bytes=64 * 2**20,
                                                            two_shot_max_bytes=64 * 2**20),
                               uniform_tokens=True)
    if rank == 0:
        print(f"device: {device_name()}; {topo}; {reducer.describe()}", flush=True)

    variants = {
        "two": lambda x: sum(all_reduce(p, shard) for p in routed_and_shared(layer, x)),
        "one": lambda x: all_reduce(layer(x).hidden, shard),
        "one symm": lambda x: all_reduce_sum(layer(x).hidden, reducer),
    }
    # correctness: the three agree (bf16), at 512 tokens
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(512, args.hidden, generator=gen, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        outs = {k: f(x).float() for k, f in variants.items()}
    ref = outs["one"]
    errs = {k: ((v - ref).norm() / ref.norm()).item() for k, v in outs.items()}
    if rank == 0:
        print("rel diff vs 'one':", errs, flush=True)

    results, rows = [], []
    for tokens in args.tokens:
        x = torch.randn(tokens, args.hidden, generator=gen, device=device, dtype=torch.bfloat16)
        xg = x.clone().requires_grad_()
        gout = torch.randn_like(x)
        r = {"tokens": tokens}
        torch.cuda.reset_peak_memory_stats()
        for name, fn in variants.items():
            with torch.no_grad():
                r[f"{name} fwd"] = time_eager(lambda: fn(x), iters=10, warmup=3) / 1000

            def step():
                for p in layer.parameters():
                    p.grad = None
                xg.grad = None
                fn(xg).backward(gout)
            r[f"{name} fwd+bwd"] = time_eager(step, iters=10, warmup=3) / 1000
        r["peak_GiB"] = torch.cuda.max_memory_allocated() / 2**30
        results.append(r)
        rows.append([tokens, r["two fwd"], r["one fwd"], r["one symm fwd"],
                     r["two fwd"] / r["one fwd"], r["two fwd"] / r["one symm fwd"],
                     r["two fwd+bwd"], r["one fwd+bwd"], r["one symm fwd+bwd"],
                     r["two fwd+bwd"] / r["one fwd+bwd"],
                     r["two fwd+bwd"] / r["one symm fwd+bwd"], r["peak_GiB"]])
        if rank == 0:
            print(r, flush=True)
    if rank == 0:
        tag = "moe_tp" if args.moe_tp else "moe_ep"
        write_results(f"moe_layer_{tag}", {"device": device_name(), "args": vars(args),
                                           "rel_diff": errs, "results": results})
        print(f"\nMoE layer (ms), {tag} {world}, hidden {args.hidden}, {args.experts} experts "
              f"top-{args.top_k}, width {args.expert_width}, shared {args.shared_width}, bf16, "
              f"{device_name()}")
        print(table(["tokens", "two fwd", "one fwd", "one symm fwd", "speedup", "speedup symm",
                     "two f+b", "one f+b", "one symm f+b", "speedup", "speedup symm",
                     "peak GiB"], rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
