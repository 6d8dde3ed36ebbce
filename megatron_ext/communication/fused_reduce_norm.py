"""Reduce + residual add + RMSNorm: the step that completes a pending attention-TP reduction.

``prepare_attn`` / ``prepare_mlp`` finish a partial sum left by the previous row-parallel layer,
add the residual and normalise. Unfused that is an all-reduce, an add and an RMSNorm (several
passes over the activations plus the collective's own launch). Here:

* ``fused``    — one Triton kernel reads every rank's partial straight out of the symmetric
  buffer (peer loads over NVLink), sums in rank order, adds the residual, writes the new
  residual and the normalised output; it opens with a per-program barrier over the signal pads
  and needs no closing one (the buffer's two slots make that safe: see ``symm_mem``);
* ``composed`` — the reducer's all-reduce (one-/two-shot or NCCL), then one Triton kernel for
  add + RMSNorm;
* ``reference`` — torch ops only (the unfused path; the CPU path; the test oracle).

``auto`` takes ``fused`` where the partial fits a symmetric slot, ``composed`` on other CUDA
cases, ``reference`` on CPU. Numerics follow HF ``Qwen3RMSNorm`` (fp32 statistics, the
normalised value rounded to the input dtype before the weight multiply); the partial sum is
rounded to the input dtype before the residual add, as the unfused path does.
Backward (training) is the same for every method: the sum's adjoint is the identity, the
RMSNorm backward is computed with torch ops from the saved new residual.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from megatron_ext.parallel.comm_counter import record
from megatron_ext.parallel.groups import AxisGroup, ParallelGroups
from megatron_ext.communication.symm_mem import SymmMemAllReduce, SymmMemConfig, all_reduce_sum
from megatron_ext.kernels.reference import rms_norm_reference
from megatron_ext.kernels.launch import next_power_of_2, sm_count
from megatron_ext.kernels.triton_loader import kernel_module

FUSED = "fused"
COMPOSED = "composed"
REFERENCE = "reference"
AUTO = "auto"
METHODS = (AUTO, FUSED, COMPOSED, REFERENCE)
MAX_TRITON_HIDDEN = 16384


# ---------------------------------------------------------------------- reference (torch ops)
def add_rms_norm_reference(x: torch.Tensor, residual: Optional[torch.Tensor],
                           weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + residual`` (or ``x``), returns ``(rms_norm(h), h)``."""
    h = x if residual is None else x + residual
    return rms_norm_reference(h, weight, eps), h


def rms_norm_backward(grad_y: torch.Tensor, h: torch.Tensor, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`rms_norm_reference` w.r.t. its input and weight."""
    compute = torch.promote_types(h.dtype, torch.float32)
    hf = h.to(compute)
    rstd = torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    xhat = hf * rstd
    gy = grad_y.to(compute)
    dw = (gy * xhat.to(h.dtype).to(compute)).reshape(-1, h.shape[-1]).sum(0)
    g = gy * weight.to(compute)
    dh = rstd * (g - xhat * (g * xhat).mean(-1, keepdim=True))
    return dh.to(h.dtype), dw.to(weight.dtype)


# ---------------------------------------------------------------------- Triton kernel
@functools.lru_cache(maxsize=None)
def _triton_kernel():
    """The Triton kernels (:mod:`megatron_ext.kernels.add_rms_norm`); ``None`` without Triton."""
    k = kernel_module("add_rms_norm")
    return None if k is None else k.add_rmsnorm_rows


def triton_available(device: torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available() and \
        _triton_kernel() is not None


def _launch(x2: Optional[torch.Tensor], residual2: Optional[torch.Tensor], weight: torch.Tensor,
            eps: float, rows: int, cols: int, dtype: torch.dtype, device: torch.device,
            reducer: Optional[SymmMemAllReduce] = None,
            staged: Optional[torch.Tensor] = None,
            copy_in: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel: ``x2`` alone (no reducer), or every rank's partial from the reducer's buffer
    ``staged`` — already there, or (``copy_in``) copied there from ``x2`` by the kernel."""
    kernel = _triton_kernel()
    h = torch.empty((rows, cols), dtype=dtype, device=device)
    y_dtype = torch.promote_types(dtype, weight.dtype)
    y = torch.empty((rows, cols), dtype=y_dtype, device=device)
    block = next_power_of_2(cols)
    warps = max(1, min(16, block // 256))
    sms = sm_count(device)
    has_res = residual2 is not None
    if staged is not None:
        world = reducer.world_size
        grid = max(1, min(rows, 2 * sms, reducer.signal_slots // world))
        peers, signals = reducer.peer_pointers(staged), reducer.signal_pointers()
        kernel[(grid,)](x2 if copy_in else staged, peers, signals,
                        residual2 if has_res else h, h, y, weight, rows, cols, eps, grid,
                        RANK=reducer.rank, WORLD=world, FROM_PEERS=True, HAS_RESIDUAL=has_res,
                        BLOCK=block, COPY_IN=copy_in, num_warps=warps)
    else:
        grid = max(1, min(rows, 4 * sms))
        kernel[(grid,)](x2, x2, x2, residual2 if has_res else h, h, y, weight,
                        rows, cols, eps, grid, RANK=0, WORLD=1, FROM_PEERS=False,
                        HAS_RESIDUAL=has_res, BLOCK=block, num_warps=warps)
    return y, h


# ---------------------------------------------------------------------- method choice
def choose_method(partial: torch.Tensor, reducer: Optional[SymmMemAllReduce],
                  method: str = AUTO) -> str:
    """Resolve ``auto`` and check that an explicit method can run here (ValueError if not)."""
    if method not in METHODS:
        raise ValueError(f"unknown fused-norm method {method!r}; use one of {METHODS}")
    cuda_triton = triton_available(partial.device) and partial.shape[-1] <= MAX_TRITON_HIDDEN
    nbytes = partial.numel() * partial.element_size()
    fits = reducer is not None and reducer.fits_slot(nbytes, partial.dtype)
    if method == AUTO:
        if not cuda_triton:
            return REFERENCE
        return FUSED if fits else COMPOSED
    if method == FUSED and not (cuda_triton and fits):
        raise ValueError("fused reduce+RMSNorm needs CUDA, Triton, an enabled symmetric-memory "
                         f"reducer and a partial that fits its slot (reducer: {reducer!r}, "
                         f"dtype {partial.dtype}, {nbytes} bytes)")
    if method == COMPOSED and not cuda_triton:
        raise ValueError(f"composed reduce+RMSNorm needs CUDA and Triton (hidden <= "
                         f"{MAX_TRITON_HIDDEN}); device {partial.device}")
    return method


def _check(partial: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor) -> None:
    if residual is not None and (residual.shape != partial.shape or
                                 residual.dtype != partial.dtype):
        raise ValueError(f"residual {tuple(residual.shape)}/{residual.dtype} must match the "
                         f"partial sum {tuple(partial.shape)}/{partial.dtype}")
    if weight.dim() != 1 or weight.shape[0] != partial.shape[-1]:
        raise ValueError(f"norm weight shape {tuple(weight.shape)} must be "
                         f"({partial.shape[-1]},), the hidden size")


# ---------------------------------------------------------------------- autograd wrapper
def _forward(partial, residual, weight, eps, reducer, method):
    """Forward of the CUDA methods (no autograd): returns ``(y, h)`` shaped like ``partial``."""
    shape = partial.shape
    cols = shape[-1]
    rows = partial.numel() // cols
    res2 = None if residual is None else residual.reshape(rows, cols).contiguous()
    if method == FUSED:
        record("all_reduce", reducer.axis.name, partial.numel() * partial.element_size())
        staged = reducer.stage_in_buffer(partial.contiguous())
        y, h = _launch(None, res2, weight.contiguous(), eps, rows, cols, partial.dtype,
                       partial.device, reducer=reducer, staged=staged.view(rows, cols))
    else:  # COMPOSED
        summed = partial if reducer is None else reducer.all_reduce(partial)
        y, h = _launch(summed.reshape(rows, cols).contiguous(), res2, weight.contiguous(),
                       eps, rows, cols, partial.dtype, partial.device)
    return y.view(shape), h.view(shape)


class _ReduceAddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, partial, residual, weight, eps, reducer, method):
        y, h = _forward(partial, residual, weight, eps, reducer, method)
        ctx.save_for_backward(h, weight)
        ctx.eps, ctx.has_residual = eps, residual is not None
        return y, h

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        h, weight = ctx.saved_tensors
        dh, dw = rms_norm_backward(grad_y, h, weight, ctx.eps)
        if grad_h is not None:
            dh = dh + grad_h
        dw = dw if ctx.needs_input_grad[2] else None
        return dh, (dh if ctx.has_residual else None), dw, None, None, None


def reduce_add_rms_norm(partial: torch.Tensor, residual: Optional[torch.Tensor],
                        weight: torch.Tensor, eps: float,
                        reducer: Optional[SymmMemAllReduce] = None,
                        method: str = AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Complete a pending sum and normalise: ``h = Σ_ranks partial (+ residual)``,
    returns ``(rms_norm(h) * weight, h)``; ``h`` is the next residual.

    ``reducer`` ``None`` (or a one-rank group) means ``partial`` is already whole. Differentiable:
    ``partial`` and ``residual`` both get ``dL/dh`` (identity adjoint of the sum).
    """
    _check(partial, residual, weight)
    if reducer is not None and reducer.axis.is_trivial:
        reducer = None
    method = choose_method(partial, reducer, method)
    if method == REFERENCE:
        summed = partial if reducer is None else all_reduce_sum(partial, reducer)
        return add_rms_norm_reference(summed, residual, weight, eps)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (partial, residual, weight)):
        return _ReduceAddRMSNorm.apply(partial, residual, weight, eps, reducer, method)
    return _forward(partial, residual, weight, eps, reducer, method)  # inference: no graph


def copy_in_reduce_add_rms_norm(partial: torch.Tensor, residual: Optional[torch.Tensor],
                                weight: torch.Tensor, eps: float, reducer: SymmMemAllReduce
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference: :func:`reduce_add_rms_norm`'s ``fused`` method with the partial copied into the
    next buffer slot by the kernel itself (no staging copy): one kernel, one barrier. The caller
    checks that it applies (CUDA, Triton, a partial that fits a slot, one dtype)."""
    _check(partial, residual, weight)
    cols = partial.shape[-1]
    rows = partial.numel() // cols
    slot = reducer.next_slot(partial.numel() * partial.element_size()).view(partial.dtype)
    res2 = None if residual is None else residual.reshape(rows, cols).contiguous()
    y, h = _launch(partial.reshape(rows, cols).contiguous(), res2, weight.contiguous(), eps, rows,
                   cols, partial.dtype, partial.device, reducer=reducer,
                   staged=slot[:rows * cols].view(rows, cols), copy_in=True)
    return y.view(partial.shape), h.view(partial.shape)


def add_rms_norm(x: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float, method: str = AUTO) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + RMSNorm of a whole (already reduced) tensor: ``(rms_norm(h), h)``."""
    return reduce_add_rms_norm(x, residual, weight, eps, None, method)


# ---------------------------------------------------------------------- communicator hook
class SymmMemReduceAddNorm:
    """``LayerCommunicator(fused_reduce_add_norm=...)``: completes a pending plain all-reduce
    (``PendingReduction.plain_all_reduce_group``) with :func:`reduce_add_rms_norm`, through the
    symmetric-memory reducer whose group has the same ranks, or NCCL for any other group.

    With ``k == 1`` the MoE shard's groups are the attention-TP groups (same ranks, same tokens),
    so the MoE layer's pending sum uses the attention-TP buffers too.
    """

    def __init__(self, reducers: Sequence[SymmMemAllReduce] = (), method: str = AUTO):
        if method not in METHODS:
            raise ValueError(f"unknown fused-norm method {method!r}; use one of {METHODS}")
        self.method = method
        self._by_ranks = {r.axis.ranks: r for r in reducers}
        self._nccl: dict = {}

    @property
    def symmetric_groups(self) -> list[tuple[int, ...]]:
        """Rank lists whose reductions go through symmetric memory."""
        return [ranks for ranks, r in self._by_ranks.items() if r.enabled]

    def reducer_for(self, group: AxisGroup, device: torch.device) -> SymmMemAllReduce:
        reducer = self._by_ranks.get(group.ranks)
        if reducer is None:
            reducer = self._nccl.get(group.ranks)
            if reducer is None:  # uniform_tokens=False: NCCL only, no collective to build it
                reducer = SymmMemAllReduce(group, device, uniform_tokens=False)
                self._nccl[group.ranks] = reducer
        return reducer

    def __call__(self, partial: torch.Tensor, residual: Optional[torch.Tensor], norm,
                 group: AxisGroup) -> tuple[torch.Tensor, torch.Tensor]:
        reducer = self.reducer_for(group, partial.device)
        if residual is not None and residual.dtype != partial.dtype:
            # mixed precision (bf16 autocast keeps an fp32 residual stream): the kernels need one
            # dtype, so only the sum goes through the reducer; add and norm promote as in torch
            h = all_reduce_sum(partial, reducer) + residual
            return norm(h), h
        return reduce_add_rms_norm(partial, residual, norm.weight, norm.eps, reducer, self.method)


def build_symm_mem_reduce_add_norm(groups: ParallelGroups, device=None,
                                   config: SymmMemConfig = SymmMemConfig(),
                                   method: str = AUTO) -> SymmMemReduceAddNorm:
    """The communicator hook for ``groups`` (collective over every rank of the world when
    ``attn_tp > 1`` on CUDA: the symmetric buffers are set up here, once)."""
    reducers = [] if groups.attn_tp.is_trivial else [SymmMemAllReduce(groups.attn_tp, device,
                                                                       config)]
    return SymmMemReduceAddNorm(reducers, method)
