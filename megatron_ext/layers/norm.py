"""RMSNorm with Hugging Face Llama/Qwen numerics.

HF normalises in float32 and casts back to the input dtype *before* multiplying by the weight
(``weight * normed.to(input_dtype)``); matching that order keeps bf16 logits bit-compatible with
``transformers``. The weight is replicated; which axes its gradient is summed over depends on where
the norm runs (DESIGN.md §4), so the caller says it.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ext.parallel.param_meta import ParamSpec, set_spec


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x)).to(x.dtype)`` with the statistics in float32 (at least)."""
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim.

    ``grad_sync``: ``("attn_dp_cp",)`` for norms whose input is identical across attention TP
    (TP_ATTN_FULL regions); ``("stage",)`` where each rank sees a different part of the data
    (SCATTERED regions, or QK-norm applied to this rank's heads only).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 grad_sync: tuple[str, ...] = ("attn_dp_cp",), name: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        if hidden_size < 1:
            raise ValueError(f"RMSNorm hidden_size={hidden_size} must be >= 1")
        if eps <= 0:
            raise ValueError(f"RMSNorm eps={eps} must be > 0")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        set_spec(self.weight, ParamSpec((hidden_size,), grad_sync=tuple(grad_sync), name=name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm expects last dim {self.hidden_size}, got shape "
                             f"{tuple(x.shape)}")
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
