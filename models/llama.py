"""Llama (``model_type: llama``): dense gated-SiLU MLP in every layer, no QK-norm, no biases.
Config mapping only; the math is the shared decoder (``models/decoder.py``)."""
from __future__ import annotations

from models.config import ModelConfig
from models.hf_fields import HFFields

MODEL_TYPE = "llama"
HF_ARCHITECTURE = "LlamaForCausalLM"


def from_hf(hf: dict, *, strict: bool = True) -> ModelConfig:
    f = HFFields(hf, MODEL_TYPE)
    f.require("hidden_act", ("silu",), "silu", "gated MLPs use SiLU")
    f.require("attention_bias", (False,), False, "biases on q/k/v/o projections")
    f.require("mlp_bias", (False,), False, "biases on MLP projections")
    f.require("attention_dropout", (0, 0.0), 0.0, "attention dropout")
    hidden = f.get("hidden_size", 4096)
    heads = f.get("num_attention_heads", 32)
    layers = f.get("num_hidden_layers", 32)
    fields = dict(
        architecture=MODEL_TYPE,
        vocab_size=f.get("vocab_size", 32000),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", heads),
        head_dim=f.get("head_dim", hidden // heads),
        intermediate_size=f.get("intermediate_size", 11008),
        rms_norm_eps=f.get("rms_norm_eps", 1e-6),
        rope_theta=f.rope_theta(10000.0),
        max_position_embeddings=f.get("max_position_embeddings", 2048),
        tie_word_embeddings=f.get("tie_word_embeddings", False),
        sparse_layers=(False,) * layers,
    )
    f.finish(strict)
    return ModelConfig(**fields, hf_config=dict(hf))


def to_hf(cfg: ModelConfig) -> dict:
    if any(cfg.sparse_layers):
        raise ValueError("a llama config cannot have sparse (MoE) layers")
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
    }
