"""SwiGLU MLP split over one group: ``down(silu(gate(x)) * up(x))``.

``gate``/``up`` are column-parallel and ``down`` row-parallel with ``reduce_results=False``, so the
output is a partial sum over the group that the communicator completes (one reduction per layer).
The same class is the dense MLP (split over ``attn_tp``, gradients synced over ``attn_dp_cp``) and
the MoE shared expert (split over the whole MoE shard, synced over ``moe_dp``); ``gate`` and ``up``
stay separate weights so their ParamSpecs are plain contiguous slices of the HF tensors.

:func:`swiglu` (``silu(gate) * up``, also used by the routed experts) is one Triton kernel each way
on CUDA fp16/bf16: torch runs two kernels forward and three backward and keeps ``silu(gate)``
for backward; the kernels keep only ``gate`` and ``up`` and round where torch rounds (``silu``
to the input dtype, then the product), so the values are torch's.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from megatron_ext.layers.backend import LayerBackend
from megatron_ext.layers.rematerialize import project_without_saving
from megatron_ext.layers.weighted_swiglu import weighted_swiglu
from megatron_ext.communication.collectives import copy_to_region
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups
from megatron_ext.kernels.triton_loader import kernel_module


@functools.lru_cache(maxsize=None)
def _kernels():
    """The Triton kernels (:mod:`megatron_ext.kernels.swiglu`); ``None`` without Triton."""
    k = kernel_module("swiglu")
    return None if k is None else (k.swiglu_fwd, k.swiglu_bwd)


_BLOCK = 2048


class _TritonSwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        fwd, _ = _kernels()
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n = gate.numel()
        fwd[(-(-n // _BLOCK),)](gate, up, gate, out, n, 1, HAS_W=False, BLOCK=_BLOCK,
                                num_warps=8)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    def backward(ctx, dout):
        _, bwd = _kernels()
        gate, up = ctx.saved_tensors
        dout = dout.contiguous()
        dg, du = torch.empty_like(gate), torch.empty_like(up)
        n = gate.numel()
        bwd[(-(-n // _BLOCK),)](gate, up, dout, dg, du, n, BLOCK=_BLOCK, num_warps=8)
        return dg, du


def swiglu_projected(gate: torch.Tensor, up: torch.Tensor,
                     project: Callable[[torch.Tensor], torch.Tensor],
                     recompute: bool = False,
                     row_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``project(swiglu(gate, up))``, or ``project(weighted_swiglu(gate, up, row_weight))`` for
    the routed experts (:mod:`~megatron_ext.layers.weighted_swiglu`). With ``recompute``
    (selective; Megatron's ``moe_act``) neither the activation's backward nor the projection
    keeps the activation: the first keeps only ``gate`` and ``up`` (which the projections produced
    anyway) and the row weights, the second gets it back recomputed
    (:mod:`~megatron_ext.layers.rematerialize`). Collective-free."""
    fn, inputs = ((swiglu, (gate, up)) if row_weight is None
                  else (weighted_swiglu, (gate, up, row_weight)))
    if not (recompute and torch.is_grad_enabled()):
        return project(fn(*inputs))
    if row_weight is None:  # torch's silu * up saves silu(gate): checkpoint it away
        from torch.utils.checkpoint import checkpoint

        act = checkpoint(swiglu, gate, up, use_reentrant=False)
    else:  # one autograd function that saves its inputs only
        act = fn(*inputs)
    return project_without_saving(fn, inputs, act, project)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``: Triton kernels on CUDA fp16/bf16 (same shapes and dtype), torch ops
    otherwise."""
    if (gate.is_cuda and gate.dtype in (torch.bfloat16, torch.float16) and up.dtype == gate.dtype
            and gate.shape == up.shape and gate.numel() > 0 and _kernels() is not None):
        return _TritonSwiGLU.apply(gate, up)
    return F.silu(gate) * up


def _join(prefix: Optional[str], name: str) -> Optional[str]:
    return f"{prefix}.{name}" if prefix else name


class SwiGLUMLP(nn.Module):
    """Gated MLP with the intermediate dim split over ``group`` → partial sum over ``group``.

    ``sync_input_grad=True`` all-reduces the input gradient over ``group`` in backward (the input is
    replicated over ``group``); pass ``False`` when the caller's collective already sums it.
    ParamSpecs: ``gate_proj``/``up_proj`` ``[I, H]`` ``Split(0)``, ``down_proj`` ``[H, I]``
    ``Split(1)``, all with ``grad_sync`` and ``shard_axis``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, group: AxisGroup, *,
                 sync_input_grad: bool = True, grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,),
                 shard_axis: Optional[str] = None, name: Optional[str] = None,
                 backend: Optional[LayerBackend] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__()
        backend = backend if backend is not None else LayerBackend()
        if intermediate_size % group.size:
            raise ValueError(f"MLP {name or ''}: intermediate_size={intermediate_size} must be "
                             f"divisible by the {group.name} size {group.size}")
        self.group, self.sync_input_grad = group, sync_input_grad
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        common = dict(grad_sync=grad_sync, shard_axis=shard_axis, kind="mlp_linear",
                      dtype=dtype, device=device)
        self.gate_proj = backend.column_linear(hidden_size, intermediate_size, group,
                                               name=_join(name, "gate_proj"), **common)
        self.up_proj = backend.column_linear(hidden_size, intermediate_size, group,
                                             name=_join(name, "up_proj"), **common)
        self.down_proj = backend.row_linear(intermediate_size, hidden_size, group,
                                            name=_join(name, "down_proj"), **common)

    recompute_activation = False  # CausalLM.set_recompute("selective")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sync_input_grad:
            x = copy_to_region(x, self.group)
        return swiglu_projected(self.gate_proj(x), self.up_proj(x), self.down_proj,
                                self.recompute_activation)


class DenseMLP(SwiGLUMLP):
    """The dense (non-MoE) MLP: split over ``groups.attn_tp``, input TP_ATTN_FULL, output partial
    over ``attn_tp``; gradients synced over ``attn_dp_cp``."""

    def __init__(self, hidden_size: int, intermediate_size: int, groups: ParallelGroups, *,
                 sync_input_grad: bool = True, name: Optional[str] = "mlp",
                 backend: Optional[LayerBackend] = None,
                 dtype: Optional[torch.dtype] = None, device: Optional[torch.device] = None):
        super().__init__(hidden_size, intermediate_size, groups.attn_tp,
                         sync_input_grad=sync_input_grad, grad_sync=(Axis.ATTN_DP_CP,),
                         shard_axis=Axis.ATTN_TP, name=name, backend=backend, dtype=dtype,
                         device=device)
