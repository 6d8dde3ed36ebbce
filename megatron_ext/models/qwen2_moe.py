"""Qwen2-MoE (``model_type: qwen2_moe``): q/k/v biases, routed experts plus a shared expert scaled
by a sigmoid gate, dense layers mixed in by ``mlp_only_layers`` / ``decoder_sparse_step``.
Config mapping only; the math is the shared decoder (``megatron_ext/models/decoder.py``)."""
from __future__ import annotations

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.hf_fields import HFFields, decoder_fields, decoder_hf, moe_fields, moe_hf

MODEL_TYPE = "qwen2_moe"
HF_ARCHITECTURE = "Qwen2MoeForCausalLM"


def from_hf(hf: dict, *, strict: bool = True) -> ModelConfig:
    f = HFFields(hf, MODEL_TYPE)
    f.full_attention_only()
    f.require("hidden_act", ("silu",), "silu", "gated MLPs use SiLU")
    f.require("attention_dropout", (0, 0.0), 0.0, "attention dropout")
    fields = decoder_fields(f, hidden=2048, heads=16, layers=24, kv_heads=16, intermediate=5632,
                            vocab=151936, max_positions=32768)
    fields.update(moe_fields(f, fields["num_layers"], num_experts=60, top_k=4,
                             moe_intermediate=1408))
    shared = f.get("shared_expert_intermediate_size", 5632)
    qkv_bias = f.get("qkv_bias", True)
    ignored = f.finish(strict)
    return ModelConfig(**fields, qkv_bias=qkv_bias, qk_norm=False,
                       shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0,
                       hf_config=dict(hf), ignored_hf_fields=ignored)


def to_hf(cfg: ModelConfig) -> dict:
    return {**decoder_hf(cfg, HF_ARCHITECTURE), "qkv_bias": cfg.qkv_bias, **moe_hf(cfg),
            "shared_expert_intermediate_size": cfg.shared_expert_intermediate_size}
