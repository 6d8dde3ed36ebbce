"""Llama (``model_type: llama``): dense gated-SiLU MLP in every layer, no QK-norm, no biases.
Config mapping only; the math is the shared decoder (``megatron_ext/models/decoder.py``)."""
from __future__ import annotations

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.hf_fields import HFFields, decoder_fields, decoder_hf

MODEL_TYPE = "llama"
HF_ARCHITECTURE = "LlamaForCausalLM"


def from_hf(hf: dict, *, strict: bool = True) -> ModelConfig:
    f = HFFields(hf, MODEL_TYPE)
    f.require("hidden_act", ("silu",), "silu", "gated MLPs use SiLU")
    f.require("attention_bias", (False,), False, "biases on q/k/v/o projections")
    f.require("mlp_bias", (False,), False, "biases on MLP projections")
    f.require("attention_dropout", (0, 0.0), 0.0, "attention dropout")
    f.full_attention_only()
    fields = decoder_fields(f, hidden=4096, heads=32, layers=32, kv_heads=None,
                            intermediate=11008, vocab=32000, max_positions=2048)
    ignored = f.finish(strict)
    return ModelConfig(**fields, sparse_layers=(False,) * fields["num_layers"], hf_config=dict(hf),
                       ignored_hf_fields=ignored)


def to_hf(cfg: ModelConfig) -> dict:
    if any(cfg.sparse_layers):
        raise ValueError("a llama config cannot have sparse (MoE) layers")
    return {**decoder_hf(cfg, HF_ARCHITECTURE), "attention_bias": False, "mlp_bias": False}
