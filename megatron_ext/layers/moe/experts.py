"""Routed experts, sharded inside the MoE shard: whole experts over ``moe_ep``, the intermediate
dim of every expert over ``moe_tp``.

Weights are 3-D stacks (``gate_proj``/``up_proj`` ``[E_local, I_local, H]``, ``down_proj``
``[E_local, H, I_local]``) so one grouped GEMM covers all local experts. ``gate`` and ``up`` are
separate stacks (HF fuses them as ``gate_up_proj = cat(gate, up)`` on dim 1): each is then a plain
slice of a global ``[E, I, H]`` tensor, which a single ParamSpec can describe.

The output of a rank is partial: only its experts, and for each only its ``1/moe_tp`` of the
intermediate dim (SwiGLU is elementwise in the intermediate dim, so the ``down`` projection of a
slice is an exact partial sum).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megatron_ext.layers.linear import default_init
from megatron_ext.layers.mlp import swiglu_projected
import megatron_ext.layers.moe.decode_experts as decode_experts
from megatron_ext.layers.moe.grouped_gemm import (Counts, group_offsets, grouped_mm,
                                                   grouped_mm_available)
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import ParamSpec, Split, set_spec


class RoutedExperts(nn.Module):
    """This rank's experts ``[first_expert, first_expert + num_local)`` (``moe_ep`` slice), each
    holding intermediate rows ``[m·I/M, (m+1)·I/M)`` (``moe_tp`` slice).

    ParamSpecs: ``gate_proj``/``up_proj`` global ``[E, I, H]`` with
    ``Split(0, moe_ep, e), Split(1, moe_tp, m)``; ``down_proj`` global ``[E, H, I]`` with
    ``Split(0, moe_ep, e), Split(2, moe_tp, m)``; ``grad_sync=("moe_dp",)``,
    ``shard_axis="moe_shard"``.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 groups: ParallelGroups, *, use_kernel: bool = True,
                 name: Optional[str] = "experts",
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        ep, tp = groups.moe_ep, groups.moe_tp
        if num_experts % ep.size:
            raise ValueError(f"num_experts={num_experts} must be divisible by moe_ep={ep.size}")
        if intermediate_size % tp.size:
            raise ValueError(f"moe_intermediate_size={intermediate_size} must be divisible by "
                             f"moe_tp={tp.size}")
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.use_kernel = use_kernel  # False: always the matmul loop (kernel A/B checks)
        self.intermediate_size = intermediate_size
        self.num_local = num_experts // ep.size
        self.first_expert = ep.rank * self.num_local
        local_i = intermediate_size // tp.size
        splits_in = tuple(s for s in (Split(0, ep.size, ep.rank), Split(1, tp.size, tp.rank))
                          if s.chunks > 1)
        splits_out = tuple(s for s in (Split(0, ep.size, ep.rank), Split(2, tp.size, tp.rank))
                           if s.chunks > 1)
        axis = Axis.MOE_SHARD if ep.size * tp.size > 1 else None

        def make(shape, global_shape, splits, pname):
            p = nn.Parameter(torch.empty(shape, dtype=dtype, device=device))
            default_init(p)
            return set_spec(p, ParamSpec(global_shape, splits, (Axis.MOE_DP,), axis,
                                         f"{name}.{pname}" if name else pname))

        e, h, i = num_experts, hidden_size, intermediate_size
        self.gate_proj = make((self.num_local, local_i, h), (e, i, h), splits_in, "gate_proj")
        self.up_proj = make((self.num_local, local_i, h), (e, i, h), splits_in, "up_proj")
        self.down_proj = make((self.num_local, h, local_i), (e, h, i), splits_out, "down_proj")

    recompute_activation = False  # CausalLM.set_recompute("selective")

    def forward(self, x_sorted: torch.Tensor, counts: Counts,
                row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x_sorted`` ``[N, H]`` rows grouped by local expert (``counts[j]`` rows for local
        expert ``j``), ``row_weights`` ``[N]`` each row's routing weight → ``[N, H]`` expert
        outputs times the weights (partial over ``moe_tp``). The weight is applied inside the
        activation, before ``down_proj`` (:mod:`~megatron_ext.layers.weighted_swiglu`: the
        combine then keeps no ``[N, H]`` rows); ``None``: unweighted."""
        self.check_rows(x_sorted, row_weights)
        k = self.use_kernel
        offs = (group_offsets(counts, x_sorted.device)
                if k and grouped_mm_available(x_sorted, self.gate_proj) else None)
        gate = grouped_mm(x_sorted, self.gate_proj.transpose(1, 2), counts, k, offs)
        up = grouped_mm(x_sorted, self.up_proj.transpose(1, 2), counts, k, offs)
        return swiglu_projected(
            gate, up, lambda a: grouped_mm(a, self.down_proj.transpose(1, 2), counts, k, offs),
            self.recompute_activation, row_weights)

    def fused_decode_applies(self, x: torch.Tensor, num_rows: int) -> bool:
        """Whether :meth:`forward_tokens` applies to ``num_rows`` assignment rows of tokens
        ``x``: inference (no autograd) of decode-sized batches on CUDA fp16/bf16 with Triton
        (:func:`~megatron_ext.layers.moe.decode_experts.fused_experts_apply`); ``use_kernel``
        False keeps the matmul loop."""
        return self.use_kernel and decode_experts.fused_experts_apply(
            x, self.gate_proj, num_rows, self.num_local)

    def forward_tokens(self, x: torch.Tensor, token_index: torch.Tensor, counts: torch.Tensor,
                       row_weights: Optional[torch.Tensor] = None,
                       weight_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """:meth:`forward` of ``x[token_index]`` without gathering it: ``x`` ``[T, H]`` tokens,
        ``token_index`` ``[N]`` the token of each row (rows grouped by local expert, ``counts``
        int64 on the device; rows past ``counts.sum()`` are left unspecified) → ``[N, H]``. Two
        fused kernels, inference only (check :meth:`fused_decode_applies`). ``weight_index``:
        ``row_weights`` is read at these indices (the router's ``[T·k]`` weights by slot)."""
        self.check_rows(x, None)
        if weight_index is None and row_weights is not None \
                and tuple(row_weights.shape) != tuple(token_index.shape):
            raise ValueError(f"RoutedExperts: row_weights {tuple(row_weights.shape)} must be "
                             f"{tuple(token_index.shape)} (one per row)")
        act = decode_experts.gate_up_act(x, token_index, counts, row_weights, self.gate_proj,
                                         self.up_proj, weight_index=weight_index)
        return decode_experts.down_proj_rows(act, counts, self.down_proj)

    def check_rows(self, x_sorted: torch.Tensor, row_weights: Optional[torch.Tensor]) -> None:
        """ValueError unless ``x_sorted`` is ``[N, H]`` and ``row_weights`` (if given) ``[N]``."""
        if x_sorted.dim() != 2 or x_sorted.shape[-1] != self.hidden_size:
            raise ValueError(f"RoutedExperts expects x [N, {self.hidden_size}], got "
                             f"{tuple(x_sorted.shape)}")
        if row_weights is not None and tuple(row_weights.shape) != (x_sorted.shape[0],):
            raise ValueError(f"RoutedExperts: row_weights {tuple(row_weights.shape)} must be "
                             f"[{x_sorted.shape[0]}] (one per row)")

    def extra_repr(self) -> str:
        return (f"experts {self.first_expert}:{self.first_expert + self.num_local} of "
                f"{self.num_experts}, hidden={self.hidden_size}, intermediate="
                f"{self.intermediate_size} (local {self.gate_proj.shape[1]})")
