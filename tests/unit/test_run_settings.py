"""What a fine-tuner sees before a run starts: HF config fields tolerated or refused by name,
--help with the real defaults, defaults that depend on the run (lr, warmup), and the example
YAMLs under examples/configs/ parsing into valid settings and layouts."""
from __future__ import annotations

import glob
import json
import os
import re

import pytest

from megatron_ext.models.config import ModelConfig
from megatron_ext.training.config import (FINETUNE_LR, SCRATCH_LR, TrainConfig, build_parser,
                                          load_yaml)
from tests.helpers.cli import REPO
from tests.helpers.real_hf import SMOLLM2_CONFIG


def _write(tmp_path, hf: dict) -> str:
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return str(tmp_path)


def test_hub_config_loads_and_unknown_fields_are_noted_not_fatal(tmp_path):
    cfg = ModelConfig.from_hf_dict(SMOLLM2_CONFIG)  # hub bookkeeping fields are known
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.tie_word_embeddings) == (9, 3, True)
    assert cfg.rope_theta == 1e5 and cfg.ignored_hf_fields == ()
    path = _write(tmp_path, {**SMOLLM2_CONFIG, "some_new_hub_field": 1, "another": "x"})
    loose = ModelConfig.from_hf_dir(path, strict=False)
    assert loose == cfg and loose.ignored_hf_fields == ("another", "some_new_hub_field")
    assert "ignoring config field(s) another, some_new_hub_field" in \
        loose.ignored_fields_note(path)
    with pytest.raises(ValueError, match=re.escape(os.path.join(path, "config.json")) +
                       ".*does not know: another, some_new_hub_field.*--strict-config"):
        ModelConfig.from_hf_dir(path, strict=True)


@pytest.mark.parametrize("field,value", [
    ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}), ("embedding_multiplier", 12.0),
    ("rope_scaling", {"rope_type": "llama3", "factor": 8.0}), ("use_sliding_window", True),
    ("layer_types", ["sliding_attention"] * 30), ("attention_bias", True),
    ("num_local_experts", 8)])
def test_fields_that_change_the_math_are_refused_even_when_not_strict(tmp_path, field, value):
    path = _write(tmp_path, {**SMOLLM2_CONFIG, field: value})
    with pytest.raises(ValueError, match=re.escape(os.path.join(path, "config.json")) + ".*"
                       + field):
        ModelConfig.from_hf_dir(path, strict=False)


_NEXT_FLAG = re.compile(r" --[a-z0-9-]+ (?:[A-Z_]+|\[)")


def test_help_shows_the_real_defaults():
    text = " ".join(build_parser().format_help().split("options:", 1)[1].split())
    assert "(default: None)" not in text
    for flag, default in [("--seq-len SEQ_LEN", "(default: 128)"),
                          ("--train-steps TRAIN_STEPS", "(default: 40)"),
                          ("--tokenizer TOKENIZER", "(default: auto)"),
                          ("--eval-interval EVAL_INTERVAL", "(default: 0)")]:
        after = _NEXT_FLAG.split(text.split(flag, 1)[1], 1)[0]
        assert default in after, (flag, after)
    lr_help = _NEXT_FLAG.split(text.split("--lr LR", 1)[1], 1)[0]
    assert f"{FINETUNE_LR}" in lr_help and f"{SCRATCH_LR}" in lr_help


def test_lr_default_depends_on_hf_init_and_warmup_clamps(tmp_path):
    scratch = TrainConfig(train_steps=2)
    assert scratch.lr == SCRATCH_LR and scratch.min_lr == pytest.approx(SCRATCH_LR / 10)
    assert scratch.warmup_steps == 2 and "warmup clamped to 2" in scratch.notes[0]
    path = _write(tmp_path, SMOLLM2_CONFIG)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert TrainConfig(model=path).lr == FINETUNE_LR
    assert TrainConfig(model=path, init_from_hf=False).lr == SCRATCH_LR
    assert TrainConfig(model=path, lr=1e-4).lr == 1e-4 and TrainConfig(model=path).notes == []
    with pytest.raises(ValueError, match="eval_iters=0 must be a positive integer"):
        TrainConfig(eval_iters=0)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(REPO, "examples", "configs",
                                                              "*.yaml"))))
def test_example_configs_parse_into_valid_settings_and_layouts(path):
    """Each example says the world it is for (``# world: N``); its data path (a prefix the user
    prepares) is left out, every other setting is validated and its layout built."""
    world = int(re.search(r"^# world: (\d+)$", open(path).read(), re.M).group(1))
    values = load_yaml(path)
    values.pop("data", None)
    cfg = TrainConfig.from_dict(values, source=path)
    topo = cfg.topology(world)
    assert topo.world == world and cfg.output_dir.startswith("runs/")


def test_there_are_the_three_example_configs():
    names = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "examples", "configs",
                                                                 "*.yaml"))}
    assert names == {"tiny_cpu.yaml", "finetune_hf_llama.yaml", "qwen3_moe_pretrain.yaml"}
