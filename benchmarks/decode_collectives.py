"""The collectives of one decode layer at decode sizes, on 2 GPUs: symmetric memory (one Triton
kernel each, :mod:`megatron_ext.communication.symm_collectives`) against NCCL, inside CUDA graphs.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node 2 benchmarks/decode_collectives.py [--rows 16 64 256] [--sweep]

Messages of Qwen3-30B-A3B (32 query heads × 128, hidden 2048) per decode row: the CP partials
``[rows, 32, 129]`` float32 all-gathered (rows replicated over CP) or exchanged all-to-all (one
owner per row), the queries ``[rows, 4096]`` bf16 all-gathered, the MoE sum ``[rows, 2048]``
bf16 all-reduced. µs per call (a graph of 20 calls, median of 5 replays) and the bytes each rank
receives over the time. Every result is first checked against NCCL's (bit-equal for gathers and
exchanges; sums within float32-accumulation rounding). ``--sweep`` also times the exchange
kernel's launch settings (``EXCHANGE_LAUNCH``) and prints the fastest per message.

The decode step's fused step ("+ add + norm": the MoE sum with the residual add and the next
RMSNorm, one kernel) is timed three ways — NCCL then the add + norm kernel, the symmetric
all-reduce then that kernel (``fuse`` off), and the fused kernel — and checked bit-equal to the
unfused symmetric one.
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, fmt_bytes, init_nccl, require_cuda, table,  # noqa: E402
                                time_graph, write_results)
from megatron_ext.communication import symm_collectives as sc  # noqa: E402
from megatron_ext.communication.collectives import (all_gather, all_reduce, all_to_all,  # noqa: E402
                                                    fused_all_reduce_add_norm)
from megatron_ext.layers.norm import RMSNorm  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402

SWEEP = dict(block=(1024, 2048, 4096), num_warps=(4, 8), programs_per_sm=(1, 2, 4))


def messages(rows: int, device) -> dict:
    """name → (collective, input) of a decode layer with ``rows`` rows (per rank)."""
    g = torch.Generator(device=device).manual_seed(rows + dist.get_rank())
    partials = torch.randn(rows, 32, 129, generator=g, device=device)
    return {
        "all-gather CP partials f32": ("gather", partials),
        "all-to-all CP partials f32": ("a2a", partials),
        "all-gather queries bf16": ("gather", torch.randn(rows, 4096, generator=g,
                                                          device=device).bfloat16()),
        "all-reduce MoE sum bf16": ("sum", torch.randn(rows, 2048, generator=g,
                                                       device=device).bfloat16()),
        "all-reduce MoE sum + add + norm": ("sum_norm", torch.randn(rows, 2048, generator=g,
                                                                    device=device).bfloat16()),
    }


FUSED_KINDS = ("sum_norm",)


def _norm_and_residual(x: torch.Tensor):
    norm = RMSNorm(x.shape[-1], 1e-6, dtype=x.dtype, device=x.device)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5, generator=torch.Generator(x.device).manual_seed(3))
    return norm, torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(4),
                             device=x.device).to(x.dtype)


def run(kind: str, x: torch.Tensor, axis, extra=None):
    """One collective (or fused decode step) of ``kind``; the fused kind takes its fused kernel
    where ``axis.fast`` serves and fuses, else the collective and then the kernel."""
    world = axis.size
    if kind == "gather":
        return all_gather(x, axis)
    if kind == "a2a":
        n = x.shape[0] // world
        return all_to_all(x, axis, [n] * world, [n] * world)
    if kind == "sum_norm":
        norm, residual = extra
        fused = fused_all_reduce_add_norm(x, residual, norm, axis)
        return fused if fused is not None else norm.add_norm(all_reduce(x, axis), residual)
    return all_reduce(x, axis)


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return all(_equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


def received_bytes(kind: str, x: torch.Tensor, world: int) -> int:
    """Bytes a rank pulls from its peers."""
    n = x.numel() * x.element_size()
    return n * (world - 1) // (world if kind == "a2a" else 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    require_cuda(__file__)
    rank, world, device = init_nccl()
    groups = sc.with_symm_collectives(build_groups(Topology(world=world, attn_cp=world)), device)
    axis = groups.attn_cp
    fast = axis.fast
    rows_out, results, fused_out = [], [], []
    default = dict(sc.EXCHANGE_LAUNCH)
    launches = [dict(zip(SWEEP, c)) for c in itertools.product(*SWEEP.values())] \
        if args.sweep else [default]
    for rows in args.rows:
        for name, (kind, x) in messages(rows, device).items():
            if kind in FUSED_KINDS:
                extra = _norm_and_residual(x) if kind == "sum_norm" else None
                with torch.no_grad():
                    timed = {}
                    for label, active, fuse in (("nccl", False, False), ("symm", True, False),
                                                ("fused", True, True)):
                        fast.active, fast.fuse = active, fuse
                        got = run(kind, x, axis, extra)
                        got = tuple(t.clone() for t in got) if isinstance(got, tuple) \
                            else got.clone()
                        timed[label] = (time_graph(lambda: run(kind, x, axis, extra)), got)
                    fast.active, fast.fuse = True, True
                same = _equal(timed["fused"][1], timed["symm"][1])
                t = {k: v[0] for k, v in timed.items()}
                r = dict(rows=rows, message=name, nccl_us=t["nccl"], symm_us=t["symm"],
                         fused_us=t["fused"], fused_equal_to_symm=same)
                results.append(r)
                fused_out.append([rows, name, t["nccl"], t["symm"], t["fused"],
                                  None if not (t["symm"] and t["fused"]) else
                                  t["symm"] / t["fused"], "=" if same else "DIFF"])
                if rank == 0:
                    print(r, flush=True)
                continue
            with torch.no_grad():
                fast.active = False
                want = run(kind, x, axis).clone()
                nccl = time_graph(lambda: run(kind, x, axis))
                fast.active = True
                timed = []
                for launch in launches:
                    sc.EXCHANGE_LAUNCH.update(launch)
                    got = run(kind, x, axis)
                    same = torch.equal(got, want) if kind != "sum" else bool(
                        ((got.float() - want.float()).abs()
                         <= 1e-2 * want.float().abs() + 1e-2).all())
                    timed.append((time_graph(lambda: run(kind, x, axis)), same, launch))
                sc.EXCHANGE_LAUNCH.update(default)
            ours = next(t for t in timed if t[2] == default)
            fastest = min((t for t in timed if t[0] is not None), key=lambda t: t[0])
            got_bytes = received_bytes(kind, x, world)
            r = dict(rows=rows, message=name, bytes_per_rank=x.numel() * x.element_size(),
                     nccl_us=nccl, symm_us=ours[0], equal_to_nccl=all(t[1] for t in timed),
                     fastest_launch=fastest[2], fastest_us=fastest[0])
            results.append(r)
            rows_out.append([rows, name, fmt_bytes(r["bytes_per_rank"]), nccl, ours[0],
                             None if not (nccl and ours[0]) else nccl / ours[0],
                             None if not ours[0] else got_bytes / ours[0] / 1e3,
                             r["equal_to_nccl"], fastest[0] if args.sweep else None,
                             str(fastest[2]) if args.sweep else ""])
            if rank == 0:
                print(r, flush=True)
    if rank == 0:
        print(f"\nDecode collectives over {world} GPUs ({device_name()}), CUDA graphs; "
              f"symm launch {default}")
        print(table(["rows", "message", "bytes/rank", "NCCL µs", "symm µs", "NCCL / symm",
                     "symm GB/s in", "equal", "fastest µs", "fastest launch"], rows_out))
        print("\nFused decode steps (the collective and its consumer kernel in one kernel):")
        print(table(["rows", "step", "NCCL + kernel µs", "symm + kernel µs", "fused µs",
                     "unfused / fused", "bits vs unfused"], fused_out))
        write_results("decode_collectives", {"device": device_name(), "world": world,
                                             "launch": default, "results": results})
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
