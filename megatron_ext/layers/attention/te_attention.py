"""TransformerEngine backend of context-parallel attention (used only where TE imports on CUDA).

``te.pytorch.DotProductAttention`` with ``cp_group``, ``cp_global_ranks``, ``cp_stream`` and
``cp_comm_type`` ("p2p" or "all_gather", our strategy names) runs the same computation as the
torch backend on TE's fused kernels. TE expects the standard load-balanced split of one
document per row (chunks ``c`` and ``2cp-1-c``, no padding) in ``bshd``; the plan says whether the
inputs have it, and anything else stays on the torch backend. Without TE this module only
answers "not usable" — nothing is emulated.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.parallel.groups import AxisGroup

_TE: Optional[object] = None
_TE_ERROR: Optional[str] = None
_MODULES: dict = {}
_CP_STREAM: Optional["torch.cuda.Stream"] = None


def _import_te():
    global _TE, _TE_ERROR
    if _TE is None and _TE_ERROR is None:
        try:
            import transformer_engine.pytorch as te_pt

            _TE = te_pt
        except Exception as exc:  # noqa: BLE001 - any import failure means "no TE"
            _TE_ERROR = f"{type(exc).__name__}: {exc}"
    return _TE


def te_importable() -> bool:
    return _import_te() is not None


def te_usable(q: torch.Tensor, plan) -> tuple[bool, str]:
    """``(usable, reason)`` for running these inputs on TE."""
    if not q.is_cuda:
        return False, "tensors are not on CUDA"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return False, f"TE attention needs fp16/bf16, got {q.dtype}"
    if not te_importable():
        return False, f"transformer_engine not importable ({_TE_ERROR})"
    if plan is not None and not plan.standard_layout:
        return False, "not the standard one-document unpadded split (packed or padded)"
    return True, "transformer_engine"


def _module(hq: int, hkv: int, d: int, scale: float, group: AxisGroup, strategy: str):
    global _CP_STREAM
    key = (hq, hkv, d, scale, group.ranks, strategy)
    if key not in _MODULES:
        kwargs = dict(num_gqa_groups=hkv, attention_dropout=0.0, qkv_format="bshd",
                      attn_mask_type="causal", softmax_scale=scale)
        if not group.is_trivial:
            if _CP_STREAM is None:
                _CP_STREAM = torch.cuda.Stream()
            kwargs.update(cp_group=group.group, cp_global_ranks=list(group.ranks),
                          cp_stream=_CP_STREAM, cp_comm_type=strategy)
        _MODULES[key] = _TE.DotProductAttention(hq, d, **kwargs)
    return _MODULES[key]


def te_context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                  cp_group: AxisGroup, *, strategy: str,
                                  softmax_scale: float) -> torch.Tensor:
    """Causal CP attention through TE; ``q [b, s_local, hq, d]`` -> ``[b, s_local, hq, d]``."""
    if not te_importable():
        raise RuntimeError(f"transformer_engine is not importable ({_TE_ERROR})")
    b, s, hq, d = q.shape
    mod = _module(hq, k.shape[2], d, softmax_scale, cp_group, strategy)
    out = mod(q, k, v, qkv_format="bshd", attn_mask_type="causal")
    return out.view(b, s, hq, d)
