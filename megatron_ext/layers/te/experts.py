"""Routed experts whose grouped GEMMs run in ``te.GroupedLinear``.

The parameters stay ours: the 3-D stacks of :class:`RoutedExperts` (``gate_proj``/``up_proj``
``[E_local, I_local, H]``, ``down_proj`` ``[E_local, H, I_local]``), with the same names and
ParamSpecs, so the EP × MoE-TP sharding, grad sync, DCP and HF checkpoints are unchanged and a
checkpoint moves between backends as is. TE's ``GroupedLinear`` keeps one ``[out, in]``
parameter per GEMM (``weight0`` …); here it is built on the meta device with those parameters
de-registered, and its weight hook ``_get_weight_tensors`` (the base module's extension point
every TE linear implements) hands it the experts of our stack as views, so its autograd function
returns each expert's weight gradient into the stack. One ``GroupedLinear`` per projection:
``in``/``out`` of expert ``j`` are the ``[out, in]`` matrix ``stack[j]``.

TE does no communication here (``GroupedLinear`` never does; its docs leave TP to the dispatch
and combine), so the output is the same partial sum over ``moe_tp`` as the native experts'.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_ext.layers.mlp import swiglu_projected
from megatron_ext.layers.moe.experts import RoutedExperts
from megatron_ext.layers.moe.grouped_gemm import Counts
from megatron_ext.layers.te.runtime import te_module


@functools.lru_cache(maxsize=None)
def _grouped_linear_class():
    te = te_module()

    class StackedGroupedLinear(te.GroupedLinear):
        """``GroupedLinear`` whose ``num_gemms`` weights are the slices of a stack passed to
        :meth:`forward` (no parameters of its own)."""

        def __init__(self, num_gemms: int, in_features: int, out_features: int):
            super().__init__(num_gemms, in_features, out_features, bias=False,
                             parallel_mode=None, tp_size=1, device="meta")
            for i in range(num_gemms):
                self.register_parameter(f"weight{i}", None)
            self.fast_setattr("_stack", None)

        def _get_weight_tensors(self):
            if self._stack is None:
                raise RuntimeError("StackedGroupedLinear runs only inside forward(x, splits, "
                                   "stack)")
            return list(self._stack.unbind(0))

        def forward(self, x: torch.Tensor, m_splits: list[int],  # noqa: D102
                    stack: torch.Tensor) -> torch.Tensor:
            if tuple(stack.shape) != (self.num_gemms, self.out_features, self.in_features):
                raise ValueError(f"StackedGroupedLinear expects a stack [{self.num_gemms}, "
                                 f"{self.out_features}, {self.in_features}], got "
                                 f"{tuple(stack.shape)}")
            self.fast_setattr("_stack", stack)
            try:
                return super().forward(x, m_splits)
            finally:
                self.fast_setattr("_stack", None)

    return StackedGroupedLinear


def _splits(counts: Counts) -> list[int]:
    return counts.tolist() if isinstance(counts, torch.Tensor) else [int(c) for c in counts]


class TERoutedExperts(RoutedExperts):
    """:class:`RoutedExperts` (same parameters) computed with ``te.GroupedLinear``."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cls = _grouped_linear_class()
        e, h = self.num_local, self.hidden_size
        i = self.gate_proj.shape[1]
        self.te_gate = cls(e, h, i)
        self.te_up = cls(e, h, i)
        self.te_down = cls(e, i, h)

    def forward(self, x_sorted: torch.Tensor, counts: Counts,
                row_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        """As :meth:`RoutedExperts.forward` (row weights applied in the activation)."""
        self.check_rows(x_sorted, row_weights)
        splits = _splits(counts)
        if len(splits) != self.num_local or sum(splits) != x_sorted.shape[0]:
            raise ValueError(f"TE experts: counts {splits} must give {self.num_local} experts "
                             f"and sum to {x_sorted.shape[0]} rows")
        gate = self.te_gate(x_sorted, splits, self.gate_proj)
        up = self.te_up(x_sorted, splits, self.up_proj)
        return swiglu_projected(gate, up, lambda a: self.te_down(a, splits, self.down_proj),
                                self.recompute_activation, row_weights)


def te_routed_experts(num_experts: int, hidden_size: int, intermediate_size: int, groups, *,
                      name: Optional[str], dtype: Optional[torch.dtype],
                      device: Optional[torch.device]) -> TERoutedExperts:
    dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    return TERoutedExperts(num_experts, hidden_size, intermediate_size, groups, name=name,
                           dtype=dtype, device=dev)
