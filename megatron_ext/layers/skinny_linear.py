"""Inference projections of a decode batch (a few rows) through one Triton launch where a sweep
found it faster than cuBLAS (:mod:`megatron_ext.kernels.skinny_gemm`).

The choice is a table keyed by the weight's shape (``(out_features, in_features)``), filled from
``benchmarks/skinny_linear.py --sweep`` on the target GPU; shapes not in it, training, CPU and
larger batches keep ``F.linear``. Used by the router's logits, the fused q/k/v projection and
the row-parallel output projection of a decode step.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from megatron_ext.kernels.launch import cdiv
from megatron_ext.kernels.triton_loader import kernel_module

MAX_ROWS = 256   # decode batches; more rows keep cuBLAS


class SkinnyLaunch(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


#: (out_features, in_features) → launch, where the kernel beat cuBLAS at every decode row count
#: on an H200 (BENCHMARKS.md §11d): the Qwen3-30B-A3B router (1.04-1.10x; cuBLAS also adds a
#: split-K reduction kernel inside a decode step). Its q/k/v [5120, 2048] and o_proj [2048, 4096]
#: stay on cuBLAS (0.3-0.9x there: this simple kernel does not split the reduction).
SKINNY_LAUNCH: dict[tuple[int, int], SkinnyLaunch] = {
    (128, 2048): SkinnyLaunch(32, 16, 256, 4, 3),
}


@functools.lru_cache(maxsize=None)
def _kernel():
    k = kernel_module("skinny_gemm")
    return None if k is None else k.skinny_gemm


def skinny_applies(x: torch.Tensor, weight: torch.Tensor,
                   launch: Optional[SkinnyLaunch] = None) -> bool:
    """Whether ``x @ weight.T`` goes through the kernel: no autograd, CUDA half precision of one
    dtype, at most :data:`MAX_ROWS` rows, and a launch for this shape (given or tabled)."""
    rows = x.numel() // x.shape[-1] if x.dim() else 0
    return (x.is_cuda and not torch.is_grad_enabled() and x.dtype in (torch.bfloat16,
                                                                       torch.float16)
            and weight.dtype == x.dtype and weight.dim() == 2 and 0 < rows <= MAX_ROWS
            and (launch is not None or tuple(weight.shape) in SKINNY_LAUNCH)
            and _kernel() is not None)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  launch: Optional[SkinnyLaunch] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through the kernel (call :func:`skinny_applies` first)."""
    c = launch or SKINNY_LAUNCH[tuple(weight.shape)]
    n, k = weight.shape
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    _kernel()[(cdiv(x2.shape[0], c.block_m), cdiv(n, c.block_n))](
        x2, weight.contiguous(), bias if bias is not None else out, out, x2.shape[0], n, k,
        HAS_BIAS=bias is not None, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_K=c.block_k,
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor,
           bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear``, through the kernel where :func:`skinny_applies`."""
    if skinny_applies(x, weight):
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
