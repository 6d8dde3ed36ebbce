"""Long-context evaluation with attention CP, TP and DP, on an HF directory or a training
checkpoint (any layout it was saved in, no conversion):

    torchrun --nproc-per-node 4 examples/eval.py --model runs/hf --attn-cp 4 --seq-len 8192
    torchrun --nproc-per-node 2 examples/eval.py --model runs/pretrain/checkpoints --attn-cp 2 \\
        --task position_loss passkey needle --lengths 1024,2048,4096 --depths 0,0.5,1 \\
        --output runs/eval
    torchrun --nproc-per-node 2 examples/eval.py --model runs/hf --attn-cp 2 --task lm_eval \\
        --lm-eval-tasks my_task --lm-eval-include tasks/

Tasks (``--task``, several per run): ``perplexity`` and ``position_loss`` (next-token loss
overall and per log-spaced position bucket, over ``--num-samples`` windows of ``--seq-len``
tokens of ``--data``; default: the embedded corpus), ``passkey`` and ``needle`` (greedy retrieval
over ``--lengths`` × ``--depths``; the needle sits in ``--haystack`` text), ``lm_eval``
(lm-evaluation-harness tasks through :mod:`megatron_ext.evaluation.lm_eval_adapter`).

Context extension: ``--max-positions-scale F`` scales RoPE by ``F`` (the config's own scaling
type with factor ``F``, else ``--rope-scaling-type``, default ``linear``), so lengths up to ``F``
times the trained positions are evaluated with the scaled model; without scaling (in the config
or from the flag) longer lengths are refused. ``results.json`` records the scaling with the
model config.

Output in ``--output``: ``results.json`` (every number, the model, the layout, the command), PNG
plots and ``report.md``. ``--resume`` continues a results file, skipping finished cells.
Exit code 2: invalid input, nothing ran and nothing was overwritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import sys

import torch

from megatron_ext.cli.common import refuse, run_command
from megatron_ext.communication.choices import CP_STRATEGIES, CPStrategy
from megatron_ext.evaluation.context import EvalContext
from megatron_ext.layers.backend import resolve_transformer_impl
from megatron_ext.evaluation.model_source import open_model_source
from megatron_ext.evaluation.results import ResultsStore
from megatron_ext.evaluation.retrieval import DEFAULT_ANSWER_TOKENS, GridSettings
from megatron_ext.evaluation.windows import WindowSettings
from megatron_ext.cli.model_args import (add_model_build_arguments,
                                         add_position_scale_arguments, apply_position_scale)
from megatron_ext.layers.embedding import padded_vocab_size
from megatron_ext.models.hf_fields import add_strict_config_argument
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import build_groups, init_distributed
from megatron_ext.parallel.topology import add_layout_arguments, topology_from_args

TASKS = ("perplexity", "position_loss", "passkey", "needle", "lm_eval")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _int_list(text: str) -> tuple[int, ...]:
    """``"1K,2048,8k"`` -> ``(1024, 2048, 8192)``."""
    out = []
    for item in text.split(","):
        item = item.strip().lower()
        scale = 1024 if item.endswith("k") else 1
        out.append(int(item.rstrip("k")) * scale)
    return tuple(out)


def _float_list(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True,
                   help="HF model directory, or a training checkpoint (step_N or its parent)")
    p.add_argument("--task", nargs="+", action="extend", choices=TASKS,
                   help="tasks to run, several allowed (default: perplexity)")
    p.add_argument("--output", default=None, help="directory for results.json, plots and "
                                                  "report.md (default: print only)")
    p.add_argument("--resume", action="store_true", help="continue --output's results.json")
    p.add_argument("--no-plots", action="store_true", help="write no PNG plots")
    p.add_argument("--data", default=None, help="dataset prefix (default: embedded corpus)")
    p.add_argument("--tokenizer", default="auto",
                   help="'auto' (default: the model's own: its directory's tokenizer files or "
                        "the one a training checkpoint was trained with; else 'byte'), 'byte' "
                        "or a local HF tokenizer dir")
    add_strict_config_argument(p)
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="model dtype (default: as stored)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--allow-long-context", action="store_true",
                   help="perplexity/position_loss beyond the model's positions as they are, "
                        "without RoPE scaling (extrapolation; refused without this flag)")
    add_position_scale_arguments(p)
    p.add_argument("--num-samples", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1, help="sequences / prompts per forward")
    p.add_argument("--num-buckets", type=int, default=16, help="position_loss: log-spaced "
                                                               "buckets")
    p.add_argument("--lengths", type=_int_list, default=(1024, 2048, 4096),
                   help="passkey/needle prompt lengths, e.g. 1K,2K,4K")
    p.add_argument("--depths", type=_float_list, default=(0.0, 0.25, 0.5, 0.75, 1.0),
                   help="passkey/needle needle depths in [0, 1]")
    p.add_argument("--samples-per-cell", type=int, default=4)
    p.add_argument("--answer-tokens", type=int, default=DEFAULT_ANSWER_TOKENS,
                   help="tokens generated per retrieval answer")
    p.add_argument("--passkey-digits", type=int, default=5)
    p.add_argument("--haystack", default=None, help="needle: haystack text file (default: the "
                                                    "embedded corpus)")
    p.add_argument("--seed", type=int, default=0, help="retrieval prompts' seed")
    p.add_argument("--lm-eval-tasks", default=None, help="lm_eval: comma-separated task names")
    p.add_argument("--lm-eval-include", default=None, help="lm_eval: directory of task YAMLs")
    p.add_argument("--lm-eval-limit", type=int, default=None, help="lm_eval: examples per task")
    p.add_argument("--cp-comm", choices=CP_STRATEGIES, default=CPStrategy.ALL_GATHER)
    add_model_build_arguments(p)
    add_layout_arguments(p, (Axis.ATTN_TP, Axis.ATTN_CP, Axis.MOE_TP, Axis.MOE_EP, Axis.MOE_DP))
    args = p.parse_args(argv)
    args.task = list(dict.fromkeys(args.task or ["perplexity"]))
    return args


def _plan(args, world: int) -> dict:
    """Everything checkable before process groups exist (``ValueError`` naming the setting)."""
    from megatron_ext.data.tokenizer import load_tokenizer

    impl = resolve_transformer_impl(args.transformer_impl)
    topo = topology_from_args(args, world)
    if topo.pp != 1:
        raise ValueError(f"evaluation runs one pipeline stage; got pp={topo.pp}")
    source = open_model_source(args.model, strict_config=args.strict_config)
    source = dataclasses.replace(source, config=apply_position_scale(source.config, args))
    config = source.config
    config.check_fits(topo)
    padded_vocab_size(config.vocab_size, topo.attn_tp, args.make_vocab_size_divisible_by)
    own = args.tokenizer in (None, "auto")
    tokenizer = load_tokenizer((source.tokenizer or "byte") if own else args.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"--tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens, more "
                         f"than the model's vocab_size={config.vocab_size}")
    if args.resume and not args.output:
        raise ValueError("--resume needs --output (the directory whose results.json to continue)")
    plan = dict(topo=topo, source=source, tokenizer=tokenizer, impl=impl, tasks={})
    store = plan["store"] = ResultsStore(args.output, source.describe(), resume=args.resume)
    if {"perplexity", "position_loss"} & set(args.task):
        from megatron_ext.data.dataset import open_dataset

        windows = WindowSettings(args.seq_len, args.num_samples, args.batch_size)
        plan["dataset"] = open_dataset(args.data, tokenizer)
        windows.check(plan["dataset"], topo.attn_dp,
                      None if args.allow_long_context else config.position_limit,
                      config.position_limit_text())
        for name in ("perplexity", "position_loss"):
            if name in args.task:
                extra = {"num_buckets": args.num_buckets} if name == "position_loss" else {}
                if args.num_buckets < 1:
                    raise ValueError(f"--num-buckets={args.num_buckets} must be >= 1")
                store.task(name, dict(windows.to_dict(), data=plan["dataset"].source, **extra))
                plan["tasks"][name] = (windows, plan["dataset"], *extra.values())
    for name in ("passkey", "needle"):
        if name not in args.task:
            continue
        grid = GridSettings(args.lengths, args.depths, args.samples_per_cell, args.answer_tokens,
                            args.seed)
        if name == "passkey":
            from megatron_ext.evaluation.passkey import PasskeyBuilder

            builder = PasskeyBuilder(tokenizer, args.passkey_digits)
            extra = {"passkey_digits": args.passkey_digits}
        else:
            from megatron_ext.evaluation.needle import NeedleBuilder, read_haystack

            builder = NeedleBuilder(tokenizer, read_haystack(args.haystack))
            extra = {"haystack": os.path.abspath(args.haystack) if args.haystack else "corpus"}
        grid.check_fits(config.position_limit, builder.fixed_tokens, topo.attn_dp,
                        config.position_limit_text())
        store.task(name, dict(grid.to_dict(), tokenizer=tokenizer.name, **extra))
        plan["tasks"][name] = (grid, builder)
    if "lm_eval" in args.task:
        from megatron_ext.evaluation.lm_eval_task import LMEvalSettings

        settings = LMEvalSettings.from_args(args)
        store.task("lm_eval", settings.to_dict())
        plan["tasks"]["lm_eval"] = settings
    return plan


def _run_task(name: str, ctx: EvalContext, settings) -> dict:
    if name == "perplexity":
        from megatron_ext.evaluation.perplexity import run_perplexity
        return run_perplexity(ctx, *settings)
    if name == "position_loss":
        from megatron_ext.evaluation.position_loss import run_position_loss
        return run_position_loss(ctx, *settings)
    if name == "passkey":
        from megatron_ext.evaluation.passkey import run_passkey
        return run_passkey(ctx, *settings)
    if name == "needle":
        from megatron_ext.evaluation.needle import run_needle
        return run_needle(ctx, *settings)
    from megatron_ext.evaluation.lm_eval_task import run_lm_eval
    return run_lm_eval(ctx, settings)


def _print_summary(name: str, summary: dict) -> None:
    if name == "perplexity":
        print(f"perplexity: loss {summary['loss']:.4f}, perplexity {summary['perplexity']:.2f} "
              f"over {summary['tokens']} tokens, {summary['tokens_per_second']:.0f} tokens/s")
    elif name == "position_loss":
        curve = ", ".join(f"{a}:{m:.3f}" for a, m in zip(summary["edges"], summary["mean_loss"])
                          if m is not None)
        print(f"position_loss (context length: mean loss): {curve}")
    elif name in ("passkey", "needle"):
        print(f"{name}: accuracy {summary['accuracy_overall']:.3f} over {summary['samples']} "
              f"prompts; per length " + ", ".join(
                  f"{n}: {a:.2f}" for n, a in zip(summary["lengths"],
                                                  summary["accuracy_per_length"])))
    else:
        print(f"{name}: {summary.get('results')}")


def _run(argv: list[str] | None = None) -> int:
    args = _args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        plan = _plan(args, world)
    except (ValueError, OSError) as err:
        return refuse("eval.py", err, "invalid evaluation")
    note = plan["source"].config.ignored_fields_note(args.model)
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(note, flush=True)
    init_distributed()
    groups = build_groups(plan["topo"])
    topo, store = plan["topo"], plan["store"]
    store.writer = groups.global_rank == 0 and bool(args.output)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    model = plan["source"].load(groups, dtype=_DTYPES.get(args.dtype), device=device,
                                cp_strategy=args.cp_comm, transformer_impl=plan["impl"],
                                make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    layout = {k: getattr(topo, k) for k in ("world", "attn_tp", "attn_cp", "attn_dp", "moe_tp",
                                            "moe_ep", "moe_dp")}
    layout.update(cp_comm=str(args.cp_comm), backend=model.backend.describe())
    if groups.global_rank == 0:
        print("layout: " + ", ".join(f"{k}={v}" for k, v in layout.items()), flush=True)
    store.begin(layout, shlex.join([os.path.basename(sys.argv[0])] + (argv or sys.argv[1:])))
    ctx = EvalContext(model, groups, plan["tokenizer"], store, args.batch_size)
    for name in args.task:
        summary = _run_task(name, ctx, plan["tasks"][name])
        if ctx.is_writer:
            _print_summary(name, summary)
    if ctx.is_writer and args.output:
        from megatron_ext.evaluation.plots import write_plots
        from megatron_ext.evaluation.report import write_report

        plots = [] if args.no_plots else write_plots(store.data, args.output)
        report = write_report(store.data, plots, args.output)
        print(f"wrote {store.path}, {report}" + "".join(f", {p}" for p in plots))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command("eval.py", _run, argv)


if __name__ == "__main__":
    sys.exit(main())
