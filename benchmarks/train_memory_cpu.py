"""Where a training step's memory goes, measured on CPU: live tensor bytes after each phase and the
peak inside it, for a width-scaled model of the 2-GPU race's structure (BENCHMARKS §12: Qwen3-30B-
A3B layers, bf16 with fp32 main weights, distributed optimizer, selective recompute), next to the
estimator's model state. Shows which phase's transients sit above the state (the GPU peak).

    torchrun --nproc-per-node 2 benchmarks/train_memory_cpu.py             # layout a: dp 2 / ep 2
    python benchmarks/train_memory_cpu.py --world1                         # one rank, ep 1

``--scale 8`` divides every width (hidden, head_dim, expert width, vocab) and the sequence by 8,
so each term of the real run (state ~ width^2, activations ~ tokens x width) shrinks by 8^2 = 64
alike (so is the optimizer's step chunk); figures are printed as measured and x64 (``real-size
GiB``). One JSON line per rank.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_ext.models.config import load_model_config  # noqa: E402
from megatron_ext.parallel.groups import build_groups, init_distributed  # noqa: E402
from megatron_ext.training import optimizer as optimizer_module  # noqa: E402
from megatron_ext.training.config import TrainConfig  # noqa: E402
from megatron_ext.training.live_memory import LiveMemory  # noqa: E402
from megatron_ext.training.memory import estimate  # noqa: E402
from megatron_ext.training.trainer import Trainer, validate_launch  # noqa: E402

MODEL = "qwen3-30b-a3b-12l"


def scaled_overrides(scale: int, layers: int) -> dict:
    mc = load_model_config(MODEL)
    return dict(hidden_size=mc.hidden_size // scale, head_dim=mc.head_dim // scale,
                moe_intermediate_size=mc.moe_intermediate_size // scale,
                intermediate_size=mc.intermediate_size // scale,
                vocab_size=mc.vocab_size // scale // 128 * 128, num_layers=layers)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=8)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=4096, help="real size; divided by --scale")
    parser.add_argument("--recompute", choices=("none", "selective", "full"), default="selective")
    parser.add_argument("--no-distributed-optimizer", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    rank, world = init_distributed(backend="gloo")
    torch.set_num_threads(1)
    optimizer_module.STEP_CHUNK_BYTES //= args.scale ** 2  # the real run's chunk, scaled alike
    layout = dict(attn_dp=world, moe_ep=world, moe_dp=1)
    seq = args.seq_len // args.scale
    cfg = TrainConfig(model=MODEL, model_overrides=scaled_overrides(args.scale, args.layers),
                      seq_len=seq, micro_batch_size=1, global_batch_size=world,
                      train_steps=args.steps, warmup_steps=1, progress=False, tensorboard=False,
                      save_at_end=False, save_interval=0, dtype="bf16", device="cpu",
                      recompute=args.recompute, output_dir="/tmp/train_memory_cpu",
                      distributed_optimizer=not args.no_distributed_optimizer, **layout)
    groups = build_groups(cfg.topology(world))
    plan = validate_launch(cfg, world)
    with LiveMemory() as mem:
        trainer = Trainer(cfg, groups, plan)
        after = {"built": mem.current}
        opt = trainer.optimizer
        for _ in range(args.steps):
            batch = trainer.step_batch()
            opt.zero_grad(trainer.micro_batches_per_rank)
            with mem.phase("forward+backward"):
                trainer._forward_backward(batch, False)
            after["backward"] = mem.current
            with mem.phase("grad sync"):
                opt.finish_grad_sync()
                norm = opt.grad_norm()
            with mem.phase("optimizer step"):
                opt.step(trainer.step, norm)
            trainer.step += 1
            trainer.consumed_samples += cfg.global_batch_size
            after["step"] = mem.current
    est = estimate(plan.model_config, groups.topology, seq_len=seq, micro_batch_size=1,
                   recompute=args.recompute, bf16=True, distributed=opt.distributed)
    state = est.params + est.main_weights + est.grads + est.optimizer
    f = args.scale ** 2
    gib = lambda n: round(n * f / 2**30, 2)  # noqa: E731
    out = {"rank": rank, "world": world, "scale": args.scale, "layers": args.layers,
           "seq_len": seq, "recompute": args.recompute, "distributed": opt.distributed,
           "estimated_state_bytes": state, "estimated_activation_bytes": est.activations,
           "live_after": after, "peak_in": mem.peaks, "peak": mem.peak,
           "real_size_gib": {"estimated_state": gib(state), "estimated_activations":
                             gib(est.activations), **{f"peak {k}": gib(v)
                                                      for k, v in mem.peaks.items()},
                             "live after step": gib(after["step"])}}
    print(json.dumps(out), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
