"""Progress and metrics of a training run, written by rank 0 only: a line on stdout per logged step
(also without the bar, so logs of batch jobs hold the loss), a tqdm bar (loss, tokens/s, grad
norm, lr), a JSON-lines log (one object per logged step, appended, so a resumed run continues
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
        self.total_steps = total_steps
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
        """``metrics`` of optimizer step ``step`` (1-based count of completed steps): one JSON
        line, TensorBoard ``train/*`` scalars, one line on stdout and the bar's postfix."""
        if not self.enabled:
            return
        self._record("train", step, metrics)
        summary = (f"loss={_fmt(metrics['loss'])} tok/s={metrics['tokens_per_s']:.0f} "
                   f"gnorm={_fmt(metrics['grad_norm'])} lr={metrics['lr']:.2e}")
        self.message(f"step {step}/{self.total_steps} {summary}")
        if self.bar is not None:
            self.bar.set_postfix_str(summary, refresh=False)

    def log_validation(self, step: int, loss: float, tokens: int) -> None:
        """Validation loss after step ``step``: a JSON line (``val_loss``, ``val_perplexity``,
        ``val_tokens``), TensorBoard ``val/*`` scalars and a line on stdout."""
        if not self.enabled:
            return
        ppl = math.exp(loss) if loss < 700 else float("inf")
        self._record("val", step, {"val_loss": loss, "val_perplexity": ppl, "val_tokens": tokens})
        self.message(f"step {step}/{self.total_steps} validation loss={_fmt(loss)} "
                     f"ppl={_fmt(ppl)} ({tokens} tokens)")

    def _record(self, tb_prefix: str, step: int, metrics: dict) -> None:
        record = {"step": step, **metrics}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    name = key[4:] if key.startswith("val_") else key
                    self.tb.add_scalar(f"{tb_prefix}/{name}", value, step)

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
