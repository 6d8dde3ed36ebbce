"""Completing a pending attention-TP sum: reduce + residual add + RMSNorm, hidden 2048, bf16.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \
        torchrun --nproc_per_node 2 benchmarks/fused_reduce_norm.py

Columns (µs per call, median of 5 repeats, eager; the graph columns replay a CUDA graph):

* ``unfused``  — NCCL all-reduce, torch add, torch RMSNorm (HF ``Qwen3RMSNorm``): the baseline;
* ``symm+torch`` — symmetric-memory all-reduce, then the same torch ops;
* ``nccl+triton`` — NCCL all-reduce, then the Triton add + RMSNorm kernel;
* ``composed`` — symmetric-memory all-reduce, then the Triton kernel;
* ``fused``    — one Triton kernel reading every rank's partial from the symmetric buffer.

Each method is first checked (forward values, and gradients of partial, residual and weight
at a small size) against a float64 single-process reference.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, init_nccl, require_cuda, table, time_eager,  # noqa: E402
                                time_graph, write_results)
from megatron_ext.communication.fused_reduce_norm import (COMPOSED, FUSED, REFERENCE,  # noqa: E402
                                            add_rms_norm_reference, reduce_add_rms_norm)
from megatron_ext.parallel.groups import AxisGroup  # noqa: E402
from megatron_ext.communication.symm_mem import NCCL, SymmMemAllReduce  # noqa: E402

ROWS = [1, 8, 64, 256, 1024, 4096, 16384]
EPS = 1e-6


def inputs(rank, world, rows, hidden, seed, device, dtype):
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = [torch.randn(rows, hidden, generator=gen, device=device).to(dtype) for _ in range(world)]
    res = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=gen, device=device)).to(dtype)
    return parts, res, w


class NcclReducer(SymmMemAllReduce):
    """The same reducer forced onto NCCL (baseline columns)."""

    def method_for(self, nbytes, dtype=torch.bfloat16):  # noqa: D401
        return NCCL


def check(reducer, nccl_reducer, rank, world, hidden, device, dtype) -> list[str]:
    failures = []
    for rows in (1, 7, 300):
        parts, res, w = inputs(rank, world, rows, hidden, 11 + rows, device, dtype)
        y_ref, h_ref = add_rms_norm_reference(sum(p.double() for p in parts), res.double(),
                                              w.double(), EPS)
        # gradients of the float64 reference for a fixed upstream gradient
        gen = torch.Generator(device=device).manual_seed(5)
        gy = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
        gh = torch.randn(rows, hidden, generator=gen, device=device).to(dtype)
        p64 = sum(p.double() for p in parts).requires_grad_()
        r64, w64 = res.double().requires_grad_(), w.double().requires_grad_()
        y64, h64 = add_rms_norm_reference(p64, r64, w64, EPS)
        torch.autograd.backward([y64, h64], [gy.double(), gh.double()])
        outs = {}
        for name, red, method in (("unfused", nccl_reducer, REFERENCE), ("composed", reducer, COMPOSED),
                                  ("fused", reducer, FUSED)):
            part = red.partial_buffer((rows, hidden), dtype) if method == FUSED else \
                torch.empty(rows, hidden, device=device, dtype=dtype)
            part.copy_(parts[rank])
            part.requires_grad_()
            resid = res.clone().requires_grad_()
            wt = w.clone().requires_grad_()
            y, h = reduce_add_rms_norm(part, resid, wt, EPS, red, method)
            torch.autograd.backward([y, h], [gy, gh])
            outs[name] = (y.detach().clone(), h.detach().clone())
            for what, got, want in (("y", y, y_ref), ("h", h, h_ref), ("d partial", part.grad, p64.grad),
                                    ("d residual", resid.grad, r64.grad), ("d weight", wt.grad, w64.grad)):
                err = ((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item()
                if not err < 2e-2:
                    failures.append(f"{name} rows={rows} {what}: rel err {err:.2e}")
            same = outs[name][0].clone()
            dist.broadcast(same, src=0)
            if not torch.equal(same, outs[name][0]):
                failures.append(f"{name} rows={rows}: y differs across ranks")
        if not torch.equal(outs["fused"][1], outs["composed"][1]):
            d = (outs["fused"][1].float() - outs["composed"][1].float()).abs().max().item()
            failures.append(f"rows={rows}: fused h != composed h bitwise (max diff {d:.2e})")
    return failures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    require_cuda(__file__)
    dtype, hidden = torch.bfloat16, args.hidden
    rank, world, device = init_nccl()
    group = dist.new_group(list(range(world)))
    axis = AxisGroup("attn_tp", tuple(range(world)), rank, group)
    reducer = SymmMemAllReduce(axis, device)
    nccl_reducer = NcclReducer(AxisGroup("attn_tp", axis.ranks, rank, group), device)
    if rank == 0:
        print(f"device: {device_name()}; {reducer.describe()}", flush=True)
    failures = check(reducer, nccl_reducer, rank, world, hidden, device, dtype)
    if rank == 0:
        print("correctness:", "OK" if not failures else failures, flush=True)

    rows_out, results = [], []
    for rows in ROWS:
        parts, res, w = inputs(rank, world, rows, hidden, 3, device, dtype)
        nbytes = rows * hidden * 2
        plain = parts[rank].clone()
        slot = reducer.partial_buffer((rows, hidden), dtype)
        slot.copy_(parts[rank])
        fits = reducer.method_for(nbytes, dtype) != NCCL
        fns = {
            "unfused": lambda: reduce_add_rms_norm(plain, res, w, EPS, nccl_reducer, REFERENCE),
            "symm+torch": lambda: reduce_add_rms_norm(slot, res, w, EPS, reducer, REFERENCE),
            "nccl+triton": lambda: reduce_add_rms_norm(plain, res, w, EPS, nccl_reducer, COMPOSED),
            "composed": lambda: reduce_add_rms_norm(slot, res, w, EPS, reducer, COMPOSED),
        }
        if fits:
            fns["fused"] = lambda: reduce_add_rms_norm(slot, res, w, EPS, reducer, FUSED)
        r = {"rows": rows, "bytes": nbytes}
        with torch.no_grad():
            for name, fn in fns.items():
                r[name] = time_eager(fn, iters=30)
                r[name + "_graph"] = time_graph(fn, iters=10) if rows <= 4096 else None
        results.append(r)
        best = min((k for k in fns if k != "unfused"), key=lambda k: r[k])
        rows_out.append([rows, f"{nbytes / 2**20:.3g}", r["unfused"], r["symm+torch"],
                         r["nccl+triton"], r["composed"], r.get("fused"), best,
                         r["unfused"] / r[best], r["unfused_graph"], r["composed_graph"],
                         r.get("fused_graph")])
        if rank == 0:
            print(r, flush=True)
    if rank == 0:
        write_results("fused_reduce_norm", {"device": device_name(), "hidden": hidden,
                                            "results": results, "correctness_failures": failures})
        print(f"\nreduce + residual + RMSNorm (µs), {world} ranks, hidden {hidden}, bf16, "
              f"{device_name()}")
        print(table(["rows", "MB", "unfused", "symm+torch", "nccl+triton", "composed", "fused",
                     "best", "speedup", "unfused graph", "composed graph", "fused graph"],
                    rows_out), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
