"""Launchers of the Triton routing kernels (:mod:`megatron_ext.kernels.moe_route`) and when they
apply: the router's top-k softmax and the local dispatch's sort by expert, each one launch
instead of ~7 small torch kernels (what a decode step of a many-layer MoE spends its time on).

Both return exactly what the torch paths in :mod:`~megatron_ext.layers.moe.router` and
:mod:`~megatron_ext.layers.moe.dispatch` return; those modules ask :func:`top_k_kernel_applies` /
:func:`align_kernel_applies` per call and keep the torch code for everything else (CPU, no Triton,
autograd through the weights, more than :data:`MAX_ALIGN_SLOTS` assignments).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_ext.kernels.launch import cdiv, next_power_of_2
from megatron_ext.kernels.triton_loader import kernel_module

MAX_EXPERTS = 512          # one program holds a row of logits / the per-expert counters
MAX_ALIGN_SLOTS = 8192     # T·k of one sort (decode: 1024 tokens × top-8); each program reads all
_ALIGN_CHUNK = 64          # assignments placed by one program (a [64, 64] comparison)
_HIST_CHUNK = 1024         # ids histogrammed at once


@functools.lru_cache(maxsize=None)
def _kernels():
    return kernel_module("moe_route")


def top_k_kernel_applies(logits: torch.Tensor) -> bool:
    """The fused top-k softmax serves ``logits`` ``[T, E]``: CUDA half/single precision, no
    autograd (the kernel has no backward), ``1 <= E <= MAX_EXPERTS``, Triton present."""
    return (logits.is_cuda and logits.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and logits.dim() == 2 and logits.shape[0] > 0 and 0 < logits.shape[1] <= MAX_EXPERTS
            and not torch.is_grad_enabled() and _kernels() is not None)


def fused_top_k_softmax(logits: torch.Tensor, top_k: int, renormalize: bool
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [T, k]`` in the logits' dtype, ``experts [T, k]`` int64): the ``top_k`` largest
    float32 softmax probabilities of each row in descending order (divided by their sum with
    ``renormalize``), as :func:`megatron_ext.layers.moe.router.top_k_softmax` computes them."""
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    rows, num_experts = logits.shape
    weights = torch.empty((rows, top_k), dtype=logits.dtype, device=logits.device)
    experts = torch.empty((rows, top_k), dtype=torch.int64, device=logits.device)
    block_e = next_power_of_2(num_experts)
    _kernels().top_k_softmax[(rows,)](
        logits, weights, experts, num_experts, logits.stride(0), TOP_K=top_k,
        BLOCK_K=next_power_of_2(top_k), BLOCK_E=block_e, WARP=min(block_e, 32),
        RENORM=renormalize, PRECISE=logits.is_cuda, num_warps=1 if block_e <= 256 else 2)
    return weights, experts


def align_kernel_applies(experts: torch.Tensor, num_local: int) -> bool:
    """The one-launch counting sort serves ``experts`` (CUDA integer ids, at most
    :data:`MAX_ALIGN_SLOTS` of them) for ``1 <= num_local <= MAX_EXPERTS`` local experts."""
    return (experts.is_cuda and experts.dtype in (torch.int64, torch.int32)
            and 0 < experts.numel() <= MAX_ALIGN_SLOTS and 0 < num_local <= MAX_EXPERTS
            and _kernels() is not None)


def fused_align(experts: torch.Tensor, first_expert: int, num_local: int, with_valid: bool
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                           Optional[torch.Tensor]]:
    """Every assignment of ``experts`` ``[T, k]`` stably sorted by local expert ``id -
    first_expert`` (those outside ``[0, num_local)`` last) → ``(flat_index, token_index,
    counts, slot_row, valid_rows)`` as :func:`~megatron_ext.layers.moe.dispatch.local_dispatch`
    defines them (``valid_rows`` only ``with_valid``, else ``None``)."""
    top_k = experts.shape[-1]
    ids = experts.reshape(-1)
    n = ids.numel()
    dev = experts.device
    flat_index, token_index, slot_row = (torch.empty(n, dtype=torch.int64, device=dev)
                                         for _ in range(3))
    counts = torch.empty(num_local, dtype=torch.int64, device=dev)
    valid = torch.empty(n, dtype=torch.bool, device=dev) if with_valid else None
    chunk = min(_ALIGN_CHUNK, next_power_of_2(n))
    _kernels().align_assignments[(cdiv(n, chunk),)](
        ids, flat_index, token_index, slot_row, counts,
        valid.view(torch.uint8) if with_valid else slot_row, n, first_expert, num_local,
        TOP_K=top_k, BLOCK_E=next_power_of_2(num_local), CHUNK=chunk,
        HIST_CHUNK=min(_HIST_CHUNK, next_power_of_2(n)), STORE_VALID=with_valid, num_warps=4)
    return flat_index, token_index, counts, slot_row, valid
