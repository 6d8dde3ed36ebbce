"""RMSNorm on ``te.RMSNorm`` with our ParamSpec.

``te.RMSNorm(hidden, eps, zero_centered_gamma=False)`` computes ``x / rms(x) * weight`` with the
statistics in float32 and one rounding at the end (HF rounds ``x / rms(x)`` to the input dtype
before the multiply; the two differ by bf16 rounding only). Its parameter is ``weight``, so the
module path gives the HF name. The communicator's fused reduce+add+norm reads ``weight`` and
``eps`` of whichever norm it is handed, so it works on this one unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch

from megatron_ext.layers.te.runtime import te_module
from megatron_ext.parallel.param_meta import ParamSpec, set_spec


def te_rms_norm(hidden_size: int, eps: float, *, grad_sync: tuple[str, ...],
                name: Optional[str], dtype: Optional[torch.dtype],
                device: Optional[torch.device]):
    if hidden_size < 1:
        raise ValueError(f"RMSNorm hidden_size={hidden_size} must be >= 1")
    if eps <= 0:
        raise ValueError(f"RMSNorm eps={eps} must be > 0")
    te = te_module()
    dev = device if device is not None else torch.device("cuda", torch.cuda.current_device())
    norm = te.RMSNorm(hidden_size, eps=eps, zero_centered_gamma=False, device=dev, dtype=dtype)
    with torch.no_grad():
        norm.weight.fill_(1.0)
    set_spec(norm.weight, ParamSpec((hidden_size,), grad_sync=tuple(grad_sync), name=name))
    return norm
