"""All-reduce latency over the attention-TP group, 4 KB – 32 MB: the project's symmetric-memory
path vs plain NCCL ``all_reduce``, in the same run.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 2 benchmarks/reduction_latency.py

Every method is first checked against a float64 sum of every rank's (regenerated) input.
Columns (µs per all-reduce, median of 5 repeats):

* ``nccl``        — ``dist.all_reduce`` in place on a plain tensor (the baseline);
* ``1shot``/``2shot`` — torch symmetric-memory kernels on a partial already in the symmetric
  slot (how ``row_parallel_linear_into`` leaves it); ``1shot+copy`` — input outside the buffer,
  copied in by the one-shot kernel itself; ``1shot triton`` — the project's one-barrier Triton
  kernel (``symm_kernels.py``);
* ``ours``        — ``SymmMemAllReduce.all_reduce`` with its size-based choice (``method``; the
  one-shot kernel is torch's in eager mode and the Triton one under graph capture);
* eager: back-to-back Python calls timed with CUDA events; graph: a CUDA graph of 20 calls.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, fmt_bytes, init_nccl, require_cuda, table,  # noqa: E402
                                time_eager, time_graph, write_results)
from megatron_ext.parallel.groups import AxisGroup  # noqa: E402
from megatron_ext.communication.symm_mem import (NCCL, ONE_SHOT, TWO_SHOT, SymmMemAllReduce,  # noqa: E402
                                            SymmMemConfig)

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 32 << 20]


def rank_input(rank: int, numel: int, seed: int, device, dtype) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(seed * 1000 + rank)
    return torch.randn(numel, generator=gen, device=device, dtype=torch.float32).to(dtype)


def check(reducer: SymmMemAllReduce, world: int, rank: int, device, dtype) -> list[str]:
    """Every method at a few sizes (odd sizes too) vs a float64 reference; poisoned outputs."""
    failures = []
    for seed, numel in enumerate([1, 8, 1000, 4096 * 3 + 8, 1 << 20, 3 << 20]):
        ref = sum(rank_input(r, numel, seed, device, dtype).double() for r in range(world))
        x = rank_input(rank, numel, seed, device, dtype)
        methods = [NCCL, "auto"]
        if numel * x.element_size() % 4 == 0:  # torch's kernels take whole 4-byte words only
            methods += [ONE_SHOT, TWO_SHOT, "1shot+copy", "2shot+copy", "1shot triton"]
        for method in methods:
            if method in ("1shot+copy", "2shot+copy"):
                out = reducer.all_reduce(x, ONE_SHOT if method.startswith("1") else TWO_SHOT)
            elif method == "auto":
                buf = reducer.partial_buffer(x.shape, dtype)
                buf.copy_(x)
                out = reducer.all_reduce(buf)
            elif method == NCCL:
                out = reducer.all_reduce(x, NCCL)
            elif method == "1shot triton":
                buf = reducer.partial_buffer(x.shape, dtype)
                buf.copy_(x)
                out = torch.full_like(x, float("nan"))
                reducer._one_shot_triton(buf, out)
            else:
                buf = reducer.partial_buffer(x.shape, dtype)
                buf.copy_(x)
                out = reducer.all_reduce(buf, method)
            err = ((out.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            same = torch.empty_like(out)
            same.copy_(out)
            dist.broadcast(same, src=0)
            identical = torch.equal(same, out)
            if not (err < 1e-2 and torch.isfinite(out).all() and identical):
                failures.append(f"{method} numel={numel}: rel err {err:.2e}, identical across "
                                f"ranks: {identical}")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    require_cuda(__file__)
    dtype = getattr(torch, args.dtype)
    rank, world, device = init_nccl()
    group = dist.new_group(list(range(world)))
    axis = AxisGroup("attn_tp", tuple(range(world)), rank, group)
    reducer = SymmMemAllReduce(axis, device, SymmMemConfig())
    if rank == 0:
        print(f"device: {device_name()}; world {world}; {reducer.describe()}", flush=True)
    if not reducer.enabled:
        raise SystemExit(f"symmetric memory is off: {reducer.reason}")
    failures = check(reducer, world, rank, device, dtype)
    if rank == 0:
        print("correctness:", "OK" if not failures else failures, flush=True)

    rows, results = [], []
    for nbytes in SIZES:
        numel = nbytes // torch.empty((), dtype=dtype).element_size()
        x = rank_input(rank, numel, 7, device, dtype)
        plain = x.clone()
        slot = reducer.partial_buffer((numel,), dtype)
        slot.copy_(x)
        out = torch.empty_like(x)
        gname = group.group_name
        fns = {
            "nccl": lambda: dist.all_reduce(plain, group=group),
            "1shot": lambda: torch.ops.symm_mem.one_shot_all_reduce_out(slot, "sum", gname, out),
            "1shot triton": lambda: reducer._one_shot_triton(slot, out),
            "2shot": lambda: torch.ops.symm_mem.two_shot_all_reduce_out(slot, "sum", gname, out),
            "1shot+copy": lambda: torch.ops.symm_mem.one_shot_all_reduce_copy_out(
                slot, x, "sum", gname, out),
            "ours": lambda: reducer.all_reduce(slot),
        }
        res = {"bytes": nbytes, "method": reducer.method_for(nbytes, dtype)}
        for name, fn in fns.items():
            res[f"{name}_eager"] = time_eager(fn)
            res[f"{name}_graph"] = time_graph(fn)
        plain.copy_(x)  # NCCL ran in place: keep values finite for the next size
        results.append(res)
        base_e, base_g = res["nccl_eager"], res["nccl_graph"]
        ours_e, ours_g = res["ours_eager"], res["ours_graph"]
        rows.append([fmt_bytes(nbytes), res["method"], base_e, res["1shot_eager"],
                     res["1shot triton_eager"], res["2shot_eager"], res["1shot+copy_eager"],
                     ours_e, base_e / ours_e, base_g, res["1shot_graph"],
                     res["1shot triton_graph"], res["2shot_graph"], ours_g,
                     (base_g / ours_g) if (base_g and ours_g) else None])
        if rank == 0:
            print(f"{fmt_bytes(nbytes)}: {res}", flush=True)
    if rank == 0:
        write_results("reduction_latency", {"device": device_name(), "world": world,
                                            "dtype": args.dtype, "results": results,
                                            "correctness_failures": failures})
        print(f"\nall-reduce latency (µs), {world} ranks, {args.dtype}, {device_name()}")
        print(table(["size", "ours→", "nccl", "1shot", "1shot triton", "2shot", "1shot+copy",
                     "ours", "speedup", "nccl graph", "1shot graph", "1shot triton graph",
                     "2shot graph", "ours graph", "speedup graph"], rows), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
