"""Batched decode throughput on 2 GPUs: the seed's moe_dp = 1 gain (experts split over the CP
ranks instead of replicated per CP group) where it lives — decode steps, which read every expert
weight each step.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node 2 benchmarks/decode.py \\
        [--layers 48] [--batch 16 64 256] [--prompt 1024 8192] [--new 128] [--hf]

Model: preset ``qwen3-30b-a3b`` (48 layers, hidden 2048, 32/4 heads × 128, 128 experts top-8,
width 768, vocab 151936), random bf16 weights drawn on the GPU (replicated parameters equal on
every rank). For each prompt length the KV cache is filled with random K/V (a prefill of
256 × 8K tokens is not what is measured here), then ``--new`` decode steps of the whole batch
run as a CUDA graph (the production step: :class:`megatron_ext.serving.decode_step.DecodeState`
with one owner per token, greedy sampling on the owner). Layouts of the same 2 GPUs:

* ``a cp2 moe_dp1`` — attn_cp 2, experts split over both GPUs (moe_tp 2), MOE_FULL k = 2;
* ``a-rep cp2 moe_dp1 replicated`` — the same, every CP rank running every decode row
  (``decode_rows="replicated"``: the CP partials all-gathered, the MoE sum all-reduced, no other
  collective); ``a-rep-ep ...`` the same with the experts split whole (moe_ep 2: 64 experts of
  width 768 per GPU) instead of by width (moe_tp 2: 128 of width 384);
* ``b cp2 moe_dp2`` — attn_cp 2, every GPU holds every expert (the seed's baseline);
* ``c tp2``         — attn_tp 2, moe_tp 2 (k = 1).

Per row: ms per step, decode tokens/s (both GPUs together: batch / step time), and the
weight-read bound: bytes a GPU must read per step (its dense weights and LM head, the expected
share of its expert weights that the step's tokens route to, its KV cache) / the HBM bandwidth
measured in the same run (a 4 GiB device copy), and step time / bound. ``--moe-reduction``: one
MoE layer with a shared expert (Qwen2-MoE style; Qwen3 has none) at decode batch sizes inside a
CUDA graph, routed + shared partials reduced separately (``two``) vs added first (``one``).
``--hf``: ``transformers`` ``generate`` on GPU 0 with the same model and batch (if installed).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import (device_name, hbm_bandwidth, init_nccl, require_cuda, table,  # noqa: E402
                                time_graph, write_results)
from megatron_ext.layers.attention.cp_decode import DECODE_KERNELS, set_decode_kernel  # noqa: E402
from megatron_ext.communication.symm_collectives import with_symm_collectives  # noqa: E402
from megatron_ext.models.config import ModelConfig  # noqa: E402
from megatron_ext.parallel.axes import GROUP_AXES  # noqa: E402
from megatron_ext.models.decoder import CausalLM  # noqa: E402
from megatron_ext.parallel.groups import build_groups  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402
from megatron_ext.serving import SamplingParams  # noqa: E402
from megatron_ext.serving.decode_step import DecodeBatch, DecodeState, StepRunner  # noqa: E402
from megatron_ext.serving.kv_cache import KVCache  # noqa: E402

LAYOUTS = {
    "a cp2 moe_dp1": dict(attn_cp=2, moe_tp=2, moe_ep=1, moe_dp=1),
    # the same layout with the decode rows replicated over CP (two collectives per layer)
    "a-rep cp2 moe_dp1 replicated": dict(attn_cp=2, moe_tp=2, moe_ep=1, moe_dp=1),
    # the same layout with the MoE shard split by expert instead of by expert width
    "a-ep cp2 moe_dp1 moe_ep2": dict(attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=1),
    # ... with the decode rows replicated over CP: whole experts per GPU (64 x 768)
    "a-rep-ep cp2 moe_dp1 moe_ep2 replicated": dict(attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=1),
    "b cp2 moe_dp2": dict(attn_cp=2, moe_dp=2, moe_tp=1, moe_ep=1),
    "c tp2": dict(attn_tp=2, moe_tp=2, moe_ep=1),
}
# decode_rows="replicated"; the rest: one owner
REPLICATED = {"a-rep cp2 moe_dp1 replicated", "a-rep-ep cp2 moe_dp1 moe_ep2 replicated"}
BF16 = torch.bfloat16


def set_symm_active(groups, active: bool, fuse: bool = True) -> None:
    """Route the decode collectives through symmetric memory (True) or NCCL (False); ``fuse``:
    the fused exchange + merge / reduce + add + norm kernels where they apply."""
    for axis in GROUP_AXES:
        fast = getattr(groups, axis).fast
        if fast is not None:
            fast.active, fast.fuse = active, fuse


def random_model(cfg: ModelConfig, groups, device) -> CausalLM:
    """bf16 weights drawn on the GPU; the same generator state on every rank, so replicated
    parameters (router, norms) agree, as the MoE's shard needs."""
    model = CausalLM(cfg, groups, dtype=BF16, device=device).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def elapsed_ms(fn, device) -> float:
    """Wall time of ``fn`` (CUDA events on a GPU; ranks aligned by a barrier first)."""
    dist.barrier()
    if device.type != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1000
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def bytes_per_step(model: CausalLM, cfg: ModelConfig, moe_tokens: int, kv_bytes: int) -> float:
    """What this GPU must read per decode step: every non-expert weight but the embedding table
    (rows only), the expected fraction of its experts that ``moe_tokens`` routed tokens hit
    (``1 - (1 - top_k/E)^tokens``), and its KV cache."""
    dense = experts = 0
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        if ".experts." in name:
            experts += n
        elif "embed_tokens" not in name:
            dense += n
    hit = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** moe_tokens
    return dense + hit * experts + kv_bytes


def profile_steps(step, cache, steps: int = 3, rows: int = 60) -> str:
    """Kernel-time table of ``steps`` calls of ``step`` (a replay of the captured step: the
    kernels as the timed graph runs them, a collective's wait for its peer included)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
            cache.host_step_end()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="device_time_total", row_limit=rows,
                                     max_name_column_width=60)


#: ``--sampling``: what a chat/eval user sets (per-request seeds); "greedy" = argmax only
SAMPLED = dict(temperature=0.7, top_k=0, top_p=0.9)


def decode_case(model, groups, cfg, batch: int, prompt: int, new: int, device,
                profile: bool = False, replicate_cp: bool = False,
                sampling: str = "greedy") -> dict:
    topo, coords = groups.topology, groups.coords
    cp = topo.attn_cp
    warm = 2
    attn = model.layers[0].self_attn
    extra = 3 if profile else 0
    cache = KVCache(groups.attn_cp, batch, prompt // cp, new + warm + extra, device=device)
    gen = torch.Generator(device=device).manual_seed(1)
    for layer in model.layers:
        shape = (batch, prompt // cp, attn.local_kv_heads, attn.head_dim)
        k = torch.randn(shape, generator=gen, device=device, dtype=BF16)
        cache.layer(layer.layer_idx).store(k, torch.randn(shape, generator=gen, device=device,
                                                          dtype=BF16))
        del k
    cache.start_decoding()
    requests = DecodeBatch((tuple(range(batch)),), replicate_cp)
    owned = requests.owned_requests(groups, coords.attn_dp, coords.attn_cp)
    params = [SamplingParams(new + warm + extra, seed=r,
                             **(SAMPLED if sampling == "sampled" else {})) for r in owned]
    state = DecodeState(model, groups, cache, requests,
                        positions=torch.full((batch,), prompt, dtype=torch.long, device=device),
                        input_ids=torch.ones(len(owned), dtype=torch.long, device=device),
                        finished=torch.zeros(len(owned), dtype=torch.bool, device=device),
                        tokens=torch.zeros(len(owned), new + warm + extra, dtype=torch.long,
                                           device=device),
                        params=params, eos_token_id=None, pad_token_id=0, keep_logits=False,
                        vocab_size=cfg.vocab_size)
    runner = StepRunner(use_cuda_graphs=device.type == "cuda")

    def steps(n: int) -> None:
        for _ in range(n):
            runner.run(state)
            cache.host_step_end()

    steps(warm)            # eager warm-up step, then the capture (+ its replay)
    ms = elapsed_ms(lambda: steps(new), device) / new
    kernels = profile_steps(lambda: runner.run(state), cache) \
        if profile and device.type == "cuda" else None
    # the MoE sees its token group's owned rows once: k x (this rank's rows) for MOE_FULL
    moe_tokens = len(owned) * (1 if replicate_cp else topo.token_group_size)
    filled = cache.length
    kv = sum(2 * layer.k[:, :, :filled].numel() * layer.k.element_size()
             for layer in cache._layers.values())
    result = dict(ms_per_step=ms, tokens_per_s=batch / (ms / 1000), captures=runner.captures,
                  bytes_per_step=bytes_per_step(model, cfg, moe_tokens, kv),
                  peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30
                  if device.type == "cuda" else 0.0)
    if kernels is not None:
        result["profile"] = kernels
    result["tokens"] = state.tokens[:, :new + warm].cpu()   # same inputs: same tokens per variant
    del state, runner, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def moe_reduction(device, world: int, tokens_list, collectives) -> list:
    """One shared-expert MoE layer (moe_tp over both GPUs, k = 1) at decode batch sizes in a CUDA
    graph: routed and shared partials all-reduced separately vs added, then one all-reduce —
    with each of ``collectives`` (``nccl``, ``symm``; ``--moe-reduction`` runs both)."""
    from benchmarks.moe_layer import routed_and_shared
    from megatron_ext.communication.collectives import all_reduce
    from megatron_ext.layers.moe.moe_layer import MoELayer

    groups = build_groups(Topology(world=world, attn_tp=world, moe_tp=world, moe_ep=1))
    groups = with_symm_collectives(groups, device)
    torch.manual_seed(0)
    layer = MoELayer(2048, 128, 8, 768, groups, shared_expert_intermediate_size=4096,
                     shared_expert_gate=True, dtype=BF16, device=device)
    shard = groups.moe_shard
    rows = []
    for coll in collectives:
        set_symm_active(groups, coll == "symm")
        for tokens in tokens_list:
            x = torch.randn(tokens, 2048, device=device, dtype=BF16)
            with torch.no_grad():
                # as in a decode step: no router statistics
                two = time_graph(lambda: sum(all_reduce(p, shard)
                                             for p in routed_and_shared(layer, x, False)))
                one = time_graph(lambda: all_reduce(layer(x, with_stats=False).hidden, shard))
            rows.append([coll, tokens, two, one, (two / one) if two and one else None])
    return rows


def hf_generate(cfg: ModelConfig, cases, new: int, device) -> dict:
    """tokens/s of transformers' greedy generate per ``(prompt, batch)`` case (decode part: the
    ``new``-token run minus a 1-token run), one model built once; OOM reported per case."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = cfg.to_hf_dict()
    d.pop("architectures", None)
    with torch.device(device):   # random weights drawn on the GPU (30 B parameters)
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(d.pop("model_type"), **d),
                                              dtype=BF16).eval()
    out = {}
    for prompt, batch in cases:
        ids = torch.randint(1, cfg.vocab_size, (batch, prompt), device=device)

        def run(n):
            torch.cuda.synchronize()
            t = time.perf_counter()
            hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                        max_new_tokens=n, min_new_tokens=n)
            torch.cuda.synchronize()
            return time.perf_counter() - t
        try:
            run(2)
            seconds = run(new) - run(1)
            out[f"{prompt}x{batch}"] = batch * (new - 1) / seconds
        except torch.cuda.OutOfMemoryError:
            out[f"{prompt}x{batch}"] = "OOM"
        torch.cuda.empty_cache()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="qwen3-30b-a3b")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="gloo on CPU, float32, no timing claims (checks the script runs)")
    parser.add_argument("--batch", type=int, nargs="*", default=[16, 64, 256])
    parser.add_argument("--prompt", type=int, nargs="*", default=[1024, 8192])
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--layouts", nargs="*", default=["a cp2 moe_dp1", "b cp2 moe_dp2", "c tp2"],
                        help="layouts to run (none: only --hf / --moe-reduction)")
    parser.add_argument("--moe-reduction", action="store_true")
    parser.add_argument("--moe-reduction-tokens", type=int, nargs="*", default=[1, 4, 16, 64, 256],
                        help="decode batch sizes (tokens of the MoE layer) of --moe-reduction")
    parser.add_argument("--hf", action="store_true",
                        help="also transformers' generate on one GPU (rank 0; other ranks wait)")
    parser.add_argument("--hf-batch", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--decode-kernel", nargs="+", default=["auto"], choices=DECODE_KERNELS,
                        help="decode attention: auto (split-K Triton kernel on CUDA) and/or "
                             "torch (batched matmuls); several = A/B in the same run")
    parser.add_argument("--collectives", nargs="+", default=["symm"],
                        choices=["symm", "symm-unfused", "nccl"],
                        help="decode-size collectives through symmetric memory (one Triton "
                             "kernel each; 'symm' also fuses the CP merge and the MoE sum's add + "
                             "norm into them, 'symm-unfused' does not) and/or NCCL; several = "
                             "A/B in the same run")
    parser.add_argument("--sampling", nargs="+", default=["greedy"], choices=["greedy", "sampled"],
                        help=f"greedy (argmax) and/or sampled ({SAMPLED}, a seed per request); "
                             "several = A/B in the same run")
    parser.add_argument("--profile", action="store_true",
                        help="print each case's kernel-time table (3 graph replays, rank 0)")
    args = parser.parse_args()
    if not args.cpu_smoke:
        require_cuda(__file__, "--cpu-smoke")
    global BF16
    if args.cpu_smoke:
        from megatron_ext.parallel.groups import init_distributed
        init_distributed()
        rank, world, device, BF16 = dist.get_rank(), dist.get_world_size(), \
            torch.device("cpu"), torch.float32
    else:
        rank, world, device = init_nccl()
    cfg = ModelConfig.preset(args.preset)
    if args.layers is not None and args.layers != cfg.num_layers:
        cfg = cfg.replace(num_layers=args.layers, sparse_layers=cfg.sparse_layers[:1] * args.layers)
    bandwidth = hbm_bandwidth(device) if device.type == "cuda" else 1e12
    if rank == 0:
        print(f"device: {device_name() if device.type == 'cuda' else 'cpu'}; "
              f"{cfg.num_layers} layers; HBM copy bandwidth "
              f"{bandwidth / 1e12:.2f} TB/s", flush=True)
    rows, results = [], []
    seen_tokens: dict = {}   # same topology (same weights), same inputs: compare the tokens
    for name in args.layouts:
        groups = build_groups(Topology(world=world, **LAYOUTS[name]))
        if device.type == "cuda":
            groups = with_symm_collectives(groups, device)
        model = random_model(cfg, groups, device)
        variants = [(k, c, s) for k in args.decode_kernel for c in args.collectives
                    for s in args.sampling]
        for prompt in args.prompt:
            for batch in args.batch:
                for kern, coll, sampling in variants:
                    set_decode_kernel(kern)
                    set_symm_active(groups, coll != "nccl", coll == "symm")
                    label = name if len(variants) == 1 else f"{name} [{kern} {coll} {sampling}]"
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    try:
                        r = decode_case(model, groups, cfg, batch, prompt, args.new, device,
                                        args.profile, name in REPLICATED, sampling)
                    except torch.cuda.OutOfMemoryError:
                        r = None
                        gc.collect()
                        torch.cuda.empty_cache()
                    if r is None:
                        rows.append([label, prompt, batch, "OOM", None, None, None, None])
                        continue
                    tokens = r.pop("tokens")
                    key = (prompt, batch, kern, sampling, tuple(sorted(LAYOUTS[name].items())))
                    first = seen_tokens.setdefault(key, tokens)
                    r["tokens_match_first_variant"] = bool(torch.equal(first, tokens))
                    bound_ms = r["bytes_per_step"] / bandwidth * 1000
                    r.update(layout=label, prompt=prompt, batch=batch, bound_ms=bound_ms,
                             decode_kernel=kern, collectives=coll, sampling=sampling)
                    results.append(r)
                    rows.append([label, prompt, batch, r["ms_per_step"], r["tokens_per_s"],
                                 bound_ms, r["ms_per_step"] / bound_ms, r["peak_GiB"]])
                    if rank == 0:
                        print(rows[-1], "tokens == first variant's:",
                              r["tokens_match_first_variant"], flush=True)
                        if "profile" in r:
                            print(r.pop("profile"), flush=True)
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"device": device_name() if device.type == "cuda" else "cpu",
           "layers": cfg.num_layers, "new": args.new,
           "hbm_bytes_per_s": bandwidth, "decode": results}
    if rank == 0:
        print(table(["layout", "prompt", "batch", "ms/step", "tokens/s", "bound ms",
                     "x bound", "peak GiB"], rows))
        for prompt in args.prompt:
            for batch in args.batch:
                for kern, coll, smp in [(k, c, s) for k in args.decode_kernel
                                        for c in args.collectives for s in args.sampling]:
                    by = {r["layout"].split(" [")[0]: r for r in results
                          if r["prompt"] == prompt and r["batch"] == batch
                          and r["decode_kernel"] == kern and r["collectives"] == coll
                          and r["sampling"] == smp}
                    b = by.get("b cp2 moe_dp2")
                    for name in ("a cp2 moe_dp1", "a-ep cp2 moe_dp1 moe_ep2",
                                 "a-rep cp2 moe_dp1 replicated",
                                 "a-rep-ep cp2 moe_dp1 moe_ep2 replicated"):
                        if b and name in by:
                            print(f"prompt {prompt} batch {batch} [{kern} {coll} {smp}]: "
                                  f"{name.split()[0]} "
                                  f"/ b tokens/s = "
                                  f"{by[name]['tokens_per_s'] / b['tokens_per_s']:.2f}x "
                                  f"(weight-read bounds: "
                                  f"{b['bound_ms'] / by[name]['bound_ms']:.2f}x)")
    if args.moe_reduction:
        red = moe_reduction(device, world, args.moe_reduction_tokens, ["nccl", "symm"])
        out["moe_reduction"] = red
        if rank == 0:
            print(table(["collectives", "tokens", "two µs", "one µs", "two / one"], red))
    if args.hf and rank == 0:
        try:
            hf = hf_generate(cfg, [(p, b) for p in args.prompt for b in args.hf_batch],
                             args.new, device)
        except Exception as exc:  # noqa: BLE001 - transformers absent or OOM: report it
            hf = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        out["transformers_tokens_per_s"] = hf
        print("transformers generate (1 GPU):", hf, flush=True)
    if rank == 0:
        write_results("decode", out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
