"""2+ GPUs: the symmetric-memory collectives equal NCCL's, eagerly and replayed from a CUDA
graph; the fused decode step (MoE sum + residual add + RMSNorm, one kernel) equals NCCL followed
by the unfused kernel, bit for bit.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc-per-node 2 scripts/symm_collectives_check.py

Gathers and all-to-all must match bit for bit; sums must equal the float32 sum in group-rank
order rounded once (what the kernel computes) and agree with NCCL's sum to bf16 rounding.
Prints one line per check and exits 1 on any failure.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import init_nccl, require_cuda  # noqa: E402
from megatron_ext.communication import collectives as C  # noqa: E402
from megatron_ext.communication.symm_collectives import with_symm_collectives  # noqa: E402
from megatron_ext.layers.norm import RMSNorm  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402


def _ops(group, x, xs):
    w = group.size
    return {
        "all_gather": C.all_gather(x, group, backward="own_rows"),
        "all_reduce": C.all_reduce(x, group),
        "reduce_scatter": C.reduce_scatter(xs, group),
        "all_to_all": C.all_to_all(xs, group, [xs.shape[0] // w] * w, [xs.shape[0] // w] * w),
    }


def _reference_sums(group, x, xs):
    """The float32 sums in group-rank order, rounded once (NCCL gathers the pieces)."""
    w = group.size
    pieces = C.all_gather(x.float(), group, backward="own_rows").view(w, *x.shape)
    whole = pieces[0].clone()
    for r in range(1, w):
        whole += pieces[r]
    pieces_s = C.all_gather(xs.float(), group, backward="own_rows").view(w, *xs.shape)
    total = pieces_s[0].clone()
    for r in range(1, w):
        total += pieces_s[r]
    n = xs.shape[0] // w
    return whole.to(x.dtype), total[group.rank * n:(group.rank + 1) * n].to(xs.dtype)


def _fused_steps(g_fast, g_nccl, rows: int, gen, device) -> dict:
    """name → (fused result, unfused reference through NCCL)."""
    w = g_fast.size
    out = {}
    x = torch.randn(rows, 2048, device=device, dtype=torch.bfloat16, generator=gen)
    residual = torch.randn(rows, 2048, device=device, dtype=torch.bfloat16, generator=gen)
    norm = RMSNorm(2048, 1e-6, dtype=torch.bfloat16, device=device)
    norm.weight.uniform_(0.5, 1.5, generator=gen)
    fused = C.fused_all_reduce_add_norm(x, residual, norm, g_fast)
    summed = _reference_sums(g_nccl, x, x.repeat(w, 1))[0]   # rank-order float32, one rounding
    out["all_reduce + add + rms_norm"] = (fused, norm.add_norm(summed, residual))
    return out


def main() -> int:
    require_cuda(__file__)
    rank, world, device = init_nccl()
    nccl = build_groups(Topology(world=world, attn_cp=world, moe_tp=world))
    fast = with_symm_collectives(nccl, device)
    g_fast, g_nccl = fast.attn_cp, nccl.attn_cp
    failures = 0

    def check(name, ok, detail=""):
        nonlocal failures
        failures += 0 if ok else 1
        if rank == 0:
            print(f"{'PASS' if ok else 'FAIL'} {name} {detail}", flush=True)

    check("symmetric collectives enabled", g_fast.fast is not None,
          "" if g_fast.fast is not None else "(no fast path on attn_cp)")
    if g_fast.fast is None:
        return 1
    gen = torch.Generator(device=device).manual_seed(rank)
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            for rows in (1, 32, 256, 1000):
                cols = 2048 if dtype == torch.bfloat16 else 129
                x = torch.randn(rows, cols, device=device, dtype=dtype, generator=gen)
                xs = torch.randn(rows * world, cols, device=device, dtype=dtype, generator=gen)
                got, want = _ops(g_fast, x, xs), _ops(g_nccl, x, xs)
                ref_all, ref_rs = _reference_sums(g_nccl, x, xs)
                tag = f"{dtype} rows={rows}"
                for op in ("all_gather", "all_to_all"):
                    check(f"{op} == NCCL", torch.equal(got[op], want[op]), tag)
                check("all_reduce == rank-order float32 sum", torch.equal(got["all_reduce"], ref_all), tag)
                check("reduce_scatter == rank-order float32 sum",
                      torch.equal(got["reduce_scatter"], ref_rs), tag)
                for op in ("all_reduce", "reduce_scatter"):
                    err = (got[op].float() - want[op].float()).abs().max().item()
                    check(f"{op} ~ NCCL", err <= 2e-2 * want[op].float().abs().max().item(),
                          f"{tag} max err {err:.3g}")
        for rows in (1, 16, 64, 250):
            for name, (fused, want) in _fused_steps(g_fast, g_nccl, rows, gen, device).items():
                ok = fused is not None and (all(torch.equal(a, b) for a, b in zip(fused, want))
                                            if isinstance(want, tuple) else
                                            torch.equal(fused, want))
                check(f"fused {name} == NCCL + kernel", ok, f"rows={rows}")
        # replayed from a CUDA graph with new inputs each time
        x = torch.zeros(64, 2048, device=device, dtype=torch.bfloat16)
        xs = torch.zeros(64 * world, 2048, device=device, dtype=torch.bfloat16)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _ops(g_fast, x, xs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = _ops(g_fast, x, xs)
            outs2 = _ops(g_fast, outs["all_reduce"][:64], outs["all_to_all"])  # chained
        for step in range(5):
            x.copy_(torch.randn(x.shape, device=device, dtype=x.dtype, generator=gen))
            xs.copy_(torch.randn(xs.shape, device=device, dtype=xs.dtype, generator=gen))
            graph.replay()
            want = _ops(g_nccl, x, xs)
            want2 = _ops(g_nccl, want["all_reduce"][:64], want["all_to_all"])
            for op in ("all_gather", "all_to_all"):
                check(f"graph replay {step} {op}", torch.equal(outs[op], want[op]) and
                      torch.equal(outs2[op].float(), want2[op].float()) if op == "all_to_all"
                      else torch.equal(outs[op], want[op]))
            ref_all, _ = _reference_sums(g_nccl, x, xs)
            check(f"graph replay {step} all_reduce", torch.equal(outs["all_reduce"], ref_all))
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    if rank == 0:
        print(f"{failures} failure(s)", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
