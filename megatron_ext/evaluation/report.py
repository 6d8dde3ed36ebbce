"""``report.md``: a short Markdown summary of ``results.json`` beside the plots."""
from __future__ import annotations

import os
from typing import Sequence


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def render_report(results: dict, plots: Sequence[str]) -> str:
    model, layout = results.get("model", {}), results.get("layout", {})
    lines = [f"# Evaluation of `{model.get('path')}`", "",
             f"* model: {model.get('architecture')} ({model.get('kind')} checkpoint"
             + (f", step {model['step']}" if model.get("step") is not None else "") + ")",
             "* layout: " + ", ".join(f"{k}={v}" for k, v in layout.items()),
             f"* command: `{results.get('command')}`", f"* updated: {results.get('updated')}", ""]
    tasks = results.get("tasks", {})
    for name, entry in tasks.items():
        s = entry.get("summary")
        if s is None:
            lines += [f"## {name}", "", "not finished (rerun with --resume)", ""]
            continue
        lines += [f"## {name}", ""]
        if name == "perplexity":
            lines += [f"loss {_fmt(s['loss'], 4)}, perplexity {_fmt(s['perplexity'], 2)} over "
                      f"{s['tokens']} predicted tokens", ""]
        elif name == "position_loss":
            rows = [(f"{a}-{b - 1}", m, n) for a, b, m, n in
                    zip(s["edges"][:-1], s["edges"][1:], s["mean_loss"], s["tokens"])]
            lines += _table(("context length", "mean loss", "tokens"), rows) + [""]
        elif name in ("passkey", "needle"):
            header = ["length \\ depth"] + [f"{d:g}" for d in s["depths"]] + ["mean"]
            rows = [[n] + list(acc) + [m] for n, acc, m in
                    zip(s["lengths"], s["accuracy"], s["accuracy_per_length"])]
            lines += _table(header, rows)
            lines += ["", f"overall accuracy {_fmt(s['accuracy_overall'])} over {s['samples']} "
                          f"prompts", ""]
        elif name == "lm_eval":
            rows = [(task, metric, value) for task, metrics in s.get("results", {}).items()
                    for metric, value in metrics.items() if isinstance(value, (int, float))]
            lines += _table(("task", "metric", "value"), rows) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})"
                                     for p in plots] + [""]
    return "\n".join(lines)


def write_report(results: dict, plots: Sequence[str], output_dir: str) -> str:
    path = os.path.join(output_dir, "report.md")
    with open(path, "w") as f:
        f.write(render_report(results, plots))
    return path
