"""The tensors of a model's Hugging Face checkpoint, named and shaped as ``transformers`` writes
them (experts per expert: ``model.layers.N.mlp.experts.E.gate_proj.weight``).

Depends only on :class:`ModelConfig`, so every rank of every pipeline stage can check a whole
checkpoint before loading its own part.
"""
from __future__ import annotations

from megatron_ext.models.config import ModelConfig

Shapes = dict[str, tuple[int, ...]]


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def attention_shapes(cfg: ModelConfig, layer: int) -> Shapes:
    p, h = layer_prefix(layer) + "self_attn.", cfg.hidden_size
    out: Shapes = {
        p + "q_proj.weight": (cfg.q_size, h),
        p + "k_proj.weight": (cfg.kv_size, h),
        p + "v_proj.weight": (cfg.kv_size, h),
        p + "o_proj.weight": (h, cfg.q_size),
    }
    if cfg.qkv_bias:
        out.update({p + "q_proj.bias": (cfg.q_size,), p + "k_proj.bias": (cfg.kv_size,),
                    p + "v_proj.bias": (cfg.kv_size,)})
    if cfg.qk_norm:
        out.update({p + "q_norm.weight": (cfg.head_dim,), p + "k_norm.weight": (cfg.head_dim,)})
    return out


def gated_mlp_shapes(prefix: str, hidden: int, width: int) -> Shapes:
    return {prefix + "gate_proj.weight": (width, hidden),
            prefix + "up_proj.weight": (width, hidden),
            prefix + "down_proj.weight": (hidden, width)}


def mlp_shapes(cfg: ModelConfig, layer: int) -> Shapes:
    p, h = layer_prefix(layer) + "mlp.", cfg.hidden_size
    if not cfg.is_sparse(layer):
        return gated_mlp_shapes(p, h, cfg.intermediate_size)
    out: Shapes = {p + "gate.weight": (cfg.num_experts, h)}
    for e in range(cfg.num_experts):
        out.update(gated_mlp_shapes(f"{p}experts.{e}.", h, cfg.moe_intermediate_size))
    if cfg.has_shared_expert:
        out.update(gated_mlp_shapes(p + "shared_expert.", h, cfg.shared_expert_intermediate_size))
        if cfg.shared_expert_gate:
            out[p + "shared_expert_gate.weight"] = (1, h)
    return out


def layer_shapes(cfg: ModelConfig, layer: int) -> Shapes:
    p, h = layer_prefix(layer), cfg.hidden_size
    out: Shapes = {p + "input_layernorm.weight": (h,)}
    out.update(attention_shapes(cfg, layer))
    out[p + "post_attention_layernorm.weight"] = (h,)
    out.update(mlp_shapes(cfg, layer))
    return out


def hf_tensor_shapes(cfg: ModelConfig) -> Shapes:
    """Every tensor of the checkpoint in model order (embedding, layers, final norm, LM head)."""
    out: Shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.hidden_size)}
    for layer in range(cfg.num_layers):
        out.update(layer_shapes(cfg, layer))
    out["model.norm.weight"] = (cfg.hidden_size,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return out
