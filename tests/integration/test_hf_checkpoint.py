"""HF config mapping and the checkpoint machinery that needs no process group: composition rules
(sliced reads equal slices of the assembled tensor, split inverts assembly), config validation,
and checkpoint errors (missing / mis-shaped / unexpected tensors, unsupported architectures)."""
from __future__ import annotations

import itertools
import json
import os

import pytest
import torch

from megatron_ext.checkpoint.hf_sources import Concat, HFTensor, Stacked, Unflatten, stacked_keys
from megatron_ext.parallel.param_meta import ParamSpec, Split
from megatron_ext.models.config import ModelConfig, PRESETS, load_model_config

# ------------------------------------------------------------------------------ composition rules


def _reader(store: dict[str, torch.Tensor], log: list):
    def read(key, slices):
        log.append((key, slices))
        return store[key][slices].clone()
    return read


def _random_store(shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}


def _all_specs(shape: tuple[int, ...], max_chunks: int = 4):
    """Every ParamSpec with up to two splits (different dims) over ``shape``."""
    yield ParamSpec(shape)
    for dim, n in itertools.product(range(len(shape)), range(2, max_chunks + 1)):
        if shape[dim] % n == 0:
            for i in range(n):
                yield ParamSpec(shape, (Split(dim, n, i),))
    if len(shape) >= 2:
        for (d0, n0), (d1, n1) in itertools.product(
                [(0, 2), (0, 4)], [(len(shape) - 2, 2), (len(shape) - 1, 2)]):
            if d0 != d1 and shape[d0] % n0 == 0 and shape[d1] % n1 == 0:
                for i, j in itertools.product(range(n0), range(n1)):
                    yield ParamSpec(shape, (Split(d0, n0, i), Split(d1, n1, j)))


def _full(source, store) -> torch.Tensor:
    return source.read(_reader(store, []), tuple(slice(None) for _ in source.shape))


@pytest.mark.parametrize("case", ["experts", "fused_gate_up", "qkv_concat", "unflatten"])
def test_sources_read_slices_and_split_roundtrip(case):
    E, I, H, G, d = 4, 6, 8, 2, 2
    if case == "experts":  # global [E, I, H] from per-expert keys
        keys = [f"experts.{e}.gate_proj.weight" for e in range(E)]
        source = stacked_keys(keys, (I, H))
        reference = lambda s: torch.stack([s[k] for k in keys])  # noqa: E731
    elif case == "fused_gate_up":  # global [E, 2, I, H]: per expert stack(gate, up)
        source = Stacked(tuple(Stacked((HFTensor(f"e{e}.gate", (I, H)),
                                        HFTensor(f"e{e}.up", (I, H)))) for e in range(E)))
        reference = lambda s: torch.stack(  # noqa: E731
            [torch.stack([s[f"e{e}.gate"], s[f"e{e}.up"]]) for e in range(E)])
    elif case == "qkv_concat":  # global [q; k; v]
        source = Concat((HFTensor("q", (8, H)), HFTensor("k", (4, H)), HFTensor("v", (4, H))))
        reference = lambda s: torch.cat([s["q"], s["k"], s["v"]])  # noqa: E731
    else:  # Unflatten of a stack == concatenation on dim 0 (slices need not align to rows)
        source = Unflatten(Stacked((HFTensor("a", (G * d, H)), HFTensor("b", (G * d, H)))))
        reference = lambda s: torch.cat([s["a"], s["b"]])  # noqa: E731
    store = _random_store(source.expected_shapes())
    full = reference(store)
    assert tuple(full.shape) == tuple(source.shape)
    assert torch.equal(_full(source, store), full)
    for spec in _all_specs(tuple(source.shape)):
        log: list = []
        block = source.read(_reader(store, log), spec.global_slices())
        assert torch.equal(block, spec.take_local(full)), spec
        read_elems = sum(store[k][s].numel() for k, s in log)
        rows = spec.global_slices()[0]
        whole_rows = case != "unflatten" or (rows.start % (G * d) == 0 and rows.stop % (G * d) == 0)
        if whole_rows:  # only the requested elements are read
            assert read_elems == block.numel(), f"{spec}: read {read_elems} for {block.numel()}"
        else:  # an Unflatten slice inside a row reads the covering rows
            assert block.numel() < read_elems <= 2 * block.numel() * G * d
    back = source.split(full)
    assert set(back) == set(store) and all(torch.equal(back[k], store[k]) for k in store)


# ------------------------------------------------------------------------------ config mapping
def _hf_config(model_type: str, **overrides) -> dict:
    from transformers import AutoConfig

    base = ModelConfig.preset({"qwen3_moe": "tiny-qwen3-moe", "qwen2_moe": "tiny-qwen2-moe",
                               "llama": "tiny-llama"}[model_type]).to_hf_dict()
    base.pop("architectures")
    base.update(overrides)
    return AutoConfig.for_model(base.pop("model_type"), **base).to_dict()


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_roundtrip_through_hf_config(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen2_moe", "llama"])
def test_transformers_config_maps_to_the_same_model(model_type):
    """A config.json written by transformers (all its defaults filled in) maps back exactly."""
    preset = ModelConfig.preset({"qwen3_moe": "tiny-qwen3-moe", "qwen2_moe": "tiny-qwen2-moe",
                                 "llama": "tiny-llama"}[model_type])
    cfg = ModelConfig.from_hf_dict(_hf_config(model_type))
    assert cfg == preset


def test_sparse_pattern_follows_transformers():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    for step, only in [(1, []), (2, []), (1, [0, 3]), (3, [2])]:
        hf = _hf_config("qwen2_moe", num_hidden_layers=5, decoder_sparse_step=step,
                        mlp_only_layers=only)
        cfg = ModelConfig.from_hf_dict(hf)
        model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{k: v for k, v in hf.items()
                                                      if k not in ("model_type",)}))
        truth = tuple(type(layer.mlp).__name__.endswith("SparseMoeBlock")
                      for layer in model.model.layers)
        assert cfg.sparse_layers == truth, (step, only)


@pytest.mark.parametrize("model_type,field,value,needle", [
    ("llama", "rope_parameters", {"rope_type": "longrope", "rope_theta": 5e5, "factor": 8.0,
                                  "short_factor": [1.0], "long_factor": [2.0],
                                  "original_max_position_embeddings": 8192}, "rope_type='longrope'"),
    ("llama", "rope_scaling", {"type": "linear", "factor": 2.0, "low_freq_factor": 1.0},
     "entries ['low_freq_factor']"),
    ("llama", "hidden_act", "gelu", "hidden_act='gelu'"),
    ("llama", "mlp_bias", True, "mlp_bias=True"),
    ("llama", "attention_bias", True, "attention_bias=True"),
    ("qwen3_moe", "attention_bias", True, "attention_bias=True"),
    ("qwen3_moe", "use_sliding_window", True, "use_sliding_window=True"),
    ("qwen2_moe", "layer_types", ["sliding_attention", "full_attention", "full_attention"],
     "sliding_attention"),
    ("qwen2_moe", "some_new_feature", 3, "some_new_feature"),
    ("qwen2_moe", "mlp_only_layers", [7], "mlp_only_layers entries [7]"),
    ("qwen3_moe", "num_experts_per_tok", 9, "num_experts_per_tok=9 must be <= num_experts=8"),
    ("qwen3_moe", "num_key_value_heads", 3, "num_kv_heads=3 must divide num_heads=4"),
])
def test_unsupported_config_fields_are_named(model_type, field, value, needle):
    hf = ModelConfig.preset({"qwen3_moe": "tiny-qwen3-moe", "qwen2_moe": "tiny-qwen2-moe",
                             "llama": "tiny-llama"}[model_type]).to_hf_dict()
    hf[field] = value
    with pytest.raises(ValueError, match=_re(needle)):
        ModelConfig.from_hf_dict(hf)


def test_unknown_field_allowed_when_not_strict():
    hf = ModelConfig.preset("tiny-llama").to_hf_dict()
    hf["some_new_feature"] = 1
    assert ModelConfig.from_hf_dict(hf, strict=False).architecture == "llama"


def test_unsupported_architecture_is_named(tmp_path):
    with pytest.raises(ValueError, match="model_type='mixtral'.*supported model types: "
                                         "qwen3_moe, qwen2_moe, llama"):
        ModelConfig.from_hf_dict({"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="model_type='gpt2'"):
        load_model_config(str(tmp_path))
    with pytest.raises(ValueError, match="neither a model preset"):
        load_model_config(os.path.join(str(tmp_path), "nope"))


def test_model_config_validation_messages():
    base = ModelConfig.preset("tiny-qwen3-moe")
    for changes, needle in [({"hidden_size": 0}, "hidden_size=0 must be a positive integer"),
                            ({"head_dim": 7}, "head_dim=7 must be even"),
                            ({"sparse_layers": (True,)}, "sparse_layers has 1 entries"),
                            ({"architecture": "gpt2"}, "architecture='gpt2' is not supported"),
                            ({"shared_expert_gate": True}, "shared_expert_gate=True needs")]:
        with pytest.raises(ValueError, match=_re(needle)):
            base.replace(**changes)


def _re(text: str) -> str:
    import re
    return re.escape(text)


def test_model_layout_fit_is_checked_before_any_collective():
    from megatron_ext.parallel.topology import Topology

    cfg = ModelConfig.preset("tiny-qwen3-moe")
    cfg.check_fits(Topology(world=8, attn_tp=2, moe_ep=4, moe_tp=2))
    for sizes, needle in [(dict(world=3, attn_tp=3, moe_tp=3, moe_ep=1),
                           "num_heads=4 must be divisible by attn_tp=3"),
                          (dict(world=3, attn_tp=1, moe_tp=1, moe_ep=3),
                           "num_experts=8 must be divisible by moe_ep=3"),
                          (dict(world=3, attn_tp=1, moe_tp=3, moe_ep=1),
                           "moe_intermediate_size=16 must be divisible by moe_tp=3")]:
        with pytest.raises(ValueError, match=_re(needle)):
            cfg.check_fits(Topology(**sizes))
