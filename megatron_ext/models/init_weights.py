"""Layout-independent weight initialisation: any two layouts start from the same model."""
from __future__ import annotations

import zlib
from typing import Mapping

import torch
from torch import nn

from megatron_ext.checkpoint.hf_sources import HFSource
from megatron_ext.parallel.param_meta import get_spec


def init_weights(model: nn.Module, sources: Mapping[str, HFSource], seed: int = 0,
                 std: float = 0.02) -> None:
    """Every global tensor is drawn from a generator seeded by ``seed`` and the parameter's HF
    source key (``sources``), and each rank keeps its slice. Norm weights are ones, biases zeros."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            spec = get_spec(param)
            if name.endswith("norm.weight"):
                param.fill_(1.0)
                continue
            if name.endswith(".bias"):
                param.zero_()
                continue
            key = ",".join(sources[name].keys()[:1])
            g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode()))
                                              % (2 ** 63))
            full = torch.randn(spec.global_shape, generator=g, dtype=torch.float32) * std
            param.copy_(spec.take_local(full))
