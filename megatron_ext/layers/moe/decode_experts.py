"""Fused routed-expert GEMMs for batched decode (inference only): two Triton kernels
(:mod:`megatron_ext.kernels.moe_experts`) instead of a row gather, three ``torch._grouped_mm``
calls (each with its offsets), the routing-weight gather and a SwiGLU kernel.

Why: a decode step reads every local expert's weights for a few rows each, so the experts are
bound by reading weights; the grouped GEMMs reached ~62% of the HBM copy rate on an H200 (Qwen3-30B-
A3B, 64 tokens). Here one program per (local expert, column block) reads its weight tile once for
all of its expert's rows and skips experts without rows; ``gate_up`` gathers the token rows itself
and applies the row-weighted SwiGLU in its epilogue, rounding where the grouped-GEMM path rounds
(each projection to the weight dtype, then :mod:`~megatron_ext.layers.weighted_swiglu`'s steps),
so both paths agree to accumulation order. Counts stay on the device (no host sync: capturable).

Launch configs are fixed per shape (:data:`GATE_UP_CONFIGS`, :data:`DOWN_CONFIGS`, from
``benchmarks/moe_decode_experts.py --sweep``), never autotuned at run time: every rank of a
captured step then runs the same kernels. Bigger batches keep the grouped GEMMs
(:data:`MAX_ROWS_PER_EXPERT`), which reach higher efficiency with many rows per expert.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import torch

from megatron_ext.kernels.launch import cdiv, hopper_or_newer, next_power_of_2
from megatron_ext.kernels.triton_loader import kernel_module

MAX_ROWS_PER_EXPERT = 32   # decode-sized: rows (assignments) per local expert on average
SMALL_BLOCK_ROWS = 8       # average rows per expert up to which 16-row chunks serve


class LaunchConfig(NamedTuple):
    block_m: int     # rows per chunk: each weight tile read from HBM serves this many rows
    block_n: int     # output columns per program
    block_k: int     # reduction step
    num_warps: int
    num_stages: int
    pdl: bool = False   # down starts while gate_up drains (programmatic launch, sm_90+)


def block_rows(num_rows: int, num_local: int) -> int:
    """Rows per chunk for ``num_rows`` rows over ``num_local`` experts: 16 (the smallest
    tensor-core tile) while experts average ≤ :data:`SMALL_BLOCK_ROWS` rows, else 32. An expert
    with more rows than a chunk walks a second chunk whose weight tiles come back from HBM (the
    step's tiles outgrow L2), so at ~16 rows per expert (Qwen3-30B-A3B, 256 tokens on 2 GPUs)
    16-row chunks read the weights ~1.5 times."""
    return 16 if num_rows <= SMALL_BLOCK_ROWS * num_local else 32


def default_config(block_m: int) -> LaunchConfig:
    return LaunchConfig(block_m, 64, 128, 4, 3, True)


# (intermediate I_local, hidden H, block_m) → config; keys of the Qwen3-30B-A3B shapes (moe_tp 2
# and 1), from ``benchmarks/moe_decode_experts.py --sweep`` on an H200 (BENCHMARKS.md §11d; the
# 32-row ones §11e: 192 and 256 tokens; PDL ``--variants``, §11f)
GATE_UP_CONFIGS: dict[tuple[int, int, int], LaunchConfig] = {
    (384, 2048, 16): LaunchConfig(16, 64, 128, 4, 3, True),
    (768, 2048, 16): LaunchConfig(16, 64, 128, 4, 3, True),
    (384, 2048, 32): LaunchConfig(32, 64, 64, 4, 3, True),
    (768, 2048, 32): LaunchConfig(32, 64, 128, 4, 3, True),
}
DOWN_CONFIGS: dict[tuple[int, int, int], LaunchConfig] = {
    (384, 2048, 16): LaunchConfig(16, 128, 128, 4, 4, True),
    (768, 2048, 16): LaunchConfig(16, 64, 128, 4, 4, True),
    (384, 2048, 32): LaunchConfig(32, 64, 64, 4, 4, True),
    (768, 2048, 32): LaunchConfig(32, 128, 128, 4, 3, True),
}


def launch_config(table: dict, inter: int, hidden: int, num_rows: int,
                  num_local: int) -> LaunchConfig:
    """A kernel's tabled config for experts of width ``inter`` and ``num_rows`` rows over
    ``num_local`` experts (the default one for shapes no sweep has seen)."""
    block_m = block_rows(num_rows, num_local)
    return table.get((inter, hidden, block_m), default_config(block_m))


@functools.lru_cache(maxsize=None)
def _kernels():
    return kernel_module("moe_experts")


def _pdl(c: LaunchConfig, device: torch.device) -> bool:
    """Whether ``c`` asks for programmatic dependent launch and the GPU has it (sm_90+)."""
    return c.pdl and hopper_or_newer(device)


def fused_experts_apply(x: torch.Tensor, weight: torch.Tensor, num_rows: int,
                        num_local: int) -> bool:
    """Whether the fused decode path applies: CUDA fp16/bf16 ``x`` and ``weight`` of one dtype,
    no autograd (the kernels have no backward), Triton present, and at most
    :data:`MAX_ROWS_PER_EXPERT` rows per local expert on average (``num_rows`` bounds the rows:
    a fixed-size dispatch counts other ranks' rows too)."""
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype
            and not torch.is_grad_enabled() and num_rows <= MAX_ROWS_PER_EXPERT * num_local
            and _kernels() is not None)


def _check(counts: torch.Tensor, num_local: int, rows: torch.Tensor, what: str) -> None:
    if counts.dtype != torch.int64 or tuple(counts.shape) != (num_local,):
        raise ValueError(f"{what}: counts must be int64 [{num_local}], got {counts.dtype} "
                         f"{tuple(counts.shape)}")
    if rows.device != counts.device:
        raise ValueError(f"{what}: counts on {counts.device}, rows on {rows.device}")


def gate_up_act(x: torch.Tensor, token_index: torch.Tensor, counts: torch.Tensor,
                row_weights: Optional[torch.Tensor], gate_proj: torch.Tensor,
                up_proj: torch.Tensor, config: Optional[LaunchConfig] = None,
                weight_index: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x`` ``[T, H]`` token rows, ``token_index`` ``[N]`` int64 (rows grouped by local expert,
    ``counts`` ``[E]`` int64 per expert; rows past ``counts.sum()`` are left unwritten),
    ``row_weights`` ``[N]`` or ``None`` — or, with ``weight_index`` ``[N]`` int64, any 1-d tensor
    read at those indices (the router's flattened ``[T·k]`` weights by the rows' slots) —,
    ``gate_proj``/``up_proj`` ``[E, I, H]`` → ``[N, I]`` the (row-weighted) SwiGLU of
    ``x[token_index]``'s projections by each row's expert."""
    num_local, inter, hidden = gate_proj.shape
    _check(counts, num_local, token_index, "gate_up_act")
    if x.shape[-1] != hidden or up_proj.shape != gate_proj.shape or token_index.dtype != torch.int64:
        raise ValueError(f"gate_up_act: x {tuple(x.shape)}, gate {tuple(gate_proj.shape)}, up "
                         f"{tuple(up_proj.shape)}, token_index {token_index.dtype}")
    n = token_index.numel()
    out = torch.empty((n, inter), dtype=x.dtype, device=x.device)
    if n == 0:
        return out
    c = config or launch_config(GATE_UP_CONFIGS, inter, hidden, n, num_local)
    rw = row_weights.contiguous() if row_weights is not None else out
    if weight_index is not None and (row_weights is None
                                     or tuple(weight_index.shape) != tuple(token_index.shape)):
        raise ValueError(f"gate_up_act: weight_index {tuple(weight_index.shape)} needs "
                         f"row_weights and one index per row {tuple(token_index.shape)}")
    rw_index = weight_index.contiguous() if weight_index is not None else token_index
    _kernels().gate_up_act[(num_local, cdiv(inter, c.block_n))](
        x.contiguous(), token_index.contiguous(), counts.contiguous(), rw, rw_index,
        gate_proj.contiguous(), up_proj.contiguous(), out, hidden, inter,
        HAS_W=row_weights is not None, W_INDEX=weight_index is not None,
        E_POW2=next_power_of_2(num_local), BLOCK_M=c.block_m,
        BLOCK_N=c.block_n, BLOCK_K=c.block_k, RELEASE=_pdl(c, x.device),
        num_warps=c.num_warps, num_stages=c.num_stages)
    return out


def down_proj_rows(act: torch.Tensor, counts: torch.Tensor, down_proj: torch.Tensor,
                   config: Optional[LaunchConfig] = None) -> torch.Tensor:
    """``act`` ``[N, I]`` rows grouped by local expert (``counts``), ``down_proj`` ``[E, H, I]``
    → ``[N, H]`` (rows past ``counts.sum()`` left unwritten)."""
    num_local, hidden, inter = down_proj.shape
    _check(counts, num_local, act, "down_proj_rows")
    if act.dim() != 2 or act.shape[1] != inter:
        raise ValueError(f"down_proj_rows: act {tuple(act.shape)} for down {tuple(down_proj.shape)}")
    n = act.shape[0]
    out = torch.empty((n, hidden), dtype=act.dtype, device=act.device)
    if n == 0:
        return out
    c = config or launch_config(DOWN_CONFIGS, inter, hidden, n, num_local)
    pdl = _pdl(c, act.device)
    extra = {"launch_pdl": True} if pdl else {}
    _kernels().down[(num_local, cdiv(hidden, c.block_n))](
        act.contiguous(), counts.contiguous(), down_proj.contiguous(), out, hidden, inter,
        E_POW2=next_power_of_2(num_local), BLOCK_M=c.block_m, BLOCK_N=c.block_n,
        BLOCK_K=c.block_k, AFTER_PRIOR=pdl, num_warps=c.num_warps,
        num_stages=c.num_stages, **extra)
    return out
