"""RMSNorm with Hugging Face Llama/Qwen numerics.

HF normalises in float32 and casts back to the input dtype *before* multiplying by the weight
(``weight * normed.to(input_dtype)``); matching that order keeps bf16 logits bit-compatible with
``transformers``. The weight is replicated; which axes its gradient is summed over depends on where
the norm runs (DESIGN.md §4), so the caller says it.

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

from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.param_meta import ParamSpec, set_spec

MAX_TRITON_COLS = 16384


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x)).to(x.dtype)`` with the statistics in float32 (at least)."""
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)
    xf = x.to(compute)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(dtype)


# ------------------------------------------------------------------------------ Triton kernels
@functools.lru_cache(maxsize=None)
def _kernels():
    """Compiled on first use; ``None`` without Triton (CPU machines)."""
    try:
        import triton
        import triton.language as tl
    except Exception:  # noqa: BLE001
        return None

    @triton.jit
    def rms_fwd(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, n_cols, eps,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_C)
        row_ok, col_ok = rows < n_rows, cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(x * x, axis=1) / n_cols + eps)
        xhat = (x * rstd[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        tl.store(y_ptr + off, (xhat * w[None, :]).to(y_ptr.dtype.element_ty), mask=mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_ok)

    @triton.jit
    def rms_bwd(x_ptr, w_ptr, dy_ptr, rstd_ptr, dx_ptr, dw_ptr, n_rows, n_cols, n_blocks, nprog,
                BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        col_ok = cols < n_cols
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], dtype=tl.float32)
        for start in range(0, n_blocks, nprog):
            rows = (start + pid) * BLOCK_R + tl.arange(0, BLOCK_R)
            row_ok = rows < n_rows
            mask = row_ok[:, None] & col_ok[None, :]
            off = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
            x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + off, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
            xhat = x * rstd[:, None]
            dw += tl.sum(dy * xhat.to(x_ptr.dtype.element_ty).to(tl.float32), axis=0)
            # d(normed) = dy * w, rounded to the input dtype as autograd's cast does
            g = (dy * w[None, :]).to(x_ptr.dtype.element_ty).to(tl.float32)
            c = tl.sum(g * xhat, axis=1) / n_cols
            dx = rstd[:, None] * (g - xhat * c[:, None])
            tl.store(dx_ptr + off, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dw_ptr + pid.to(tl.int64) * n_cols + cols, dw, mask=col_ok)

    return triton, rms_fwd, rms_bwd


def _tiles(n_cols: int) -> tuple[int, int, int]:
    import triton

    block_c = triton.next_power_of_2(n_cols)
    block_r = max(1, min(64, 2048 // block_c))
    warps = max(1, min(16, block_r * block_c // 512))
    return block_r, block_c, warps


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_of(index)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


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
        fwd[(_cdiv(rows, block_r),)](x2, weight.contiguous(), y, rstd, rows, cols, eps,
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
        n_blocks = _cdiv(rows, block_r)
        nprog = max(1, min(n_blocks, 8 * _sm_count(x2.device)))
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

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"
