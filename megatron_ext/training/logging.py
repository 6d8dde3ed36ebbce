"""Progress and metrics of a training run, written by rank 0 only: a tqdm bar (loss, tokens/s,
grad norm, lr), a JSON-lines log (one object per logged step, appended, so a resumed run continues
the same file) and TensorBoard scalars when ``tensorboard`` is importable."""
from __future__ import annotations

import json
import math
import os
import sys


def _fmt(value: float) -> str:
    return f"{value:.4f}" if math.isfinite(value) else str(value)


class MetricsLogger:
    def __init__(self, output_dir: str, total_steps: int, start_step: int = 0, *,
                 enabled: bool = True, progress: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.bar = None
        self.tb = None
        self.metrics_path = os.path.join(output_dir, "metrics.jsonl")
        if not enabled:
            return
        os.makedirs(output_dir, exist_ok=True)
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", unit="step",
                            dynamic_ncols=True, file=sys.stdout, mininterval=0.5)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception:  # tensorboard not installed: JSON lines only
                SummaryWriter = None
            if SummaryWriter is not None:
                self.tb = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def log(self, step: int, metrics: dict) -> None:
        """``metrics`` of optimizer step ``step`` (1-based count of completed steps)."""
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, step)
        if self.bar is not None:
            self.bar.set_postfix_str(
                f"loss={_fmt(metrics['loss'])} tok/s={metrics['tokens_per_s']:.0f} "
                f"gnorm={_fmt(metrics['grad_norm'])} lr={metrics['lr']:.2e}", refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None
