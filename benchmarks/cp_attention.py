"""Benchmark: context-parallel causal attention, forward + backward, on CUDA (torchrun, NCCL).

    torchrun --nproc_per_node=2 benchmarks/cp_attention.py --json cp_attention.json

For each shape (bf16; MHA 16 x 128 and GQA 16/4 x 128 by default) and sequence length
(16K-128K) it times one forward + backward and records peak attention memory per GPU for

* ``sdpa cp1``   torch ``scaled_dot_product_attention`` (flash), whole sequence on one GPU;
* ``ours cp1``   :func:`context_parallel_attention` on a one-rank group (same flash kernels);
* ``ours cp{N}`` the same over all launched GPUs, strategies ``all_gather`` and ``p2p``
  (the plan is built once per shape and passed in, as the models do);
* ``te cp{N}``   TransformerEngine's ``DotProductAttention`` with ``cp_group`` (``cp_comm_type``
  ``p2p``, ``all_gather`` and ``a2a``; cuDNN fused attention), where TE imports;
* ``torch cp{N}`` torch's ``torch.distributed.tensor.experimental.context_parallel`` (flash SDPA,
  head-tail load balance, rotate methods ``allgather`` and ``alltoall``) on the same shapes in
  the same run.

Time: median of ``--iters`` CUDA-event timings after ``--warmup`` steps, max over ranks
(each rank's median kept in the JSON).
Memory: peak allocated during one step minus allocated before it, plus the step's local
inputs (q, k, v, dout) — i.e. what attention needs on one GPU. ``--check`` first compares
outputs and gradients of every CP path with a float64 reference on a small problem.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import require_cuda  # noqa: E402
from megatron_ext.layers.attention import attention_math  # noqa: E402
from megatron_ext.layers.attention.cp_attention import backend_name, context_parallel_attention  # noqa: E402
from megatron_ext.layers.attention.cp_plan import plan_cp_attention  # noqa: E402
from megatron_ext.data.cp_split import split_batch_for_cp  # noqa: E402
from megatron_ext.parallel.groups import AxisGroup, build_groups, init_distributed  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402

GB = 1 << 30


def log0(*a):
    if dist.get_rank() == 0:
        print(*a, flush=True)


# ------------------------------------------------------------------------------ measurement
def measure(step, warmup: int, iters: int, input_bytes: int) -> dict:
    """Median step time (ms, max over ranks) and peak attention memory (GiB, max over ranks)."""
    for i in range(warmup):
        if i == warmup - 1:  # the last warm-up step doubles as the memory measurement
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        step()
    torch.cuda.synchronize()
    mem = torch.cuda.max_memory_allocated() - before + input_bytes
    dist.barrier()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    mine = torch.tensor([statistics.median(times), mem / GB], device="cuda")
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    t = torch.stack(every).amax(0)
    return {"ms": round(t[0].item(), 3), "mem_gib": round(t[1].item(), 3),
            "ms_per_rank": [round(e[0].item(), 3) for e in every]}


def _rand(*shape, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.bfloat16)


def ours(S: int, hq: int, hkv: int, d: int, group: AxisGroup, strategy: str):
    cp = group.size
    batch = split_batch_for_cp(torch.zeros(1, S, dtype=torch.long), None, cp, group.rank)
    tok = batch.token_index.cuda()
    L = S // cp
    q = _rand(1, L, hq, d, seed=1).requires_grad_()
    k = _rand(1, L, hkv, d, seed=2).requires_grad_()
    v = _rand(1, L, hkv, d, seed=3).requires_grad_()
    dout = _rand(1, L, hq, d, seed=4)
    # built once and reused, as the models do (one plan per batch for every layer)
    plan = plan_cp_attention(q, k, v, group, token_index=tok, strategy=strategy)

    def step():
        out = context_parallel_attention(q, k, v, group, strategy=strategy, plan=plan,
                                         backend="torch")
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    return step, nbytes, contextlib.ExitStack()


def te_cp(S: int, hq: int, hkv: int, d: int, group: AxisGroup, comm_type: str):
    """TE's own CP attention on the same zigzag-split inputs (TE's split, as ours)."""
    from megatron_ext.layers.attention.attention_math import default_scale
    from megatron_ext.layers.attention.te_attention import te_context_parallel_attention

    L = S // group.size
    q = _rand(1, L, hq, d, seed=1).requires_grad_()
    k = _rand(1, L, hkv, d, seed=2).requires_grad_()
    v = _rand(1, L, hkv, d, seed=3).requires_grad_()
    dout = _rand(1, L, hq, d, seed=4)
    scale = default_scale(d)

    def step():
        out = te_context_parallel_attention(q, k, v, group, strategy=comm_type,
                                            softmax_scale=scale)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    return step, nbytes, contextlib.ExitStack()


def sdpa_single(S: int, hq: int, hkv: int, d: int):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = _rand(1, S, hq, d, seed=1).requires_grad_()
    k = _rand(1, S, hkv, d, seed=2).requires_grad_()
    v = _rand(1, S, hkv, d, seed=3).requires_grad_()
    dout = _rand(1, S, hq, d, seed=4)
    gqa = {"enable_gqa": True} if hq != hkv else {}

    def step():
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True, **gqa)
        out.backward(dout.transpose(1, 2))
        q.grad = k.grad = v.grad = None

    nbytes = sum(t.numel() * t.element_size() for t in (q, k, v, dout))
    return step, nbytes, contextlib.ExitStack()


def torch_cp(S: int, hq: int, hkv: int, d: int, mesh, rotate: str, expand_kv: bool):
    """torch's experimental context_parallel: buffers are sharded in place on entry."""
    from torch.distributed.tensor.experimental import context_parallel
    from torch.distributed.tensor.experimental._attention import set_rotate_method
    from torch.nn.attention import SDPBackend, sdpa_kernel

    set_rotate_method(rotate)
    hk = hq if expand_kv else hkv
    q, k, v, dout = (_rand(1, h, S, d, seed=s) for h, s in ((hq, 1), (hk, 2), (hk, 3), (hq, 4)))
    gqa = {"enable_gqa": True} if hk != hq else {}
    stack = contextlib.ExitStack()
    stack.enter_context(sdpa_kernel([SDPBackend.FLASH_ATTENTION]))
    stack.enter_context(context_parallel(mesh, buffers=[q, k, v, dout], buffer_seq_dims=[2] * 4,
                                         no_restore_buffers={q, k, v, dout}))
    for t in (q, k, v):
        t.requires_grad_()

    def step():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        out.backward(dout)
        q.grad = k.grad = v.grad = None

    L = S // mesh.size()
    nbytes = 2 * L * d * (2 * hq + 2 * hk)  # local shards of q, k, v, dout (bf16)
    return step, nbytes, stack


def profile_config(make, S: int, hq: int, hkv: int, d: int, rows: int = 14) -> dict:
    """CUDA kernel times of one forward + backward (after two warm-up steps): total, the
    communication kernels' share, and the top kernels — where a config spends its time."""
    from torch.profiler import ProfilerActivity, profile

    step, _, stack = make(S, hq, hkv, d)
    try:
        for _ in range(2):
            step()
        torch.cuda.synchronize()
        dist.barrier()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            s.record()
            step()
            e.record()
            torch.cuda.synchronize()
    finally:
        stack.close()
    kernels = [ev for ev in prof.key_averages() if ev.device_time_total > 0]
    kernels.sort(key=lambda ev: -ev.device_time_total)
    comm = sum(ev.device_time_total for ev in kernels if "nccl" in ev.key.lower())
    out = {"step_ms": round(s.elapsed_time(e), 3),
           "kernel_ms": round(sum(ev.device_time_total for ev in kernels) / 1e3, 3),
           "nccl_ms": round(comm / 1e3, 3),
           "top": [(ev.key[:90], ev.count, round(ev.device_time_total / 1e3, 3))
                   for ev in kernels[:rows]]}
    log0(f"## {S} tokens {hq}:{hkv}:{d} step {out['step_ms']} ms, kernels {out['kernel_ms']} "
         f"ms (nccl {out['nccl_ms']})")
    for key, n, ms in out["top"]:
        log0(f"   {ms:8.3f} ms  x{n:<4} {key}")
    return out


# ------------------------------------------------------------------------------ correctness
def _reference(q, k, v, seg):
    g = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(g, 2), v.repeat_interleave(g, 2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
    n = q.shape[1]
    vis = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()[None]
    vis = vis & (seg[:, :, None] == seg[:, None])
    return torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~vis[:, None], float("-inf"))
                        .softmax(-1), v)


def check(group: AxisGroup, device: str = "cuda", sizes=(2048, 2045, (700, 1348))) -> list[dict]:
    """bf16 CP paths vs a float64 reference on the same bf16 inputs; the error of plain bf16
    flash SDPA against that reference is the yardstick."""
    rows = []
    cp, r = group.size, group.rank
    n, odd, docs2 = sizes
    for (hq, hkv), S, docs in [((4, 4), n, None), ((8, 2), n, None), ((4, 2), odd, None),
                               ((4, 2), sum(docs2), list(docs2))]:
        d = 64
        g = torch.Generator(device=device).manual_seed(S + hkv)
        q, k, v, w = (torch.randn(1, S, h, d, generator=g, device=device).bfloat16()
                      for h in (hq, hkv, hkv, hq))
        seg = torch.zeros(1, S, dtype=torch.long, device=device)
        if docs:
            seg[0, docs[0]:] = 1
        q64, k64, v64 = (t.double().requires_grad_() for t in (q, k, v))
        ref = _reference(q64, k64, v64, seg)
        (ref * w.double()).sum().backward()
        refs = [ref.detach(), q64.grad, k64.grad, v64.grad]
        # yardstick: flash SDPA on one GPU (one document only)
        if docs is None:
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs.transpose(1, 2), ks.transpose(1, 2),
                                               vs.transpose(1, 2), is_causal=True,
                                               enable_gqa=hq != hkv).transpose(1, 2)
            (o * w).sum().backward()
            sdpa_err = max((a.double() - b).abs().max().item()
                           for a, b in zip([o, qs.grad, ks.grad, vs.grad], refs))
        else:
            sdpa_err = float("nan")
        for c, grp in ((1, AxisGroup.single("attn_cp")), (cp, group)):
            for strategy in ("all_gather", "p2p"):
                if c == 1 and strategy == "p2p":
                    continue
                rank = 0 if c == 1 else r
                b = split_batch_for_cp(torch.zeros(1, S, dtype=torch.long), None, c, rank,
                                       doc_lengths=[docs] if docs else None)
                src = b.layouts[0].source[b.layouts[0].local_slots(rank)].to(device)
                keep = (src >= 0).view(1, -1, 1, 1)
                loc = [torch.where(keep, t[:, src.clamp(min=0)], 0) for t in (q, k, v, w)]
                ql, kl, vl = (t.clone().requires_grad_() for t in loc[:3])
                out = context_parallel_attention(ql, kl, vl, grp,
                                                 token_index=b.token_index.to(device),
                                                 segment_ids=b.segment_ids.to(device),
                                                 strategy=strategy, backend="torch")
                (out * loc[3]).sum().backward()
                err = 0.0
                for got, want in zip([out, ql.grad, kl.grad, vl.grad], refs):
                    want = torch.where(keep, want[:, src.clamp(min=0)], 0)
                    err = max(err, (got.double() - want).abs().max().item())
                t = torch.tensor([err], device=device)
                if c > 1:
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                rows.append({"hq": hq, "hkv": hkv, "S": S, "docs": docs, "cp": c,
                             "strategy": strategy, "max_err": round(t.item(), 5),
                             "sdpa_flash_err": round(sdpa_err, 5)})
    return rows


# ------------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    p.add_argument("--shapes", nargs="+", default=["16:16:128", "16:4:128"],
                   help="hq:hkv:head_dim")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--rotate", nargs="*", default=["allgather", "alltoall"])
    p.add_argument("--te", nargs="*", default=["p2p", "all_gather", "a2a"],
                   help="TE cp_comm_type columns (where TE imports; none: skip)")
    p.add_argument("--check", action="store_true")
    p.add_argument("--only", nargs="*", default=None,
                   help="run only the configs whose name contains one of these words")
    p.add_argument("--profile", type=int, default=0, metavar="S",
                   help="profile one step of each config at S tokens (first shape) and print "
                        "its CUDA kernel times (rank 0), instead of the timing grid")
    p.add_argument("--json", default="cp_attention.json")
    args = p.parse_args()
    require_cuda(__file__)

    rank, world = init_distributed("nccl")
    groups = build_groups(Topology(world=world, attn_cp=world))
    cp_group = groups.attn_cp
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda", (world,))
    result = {"device": torch.cuda.get_device_name(), "gpus": world, "torch": torch.__version__,
              "backend": backend_name(), "command": " ".join(sys.argv), "rows": []}
    log0(f"# {result['device']} x{world}, torch {torch.__version__}, "
         f"auto backend: {result['backend']}")

    def dump():
        if rank == 0:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)

    if args.check:
        t0 = time.time()
        result["check"] = check(cp_group)
        result["flash_gqa_native"] = attention_math._FLASH_GQA_NATIVE
        for row in result["check"]:
            log0("check", row)
        log0(f"# check took {time.time() - t0:.1f}s; flash GQA native: "
             f"{attention_math._FLASH_GQA_NATIVE}")
        dump()

    configs = [("sdpa cp1", lambda S, hq, hkv, d: sdpa_single(S, hq, hkv, d)),
               ("ours cp1", lambda S, hq, hkv, d: ours(S, hq, hkv, d, AxisGroup.single("cp1"),
                                                       "all_gather"))]
    if world > 1:
        for strategy in ("all_gather", "p2p"):
            configs.append((f"ours cp{world} {strategy}",
                            lambda S, hq, hkv, d, s=strategy: ours(S, hq, hkv, d, cp_group, s)))
        from megatron_ext.layers.attention.te_attention import te_importable

        for comm in args.te if te_importable() else ():
            configs.append((f"te cp{world} {comm}",
                            lambda S, hq, hkv, d, c=comm: te_cp(S, hq, hkv, d, cp_group, c)))
        for rot in args.rotate:
            configs.append((f"torch cp{world} {rot}",
                            lambda S, hq, hkv, d, r=rot: torch_cp(S, hq, hkv, d, mesh, r, False)))
    if args.only:
        configs = [(n, m) for n, m in configs if any(w in n for w in args.only)]
    if args.profile:
        hq, hkv, d = (int(x) for x in args.shapes[0].split(":"))
        result["profile"] = {name: profile_config(make, args.profile, hq, hkv, d)
                             for name, make in configs}
        dump()
        return
    header = f"{'shape':>10} {'S':>7} " + " ".join(f"{n:>22}" for n, _ in configs)
    log0(header)
    for shape in args.shapes:
        hq, hkv, d = (int(x) for x in shape.split(":"))
        for S in args.seqlens:
            row = {"hq": hq, "hkv": hkv, "d": d, "S": S, "results": {}}
            for name, make in configs:
                stack = None
                try:
                    try:
                        step, nbytes, stack = make(S, hq, hkv, d)
                        res = measure(step, args.warmup, args.iters, nbytes)
                    except Exception as exc:  # noqa: BLE001
                        if not name.startswith("torch") or hq == hkv:
                            raise
                        if stack is not None:
                            stack.close()
                        # torch CP with GQA: retry with K/V heads expanded to hq
                        step, nbytes, stack = torch_cp(S, hq, hkv, d, mesh, name.split()[-1],
                                                       True)
                        res = measure(step, args.warmup, args.iters, nbytes)
                        res["note"] = f"K/V expanded to {hq} heads ({type(exc).__name__})"
                except Exception as exc:  # noqa: BLE001
                    res = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
                finally:
                    if stack is not None:
                        stack.close()
                    step = None
                    torch.cuda.empty_cache()
                row["results"][name] = res
            base = row["results"].get("ours cp1", {}).get("ms")
            sbase = row["results"].get("sdpa cp1", {}).get("ms")
            mbase = row["results"].get("ours cp1", {}).get("mem_gib")
            for name, res in row["results"].items():
                if "ms" in res and base:
                    res["speedup_vs_ours_cp1"] = round(base / res["ms"], 3)
                    res["speedup_vs_sdpa_cp1"] = round(sbase / res["ms"], 3) if sbase else None
                    res["mem_vs_ours_cp1"] = round(res["mem_gib"] / mbase, 3)
            result["rows"].append(row)
            cells = []
            for name, _ in configs:
                res = row["results"][name]
                cells.append(f"{res['ms']:9.2f}ms {res['mem_gib']:6.2f}G" if "ms" in res
                             else f"{'ERR':>22}")
            log0(f"{shape:>10} {S:>7} " + " ".join(f"{c:>22}" for c in cells))
            for name, res in row["results"].items():
                if "error" in res:
                    log0(f"   {name}: {res['error']}")
            dump()
    dump()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
