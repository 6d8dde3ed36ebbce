"""Which implementation builds each module: ours (``native``) or TransformerEngine (``te``).

Chosen once, when the model is built (``--transformer-impl {native,te,auto}``), in the spirit of
megatron-core's ``BackendSpecProvider``: the model asks a :class:`LayerBackend` for a column- or
row-parallel linear, an RMSNorm, the routed experts and the CP-attention kernel, and the backend
returns the module; nothing probes TE per call or through module globals.

Both implementations create the same parameters under the same names with the same
:class:`~megatron_ext.parallel.param_meta.ParamSpec`\\ s (TE modules are handed our sharded
weights), so gradient sync, DCP checkpoints and HF load/save are backend-independent: a checkpoint
trained with TE loads natively and back. TE modules never add a reduction: they run with
``parallel_mode=None`` on pre-sharded weights, so row-parallel outputs stay partial sums for the
:class:`~megatron_ext.communication.communicator.LayerCommunicator`.

A TE backend keeps a module native where TE cannot express our layout; each such case is recorded
with its reason (:meth:`LayerBackend.describe`, logged once per model):

* K/V projections whose heads are replicated over attention TP (``num_kv_heads < attn_tp``): the
  replicas' weight gradients are summed in our autograd function, which TE's GEMM cannot host;
* the input norm stays a separate ``te.RMSNorm`` rather than fused into QKV (``LayerNormLinear``):
  the communicator owns it (it runs on the residual's scatter mode, possibly fused with the
  pending all-reduce and the residual add), so fusing it into a TP_ATTN_FULL projection would
  move it after the gather and take away the fused reduce+add+norm.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

import torch
from torch import nn

from megatron_ext.layers.linear import (ColumnParallelLinear, InitFn, RowParallelLinear,
                                        default_init)
from megatron_ext.layers.norm import RMSNorm
from megatron_ext.layers.te.runtime import te_unavailable_reason
from megatron_ext.parallel.axes import Axis
from megatron_ext.parallel.groups import AxisGroup

log = logging.getLogger("megatron_ext.backend")


class TransformerImpl(StrEnum):
    NATIVE = "native"
    TE = "te"
    AUTO = "auto"


TRANSFORMER_IMPLS: tuple[str, ...] = tuple(TransformerImpl)


def resolve_transformer_impl(requested: str, *, cuda_available: Optional[bool] = None) -> str:
    """What a requested ``native|te|auto`` builds: ``native``, ``te``, or ``auto`` (TE imports on
    CUDA: each module kind on whichever implementation measured faster, see
    :data:`AUTO_TE_KINDS`); ``auto`` without TE is ``native``. ``te`` where TE cannot run is a
    ValueError naming why (callers check this before any process group exists)."""
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl={requested!r} must be one of "
                         f"{', '.join(TRANSFORMER_IMPLS)}")
    if requested == TransformerImpl.NATIVE:
        return TransformerImpl.NATIVE
    why = te_unavailable_reason(cuda_available)
    if requested == TransformerImpl.TE and why is not None:
        raise ValueError(f"transformer_impl=te needs TransformerEngine on CUDA, but {why}")
    if why is not None:
        return TransformerImpl.NATIVE
    return TransformerImpl.TE if requested == TransformerImpl.TE else TransformerImpl.AUTO


#: What ``auto`` takes from TE when TE imports: the module kinds where TE measured faster on the
#: GPU (2×H200 bf16). None today. Ours was faster for the column linear (853 vs 927 µs), row
#: linear (462 vs 937), RMSNorm (901 vs 912), grouped experts (1492 vs 5095; BENCHMARKS §13) and,
#: since session 3's reverse-ring backward and one-pass merge, for CP attention too: our best
#: 1.004–1.031× TE's p2p from 32K to 128K tokens (MHA and GQA) at 0.71–0.88× its memory, and
#: 1.2–1.4× TE's all_gather (§13c). Until then this held ``cp_attention_p2p``.
AUTO_TE_KINDS: frozenset[str] = frozenset()
_AUTO_NATIVE_WHY = "native (faster than TE: BENCHMARKS §13, §13c)"


@dataclass
class LayerBackend:
    """The module provider of one model build (``impl`` already resolved: ``native`` or ``te``).

    ``choices`` records, per module kind, which implementation each instance got (and why a TE
    build kept one native) — the source of the one log line per model."""

    impl: str = TransformerImpl.NATIVE
    choices: dict[str, set[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.impl not in TRANSFORMER_IMPLS:
            raise ValueError(f"LayerBackend impl={self.impl!r} must be one of "
                             f"{', '.join(TRANSFORMER_IMPLS)}")
        if self.impl == TransformerImpl.AUTO and te_unavailable_reason() is not None:
            raise ValueError("LayerBackend impl='auto' needs TransformerEngine here: resolve "
                             "'auto' with resolve_transformer_impl first (native without TE)")

    @classmethod
    def resolve(cls, requested: str) -> "LayerBackend":
        return cls(resolve_transformer_impl(requested))

    @property
    def uses_te(self) -> bool:
        """Whether the linears, norms and experts are TE modules (``auto`` keeps them native)."""
        return self.impl == TransformerImpl.TE

    def _te_for(self, kind: str) -> bool:
        return self.uses_te or (self.impl == TransformerImpl.AUTO and kind in AUTO_TE_KINDS)

    @property
    def _native_label(self) -> str:
        return _AUTO_NATIVE_WHY if self.impl == TransformerImpl.AUTO else "native"

    def _record(self, kind: str, choice: str) -> None:
        self.choices.setdefault(kind, set()).add(choice)

    # ------------------------------------------------------------------ modules
    def column_linear(self, in_features: int, out_features: int, tp_group: AxisGroup,
                      bias: bool = False, *, num_partitions: Optional[int] = None,
                      grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,),
                      shard_axis: Optional[str] = None, name: Optional[str] = None,
                      kind: str = "linear", init_method: InitFn = default_init,
                      dtype: Optional[torch.dtype] = None,
                      device: Optional[torch.device] = None) -> nn.Module:
        """A column-parallel linear whose input gradient the caller sums (``sync_input_grad``
        False: the block or the communicator does it once for all its linears)."""
        replicated = num_partitions is not None and num_partitions < tp_group.size
        if self.uses_te and not replicated:
            from megatron_ext.layers.te.linear import te_column_parallel_linear

            self._record(kind, "te")
            return te_column_parallel_linear(in_features, out_features, tp_group, bias,
                                             grad_sync=grad_sync, shard_axis=shard_axis,
                                             name=name, init_method=init_method, dtype=dtype,
                                             device=device)
        self._record(kind, "native (heads replicated over attn_tp)" if self.uses_te else
                     self._native_label)
        return ColumnParallelLinear(in_features, out_features, tp_group, bias,
                                    num_partitions=num_partitions, sync_input_grad=False,
                                    grad_sync=grad_sync, shard_axis=shard_axis, name=name,
                                    init_method=init_method, dtype=dtype, device=device)

    def row_linear(self, in_features: int, out_features: int, tp_group: AxisGroup,
                   bias: bool = False, *, grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,),
                   shard_axis: Optional[str] = None, name: Optional[str] = None,
                   kind: str = "linear", init_method: InitFn = default_init,
                   dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> nn.Module:
        """A row-parallel linear returning the partial sum over ``tp_group`` (the communicator
        completes it)."""
        if self.uses_te:
            from megatron_ext.layers.te.linear import te_row_parallel_linear

            self._record(kind, "te")
            return te_row_parallel_linear(in_features, out_features, tp_group, bias,
                                          grad_sync=grad_sync, shard_axis=shard_axis, name=name,
                                          init_method=init_method, dtype=dtype, device=device)
        self._record(kind, self._native_label)
        return RowParallelLinear(in_features, out_features, tp_group, reduce_results=False,
                                 bias=bias, grad_sync=grad_sync, shard_axis=shard_axis,
                                 name=name, init_method=init_method, dtype=dtype, device=device)

    def rms_norm(self, hidden_size: int, eps: float, *,
                 grad_sync: tuple[str, ...] = (Axis.ATTN_DP_CP,), name: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None) -> nn.Module:
        if self.uses_te:
            from megatron_ext.layers.te.norm import te_rms_norm

            self._record("norm", "te")
            return te_rms_norm(hidden_size, eps, grad_sync=grad_sync, name=name, dtype=dtype,
                               device=device)
        self._record("norm", self._native_label)
        return RMSNorm(hidden_size, eps, grad_sync=grad_sync, name=name, dtype=dtype,
                       device=device)

    def routed_experts(self, num_experts: int, hidden_size: int, intermediate_size: int,
                       groups, *, name: Optional[str] = "experts",
                       dtype: Optional[torch.dtype] = None,
                       device: Optional[torch.device] = None) -> nn.Module:
        if self.uses_te:
            from megatron_ext.layers.te.experts import te_routed_experts

            self._record("grouped_experts", "te")
            return te_routed_experts(num_experts, hidden_size, intermediate_size, groups,
                                     name=name, dtype=dtype, device=device)
        from megatron_ext.layers.moe.experts import RoutedExperts

        self._record("grouped_experts", self._native_label)
        return RoutedExperts(num_experts, hidden_size, intermediate_size, groups, name=name,
                             dtype=dtype, device=device)

    def attention_kernel(self, cp_strategy: str = "all_gather") -> str:
        """The ``backend`` argument of CP attention: ``torch`` natively; ``auto`` with TE (TE's
        ``DotProductAttention`` for every standard one-document split, ours for packed or
        padded batches, which TE's CP does not take — each reason logged once there). Under
        ``auto`` a strategy goes to TE only if :data:`AUTO_TE_KINDS` names it (none today)."""
        if self._te_for(f"cp_attention_{cp_strategy}"):
            self._record("cp_attention", f"te {cp_strategy} (torch for packed/padded batches)")
            return "auto"
        self._record("cp_attention", self._native_label)
        return "torch"

    # ------------------------------------------------------------------ report
    def describe(self) -> str:
        """One line: the implementation of every module kind built so far."""
        parts = [f"{kind}={'/'.join(sorted(got))}" for kind, got in sorted(self.choices.items())]
        return f"transformer-impl {self.impl}: " + ", ".join(parts)

    def log_once(self) -> None:
        log.info("%s", self.describe())
