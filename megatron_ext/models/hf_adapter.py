"""Where each parameter of :class:`~megatron_ext.models.decoder.CausalLM` lives in a Hugging Face
checkpoint (the model's state-dict adapter, as torchtitan's ``state_dict_adapter.py``).

Module and parameter names already follow ``transformers`` (``model.layers.3.self_attn.q_proj.weight``),
so only what is stored differently is special-cased: routed experts (one stacked parameter here,
one tensor per expert in HF), the shared expert's inner MLP and gate, and a tied LM head held on
another pipeline stage (it is the embedding tensor).
"""
from __future__ import annotations

import re
from typing import Iterable

from megatron_ext.checkpoint.hf_sources import HFSource, HFTensor, stacked_keys
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.hf_keys import hf_tensor_shapes

_EXPERTS = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_SHARED = re.compile(r"^(model\.layers\.\d+\.mlp\.shared_expert)\.(mlp\.(\w+)|gate)\.weight$")


def hf_source(name: str, expected: dict, config: ModelConfig) -> HFSource:
    """Where parameter ``name`` lives in the HF checkpoint (see the module doc)."""
    if name in expected:
        return HFTensor(name, expected[name])
    match = _EXPERTS.match(name)
    if match:
        prefix, proj = match.groups()
        keys = [f"{prefix}.{e}.{proj}.weight" for e in range(config.num_experts)]
        return stacked_keys(keys, expected[keys[0]])
    match = _SHARED.match(name)
    if match:
        prefix, _, proj = match.groups()
        key = f"{prefix}.{proj}.weight" if proj else f"{prefix}_gate.weight"
        return HFTensor(key, expected[key])
    if name == "lm_head.weight" and config.tie_word_embeddings:
        key = "model.embed_tokens.weight"
        return HFTensor(key, expected[key])
    raise ValueError(f"parameter {name} has no place in the {config.architecture} HF checkpoint")


def hf_sources(param_names: Iterable[str], config: ModelConfig) -> dict[str, HFSource]:
    """HF source of every named parameter (what one rank or stage holds)."""
    expected = hf_tensor_shapes(config)
    return {name: hf_source(name, expected, config) for name in param_names}
