"""Qwen3-MoE (``model_type: qwen3_moe``): QK-norm, no biases, routed experts in every layer unless
``mlp_only_layers`` / ``decoder_sparse_step`` say otherwise, ``norm_topk_prob`` renormalisation.
Config mapping only; the math is the shared decoder (``megatron_ext/models/decoder.py``)."""
from __future__ import annotations

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.hf_fields import HFFields, decoder_fields, decoder_hf, moe_fields, moe_hf

MODEL_TYPE = "qwen3_moe"
HF_ARCHITECTURE = "Qwen3MoeForCausalLM"


def from_hf(hf: dict, *, strict: bool = True) -> ModelConfig:
    f = HFFields(hf, MODEL_TYPE)
    f.full_attention_only()
    f.require("hidden_act", ("silu",), "silu", "gated MLPs use SiLU")
    f.require("attention_bias", (False,), False, "biases on q/k/v/o projections")
    f.require("attention_dropout", (0, 0.0), 0.0, "attention dropout")
    fields = decoder_fields(f, hidden=2048, heads=32, layers=24, kv_heads=4, intermediate=6144,
                            vocab=151936, max_positions=32768)
    fields.update(moe_fields(f, fields["num_layers"],
                             num_experts=f.get("num_local_experts", 128), top_k=8,
                             moe_intermediate=768))
    ignored = f.finish(strict)
    return ModelConfig(**fields, qkv_bias=False, qk_norm=True, hf_config=dict(hf),
                       ignored_hf_fields=ignored)


def to_hf(cfg: ModelConfig) -> dict:
    return {**decoder_hf(cfg, HF_ARCHITECTURE), "attention_bias": False, **moe_hf(cfg)}
