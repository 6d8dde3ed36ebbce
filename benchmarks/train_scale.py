"""Multi-GPU training race: megatron_ext vs megatron-core + TransformerEngine, same shape, same
layout, same run. Prints one JSON line (rank 0) with tokens/s, MFU, peak memory per rank and, for
ours, the memory estimator's prediction.

    torchrun --nproc-per-node 2 benchmarks/train_scale.py --impl ours  --layout a --seq-len 4096
    torchrun --nproc-per-node 2 benchmarks/train_scale.py --impl mcore --layout a --seq-len 4096
    python benchmarks/train_scale.py --impl ours --layout a --layers 4     # 1 GPU: scaling base
    python benchmarks/train_scale.py --impl ours --layout a --dry-run      # the plan, no GPU

Model: ``--layers`` (default 12) layers of Qwen3-30B-A3B (preset ``qwen3-30b-a3b-12l``: hidden
2048, 32 q / 4 KV heads x 128, 128 experts top-8, expert width 768, vocab 151936, QK-norm).
Layouts over the world's W GPUs: (a) attn_dp W / moe_ep W; (b) attn_cp W + moe_ep W with moe_dp
1; (c) attn_tp W / moe_ep W — on 2 GPUs the issue's layouts, on 1 GPU all sizes 1 (so tokens/s
per GPU at 2 GPUs vs 1 compares the same per-GPU batch: one ``--seq-len`` sample per micro-batch
per attention data-parallel rank; use fewer ``--layers`` where one GPU cannot hold 12).
Both sides: bf16 parameters with fp32 main weights and gradients, distributed optimizer, AdamW,
overlapped gradient reduction, ``--recompute`` (ours: none/selective/full; mcore: none, selective
= ``moe_act``, full = uniform per layer), micro-batch size 1, ``--micro-batches`` per rank.
megatron-core is built on our process groups (``ParallelGroups.to_megatron()``, passed as
``pg_collection``); if it refuses them the JSON says so and it runs on its own parallel_state.
Step time = median over ``--steps`` after ``--warmup`` (cuda-synchronised wall clock of the
whole step). MFU = model FLOP/s / (GPUs x 989 TFLOP/s, H100/H200 dense bf16 datasheet).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._common import require_cuda  # noqa: E402
from megatron_ext.models.config import load_model_config  # noqa: E402
from megatron_ext.parallel.groups import build_groups, init_distributed  # noqa: E402
from megatron_ext.parallel.topology import Topology  # noqa: E402

PEAK_BF16 = 989e12
MODEL = "qwen3-30b-a3b-12l"
LAYOUTS = {"a": "attn_dp", "b": "attn_cp", "c": "attn_tp"}  # the attention axis spanning the world


def layout_sizes(layout: str, world: int) -> dict:
    """Layout ``layout`` on ``world`` GPUs: its attention axis and moe_ep span the world."""
    return {LAYOUTS[layout]: world, "moe_ep": world, "moe_dp": 1}


def model_config(layers: int):
    """The Qwen3-30B-A3B slice with ``layers`` layers (all MoE, real layer dimensions)."""
    mc = load_model_config(MODEL)
    return mc if layers == mc.num_layers else mc.replace(
        num_layers=layers, sparse_layers=(True,) * layers)


def plan(args, world: int) -> dict:
    """What a run will be (no GPU needed): layout, tokens per step, model FLOPs per token and the
    memory estimator's per-rank prediction for ours."""
    from megatron_ext.training.memory import estimate

    topo = Topology(world=world, **layout_sizes(args.layout, world))
    mc = model_config(args.layers)
    mc.check_fits(topo)
    est = estimate(mc, topo, seq_len=args.seq_len, micro_batch_size=1, recompute=args.recompute,
                   bf16=True, distributed=not args.no_distributed_optimizer,
                   micro_batches=args.micro_batches)
    return {"world": world, "layout_sizes": layout_sizes(args.layout, world),
            "layers": args.layers, "tokens_per_step": topo.attn_dp * args.micro_batches
            * args.seq_len, "flops_per_token": flops_per_token(mc, args.seq_len),
            "estimate_bytes": est.total, "estimate": est.describe()}


def flops_per_token(cfg, seq: int) -> float:
    """3 x forward: q/k/v/o, causal attention, router, top-k experts' three projections, LM head."""
    h, q, kv = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    per_layer = 2 * (h * q + 2 * h * kv + q * h) + 2 * 2 * (seq / 2) * q
    per_layer += 2 * h * cfg.num_experts
    per_layer += cfg.num_experts_per_tok * 3 * 2 * h * cfg.moe_intermediate_size
    return 3 * (cfg.num_layers * per_layer + 2 * h * cfg.vocab_size)


# ---------------------------------------------------------------------- ours
def run_ours(args, topo: Topology, groups) -> dict:
    from megatron_ext.training.config import TrainConfig
    from megatron_ext.training.memory import estimate
    from megatron_ext.training.trainer import Trainer, validate_launch

    layout = layout_sizes(args.layout, topo.world)
    cfg = TrainConfig(model=MODEL, model_overrides={"num_layers": args.layers},
                      seq_len=args.seq_len, micro_batch_size=1,
                      global_batch_size=topo.attn_dp * args.micro_batches,
                      train_steps=args.warmup + args.steps, warmup_steps=1, lr=1e-4, min_lr=1e-5,
                      progress=False, tensorboard=False, save_at_end=False, save_interval=0,
                      dtype="bf16", device="cuda", recompute=args.recompute,
                      distributed_optimizer=not args.no_distributed_optimizer,
                      output_dir="/tmp/train_scale", **layout)
    trainer = Trainer(cfg, groups, validate_launch(cfg, topo.world))
    times = []
    for i in range(cfg.train_steps):
        m = trainer.train_step()
        if i >= args.warmup:
            times.append(m.step_time_s)
    est = estimate(trainer.plan.model_config, topo, seq_len=args.seq_len, micro_batch_size=1,
                   recompute=args.recompute, bf16=True,
                   distributed=trainer.optimizer.distributed, micro_batches=args.micro_batches)
    return {"step_times_s": times, "loss": m.loss, "estimate_bytes": est.total,
            "estimate": est.describe(), "grad_reduce_launched_in_backward":
            trainer.optimizer.reducer.launched_in_backward}


# ---------------------------------------------------------------------- megatron-core
def run_mcore(args, topo: Topology, groups) -> dict:
    import torch.nn.functional as F
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer import TransformerConfig

    mc = model_config(args.layers)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topo.attn_tp, context_parallel_size=topo.attn_cp,
        expert_model_parallel_size=topo.moe_ep, expert_tensor_parallel_size=topo.moe_tp)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    recompute = {"none": {}, "selective": dict(recompute_granularity="selective",
                                               recompute_modules=["moe_act"]),
                 "full": dict(recompute_granularity="full", recompute_method="uniform",
                              recompute_num_layers=1)}[args.recompute]
    config = TransformerConfig(
        num_layers=mc.num_layers, hidden_size=mc.hidden_size, num_attention_heads=mc.num_heads,
        num_query_groups=mc.num_kv_heads, kv_channels=mc.head_dim,
        ffn_hidden_size=mc.intermediate_size, num_moe_experts=mc.num_experts,
        moe_router_topk=mc.num_experts_per_tok, moe_ffn_hidden_size=mc.moe_intermediate_size,
        moe_token_dispatcher_type="alltoall", moe_grouped_gemm=True,
        moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=1e-3,
        moe_router_pre_softmax=False, qk_layernorm=True, normalization="RMSNorm",
        layernorm_epsilon=mc.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, bf16=True, params_dtype=torch.bfloat16,
        tensor_model_parallel_size=topo.attn_tp, context_parallel_size=topo.attn_cp,
        expert_model_parallel_size=topo.moe_ep, expert_tensor_parallel_size=topo.moe_tp,
        sequence_parallel=topo.attn_tp > 1, attention_dropout=0.0, hidden_dropout=0.0,
        **recompute)
    spec = get_gpt_layer_with_transformer_engine_spec(num_experts=mc.num_experts,
                                                      moe_grouped_gemm=True, qk_layernorm=True)
    pg_note = "ParallelGroups.to_megatron()"
    kw = {}
    try:
        kw = {"pg_collection": groups.to_megatron()}
        model = GPTModel(config, spec, mc.vocab_size, args.seq_len,
                         position_embedding_type="rope", rotary_base=int(mc.rope_theta), **kw)
    except Exception as err:  # record why, run on parallel_state
        pg_note = f"parallel_state (to_megatron refused: {type(err).__name__}: {err})"
        kw = {}
        model = GPTModel(config, spec, mc.vocab_size, args.seq_len,
                         position_embedding_type="rope", rotary_base=int(mc.rope_theta))
    model.cuda()
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=True, overlap_param_gather=True,
        use_distributed_optimizer=not args.no_distributed_optimizer)
    model = DistributedDataParallel(config, ddp_config, model, **kw)
    opt = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=1e-4, bf16=True, weight_decay=0.1, clip_grad=1.0,
                        use_distributed_optimizer=not args.no_distributed_optimizer,
                        adam_beta1=0.9, adam_beta2=0.95), [model],
        use_gloo_process_groups=False, **kw)
    cp, cp_rank = topo.attn_cp, groups.attn_cp.rank
    gen = torch.Generator().manual_seed(0)
    times = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        model.zero_grad_buffer()
        opt.zero_grad()
        for mb in range(args.micro_batches):
            ids = torch.randint(0, mc.vocab_size, (1, args.seq_len + 1), generator=gen)
            tokens, labels = ids[:, :-1], ids[:, 1:]
            if cp > 1:  # load-balanced CP split: chunks c and 2cp-1-c
                chunks = [t.chunk(2 * cp, dim=1) for t in (tokens, labels)]
                tokens, labels = (torch.cat([c[cp_rank], c[2 * cp - 1 - cp_rank]], dim=1)
                                  for c in chunks)
            tokens, labels = tokens.cuda(), labels.cuda()
            position_ids = torch.arange(tokens.shape[1], device="cuda").unsqueeze(0)
            sync = model.no_sync() if mb < args.micro_batches - 1 else _null()
            with sync:
                loss = model(tokens, position_ids, None, labels=labels)
                (loss.float().mean() / args.micro_batches).backward()
        model.finish_grad_sync()
        opt.step()
        torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    return {"step_times_s": times, "loss": float(loss.float().mean()), "groups": pg_note}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=("ours", "mcore"), required=True)
    parser.add_argument("--layout", choices=tuple(LAYOUTS), default="a")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batches", type=int, default=1)
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="none")
    parser.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--layers", type=int, default=12, help="layers of the 48-layer model")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan for --world GPUs (no GPU, no process group)")
    parser.add_argument("--world", type=int, default=None,
                        help="GPUs for --dry-run (a real run takes torchrun's world)")
    args = parser.parse_args()
    if args.dry_run:
        world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
        try:
            print(json.dumps({"impl": args.impl, "layout": args.layout, **plan(args, world)}))
        except ValueError as err:
            print(f"train_scale.py: {err}", file=sys.stderr)
            return 2
        return 0
    require_cuda(__file__)
    init_distributed()
    world = dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    topo = Topology(world=world, **layout_sizes(args.layout, world))
    groups = build_groups(topo)
    torch.cuda.reset_peak_memory_stats()
    result = {"impl": args.impl, "layout": args.layout,
              "layout_sizes": layout_sizes(args.layout, world), "layers": args.layers,
              "world": world,
              "seq_len": args.seq_len, "micro_batches": args.micro_batches,
              "recompute": args.recompute,
              "distributed_optimizer": not args.no_distributed_optimizer}
    try:
        result.update((run_ours if args.impl == "ours" else run_mcore)(args, topo, groups))
        step = statistics.median(result["step_times_s"])
        tokens = topo.attn_dp * args.micro_batches * args.seq_len
        mc = model_config(args.layers)
        result.update(tokens_per_s=tokens / step, tokens_per_s_per_gpu=tokens / step / world,
                      step_time_s=step,
                      mfu=tokens / step * flops_per_token(mc, args.seq_len) / (world * PEAK_BF16))
    except Exception as err:  # out of memory or an unsupported layout: record it
        result["error"] = f"{type(err).__name__}: {err}"
        result["traceback"] = traceback.format_exc(limit=4)
    peak = [None] * world
    dist.all_gather_object(peak, torch.cuda.max_memory_allocated())
    result["peak_memory_gib_per_rank"] = [round(p / 2**30, 2) for p in peak]
    if dist.get_rank() == 0:
        print(json.dumps(result), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
