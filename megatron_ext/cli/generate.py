"""Generation (greedy or sampled) with attention CP / TP / DP and any MoE layout (pp = 1):

    torchrun --nproc-per-node 4 examples/generate.py --model runs/hf --prompt "Once upon" \\
        --attn-tp 2 --attn-cp 2 --moe-dp 1 --max-new-tokens 64
    torchrun --nproc-per-node 4 examples/generate.py --model runs/hf --attn-cp 2 --moe-dp 2 \\
        --prompt "first prompt" --prompt "a second, longer prompt"
    torchrun --nproc-per-node 2 examples/generate.py --model runs/hf --attn-cp 2 --moe-dp 1 \
        --prompts-file requests.jsonl --output completions.jsonl --temperature 0.7 --top-p 0.9

``--model``: an HF directory (e.g. from examples/convert_checkpoint.py). ``--tokenizer``: the
model's own (default, when its directory has tokenizer files), ``byte`` or a local HF tokenizer
directory; generation stops at its EOS token. Several
``--prompt`` flags make a batch (left-padded; split over attention DP). The prefill splits each
prompt over attention CP and every CP rank keeps the KV of its own chunks; decode steps attend to
the cache spread over the CP ranks. ``--max-positions-scale F`` scales RoPE for prompts + new tokens up to ``F`` times the trained
positions (as in examples/eval.py); longer requests are refused without scaling. Exit code 2:
invalid input, nothing ran.

``--prompts-file``: JSONL, one request per line: ``{"prompt": "..."}`` plus any of
``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed`` (defaults: the flags).
``--output``: JSONL, one line per request in input order: ``prompt``, ``completion``,
``token_ids``, ``finish_reason`` (``eos`` / ``length``). Rank 0 shows progress at every check
and the decode tokens/s at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from megatron_ext.cli.common import refuse, run_command
from megatron_ext.communication.choices import CP_STRATEGIES, CPStrategy
from megatron_ext.data.tokenizer import load_tokenizer, resolve_tokenizer
from megatron_ext.layers.backend import resolve_transformer_impl
from megatron_ext.parallel.axes import Axis
from megatron_ext.communication.symm_collectives import with_symm_collectives
from megatron_ext.parallel.groups import (AxisGroup, ParallelGroups, build_groups,
                                          init_distributed)
from megatron_ext.parallel.topology import (GROUP_AXES, add_layout_arguments,
                                            topology_from_args)
from megatron_ext.serving import (SamplingParams, check_generate_inputs, generate_batch,
                                  left_pad, resolve_decode_rows)
from megatron_ext.models.config import ModelConfig
from megatron_ext.cli.model_args import (add_model_build_arguments,
                                         add_position_scale_arguments, apply_position_scale)
from megatron_ext.layers.embedding import padded_vocab_size
from megatron_ext.models.hf_fields import add_strict_config_argument
from megatron_ext.models.decoder import CausalLM
from megatron_ext.checkpoint.hf import load_hf_checkpoint

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="HF model directory")
    p.add_argument("--prompt", action="append", default=[],
                   help="prompt text (repeat for a batch)")
    p.add_argument("--prompts-file", help="JSONL requests (module doc); adds to --prompt")
    p.add_argument("--output", help="write the completions as JSONL here (rank 0)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = whole vocabulary")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="sampling seed of every request")
    p.add_argument("--check-every", type=int, default=8,
                   help="decode steps between checks for finished requests")
    p.add_argument("--tokenizer", default="auto",
                   help="'auto' (default: the model's own when --model has tokenizer files, else "
                        "'byte'), 'byte' or a local HF tokenizer dir")
    add_strict_config_argument(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--no-eos", action="store_true", help="ignore the tokenizer's EOS token")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--cp-comm", choices=CP_STRATEGIES, default=CPStrategy.ALL_GATHER,
                   help="K/V exchange of the CP prefill")
    p.add_argument("--decode-rows", default="auto",
                   help="decode rows under CP: 'owner' (one CP rank per row), 'replicated' "
                        "(every CP rank runs every row: 2 collectives per layer instead of 4; "
                        "needs attn_tp 1 and --moe-dp covering the CP group) or 'auto' "
                        "(replicated where it applies, the default)")
    add_model_build_arguments(p)
    add_position_scale_arguments(p)
    add_layout_arguments(p, (Axis.ATTN_TP, Axis.ATTN_CP, Axis.MOE_TP, Axis.MOE_EP, Axis.MOE_DP))
    return p.parse_args(argv)


_REQUEST_KEYS = ("prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed")


def _requests(args) -> list[tuple[str, SamplingParams]]:
    """``(prompt, SamplingParams)`` of every request (``ValueError`` naming the file and line)."""
    defaults = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    out = [(text, SamplingParams(**defaults)) for text in args.prompt]
    if args.prompts_file:
        try:
            lines = open(args.prompts_file, encoding="utf-8").read().splitlines()
        except OSError as err:
            raise ValueError(f"--prompts-file {args.prompts_file}: {err.strerror}") from None
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"--prompts-file {args.prompts_file} line {n}"
            try:
                item = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err.msg})") from None
            if not isinstance(item, dict) or not isinstance(item.get("prompt"), str):
                raise ValueError(f'{where}: needs an object with a string "prompt"')
            unknown = sorted(set(item) - set(_REQUEST_KEYS))
            if unknown:
                raise ValueError(f"{where}: unknown keys {unknown} (known: {list(_REQUEST_KEYS)})")
            try:
                params = SamplingParams(**{**defaults, **{k: v for k, v in item.items()
                                                          if k != "prompt"}})
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
            out.append((item["prompt"], params))
    if not out:
        raise ValueError("no prompts: pass --prompt or --prompts-file")
    return out


class _ConfigOnly:
    """What :func:`check_generate_inputs` reads of a model, before any model is built."""

    pre_process = post_process = True

    def __init__(self, config: ModelConfig, groups: ParallelGroups):
        self.config, self.groups = config, groups


def _run(argv: list[str] | None = None) -> int:
    args = _args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:  # everything checkable before process groups exist
        impl = resolve_transformer_impl(args.transformer_impl)
        topo = topology_from_args(args, world)
        config = apply_position_scale(
            ModelConfig.from_hf_dir(args.model, strict=args.strict_config), args)
        config.check_fits(topo)
        padded_vocab_size(config.vocab_size, topo.attn_tp, args.make_vocab_size_divisible_by)
        tok = load_tokenizer(resolve_tokenizer(args.tokenizer, args.model))
        requests = _requests(args)
        encoded = [tok.encode(text).tolist() for text, _ in requests]
        for i, p in enumerate(encoded):
            if not p:
                raise ValueError(f"prompt {i} ({requests[i][0]!r}) encodes to no token")
        ids, mask = left_pad(encoded, pad_id=tok.pad_id if tok.pad_id < config.vocab_size else 0)
        params = [p for _, p in requests]
        eos = None if args.no_eos or tok.eos_id >= config.vocab_size else tok.eos_id
        stand_in = ParallelGroups(topo, 0, **{a: AxisGroup.single(a) for a in GROUP_AXES})
        check_generate_inputs(_ConfigOnly(config, stand_in), stand_in, ids,
                              [p.max_new_tokens for p in params], eos, mask)
        if isinstance(args.check_every, bool) or args.check_every < 1:
            raise ValueError(f"--check-every={args.check_every} must be >= 1")
        try:
            resolve_decode_rows(args.decode_rows, topo)
        except ValueError as err:
            raise ValueError(f"--decode-rows: {err}") from None
    except (ValueError, OSError) as err:
        return refuse("generate.py", err, "invalid generation")
    note = config.ignored_fields_note(args.model)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, flush=True)
    init_distributed()
    groups = build_groups(topo)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    if cuda:  # decode-size collectives through symmetric memory (NCCL where it can't serve)
        groups = with_symm_collectives(groups, device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    # the config as checked above (it may carry --max-positions-scale), the directory's weights
    model = CausalLM.for_stage(config, groups, cp_strategy=args.cp_comm, dtype=dtype,
                               transformer_impl=impl, device=device,
                               make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    load_hf_checkpoint(model, args.model, strict=True)
    model.eval()
    rank0 = groups.global_rank == 0
    total = len(requests)

    def progress(steps: int, finished: int) -> None:
        if rank0:
            done = int(30 * finished / total)
            print(f"\r[{'#' * done}{'.' * (30 - done)}] {finished}/{total} requests done, "
                  f"{steps} steps", end="", file=sys.stderr, flush=True)

    out = generate_batch(model, groups, ids, params, eos, attention_mask=mask,
                         pad_token_id=eos, check_every=args.check_every, on_check=progress,
                         decode_rows=args.decode_rows)
    if rank0:
        print(file=sys.stderr)
        S = ids.shape[1]
        print(f"layout: attn tp={topo.attn_tp} cp={topo.attn_cp} dp={topo.attn_dp} | moe "
              f"tp={topo.moe_tp} ep={topo.moe_ep} dp={topo.moe_dp} | {model.backend.describe()}")
        rows = []
        for i, (text, _) in enumerate(requests):
            ids_new = out.tokens[i, S:S + out.new_tokens[i]].tolist()
            hit_eos = eos is not None and bool(ids_new) and ids_new[-1] == eos
            shown = ids_new[:-1] if hit_eos else ids_new
            rows.append(dict(prompt=text, completion=tok.decode(shown), token_ids=ids_new,
                             finish_reason="eos" if hit_eos else "length"))
            if not args.output:
                print(f"[{i}] {text}{rows[-1]['completion']}")
        if args.output:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps(r) + "\n" for r in rows)
            print(f"{len(rows)} completions -> {args.output}")
        prompt_tokens = sum(out.prompt_lengths)
        print(f"prefill: {prompt_tokens} prompt tokens in {out.prefill_seconds:.3f} s | decode: "
              f"{sum(out.new_tokens)} tokens ({out.steps_run} steps, up to {total} rows) in "
              f"{out.decode_seconds:.3f} s, {out.decode_tokens_per_second:.1f} tokens/s | "
              f"KV cache on rank 0: {out.cache_slots} slots/row, "
              f"{out.cache_bytes / 2 ** 10:.1f} KiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("generate.py", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
