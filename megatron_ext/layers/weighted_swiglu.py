"""Row-weighted SwiGLU: ``out[r] = swiglu(gate[r], up[r]) · w[r]`` — the routed experts apply the
routing weight of each row inside their activation, before the down projection.

Why: weighting after the down projection (HF's order, ``expert(x) · w``) needs the expert's output
rows ``[N, H]`` for the gradient of ``w``, so the combine had to keep them (8 rows of ``H`` per
token per layer at top-8 and moe_ep 2: ~1.5 GiB over the 12-layer Qwen3-30B-A3B slice at seq 4096).
Here ``dw[r] = Σ_i dout[r, i] · swiglu[r, i]`` comes from ``gate``/``up``, which the activation's
backward keeps anyway, and the combine becomes an unweighted sum that keeps nothing ``[N, H]``.
Megatron-core does the same: its grouped experts apply the permuted routing probabilities in the
activation (``weighted_bias_swiglu_impl``) and un-permute with a plain sum. The down projection is linear, so the value is HF's in exact arithmetic
(float64 runs agree with transformers to ~1e-12); in bf16 the rounding differs from HF's order
(the weighted activation is rounded before the projection, instead of the projection's output).

Numerics: ``act = swiglu(gate, up)`` with :func:`~megatron_ext.layers.mlp.swiglu`'s rounding
(``silu`` rounded to the input dtype, then the product), then ``round(float(act) · float(w))``.
Backward: ``d_act = round(dout · w)``, ``dgate``/``dup`` exactly as ``swiglu``'s backward given
``d_act``, ``dw[r] = Σ_i float(dout) · float(act)`` accumulated in float32 (float64 for float64).
One autograd function saving only ``gate``, ``up`` and ``w``: torch ops on CPU and for
float32/64; on CUDA fp16/bf16 one Triton kernel each way (:mod:`megatron_ext.kernels.swiglu`).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from megatron_ext.kernels.launch import next_power_of_2
from megatron_ext.kernels.triton_loader import kernel_module

_BLOCK = 2048
_ROW_BLOCK = 1024


@functools.lru_cache(maxsize=None)
def _kernels():
    """``(forward, backward)`` Triton kernels; ``None`` without Triton."""
    k = kernel_module("swiglu")
    return None if k is None else (k.swiglu_fwd, k.weighted_swiglu_bwd)


def _use_triton(gate: torch.Tensor) -> bool:
    return (gate.is_cuda and gate.dtype in (torch.bfloat16, torch.float16) and gate.numel() > 0
            and _kernels() is not None)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _forward_torch(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    acc = _accumulation_dtype(gate.dtype)
    return ((F.silu(gate) * up).to(acc) * w.to(acc).unsqueeze(-1)).to(gate.dtype)


def _backward_torch(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, dout: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    acc = _accumulation_dtype(gate.dtype)
    silu = F.silu(gate)
    dw = (dout.to(acc) * (silu * up).to(acc)).sum(-1)
    d_act = (dout.to(acc) * w.to(acc).unsqueeze(-1)).to(gate.dtype)
    dgate = torch.ops.aten.silu_backward(d_act * up, gate)  # torch's own silu gradient
    return dgate, d_act * silu, dw.to(w.dtype)


def _forward_triton(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    fwd, _ = _kernels()
    out = torch.empty_like(gate)
    n = gate.numel()
    fwd[(-(-n // _BLOCK),)](gate, up, w, out, n, gate.shape[1], HAS_W=True, BLOCK=_BLOCK,
                            num_warps=8)
    return out


def _backward_triton(gate: torch.Tensor, up: torch.Tensor, w: torch.Tensor, dout: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _, bwd = _kernels()
    dgate, dup, dw = torch.empty_like(gate), torch.empty_like(up), torch.empty_like(w)
    cols = gate.shape[1]
    block = min(_ROW_BLOCK, next_power_of_2(cols))
    bwd[(gate.shape[0],)](gate, up, w, dout.contiguous(), dgate, dup, dw, cols, BLOCK=block,
                          num_warps=max(1, min(8, block // 128)))
    return dgate, dup, dw


class _WeightedSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up, w):
        gate, up, w = gate.contiguous(), up.contiguous(), w.contiguous()
        ctx.save_for_backward(gate, up, w)
        return (_forward_triton if _use_triton(gate) else _forward_torch)(gate, up, w)

    @staticmethod
    def backward(ctx, dout):
        gate, up, w = ctx.saved_tensors
        return (_backward_triton if _use_triton(gate) else _backward_torch)(gate, up, w, dout)


def weighted_swiglu(gate: torch.Tensor, up: torch.Tensor, row_weight: torch.Tensor
                    ) -> torch.Tensor:
    """``swiglu(gate, up) · row_weight[:, None]`` for ``gate``/``up`` ``[N, I]`` (same dtype) and
    ``row_weight`` ``[N]`` (any float dtype; used in float32, or float64 for float64 inputs),
    differentiable in all three (see the module doc for the rounding)."""
    if gate.dim() != 2 or gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"weighted_swiglu: gate {tuple(gate.shape)} {gate.dtype} and up "
                         f"{tuple(up.shape)} {up.dtype} must be the same [N, I] and dtype")
    if tuple(row_weight.shape) != (gate.shape[0],) or not row_weight.is_floating_point():
        raise ValueError(f"weighted_swiglu: row_weight {tuple(row_weight.shape)} "
                         f"{row_weight.dtype} must be float [{gate.shape[0]}]")
    return _WeightedSwiGLU.apply(gate, up, row_weight)
