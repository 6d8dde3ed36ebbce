"""Evaluation windows: consecutive ``seq_len``-token samples of a token dataset, in batches of
``batch_size`` rows (the cells a resumed run skips)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch


@dataclass(frozen=True)
class WindowSettings:
    seq_len: int
    num_samples: int
    batch_size: int = 1

    def __post_init__(self) -> None:
        if self.seq_len < 2 or self.num_samples < 1 or self.batch_size < 1:
            raise ValueError(f"--seq-len={self.seq_len} must be >= 2, --num-samples="
                             f"{self.num_samples} and --batch-size={self.batch_size} >= 1")

    def check(self, dataset, attn_dp: int, max_positions: Optional[int],
              limit_text: Optional[str] = None) -> None:
        """Pure checks against the data and the layout (before process groups exist);
        ``max_positions`` None: longer windows than the model was trained on are intended;
        ``limit_text`` says where the limit comes from (default: max_position_embeddings)."""
        if max_positions is not None and self.seq_len > max_positions:
            limit_text = limit_text or f"max_position_embeddings={max_positions}"
            raise ValueError(f"--seq-len={self.seq_len} is beyond the model's {limit_text} "
                             f"(pass --max-positions-scale F to scale RoPE for it, or "
                             f"--allow-long-context to evaluate there as is)")
        if self.batch_size < attn_dp:
            raise ValueError(f"--batch-size={self.batch_size} gives some of the attn_dp="
                             f"{attn_dp} ranks no sequence")
        available = dataset.num_samples(self.seq_len)
        if available < self.num_samples:
            raise ValueError(f"the dataset holds {available} samples of {self.seq_len} tokens, "
                             f"fewer than --num-samples={self.num_samples}")

    def batches(self, attn_dp: int = 1) -> list[range]:
        """Sample indices per batch; a last batch too short to give every attention-DP rank a
        row joins the one before."""
        out = [range(a, min(a + self.batch_size, self.num_samples))
               for a in range(0, self.num_samples, self.batch_size)]
        if len(out) > 1 and len(out[-1]) < attn_dp:
            out[-2:] = [range(out[-2].start, out[-1].stop)]
        return out

    def to_dict(self) -> dict:
        return {"seq_len": self.seq_len, "num_samples": self.num_samples,
                "batch_size": self.batch_size}


def window_batch(dataset, rows: range, seq_len: int, device) -> torch.Tensor:
    """``[len(rows), seq_len]``: windows of exactly ``seq_len`` tokens (``seq_len - 1``
    predicted), so a window never needs more positions than the model has."""
    return torch.as_tensor(np.stack([dataset.sample(i, seq_len)[:seq_len].astype(np.int64)
                                     for i in rows]), device=device)


def batch_key(rows: range) -> str:
    return f"samples={rows.start}-{rows.stop - 1}"
