"""PNG plots of ``results.json`` (matplotlib, imported lazily with the file-only Agg backend):
loss vs position, retrieval accuracy over length × depth, and accuracy per length."""
from __future__ import annotations

import math
import os
from typing import Optional

RETRIEVAL_TASKS = ("passkey", "needle")


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise ValueError("plots need matplotlib: pip install 'megatron_ext[eval]' (or pass "
                         "--no-plots)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_position_loss(summary: dict, path: str, title: str) -> str:
    plt = _pyplot()
    edges, means = summary["edges"], summary["mean_loss"]
    xs = [math.sqrt(a * max(b - 1, a)) for a, b in zip(edges[:-1], edges[1:])]
    pts = [(x, m) for x, m in zip(xs, means) if m is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
    ax.set_xscale("log")
    ax.set_xlabel("context length (tokens before the predicted token)")
    ax.set_ylabel("mean next-token loss (nats)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_retrieval_heatmap(summary: dict, path: str, title: str) -> str:
    plt = _pyplot()
    lengths, depths, acc = summary["lengths"], summary["depths"], summary["accuracy"]
    grid = [[float("nan") if a is None else a for a in row] for row in acc]
    fig, ax = plt.subplots(figsize=(1.2 * len(depths) + 2.5, 0.6 * len(lengths) + 2))
    image = ax.imshow(grid, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("needle depth (fraction of the filler before it)")
    ax.set_ylabel("prompt length (tokens)")
    for i, row in enumerate(acc):
        for j, a in enumerate(row):
            ax.text(j, i, "-" if a is None else f"{a:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, label="exact-match accuracy")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_length_summary(tasks: dict, path: str, title: str) -> Optional[str]:
    """Accuracy per prompt length of every retrieval task that ran (``None`` if none did)."""
    series = [(name, tasks[name]["summary"]) for name in RETRIEVAL_TASKS
              if "summary" in tasks.get(name, {})]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in series:
        pts = [(n, a) for n, a in zip(s["lengths"], s["accuracy_per_length"]) if a is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("accuracy (mean over depths)")
    ax.set_title(title)
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_plots(results: dict, output_dir: str) -> list[str]:
    """Every plot the finished tasks of ``results`` allow; returns the files written."""
    tasks, model = results.get("tasks", {}), os.path.basename(
        os.path.normpath(results.get("model", {}).get("path", "model")))
    written = []
    if "summary" in tasks.get("position_loss", {}):
        written.append(plot_position_loss(tasks["position_loss"]["summary"],
                                          os.path.join(output_dir, "position_loss.png"),
                                          f"{model}: loss by position"))
    for name in RETRIEVAL_TASKS:
        if "summary" in tasks.get(name, {}):
            written.append(plot_retrieval_heatmap(tasks[name]["summary"],
                                                  os.path.join(output_dir, f"{name}_heatmap.png"),
                                                  f"{model}: {name} accuracy"))
    summary = plot_length_summary(tasks, os.path.join(output_dir, "accuracy_by_length.png"),
                                  f"{model}: retrieval accuracy by length")
    if summary:
        written.append(summary)
    return written
