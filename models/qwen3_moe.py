"""Qwen3-MoE (``model_type: qwen3_moe``): QK-norm, no biases, routed experts in every layer unless
``mlp_only_layers`` / ``decoder_sparse_step`` say otherwise, ``norm_topk_prob`` renormalisation.
Config mapping only; the math is the shared decoder (``models/decoder.py``)."""
from __future__ import annotations

from models.config import ModelConfig
from models.hf_fields import HFFields, mlp_only_layers_of, sparse_pattern

MODEL_TYPE = "qwen3_moe"
HF_ARCHITECTURE = "Qwen3MoeForCausalLM"


def from_hf(hf: dict, *, strict: bool = True) -> ModelConfig:
    f = HFFields(hf, MODEL_TYPE)
    f.full_attention_only()
    f.require("hidden_act", ("silu",), "silu", "gated MLPs use SiLU")
    f.require("attention_bias", (False,), False, "biases on q/k/v/o projections")
    f.require("attention_dropout", (0, 0.0), 0.0, "attention dropout")
    hidden = f.get("hidden_size", 2048)
    heads = f.get("num_attention_heads", 32)
    layers = f.get("num_hidden_layers", 24)
    num_experts = f.get("num_experts", f.get("num_local_experts", 128))
    fields = dict(
        architecture=MODEL_TYPE,
        vocab_size=f.get("vocab_size", 151936),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", 4),
        head_dim=f.get("head_dim", hidden // heads),
        intermediate_size=f.get("intermediate_size", 6144),
        rms_norm_eps=f.get("rms_norm_eps", 1e-6),
        rope_theta=f.rope_theta(10000.0),
        max_position_embeddings=f.get("max_position_embeddings", 32768),
        tie_word_embeddings=f.get("tie_word_embeddings", False),
        qkv_bias=False,
        qk_norm=True,
        num_experts=num_experts,
        num_experts_per_tok=f.get("num_experts_per_tok", 8),
        moe_intermediate_size=f.get("moe_intermediate_size", 768),
        norm_topk_prob=f.get("norm_topk_prob", False),
        sparse_layers=sparse_pattern(layers, num_experts, f.get("decoder_sparse_step", 1),
                                     f.get("mlp_only_layers", [])),
        router_aux_loss_coef=f.get("router_aux_loss_coef", 0.001),
    )
    f.finish(strict)
    return ModelConfig(**fields, hf_config=dict(hf))


def to_hf(cfg: ModelConfig) -> dict:
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
        "hidden_act": "silu",
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": mlp_only_layers_of(cfg.sparse_layers),
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
    }
