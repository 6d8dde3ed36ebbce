"""Model configuration: one validated dataclass for every supported decoder, built from a Hugging
Face ``config.json`` or a named preset.

The per-model modules (``megatron_ext/models/qwen3_moe.py``, ``megatron_ext/models/qwen2_moe.py``, ``megatron_ext/models/llama.py``) only
say how their HF config maps onto :class:`ModelConfig`; the decoder code reads nothing else. HF
fields that change the math but are not implemented (rope scaling types other than linear /
dynamic / yarn / llama3, sliding windows, biases on ``o_proj``/MLP, other activations,
quantization) are rejected with a ``ValueError`` naming the
field, so a checkpoint never loads into a model that would compute something else.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from dataclasses import replace as replace_fields
from typing import TYPE_CHECKING, Any, Callable, Optional

from megatron_ext.layers.rope_scaling import RopeScaling

if TYPE_CHECKING:
    from megatron_ext.parallel.topology import Topology

ARCHITECTURES: tuple[str, ...] = ("qwen3_moe", "qwen2_moe", "llama")


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    """Shape and math of one decoder-only causal LM.

    ``sparse_layers[i]`` says whether layer ``i`` has a routed-expert MLP (else a dense gated MLP of
    width ``intermediate_size``). A shared expert (``shared_expert_intermediate_size > 0``) runs
    beside the routed experts in sparse layers, scaled by ``sigmoid(x @ w_gate)`` when
    ``shared_expert_gate``.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    sparse_layers: tuple[bool, ...] = ()
    router_aux_loss_coef: float = 0.0
    # RoPE scaling (HF rope_parameters / rope_scaling); None = plain RoPE. A dict (as stored in
    # training checkpoints) is accepted and converted.
    rope_scaling: Optional[RopeScaling] = None
    # The HF config.json this config came from (written back verbatim on save); not compared.
    hf_config: Optional[dict] = field(default=None, compare=False, repr=False)
    # Unknown HF fields ignored when loading with strict=False (for one note by the command).
    ignored_hf_fields: tuple[str, ...] = field(default=(), compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture={self.architecture!r} is not supported; "
                             f"supported: {', '.join(ARCHITECTURES)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_kv_heads={self.num_kv_heads} must divide "
                             f"num_heads={self.num_heads} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even (rotary embedding)")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", RopeScaling.from_dict(self.rope_scaling))
        elif self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling={self.rope_scaling!r} must be a RopeScaling, a dict "
                             f"of its fields or None")
        sparse = tuple(bool(s) for s in self.sparse_layers) or (False,) * self.num_layers
        object.__setattr__(self, "sparse_layers", sparse)
        if len(sparse) != self.num_layers:
            raise ValueError(f"sparse_layers has {len(sparse)} entries but num_layers="
                             f"{self.num_layers}")
        if not all(sparse):
            _positive_int("intermediate_size (dense MLP layers exist)", self.intermediate_size)
        if any(sparse):
            _positive_int("num_experts (sparse layers exist)", self.num_experts)
            _positive_int("num_experts_per_tok", self.num_experts_per_tok)
            _positive_int("moe_intermediate_size", self.moe_intermediate_size)
            if self.num_experts_per_tok > self.num_experts:
                raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be <= "
                                 f"num_experts={self.num_experts}")
        if self.shared_expert_intermediate_size < 0:
            raise ValueError(f"shared_expert_intermediate_size="
                             f"{self.shared_expert_intermediate_size} must be >= 0")
        if self.shared_expert_gate and not self.shared_expert_intermediate_size:
            raise ValueError("shared_expert_gate=True needs shared_expert_intermediate_size > 0")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef={self.router_aux_loss_coef} must be >= 0")

    # ------------------------------------------------------------------ derived
    def is_sparse(self, layer: int) -> bool:
        return self.sparse_layers[layer]

    @property
    def has_shared_expert(self) -> bool:
        return self.shared_expert_intermediate_size > 0

    @property
    def position_limit(self) -> int:
        """The positions the model is meant for: ``max_position_embeddings``, or with RoPE
        scaling the length the scaling stretches to (:meth:`RopeScaling.position_limit`).
        Evaluation and generation refuse longer inputs."""
        if self.rope_scaling is None:
            return self.max_position_embeddings
        return self.rope_scaling.position_limit(self.max_position_embeddings)

    def position_limit_text(self) -> str:
        """How :attr:`position_limit` came about, for messages."""
        if self.rope_scaling is None:
            return f"max_position_embeddings={self.max_position_embeddings}"
        r = self.rope_scaling
        return (f"{self.position_limit} positions ({r.rope_type} RoPE scaling "
                f"factor={r.factor if r.factor is not None else r.yarn_factor(self.max_position_embeddings)} of "
                f"{r.original_length(self.max_position_embeddings)}; "
                f"max_position_embeddings={self.max_position_embeddings})")

    def with_position_scale(self, factor: float, rope_type: Optional[str] = None) -> "ModelConfig":
        """This model with RoPE scaled by ``factor`` (``--max-positions-scale``). The type is
        ``rope_type`` if given, else the config's own scaling type (keeping its other
        parameters: yarn's betas, llama3's frequency bands, the pretraining length), else
        ``linear`` (position interpolation: a bare factor means that in ``transformers`` and
        vLLM, and it needs no other parameter)."""
        own = self.rope_scaling
        rope_type = rope_type or (own.rope_type if own is not None else "linear")
        if own is not None and own.rope_type == rope_type:
            scaling = replace_fields(own, factor=factor)
        elif rope_type == "llama3":
            raise ValueError("--rope-scaling-type llama3 needs low/high frequency factors: set "
                             "them in the model's config.json rope_parameters")
        else:
            original = None if rope_type != "yarn" else (
                own.original_length(self.max_position_embeddings) if own is not None else
                self.max_position_embeddings)
            scaling = RopeScaling(rope_type, factor, original_max_position_embeddings=original)
        return self.replace(rope_scaling=scaling)

    def to_dict(self) -> dict:
        """Every field as plain values (no stored HF dict): what training checkpoints and
        results files record."""
        d = asdict(self)
        for key in ("hf_config", "ignored_hf_fields"):
            d.pop(key)
        return d

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def check_fits(self, topo: "Topology") -> None:
        """Every size rule the parallel layers enforce at construction, named with the model
        field. Pure: runs before any process group exists, so a launch fails with this message,
        not a traceback or a hang (``tests/unit/test_fit_rules.py`` proves that no layout the
        layers refuse passes here)."""
        from megatron_ext.layers.attention.block import check_head_split
        from megatron_ext.parallel.stages import stage_layer_range

        problems = []
        try:
            check_head_split(self.num_heads, self.num_kv_heads, topo.attn_tp)
        except ValueError as err:
            problems.append(str(err))
        if not all(self.sparse_layers) and self.intermediate_size % topo.attn_tp:
            problems.append(f"intermediate_size={self.intermediate_size} must be divisible by "
                            f"attn_tp={topo.attn_tp}")
        if any(self.sparse_layers):
            if self.num_experts % topo.moe_ep:
                problems.append(f"num_experts={self.num_experts} must be divisible by moe_ep="
                                f"{topo.moe_ep}")
            if self.moe_intermediate_size % topo.moe_tp:
                problems.append(f"moe_intermediate_size={self.moe_intermediate_size} must be "
                                f"divisible by moe_tp={topo.moe_tp}")
            if self.shared_expert_intermediate_size % topo.moe_shard_size:
                problems.append(f"shared_expert_intermediate_size="
                                f"{self.shared_expert_intermediate_size} must be divisible by the "
                                f"MoE shard size moe_ep*moe_tp={topo.moe_shard_size}")
        try:
            stage_layer_range(self.num_layers, topo.pp, 0)
        except ValueError as err:
            problems.append(str(err))
        if problems:
            raise ValueError(f"{self.architecture} model does not fit the layout: "
                             + "; ".join(problems))

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again); drops the stored HF dict."""
        values = self.to_dict()
        values.update(changes)
        return ModelConfig(**values)

    # ------------------------------------------------------------------ HF conversion
    @classmethod
    def from_hf_dict(cls, hf: dict, *, strict: bool = True) -> "ModelConfig":
        """Map an HF ``config.json`` dict. ``strict``: unknown fields are an error (a field we do
        not know might change the math); with ``strict=False`` they are ignored."""
        from megatron_ext.models import registry

        return registry.mapping_for(hf).from_hf(dict(hf), strict=strict)

    @classmethod
    def from_hf_dir(cls, path: str, *, strict: bool = True) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"no config.json in HF directory {path!r}")
        return cls.from_hf_file(config_path, strict=strict)

    @classmethod
    def from_hf_file(cls, config_path: str, *, strict: bool = True) -> "ModelConfig":
        """A ``config.json``; errors name the file."""
        try:
            with open(config_path) as f:
                hf = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path} is not valid JSON: {err}") from err
        try:
            return cls.from_hf_dict(hf, strict=strict)
        except ValueError as err:
            raise ValueError(f"{config_path}: {err}") from err

    def ignored_fields_note(self, source: str) -> Optional[str]:
        """One line naming the unknown config fields that were ignored, or ``None``."""
        if not self.ignored_hf_fields:
            return None
        return (f"note: {source}: ignoring config field(s) {', '.join(self.ignored_hf_fields)} "
                f"(not known to change the model; --strict-config refuses them)")

    def to_hf_dict(self) -> dict:
        """An HF ``config.json`` dict (the stored original when this config came from one)."""
        if self.hf_config is not None:
            return dict(self.hf_config)
        from megatron_ext.models import registry

        return registry.mapping_for({"model_type": self.architecture}).to_hf(self)

    @classmethod
    def preset(cls, name: str) -> "ModelConfig":
        """A named built-in configuration (see :func:`preset_names`)."""
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return PRESETS[name]()


def load_model_config(name_or_path: str, *, strict: bool = True) -> ModelConfig:
    """A preset name, an HF directory, or a path to a ``config.json``."""
    if name_or_path in PRESETS:
        return ModelConfig.preset(name_or_path)
    if os.path.isdir(name_or_path):
        return ModelConfig.from_hf_dir(name_or_path, strict=strict)
    if os.path.isfile(name_or_path):
        return ModelConfig.from_hf_file(name_or_path, strict=strict)
    raise ValueError(f"{name_or_path!r} is neither a model preset ({', '.join(sorted(PRESETS))}) "
                     f"nor an HF directory / config.json")


# ---------------------------------------------------------------------- presets
def _qwen3_moe(**kw: Any) -> ModelConfig:
    base = dict(architecture="qwen3_moe", qk_norm=True, norm_topk_prob=True, rope_theta=1e6,
                router_aux_loss_coef=0.001)
    base.update(kw)
    base.setdefault("sparse_layers", (True,) * base["num_layers"])
    return ModelConfig(**base)


def _qwen2_moe(**kw: Any) -> ModelConfig:
    base = dict(architecture="qwen2_moe", qkv_bias=True, shared_expert_gate=True,
                rope_theta=1e6, router_aux_loss_coef=0.001)
    base.update(kw)
    base.setdefault("sparse_layers", (True,) * base["num_layers"])
    return ModelConfig(**base)


def _llama(**kw: Any) -> ModelConfig:
    base = dict(architecture="llama", rms_norm_eps=1e-5)
    base.update(kw)
    return ModelConfig(**base)


# Qwen3-30B-A3B's published dimensions (the full model and its 12-layer benchmark slice)
_QWEN3_30B_A3B = dict(
    vocab_size=151936, hidden_size=2048, num_layers=48, num_heads=32, num_kv_heads=4,
    head_dim=128, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
    moe_intermediate_size=768, max_position_embeddings=40960)

PRESETS: dict[str, Callable[[], ModelConfig]] = {
    # tiny models for tests and CPU runs
    "tiny-qwen3-moe": lambda: _qwen3_moe(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
        max_position_embeddings=512, rope_theta=10000.0),
    "tiny-qwen2-moe": lambda: _qwen2_moe(
        vocab_size=128, hidden_size=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=48, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, sparse_layers=(True, False, True),
        max_position_embeddings=512, rope_theta=10000.0),
    "tiny-llama": lambda: _llama(
        vocab_size=128, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
        intermediate_size=64, max_position_embeddings=512, rope_theta=10000.0),
    # the shape of issue 7's 1-GPU training benchmark
    "bench-qwen3-moe": lambda: _qwen3_moe(
        vocab_size=32000, hidden_size=2048, num_layers=8, num_heads=16, num_kv_heads=4,
        head_dim=128, intermediate_size=6144, num_experts=64, num_experts_per_tok=8,
        moe_intermediate_size=768, max_position_embeddings=32768),
    # published shapes
    "qwen3-30b-a3b": lambda: _qwen3_moe(**_QWEN3_30B_A3B),
    # 12 layers of qwen3-30b-a3b with its layer dimensions: the 2-GPU training benchmark
    "qwen3-30b-a3b-12l": lambda: _qwen3_moe(**{**_QWEN3_30B_A3B, "num_layers": 12}),
    "qwen1.5-moe-a2.7b": lambda: _qwen2_moe(
        vocab_size=151936, hidden_size=2048, num_layers=24, num_heads=16, num_kv_heads=16,
        head_dim=128, intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
        moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        max_position_embeddings=8192),
    "llama3-8b": lambda: _llama(
        vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
        head_dim=128, intermediate_size=14336, rope_theta=500000.0, max_position_embeddings=8192),
}


def preset_names() -> list[str]:
    return sorted(PRESETS)
