"""RMSNorm with Hugging Face Llama/Qwen numerics.

HF normalises in float32 and casts back to the input dtype *before* multiplying by the weight
(``weight * normed.to(input_dtype)``); matching that order keeps bf16 logits bit-compatible with
``transformers``. The weight is replicated; which axes its gradient is summed over depends on where
the norm runs (design §4), so the caller says it.

On CUDA with fp16/bf16 inputs (and Triton present) forward and backward are one Triton kernel each
(:func:`rms_norm` picks it): the torch composition is ~8 passes over the activations each way and
keeps a float32 copy of the input for backward; the kernels read the input once, keep only the
per-row ``1/rms`` and round where the torch composition rounds. CPU and float32/float64 inputs run
the torch composition (the reference).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import nn

from megatron_ext.communication.fused_reduce_norm import add_rms_norm
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.param_meta import ParamSpec, set_spec
from megatron_ext.kernels.reference import rms_norm_reference
from megatron_ext.kernels.launch import cdiv, next_power_of_2, sm_count
from megatron_ext.kernels.triton_loader import kernel_module

MAX_TRITON_COLS = 16384


# ------------------------------------------------------------------------------ Triton kernels
@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels (:mod:`megatron_ext.kernels.rms_norm`); ``None`` without Triton."""
    k = kernel_module("rms_norm")
    return None if k is None else (k.triton, k.rms_fwd, k.rms_bwd)


def _tiles(n_cols: int) -> tuple[int, int, int]:
    block_c = next_power_of_2(n_cols)
    block_r = max(1, min(64, 2048 // block_c))
    warps = max(1, min(16, block_r * block_c // 512))
    return block_r, block_c, warps


class _TritonRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        _, fwd, _ = _kernels()
        cols = x.shape[-1]
        x2 = x.reshape(-1, cols).contiguous()
        rows = x2.shape[0]
        y = torch.empty((rows, cols), dtype=torch.promote_types(x.dtype, weight.dtype),
                        device=x.device)
        rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
        block_r, block_c, warps = _tiles(cols)
        fwd[(cdiv(rows, block_r),)](x2, weight.contiguous(), y, rstd, rows, cols, eps,
                                           BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.shape = x.shape
        return y.view(x.shape[:-1] + (cols,))

    @staticmethod
    def backward(ctx, dy):
        _, _, bwd = _kernels()
        x2, weight, rstd = ctx.saved_tensors
        rows, cols = x2.shape
        dy2 = dy.reshape(rows, cols).contiguous()
        dx = torch.empty_like(x2)
        block_r, block_c, warps = _tiles(cols)
        n_blocks = cdiv(rows, block_r)
        nprog = max(1, min(n_blocks, 8 * sm_count(x2.device)))
        dw_part = torch.empty((nprog, cols), dtype=torch.float32, device=x2.device)
        bwd[(nprog,)](x2, weight.contiguous(), dy2, rstd, dx, dw_part, rows, cols, n_blocks, nprog,
                      BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps)
        dw = dw_part.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.view(ctx.shape), dw, None


def triton_norm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`rms_norm` runs the Triton kernels for these tensors."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] > 0
            and x.shape[-1] <= MAX_TRITON_COLS and weight.dim() == 1 and x.numel() > 0
            and _kernels() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x)).to(x.dtype)`` with the statistics in float32 (at least): Triton
    kernels on CUDA fp16/bf16, the torch reference otherwise."""
    if triton_norm_applies(x, weight):
        return _TritonRMSNorm.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


class RMSNorm(nn.Module):
    """RMSNorm over the last dim.

    ``grad_sync``: ``("attn_dp_cp",)`` for norms whose input is identical across attention TP
    (TP_ATTN_FULL regions); ``("stage",)`` where each rank sees a different part of the data
    (SCATTERED regions, or QK-norm applied to this rank's heads only).
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6,
                 grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,), name: Optional[str] = None,
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

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(self(x + residual), x + residual)``: in inference on CUDA one Triton pass (the
        residual add and the norm of a decode step are two small kernels otherwise), the same
        roundings (the sum rounded to the dtype first)."""
        if x.is_cuda and not torch.is_grad_enabled() and x.dtype == residual.dtype == \
                self.weight.dtype and x.shape == residual.shape:
            return add_rms_norm(x, residual, self.weight, self.eps)
        h = x + residual
        return self(h), h

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
