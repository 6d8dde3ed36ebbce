"""Torch references of the kernels' math (the CPU path and the test oracle)."""
from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF ``Qwen3RMSNorm``/``LlamaRMSNorm``: ``weight * (x / rms(x)).to(x.dtype)`` with the
    statistics in float32 (at least); the normalised value is cast back before the weight."""
    dtype = x.dtype
    xf = x.to(torch.promote_types(dtype, torch.float32))
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)
