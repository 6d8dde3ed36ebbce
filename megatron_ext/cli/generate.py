"""Greedy generation with attention CP / TP / DP and any MoE layout (pp = 1):

    torchrun --nproc-per-node 4 examples/generate.py --model runs/hf --prompt "Once upon" \\
        --attn-tp 2 --attn-cp 2 --moe-dp 1 --max-new-tokens 64
    torchrun --nproc-per-node 4 examples/generate.py --model runs/hf --attn-cp 2 --moe-dp 2 \\
        --prompt "first prompt" --prompt "a second, longer prompt"

``--model``: an HF directory (e.g. from examples/convert_checkpoint.py). ``--tokenizer``: ``byte``
(default) or a local HF tokenizer directory; generation stops at its EOS token. Several
``--prompt`` flags make a batch (left-padded; split over attention DP). The prefill splits each
prompt over attention CP and every CP rank keeps the KV of its own chunks; decode steps attend to
the cache spread over the CP ranks. Exit code 2: invalid input, nothing ran.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from megatron_ext.communication.choices import CP_STRATEGIES, CPStrategy
from megatron_ext.data.tokenizer import load_tokenizer
from megatron_ext.layers.backend import (TRANSFORMER_IMPLS, TransformerImpl,
                                         resolve_transformer_impl)
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import (AxisGroup, ParallelGroups, build_groups,
                                          init_distributed)
from megatron_ext.parallel.topology import (GROUP_AXES, add_layout_arguments,
                                            topology_from_args)
from megatron_ext.serving import check_generate_inputs, greedy_generate
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.decoder import CausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text (repeat for a batch)")
    p.add_argument("--tokenizer", default="byte", help="'byte' or a local HF tokenizer dir")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-eos", action="store_true", help="ignore the tokenizer's EOS token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cp-comm", choices=CP_STRATEGIES, default=CPStrategy.ALL_GATHER,
                   help="K/V exchange of the CP prefill")
    p.add_argument("--transformer-impl", choices=TRANSFORMER_IMPLS, default=TransformerImpl.AUTO,
                   help="layer implementation: native, te (TransformerEngine, CUDA) or auto (te "
                        "where it imports on CUDA)")
    add_layout_arguments(p, (Axis.ATTN_TP, Axis.ATTN_CP, Axis.MOE_TP, Axis.MOE_EP, Axis.MOE_DP))
    return p.parse_args(argv)


def _left_pad(prompts: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


class _ConfigOnly:
    """What :func:`check_generate_inputs` reads of a model, before any model is built."""

    pre_process = post_process = True

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        self.config, self.groups = config, groups


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # everything checkable before process groups exist
        impl = resolve_transformer_impl(args.transformer_impl)
        topo = topology_from_args(args, world)
        config = ModelConfig.from_hf_dir(args.model)
        config.check_fits(topo)
        tok = load_tokenizer(args.tokenizer)
        encoded = [tok.encode(p).tolist() for p in args.prompt]
        if any(not p for p in encoded):
            raise ValueError("every --prompt must encode to at least one token")
        ids, mask = _left_pad(encoded, pad_id=0)
        eos = None if args.no_eos or tok.eos_id >= config.vocab_size else tok.eos_id
        stand_in = ParallelGroups(topo, 0, **{a: AxisGroup.single(a) for a in GROUP_AXES})
        check_generate_inputs(_ConfigOnly(config, stand_in), stand_in, ids, args.max_new_tokens,
                              eos, mask)
    except ValueError as err:
        print(f"invalid generation: {err}", file=sys.stderr)
        return 2
    init_distributed()
    groups = build_groups(topo)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    model = CausalLM.from_pretrained(args.model, groups, cp_strategy=args.cp_comm, dtype=dtype,
                                     transformer_impl=impl, device=device).eval()
    out = greedy_generate(model, groups, ids, args.max_new_tokens, eos, attention_mask=mask,
                          pad_token_id=eos)
    if groups.global_rank == 0:
        S = ids.shape[1]
        print(f"layout: attn tp={topo.attn_tp} cp={topo.attn_cp} dp={topo.attn_dp} | moe "
              f"tp={topo.moe_tp} ep={topo.moe_ep} dp={topo.moe_dp} | {model.backend.describe()}")
        for i, prompt in enumerate(args.prompt):
            new = out.tokens[i, S:S + out.steps].tolist()
            if eos is not None and eos in new:
                new = new[:new.index(eos)]
            print(f"[{i}] {prompt}{tok.decode(new)}")
        prompt_tokens = sum(out.prompt_lengths)
        print(f"prefill: {prompt_tokens} prompt tokens in {out.prefill_seconds:.3f} s | decode: "
              f"{out.steps} steps x {len(args.prompt)} rows in {out.decode_seconds:.3f} s, "
              f"{out.steps * len(args.prompt) / max(out.decode_seconds, 1e-9):.1f} tokens/s | "
              f"KV cache on rank 0: {out.cache_slots} slots/row, "
              f"{out.cache_bytes / 2 ** 10:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
