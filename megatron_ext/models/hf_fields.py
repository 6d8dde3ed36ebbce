"""Reading an HF ``config.json`` dict field by field, so that every field is either used, known to
be harmless, or reported.

The per-model mappings call :meth:`HFFields.get` for the fields they use (with the default that the
``transformers`` config class applies when the field is missing), :meth:`HFFields.require` for
fields whose value must be one we implement, and :meth:`HFFields.finish` to reject whatever is
left: with ``strict`` any unknown field is an error; without it, unknown fields are ignored
(reported back so a command can print one note) unless they are in :data:`MATH_FIELDS`, fields
known to change the math that no mapping implements, which are always refused.
"""
from __future__ import annotations

import argparse
from typing import Any, Iterable, Optional

from megatron_ext.layers.rope_scaling import ROPE_TYPES, TYPE_KEYS, RopeScaling

# Fields that never change the forward math (bookkeeping, generation, init, serving options).
HARMLESS_FIELDS: frozenset[str] = frozenset({
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "use_cache",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "output_router_logits",
    "_name_or_path", "auto_map", "return_dict", "output_hidden_states", "output_attentions",
    "tokenizer_class", "is_encoder_decoder", "chunk_size_feed_forward", "id2label", "label2id",
    "problem_type", "tie_encoder_decoder", "max_window_layers", "sliding_window",
    "pretraining_tp", "use_bfloat16", "keys_to_ignore_at_inference",
    # hub / tokenizer bookkeeping that configs saved by other tools carry
    "_model_name_or_path", "_commit_hash", "unk_token_id", "sep_token_id", "cls_token_id",
    "mask_token_id", "decoder_start_token_id", "prefix", "task_specific_params", "finetuning_task",
    "max_length", "min_length", "num_beams", "do_sample", "temperature",
    "top_k", "top_p", "repetition_penalty", "length_penalty", "bad_words_ids", "num_return_sequences",
    "output_scores", "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "torchscript", "tf_legacy_loss", "pruned_heads",
    "cross_attention_hidden_size", "add_cross_attention", "is_decoder", "early_stopping",
    "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "diversity_penalty",
    "num_beam_groups", "typical_p", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "router_jitter_noise",
})

# Fields known to change the forward math (in the model types transformers has that look like
# ours) that no mapping implements: refused even when unknown fields are otherwise ignored.
MATH_FIELDS: frozenset[str] = frozenset({
    "rope_scaling", "quantization_config", "attn_logit_softcapping", "final_logit_softcapping",
    "logit_scale", "logits_scaling", "query_pre_attn_scalar", "embedding_multiplier",
    "residual_multiplier", "attention_multiplier", "hidden_activation", "clip_qkv",
    "use_qk_norm", "qk_layernorm", "rope_interleaved", "attention_chunk_size",
    "no_rope_layers", "use_sliding_window", "layer_types", "partial_rotary_factor",
    "num_local_experts", "n_routed_experts", "n_shared_experts", "moe_layer_freq",
    "first_k_dense_replace", "kv_lora_rank", "q_lora_rank", "scale_embeddings",
    "use_parallel_residual", "parallel_attn", "normalization", "norm_type", "layer_norm_eps",
    "rotary_pct", "alibi", "position_embedding_type", "sliding_window_pattern",
    "shared_expert_intermediate_size", "num_experts", "mlp_only_layers", "decoder_sparse_step",
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

    def rope(self, default_theta: float, max_positions: int) -> tuple[float, Optional[RopeScaling]]:
        """``(rope_theta, rope_scaling)`` as ``transformers`` reads them: the legacy
        ``rope_scaling`` dict if set, else ``rope_parameters`` (transformers 5); ``rope_type``
        (or the legacy ``type``) ``default`` / ``linear`` / ``dynamic`` / ``yarn`` / ``llama3``;
        ``rope_theta`` from the dict or the top level; yarn and llama3 take a top-level
        ``original_max_position_embeddings`` first, else the dict's, else ``max_positions``.
        Other types and entries are refused: they would change the frequencies."""
        params = self.get("rope_parameters") or {}
        legacy = self.get("rope_scaling") or {}
        top_original = self.get("original_max_position_embeddings")
        for name, source in (("rope_parameters", params), ("rope_scaling", legacy)):
            if not isinstance(source, dict):
                raise ValueError(f"{self.model_type} config field {name}={source!r} must be a "
                                 f"dict")
        chosen = legacy or params   # transformers: rope_scaling, when set, replaces the other
        theta = float(chosen.get("rope_theta", self.get("rope_theta", default_theta)))
        scalings = {name: self._rope_scaling(name, source, max_positions, top_original)
                    for name, source in (("rope_parameters", params), ("rope_scaling", legacy))
                    if source}
        if len(scalings) == 2 and len(set(scalings.values())) == 2:
            raise ValueError(f"{self.model_type} config fields rope_scaling and rope_parameters "
                             f"disagree ({legacy} vs {params}): keep one of them")
        scaling = scalings.get("rope_scaling", scalings.get("rope_parameters"))
        if self.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{self.model_type} config field partial_rotary_factor="
                             f"{self.hf['partial_rotary_factor']!r} is not supported (full RoPE "
                             f"only)")
        return theta, scaling

    def _rope_scaling(self, name: str, source: dict, max_positions: int,
                      top_original: Optional[int]) -> Optional[RopeScaling]:
        rope_type = source.get("rope_type", source.get("type", "default"))
        where = f"{self.model_type} config field {name}"
        if rope_type != "default" and rope_type not in ROPE_TYPES:
            raise ValueError(f"{where} has rope_type={rope_type!r}: supported are 'default', "
                             f"{', '.join(repr(t) for t in ROPE_TYPES)}")
        known = {"rope_type", "type", "rope_theta"} | set(TYPE_KEYS.get(rope_type, ()))
        if source.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{where} has partial_rotary_factor="
                             f"{source['partial_rotary_factor']!r} (full RoPE only)")
        extra = sorted(set(source) - known - {"partial_rotary_factor"})
        if extra:
            raise ValueError(f"{where} has entries {extra} that rope_type={rope_type!r} does not "
                             f"take (they might change the frequencies)")
        if rope_type == "default":
            return None
        values = {k: source[k] for k in TYPE_KEYS[rope_type] if source.get(k) is not None}
        if rope_type in ("yarn", "llama3"):
            values["original_max_position_embeddings"] = (
                top_original or values.get("original_max_position_embeddings") or max_positions)
        try:
            return RopeScaling(rope_type, **values)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None

    def full_attention_only(self) -> None:
        """Reject sliding-window attention (not implemented)."""
        self.require("use_sliding_window", (False,), False, "sliding-window attention")
        layer_types = self.get("layer_types") or []
        other = sorted({t for t in layer_types if t != "full_attention"})
        if other:
            raise ValueError(f"{self.model_type} config field layer_types contains {other}: only "
                             f"'full_attention' layers are supported")

    def finish(self, strict: bool) -> tuple[str, ...]:
        """The unknown fields that were ignored (``()`` when none); raises for fields that change
        the math, and for any unknown field when ``strict``."""
        unknown = sorted(set(self.hf) - self.used - HARMLESS_FIELDS)
        math = [k for k in unknown if k in MATH_FIELDS and self.hf[k] not in (None, False, [], {})]
        if math:
            raise ValueError(
                f"{self.model_type} config field(s) {', '.join(math)} change the model's math in a "
                f"way megatron_ext does not implement")
        if unknown and strict:
            raise ValueError(
                f"{self.model_type} config has fields megatron_ext does not know: "
                f"{', '.join(unknown)} (they might change the model's math; leave out "
                f"--strict-config / pass strict=False to ignore them)")
        return tuple(unknown)


STRICT_CONFIG_HELP = ("refuse HF config.json fields megatron_ext does not know (default: ignore "
                      "them with a note; fields known to change the math are always refused)")


def add_strict_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--strict-config``, alike for every command that reads an HF ``config.json`` (the
    command loads with ``strict=args.strict_config`` and prints
    :meth:`~megatron_ext.models.config.ModelConfig.ignored_fields_note`)."""
    parser.add_argument("--strict-config", action="store_true", help=STRICT_CONFIG_HELP)


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
    rope_theta, rope_scaling = f.rope(10000.0, f.get("max_position_embeddings", max_positions))
    return dict(
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        architecture=f.model_type,
        vocab_size=f.get("vocab_size", vocab),
        hidden_size=hidden,
        num_layers=f.get("num_hidden_layers", layers),
        num_heads=heads,
        num_kv_heads=f.get("num_key_value_heads", heads if kv_heads is None else kv_heads),
        head_dim=f.get("head_dim", hidden // heads),
        intermediate_size=f.get("intermediate_size", intermediate),
        rms_norm_eps=f.get("rms_norm_eps", 1e-6),
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
        "rope_parameters": rope_parameters_hf(cfg),
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }


def rope_parameters_hf(cfg: Any) -> dict:
    """HF ``rope_parameters`` (transformers 5 layout) of a config; yarn and llama3 state their
    pretraining length explicitly."""
    scaling = cfg.rope_scaling
    if scaling is None:
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    out = {**scaling.to_hf(), "rope_theta": cfg.rope_theta}
    if scaling.rope_type in ("yarn", "llama3"):
        out["original_max_position_embeddings"] = scaling.original_length(
            cfg.max_position_embeddings)
    return out


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
