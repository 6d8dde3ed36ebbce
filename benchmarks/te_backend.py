"""Native vs TransformerEngine backend: each module kind, a full decoder layer, and CP attention.

    bash .te/rest/install.sh && export PYTHONPATH=/tmp/te-site:$PYTHONPATH
    torchrun --nproc-per-node 2 benchmarks/te_backend.py [--seq 65536] [--tokens 8192]

Per module (forward + backward, bf16, one GPU's shard of the 2-GPU attn_tp layout where the
module is split): column-parallel linear (QKV shape), row-parallel linear (o_proj), RMSNorm, the
routed experts' three grouped GEMMs, and a whole MoE decoder layer (``CausalLM`` with one layer,
the same weights for both backends). CP attention over the 2 GPUs at ``--seq`` tokens (one
document, the standard split) with ``p2p`` and ``all_gather``, ours (``backend="torch"``) vs TE's
``DotProductAttention`` (``backend="te"``), MHA and GQA, time and peak memory. Prints one JSON
object per measurement on rank 0 and writes ``$OUT/te_backend.json`` (or ``bench_results/``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, init_nccl, require_cuda, time_eager,  # noqa: E402
                                write_results)
from megatron_ext.data.cp_split import split_batch_for_cp  # noqa: E402
from megatron_ext.layers.attention.cp_attention import context_parallel_attention  # noqa: E402
from megatron_ext.layers.attention.cp_plan import plan_cp_attention  # noqa: E402
from megatron_ext.layers.backend import LayerBackend  # noqa: E402
from megatron_ext.models.config import ModelConfig  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402

BF16 = torch.bfloat16


def _fwd_bwd(mod, *inputs, call=None):
    x = inputs[0]

    def step():
        out = call(mod, *inputs) if call is not None else mod(*inputs)
        out.float().square().mean().backward()
        x.grad = None
        for p in mod.parameters():
            p.grad = None

    return step


def modules(groups, device, tokens: int, hidden: int, heads: int, head_dim: int,
            experts: int, moe_inter: int) -> list[dict]:
    tp = groups.attn_tp
    rows = []
    for impl in ("native", "te"):
        be = LayerBackend(impl)
        kw = dict(dtype=BF16, device=device)
        x = torch.randn(tokens, hidden, device=device, dtype=BF16, requires_grad=True)
        qkv = be.column_linear(hidden, 3 * heads * head_dim, tp, name="qkv", **kw)
        o_in = torch.randn(tokens, heads * head_dim // tp.size, device=device, dtype=BF16,
                           requires_grad=True)
        o = be.row_linear(heads * head_dim, hidden, tp, name="o_proj", **kw)
        norm = be.rms_norm(hidden, 1e-6, name="norm", **kw)
        ex = be.routed_experts(experts, hidden, moe_inter, groups, name="experts", **kw)
        counts = [tokens // ex.num_local] * ex.num_local
        counts[-1] += tokens - sum(counts)
        cases = {"column_linear (qkv)": _fwd_bwd(qkv, x), "row_linear (o_proj)": _fwd_bwd(o, o_in),
                 "rms_norm": _fwd_bwd(norm, x),
                 "grouped_experts": _fwd_bwd(ex, x, counts, call=lambda m, a, c: m(a, c))}
        for name, step in cases.items():
            rows.append({"what": name, "impl": impl, "tokens": tokens, "us": time_eager(step)})
    return rows


def full_layer(groups, device, tokens: int) -> list[dict]:
    from megatron_ext.communication.local_batch import split_batch
    from megatron_ext.models.decoder import CausalLM

    cfg = ModelConfig.preset("tiny-qwen3-moe").replace(
        num_layers=1, sparse_layers=(True,), vocab_size=1024, hidden_size=2048, num_heads=16,
        num_kv_heads=4,
        head_dim=128, moe_intermediate_size=768, num_experts=16, num_experts_per_tok=4)
    seq = tokens
    ids = torch.randint(0, cfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for impl in ("native", "te"):
        model = CausalLM(cfg, groups, dtype=BF16, device=device, transformer_impl=impl)
        model.init_weights(seed=0)
        batch = split_batch(groups, ids.to(device), ids.to(device))

        def step():
            out = model(**batch.model_kwargs())
            out.loss.sum().backward()
            for p in model.parameters():
                p.grad = None

        torch.cuda.reset_peak_memory_stats()
        us = time_eager(step, iters=10, repeats=3)
        rows.append({"what": "decoder layer (MoE, 16 experts top-4)", "impl": impl,
                     "tokens": seq, "us": us, "modules": model.backend.describe(),
                     "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
        del model
    return rows


def cp_attention(groups, device, seq: int) -> list[dict]:
    group = groups.attn_cp
    rows = []
    for hq, hkv in ((32, 32), (32, 8)):
        for strategy in ("p2p", "all_gather"):
            for kernel in ("torch", "te"):
                batch = split_batch_for_cp(torch.zeros(1, seq, dtype=torch.long), None,
                                           group.size, group.rank)
                tok = batch.token_index.to(device)
                L = seq // group.size
                g = torch.Generator(device=device).manual_seed(1)
                q, k, v = (torch.randn(1, L, h, 128, generator=g, device=device,
                                       dtype=BF16).requires_grad_() for h in (hq, hkv, hkv))
                dout = torch.randn(1, L, hq, 128, generator=g, device=device, dtype=BF16)
                plan = plan_cp_attention(q, k, v, group, token_index=tok, strategy=strategy)

                def step():
                    out = context_parallel_attention(q, k, v, group, strategy=strategy,
                                                     plan=plan, backend=kernel)
                    out.backward(dout)
                    q.grad = k.grad = v.grad = None

                torch.cuda.reset_peak_memory_stats()
                us = time_eager(step, iters=5, repeats=3)
                rows.append({"what": f"cp_attention {'MHA' if hq == hkv else 'GQA'}",
                             "strategy": strategy, "impl": "native" if kernel == "torch" else "te",
                             "seq": seq, "ms": us / 1000,
                             "peak_GiB": torch.cuda.max_memory_allocated() / 2**30})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=65536, help="CP attention tokens")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per module / layer run")
    args = p.parse_args()
    require_cuda(__file__)
    LayerBackend.resolve("te")  # refuses with the reason where TE cannot run
    rank, world, device = init_nccl()
    results = []
    tp = build_groups(Topology(world=world, pp=1, attn_tp=world, attn_cp=1, attn_dp=1,
                               moe_tp=1, moe_ep=world, moe_dp=1))
    results += modules(tp, device, args.tokens, 2048, 16, 128, 16, 768)
    results += full_layer(tp, device, args.tokens)
    cp = build_groups(Topology(world=world, pp=1, attn_tp=1, attn_cp=world, attn_dp=1,
                               moe_tp=1, moe_ep=world, moe_dp=1))
    results += cp_attention(cp, device, args.seq)
    if rank == 0:
        for r in results:
            print(json.dumps(r), flush=True)
        write_results("te_backend", {"device": device_name(), "world": world, "rows": results})
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
