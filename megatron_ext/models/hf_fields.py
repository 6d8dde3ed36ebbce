"""Reading an HF ``config.json`` dict field by field, so that every field is either used, known to
be harmless, or reported.

The per-model mappings call :meth:`HFFields.get` for the fields they use (with the default that the
``transformers`` config class applies when the field is missing), :meth:`HFFields.require` for
fields whose value must be one we implement, and :meth:`HFFields.finish` to reject whatever is
left when ``strict``.
"""
from __future__ import annotations

from typing import Any, Iterable

# Fields that never change the forward math (bookkeeping, generation, init, serving options).
HARMLESS_FIELDS: frozenset[str] = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_router_logits",
    "_name_or_path", "auto_map", "return_dict", "output_hidden_states", "output_attentions",
    "tokenizer_class", "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tie_encoder_decoder", "max_window_layers", "sliding_window",
    "pretraining_tp", "use_bfloat16", "keys_to_ignore_at_inference",
})


class HFFields:
    """A view of one HF config dict that remembers which fields were consumed."""

    def __init__(self, hf: dict, model_type: str):
        self.hf = hf
        self.model_type = model_type
        self.used: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.used.add(key)
        value = self.hf.get(key)
        return default if value is None else value

    def require(self, key: str, allowed: Iterable[Any], default: Any, why: str) -> Any:
        """The field's value, which must be one of ``allowed`` (what megatron_ext implements)."""
        value = self.get(key, default)
        allowed = tuple(allowed)
        if value not in allowed:
            raise ValueError(f"{self.model_type} config field {key}={value!r} is not supported "
                             f"({why}); supported: {', '.join(repr(a) for a in allowed)}")
        return value

    def rope_theta(self, default: float) -> float:
        """``rope_theta`` from ``rope_parameters`` (transformers 5), ``rope_scaling`` or the top
        level (older files). Only plain RoPE is implemented."""
        params = self.get("rope_parameters") or {}
        scaling = self.get("rope_scaling") or {}
        for source_name, source in (("rope_parameters", params), ("rope_scaling", scaling)):
            if not isinstance(source, dict):
                raise ValueError(f"{self.model_type} config field {source_name}={source!r} must "
                                 f"be a dict")
            rope_type = source.get("rope_type", source.get("type", "default"))
            if rope_type != "default":
                raise ValueError(f"{self.model_type} config field {source_name} has "
                                 f"rope_type={rope_type!r}: only the default (unscaled) RoPE is "
                                 f"supported")
            extra = set(source) - {"rope_type", "type", "rope_theta"}
            if extra:
                raise ValueError(f"{self.model_type} config field {source_name} has unsupported "
                                 f"entries {sorted(extra)} (only rope_type='default' and "
                                 f"rope_theta are supported)")
        if self.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{self.model_type} config field partial_rotary_factor="
                             f"{self.hf['partial_rotary_factor']!r} is not supported (full RoPE "
                             f"only)")
        return float(params.get("rope_theta", scaling.get("rope_theta",
                                                          self.get("rope_theta", default))))

    def full_attention_only(self) -> None:
        """Reject sliding-window attention (not implemented)."""
        self.require("use_sliding_window", (False,), False, "sliding-window attention")
        layer_types = self.get("layer_types") or []
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(f"{self.model_type} config field layer_types contains {other}: only "
                             f"'full_attention' layers are supported")

    def finish(self, strict: bool) -> None:
        unknown = sorted(set(self.hf) - self.used - HARMLESS_FIELDS)
        if unknown and strict:
            raise ValueError(
                f"{self.model_type} config has fields megatron_ext does not know: "
                f"{', '.join(unknown)} (they might change the model's math; pass strict=False to "
                f"ignore them)")


def sparse_pattern(num_layers: int, num_experts: int, decoder_sparse_step: int,
                   mlp_only_layers: Iterable[int]) -> tuple[bool, ...]:
    """Which layers are sparse, by ``transformers``' rule for Qwen MoE models: layer ``i`` is
    sparse iff ``i`` is not in ``mlp_only_layers``, ``num_experts > 0`` and
    ``(i + 1) % decoder_sparse_step == 0``."""
    if isinstance(decoder_sparse_step, bool) or not isinstance(decoder_sparse_step, int) \
            or decoder_sparse_step < 1:
        raise ValueError(f"decoder_sparse_step={decoder_sparse_step!r} must be a positive integer")
    only = list(mlp_only_layers)
    bad = [i for i in only if not isinstance(i, int) or not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"mlp_only_layers entries {bad} are not layer indices in "
                         f"[0, {num_layers})")
    return tuple(i not in only and num_experts > 0 and (i + 1) % decoder_sparse_step == 0
                 for i in range(num_layers))


def mlp_only_layers_of(sparse_layers: tuple[bool, ...]) -> list[int]:
    return [i for i, s in enumerate(sparse_layers) if not s]


def decoder_fields(f: HFFields, *, hidden: int, heads: int, layers: int, kv_heads: int | None,
                   intermediate: int, vocab: int, max_positions: int) -> dict:
    """The attention/dense fields every decoder model shares, with the model's HF defaults."""
    hidden = f.get("hidden_size", hidden)
    heads = f.get("num_attention_heads", heads)
    return dict(
        architecture=f.model_type,
        vocab_size=f.get("vocab_size", vocab),
        hidden_size=hidden,
        num_layers=f.get("num_hidden_layers", layers),
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", heads if kv_heads is None else kv_heads),
        head_dim=f.get("head_dim", hidden // heads),
        intermediate_size=f.get("intermediate_size", intermediate),
        rms_norm_eps=f.get("rms_norm_eps", 1e-6),
        rope_theta=f.rope_theta(10000.0),
        max_position_embeddings=f.get("max_position_embeddings", max_positions),
        tie_word_embeddings=f.get("tie_word_embeddings", False),
    )


def moe_fields(f: HFFields, num_layers: int, *, num_experts: int, top_k: int,
               moe_intermediate: int) -> dict:
    """The routed-expert fields of the Qwen MoE models, with the model's HF defaults."""
    num_experts = f.get("num_experts", num_experts)
    return dict(
        num_experts=num_experts,
        num_experts_per_tok=f.get("num_experts_per_tok", top_k),
        moe_intermediate_size=f.get("moe_intermediate_size", moe_intermediate),
        norm_topk_prob=f.get("norm_topk_prob", False),
        sparse_layers=sparse_pattern(num_layers, num_experts, f.get("decoder_sparse_step", 1),
                                     f.get("mlp_only_layers", [])),
        router_aux_loss_coef=f.get("router_aux_loss_coef", 0.001),
    )


def decoder_hf(cfg: Any, architecture: str) -> dict:
    """The HF config fields every decoder model writes."""
    return {
        "architectures": [architecture],
        "model_type": cfg.architecture,
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
        "hidden_act": "silu",
    }


def moe_hf(cfg: Any) -> dict:
    """The HF config fields of the Qwen MoE models' routed experts."""
    return {
        "num_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "norm_topk_prob": cfg.norm_topk_prob,
        "decoder_sparse_step": 1,
        "mlp_only_layers": mlp_only_layers_of(cfg.sparse_layers),
        "router_aux_loss_coef": cfg.router_aux_loss_coef,
    }
