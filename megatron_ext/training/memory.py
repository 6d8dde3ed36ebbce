"""Per-rank training memory estimate: parameters, main weights, gradients, optimizer state,
activations (per recompute mode), communication buffers and the optimizer step's temporary (the
peak is the state plus the larger of the last three) — and which layouts of a world fit.

    python -m megatron_ext.training.memory --model qwen3-30b-a3b --world 8 --attn-cp 2 --moe-ep 8 \
        --moe-dp 1 --seq-len 4096 --micro-batch-size 1 --recompute selective
    python -m megatron_ext.training.memory --model qwen3-30b-a3b --world 16 --gpu-memory-gb 141

Model state is exact: the rank's parameters are built on the ``meta`` device from its layout (so
every ``ParamSpec`` split and sync group is the real one) and bucketed as the optimizer does.
Activations are a count of what autograd keeps per token, mirroring the layers (norm inputs and
outputs, q/k/v/out and log-sum-exp of flash-style CP attention, router logits, the MoE's sorted
rows, weighted SwiGLU inputs and row weights, the loss's input: it keeps no logits), times the
micro-batches a pipeline
stage holds under 1F1B; ``tests/integration/test_memory.py`` checks it against the bytes autograd
saves on CPU.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.communication.choices import (CP_STRATEGIES, RECOMPUTE_MODES, Recompute,
                                                check_choice)
from megatron_ext.layers.lm_head_loss import CHUNK_BYTES
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import get_spec
from megatron_ext.parallel.topology import LAYOUT_SIZES, Topology, add_layout_arguments

GIB = 2**30


def format_bytes(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank (of the first stage: it holds the most 1F1B micro-batches)."""

    params: int
    main_weights: int
    grads: int
    optimizer: int
    activations: int
    buffers: int
    step_temp: int = 0               # AdamW's temporary during the step (activations are freed)

    @property
    def total(self) -> int:
        """The peak: model state plus the larger of forward/backward's activations and buffers
        and the optimizer step's temporary (they are never live together)."""
        return (self.params + self.main_weights + self.grads + self.optimizer
                + max(self.activations + self.buffers, self.step_temp))

    def rows(self) -> list[tuple[str, int]]:
        return [("parameters", self.params), ("main weights", self.main_weights),
                ("gradients", self.grads), ("optimizer state", self.optimizer),
                ("activations", self.activations), ("comm/KV buffers", self.buffers),
                ("optimizer step temp", self.step_temp), ("total", self.total)]

    def describe(self) -> str:
        return ", ".join(f"{k} {format_bytes(v)}" for k, v in self.rows())


def _stage_params(config, topo: Topology, rank: int) -> list[torch.nn.Parameter]:
    from megatron_ext.models.decoder import CausalLM
    from megatron_ext.parallel.stages import stage_layer_range

    groups = ParallelGroups.without_process_groups(topo, rank)
    stage = groups.coords.pp
    model = CausalLM(config, groups, pre_process=stage == 0, post_process=stage == topo.pp - 1,
                     layer_range=stage_layer_range(config.num_layers, topo.pp, stage),
                     device=torch.device("meta"))
    return [p for p in model.parameters() if p.requires_grad]


def _param_shares(config, topo: Topology, rank: int, distributed: bool
                  ) -> list[tuple[int, int, bool]]:
    """``(elements, elements owned by rank's optimizer, is a matrix)`` per parameter of ``rank``:
    1/N of it with the distributed optimizer (N = size of its first non-trivial sync group)."""
    groups = ParallelGroups.without_process_groups(topo, rank)
    out = []
    for p in _stage_params(config, topo, rank):
        shard = 1
        if distributed:
            axes = [a for a in get_spec(p).grad_sync if groups.axis(a).size > 1]
            shard = groups.axis(axes[0]).size if axes else 1
        out.append((p.numel(), p.numel() // shard, len(get_spec(p).global_shape) >= 2))
    return out


def model_state_bytes(config, topo: Topology, rank: int, bf16: bool, distributed: bool
                      ) -> tuple[int, int, int, int]:
    """``(params, main weights, grads, optimizer)`` bytes of ``rank``: bf16 parameters with fp32
    main weights/grads, or fp32 parameters updated in place; AdamW's two fp32 moments; the main
    weights and moments of 1/N of each parameter with the distributed optimizer (N = size of its
    first non-trivial sync group)."""
    params = main = grads = optim = 0
    for n, owned, _ in _param_shares(config, topo, rank, distributed):
        params += n * (2 if bf16 else 4)
        grads += n * 4
        main += owned * 4 if bf16 else 0
        optim += owned * 8
    return params, main, grads, optim


def optimizer_step_bytes(config, topo: Topology, rank: int, distributed: bool) -> int:
    """AdamW's temporary inside the step: ``sqrt(exp_avg_sq)`` of one param group at a time
    (``adamw_param_groups``: at most ``STEP_CHUNK_BYTES`` of fp32 main weights, or one larger
    piece alone), so the largest group's bytes."""
    from megatron_ext.training.optimizer import STEP_CHUNK_BYTES

    largest = 0
    for matrix in (True, False):
        sizes = [owned * 4 for _, owned, m in _param_shares(config, topo, rank, distributed)
                 if m == matrix]
        if sizes:
            largest = max(largest, min(sum(sizes), max(STEP_CHUNK_BYTES, max(sizes))))
    return largest


KERNELS = ("cuda", "torch")


def _norm_bytes(width: int, b: int, kernels: str) -> int:
    """What one RMSNorm keeps per token: the Triton kernel its input and 1/rms; the torch
    composition (CPU) a float32 copy (or the float32 input itself), the normalised value cast
    back, and 1/rms."""
    return width * b + 4 if kernels == "cuda" else width * max(b, 4) + width * b + 4


def _swiglu_kept(recompute: str, kernels: str) -> int:
    """``[tokens, I]`` tensors a plain SwiGLU MLP keeps per token: gate and up, + the activation
    for ``down_proj`` without selective recompute, + ``silu(gate)`` in the torch composition."""
    if recompute == Recompute.SELECTIVE:
        return 2
    return 3 if kernels == "cuda" else 4


def activation_bytes(config, topo: Topology, seq_len: int, micro_batch_size: int,
                     recompute: str, bf16: bool, stage: int = 0, micro_batches: int = 1,
                     kernels: str = "cuda", cp_comm: str = "all_gather") -> int:
    """What autograd keeps for one stage's forward (see the module doc), times the micro-batches
    in flight on ``stage`` (1F1B: ``min(pp - stage, micro_batches)``). ``kernels``: the layers'
    CUDA paths (Triton norm and SwiGLU: what a GPU run keeps) or their torch compositions (CPU).
    ``cp_comm``: CP attention's ``p2p`` keeps the K/V its forward ring ended with (one more local
    K/V per layer when ``attn_cp > 1``)."""
    check_choice("kernels", kernels, KERNELS)
    from megatron_ext.parallel.stages import stage_layer_range

    b = 2 if bf16 else 4
    h, d = config.hidden_size, config.head_dim
    tp, cp = topo.attn_tp, topo.attn_cp
    t = micro_batch_size * -(-seq_len // (2 * cp)) * 2  # tokens of this rank's attention group
    nq, nkv = config.num_heads // tp, max(1, config.num_kv_heads // tp)
    start, stop = stage_layer_range(config.num_layers, topo.pp, stage)
    per_layer = []
    for i in range(start, stop):
        norms = 2 * _norm_bytes(h, b, kernels)            # input and post-attention norms
        attn = h * b + 2 * d * 4                          # projections' input, cos/sin
        if config.qk_norm:  # per head (RoPE keeps neither its input nor its output)
            attn += _norm_bytes((nq + nkv) * d, b, kernels) + (nq + nkv - 1) * 4
        attn += (nq + 2 * nkv) * d * b + nq * d * b + nq * 4  # rotated q/k, v, output, lse
        if cp > 1 and cp_comm == "p2p":
            attn += 2 * nkv * d * b                       # the peer K/V kept for backward
        if config.is_sparse(i):
            k = _moe_rows_per_token(topo)
            rows = k * config.num_experts_per_tok / topo.moe_ep  # expert rows per local token
            inter = config.moe_intermediate_size // topo.moe_tp
            # the weighted SwiGLU keeps gate and up (+ its output for down_proj without
            # selective recompute) and the row weight; the combine keeps no rows (indices only)
            swiglu = (2 if recompute == Recompute.SELECTIVE else 3) * inter * b + b
            mlp = k * (h * b + config.num_experts * 4 + config.num_experts_per_tok * 12) \
                + rows * (h * b + swiglu + 16)
            if config.shared_expert_intermediate_size:
                si = config.shared_expert_intermediate_size // topo.moe_shard_size
                # its input is the router's (one saved tensor): only its SwiGLU counts
                mlp += k * _swiglu_kept(recompute, kernels) * si * b
        else:
            inter = config.intermediate_size // tp
            mlp = h * b + _swiglu_kept(recompute, kernels) * inter * b
        per_token = norms + attn + mlp
        if recompute == Recompute.FULL:
            per_token = 2 * h * b                        # the layer's inputs: hidden, residual
        per_layer.append(per_token)
    total = t * sum(per_layer)
    if stage == topo.pp - 1:  # final norm; the loss keeps its input (no logits) and per token
        total += t * (_norm_bytes(h, b, kernels) + h * b + 4 + 8 + 1)  # lse, label, keep
    in_flight = min(topo.pp - stage, micro_batches) if topo.pp > 1 else 1
    return int(total * in_flight)


def _moe_rows_per_token(topo: Topology) -> float:
    """MoE input rows per TP_ATTN_FULL row of a rank: k (a token group's tokens), or 1/g when g
    shards tile one attention-TP group (each shard takes its members' SCATTERED slices)."""
    return topo.token_group_size / topo.shards_per_attn_tp_group


def buffer_bytes(config, topo: Topology, seq_len: int, micro_batch_size: int, bf16: bool) -> int:
    """Transient buffers: the CP all-gathered K/V, and the larger of the MoE token-group gather
    and the LM head's backward (:mod:`megatron_ext.layers.lm_head_loss`)."""
    b = 2 if bf16 else 4
    nkv = max(1, config.num_kv_heads // topo.attn_tp)
    full = micro_batch_size * seq_len
    kv = 2 * full * nkv * config.head_dim * b if topo.attn_cp > 1 else 0
    t = full / topo.attn_cp
    moe = t * _moe_rows_per_token(topo) * config.hidden_size * b * 2 if any(config.sparse_layers) \
        else 0
    # the LM head's backward (the first thing backward runs, when every activation is held):
    # its weight gradient, and one column chunk of logits and of their gradient
    vocab = -(-config.vocab_size // topo.attn_tp)
    lm_head = vocab * config.hidden_size * b + 2 * min(CHUNK_BYTES, int(t) * vocab * b)
    return int(kv + max(moe, lm_head))


def estimate(config, topo: Topology, *, seq_len: int, micro_batch_size: int, recompute: str,
             bf16: bool = True, distributed: bool = True, micro_batches: int = 1,
             cp_comm: str = "all_gather") -> MemoryEstimate:
    """The estimate for the first stage's rank 0 (the busiest under 1F1B)."""
    params, main, grads, optim = model_state_bytes(config, topo, 0, bf16, distributed)
    acts = activation_bytes(config, topo, seq_len, micro_batch_size, recompute, bf16, 0,
                            micro_batches, cp_comm=cp_comm)
    return MemoryEstimate(params, main, grads, optim, acts,
                          buffer_bytes(config, topo, seq_len, micro_batch_size, bf16),
                          optimizer_step_bytes(config, topo, 0, distributed))


def advise_recompute(config, topo: Topology, capacity_bytes: float, **kw) -> Optional[str]:
    """The lightest recompute mode whose estimate fits ``capacity_bytes`` (None: none fits)."""
    for mode in RECOMPUTE_MODES:
        if estimate(config, topo, recompute=mode, **kw).total <= capacity_bytes:
            return mode
    return None


def layouts_of(world: int, config) -> list[Topology]:
    """Every layout of ``world`` ranks the model fits (pp, attention tp/cp, experts ep/tp)."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    found = []
    for pp in divisors:
        stage = world // pp
        for tp in (d for d in divisors if stage % d == 0):
            for cp in (d for d in divisors if stage % (tp * d) == 0):
                for ep in (d for d in divisors if stage % d == 0):
                    for mt in (d for d in divisors if stage % (ep * d) == 0):
                        try:
                            topo = Topology(world=world, pp=pp, attn_tp=tp, attn_cp=cp,
                                            moe_ep=ep, moe_tp=mt)
                            config.check_fits(topo)
                            if config.num_layers < pp:
                                continue
                        except ValueError:
                            continue
                        found.append(topo)
    return found


def _layout_name(topo: Topology) -> str:
    return (f"pp{topo.pp} tp{topo.attn_tp} cp{topo.attn_cp} dp{topo.attn_dp} | "
            f"ep{topo.moe_ep} etp{topo.moe_tp} edp{topo.moe_dp}")


def main(argv: Optional[list[str]] = None) -> int:
    from megatron_ext.models.config import load_model_config
    from megatron_ext.models.hf_fields import add_strict_config_argument

    parser = argparse.ArgumentParser(prog="python -m megatron_ext.training.memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="preset name or HF directory")
    add_strict_config_argument(parser)
    parser.add_argument("--world", type=int, required=True)
    add_layout_arguments(parser)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro-batch-size", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=1, help="per rank per step")
    parser.add_argument("--recompute", choices=RECOMPUTE_MODES, default="none")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--cp-comm", choices=CP_STRATEGIES, default="all_gather",
                        help="CP attention's K/V exchange (p2p keeps one more K/V per layer)")
    parser.add_argument("--distributed-optimizer", type=int, choices=(0, 1), default=1)
    parser.add_argument("--gpu-memory-gb", type=float, default=None,
                        help="list every layout of --world that fits this memory")
    args = parser.parse_args(argv)
    try:
        config = load_model_config(args.model, strict=args.strict_config)
        note = config.ignored_fields_note(args.model)
        if note:
            print(note)
        kw = dict(seq_len=args.seq_len, micro_batch_size=args.micro_batch_size,
                  bf16=args.dtype == "bf16", distributed=bool(args.distributed_optimizer),
                  micro_batches=args.micro_batches, cp_comm=args.cp_comm)
        if args.gpu_memory_gb is None:
            sizes = {k: getattr(args, k) for k in LAYOUT_SIZES if getattr(args, k) is not None}
            topo = Topology(world=args.world, **sizes)
            config.check_fits(topo)
            print(f"{args.model} {_layout_name(topo)}, seq {args.seq_len} x mbs "
                  f"{args.micro_batch_size}, {args.dtype}, distributed optimizer "
                  f"{bool(args.distributed_optimizer)}; per rank:")
            for mode in RECOMPUTE_MODES:
                est = estimate(config, topo, recompute=mode, **kw)
                print(f"  recompute {mode:9s}: " + est.describe())
            return 0
        limit = args.gpu_memory_gb * 1e9
        print(f"layouts of {args.world} ranks for {args.model} within {args.gpu_memory_gb} GB "
              f"(seq {args.seq_len} x mbs {args.micro_batch_size}, {args.dtype}):")
        for topo in layouts_of(args.world, config):
            mode = advise_recompute(config, topo, limit, **kw)
            if mode is not None:
                est = estimate(config, topo, recompute=mode, **kw)
                print(f"  {_layout_name(topo):40s} recompute {mode:9s} "
                      f"{est.total / GIB:7.1f} GiB")
        return 0
    except ValueError as err:
        print(f"memory: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
