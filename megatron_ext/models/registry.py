"""Which per-model mapping handles an HF config (by ``model_type``, else ``architectures``)."""
from __future__ import annotations

from types import ModuleType

from megatron_ext.models import llama, qwen2_moe, qwen3_moe

MAPPINGS: dict[str, ModuleType] = {m.MODEL_TYPE: m for m in (qwen3_moe, qwen2_moe, llama)}
_BY_ARCHITECTURE: dict[str, ModuleType] = {m.HF_ARCHITECTURE: m for m in MAPPINGS.values()}


def mapping_for(hf: dict) -> ModuleType:
    model_type = hf.get("model_type")
    if model_type in MAPPINGS:
        return MAPPINGS[model_type]
    archs = hf.get("architectures") or []
    for arch in archs:
        if arch in _BY_ARCHITECTURE and model_type is None:
            return _BY_ARCHITECTURE[arch]
    raise ValueError(
        f"unsupported architecture: model_type={model_type!r}, architectures={archs!r}; "
        f"supported model types: {', '.join(MAPPINGS)} "
        f"({', '.join(_BY_ARCHITECTURE)})")
