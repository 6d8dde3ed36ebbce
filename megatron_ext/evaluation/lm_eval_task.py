"""``--task lm_eval``: lm-evaluation-harness tasks (``--lm-eval-tasks``, local task YAMLs from
``--lm-eval-include``) run through :mod:`megatron_ext.evaluation.lm_eval_adapter` on every rank;
the harness's metrics go to ``results.json`` (one cell per harness task)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

TASK = "lm_eval"


@dataclass(frozen=True)
class LMEvalSettings:
    tasks: tuple[str, ...]
    include: Optional[str] = None
    limit: Optional[int] = None
    max_length: Optional[int] = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ValueError("--task lm_eval needs --lm-eval-tasks (comma-separated task names)")
        if self.include is not None and not os.path.isdir(self.include):
            raise ValueError(f"--lm-eval-include {self.include!r} is not a directory")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--lm-eval-limit={self.limit} must be >= 1")

    @classmethod
    def from_args(cls, args) -> "LMEvalSettings":
        tasks = tuple(t.strip() for t in (args.lm_eval_tasks or "").split(",") if t.strip())
        settings = cls(tasks, args.lm_eval_include, args.lm_eval_limit,
                       batch_size=args.batch_size)
        settings.check_installed()
        return settings

    def check_installed(self) -> None:
        try:
            import lm_eval  # noqa: F401
        except ImportError as err:
            raise ValueError("--task lm_eval needs lm-evaluation-harness: pip install "
                             "'megatron_ext[eval]' (or pip install lm_eval)") from err

    def to_dict(self) -> dict:
        return {"tasks": list(self.tasks), "include": self.include and os.path.abspath(
            self.include), "limit": self.limit, "max_length": self.max_length}


def run_lm_eval(ctx, settings: LMEvalSettings) -> dict:
    """Every harness task not already in the results file (collective; rank 0 writes)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from megatron_ext.evaluation.lm_eval_adapter import ParallelLMScorer, lm_eval_model

    lm = lm_eval_model(ParallelLMScorer(ctx.model, ctx.groups, ctx.tokenizer,
                                        max_length=settings.max_length,
                                        batch_size=settings.batch_size))
    manager = TaskManager(include_path=settings.include) if settings.include else TaskManager()
    cells = ctx.store.cells(TASK)
    todo = [t for t in settings.tasks if t not in cells]
    progress = ctx.progress(TASK, len(todo), len(todo), unit="harness tasks")
    for name in todo:
        out = simple_evaluate(model=lm, tasks=[name], limit=settings.limit, task_manager=manager,
                              log_samples=False, bootstrap_iters=0, verbosity="WARNING")
        results = (out or {}).get("results", {})
        for task, metrics in results.items():
            ctx.store.put_cell(TASK, task, {k: v for k, v in metrics.items()
                                            if isinstance(v, (int, float, str))})
        progress.advance(1)
    summary = {"results": dict(cells)}
    ctx.store.put_summary(TASK, summary)
    return summary
