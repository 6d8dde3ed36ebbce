"""Long-context evaluation (next-token loss / perplexity) with attention CP, TP and DP:

    torchrun --nproc-per-node 4 examples/eval.py --model runs/hf --attn-cp 4 --seq-len 8192
    torchrun --nproc-per-node 4 examples/eval.py --model runs/hf --attn-tp 2 --attn-cp 2 \\
        --moe-dp 1 --data data/my --num-samples 16 --batch-size 2

``--model``: an HF directory (e.g. from examples/convert_checkpoint.py). ``--data``: a prepared
dataset prefix (examples/prepare_data.py); default: the embedded corpus with the byte tokenizer.
Samples are consecutive windows of ``--seq-len`` tokens. Exit code 2: invalid input, nothing ran.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from megatron_ext.communication.choices import CP_STRATEGIES, CPStrategy
from megatron_ext.layers.backend import (TRANSFORMER_IMPLS, TransformerImpl,
                                         resolve_transformer_impl)
from megatron_ext.data.dataset import open_dataset
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.evaluation.loss import EvalResult, evaluate_loss
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import build_groups, init_distributed
from megatron_ext.parallel.topology import add_layout_arguments, topology_from_args
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.decoder import CausalLM


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--data", default=None, help="dataset prefix (default: embedded corpus)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local HF tokenizer dir")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--cp-comm", choices=CP_STRATEGIES, default=CPStrategy.ALL_GATHER)
    p.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=TransformerImpl.AUTO,
                   help="layer implementation: native, te (TransformerEngine, CUDA) or auto (te "
                        "where it imports on CUDA)")
    add_layout_arguments(p, (Axis.ATTN_TP, Axis.ATTN_CP, Axis.MOE_TP, Axis.MOE_EP, Axis.MOE_DP))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # everything checkable before process groups exist
        impl = resolve_transformer_impl(args.transformer_impl)
        topo = topology_from_args(args, world)
        config = ModelConfig.from_hf_dir(args.model)
        config.check_fits(topo)
        dataset = open_dataset(args.data, load_tokenizer(args.tokenizer))
        if args.seq_len < 2 or args.num_samples < 1 or args.batch_size < 1:
            raise ValueError("--seq-len must be >= 2, --num-samples and --batch-size >= 1")
        if args.batch_size < topo.attn_dp:
            raise ValueError(f"--batch-size={args.batch_size} gives some of the attn_dp="
                             f"{topo.attn_dp} ranks no sequence")
        available = dataset.num_samples(args.seq_len)
        if available < args.num_samples:
            raise ValueError(f"the dataset holds {available} samples of {args.seq_len} tokens, "
                             f"fewer than --num-samples={args.num_samples}")
    except ValueError as err:
        print(f"invalid evaluation: {err}", file=sys.stderr)
        return 2
    init_distributed()
    groups = build_groups(topo)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = CausalLM.from_pretrained(args.model, groups, cp_strategy=args.cp_comm,
                                     transformer_impl=impl,
                                     device=device).eval()
    total, start = EvalResult(0.0, 0), time.perf_counter()
    for first in range(0, args.num_samples, args.batch_size):
        rows = range(first, min(first + args.batch_size, args.num_samples))
        batch = torch.stack([torch.as_tensor(dataset.sample(i, args.seq_len).astype("int64"))
                             for i in rows]).to(device)
        part = evaluate_loss(model, groups, batch, vocab_size=config.vocab_size)
        total = EvalResult(total.loss_sum + part.loss_sum, total.tokens + part.tokens)
    elapsed = time.perf_counter() - start
    if groups.global_rank == 0:
        print(f"layout: attn tp={topo.attn_tp} cp={topo.attn_cp} dp={topo.attn_dp} | moe "
              f"tp={topo.moe_tp} ep={topo.moe_ep} dp={topo.moe_dp} | {model.backend.describe()}")
        print(f"eval: {args.num_samples} x {args.seq_len} tokens, loss {total.loss:.4f}, "
              f"perplexity {total.perplexity:.2f}, {total.tokens / elapsed:.0f} tokens/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
