"""What makes a converted HF directory self-contained besides the weights: the training run's
tokenizer files, ``generation_config.json`` and the special-token ids in ``config.json``, and a
README stating where the weights came from. ``AutoTokenizer``, ``AutoModelForCausalLM`` and
``pipeline("text-generation")`` then load the directory with no other input.
"""
from __future__ import annotations

import json
import os
from typing import Optional

from megatron_ext.checkpoint.manifest import digest_files, read_manifest, write_manifest
from megatron_ext.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer


def training_tokenizer(state: dict, override: Optional[str] = None) -> Tokenizer:
    """The tokenizer a training checkpoint was trained with: ``override`` (a directory holding
    it) or the path the run recorded; either must hash to the recorded content."""
    spec = state["config"].get("tokenizer", "byte")
    # checkpoints from before tokenizers were recorded by content: the spec, unchecked
    saved = state.get("tokenizer") or {"name": "byte" if spec == "byte" else None, "path": spec}
    if saved["name"] == "byte":
        if override is not None:
            raise ValueError("the run trained with the byte tokenizer; --tokenizer does not apply")
        return ByteTokenizer()
    path = override or saved.get("path")
    if not path or not os.path.isdir(path):
        raise ValueError(f"the run's tokenizer ({saved['name']}) was at {path!r}, which is gone; "
                         f"pass --tokenizer <directory holding it>")
    tok = HFTokenizer(path)
    if saved["name"] not in (None, "byte") and tok.name != saved["name"]:
        raise ValueError(f"tokenizer in {path!r} is {tok.name}, but the run trained with "
                         f"{saved['name']}: pass --tokenizer <directory holding that one>")
    return tok


def special_token_ids(tok: Tokenizer) -> dict:
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id}
    return {k: v for k, v in ids.items() if v is not None}


def write_generation_files(output: str, tok: Tokenizer, base_model: Optional[str]) -> None:
    """Tokenizer files (HF tokenizers), ``generation_config.json`` (the base model's when it had
    one, its missing token ids from the tokenizer) and the token ids in ``config.json``."""
    if isinstance(tok, HFTokenizer):
        tok.save(output)
    ids = special_token_ids(tok)
    generation = {}
    if base_model and os.path.isfile(os.path.join(base_model, "generation_config.json")):
        with open(os.path.join(base_model, "generation_config.json")) as f:
            generation = json.load(f)
    for key, value in ids.items():
        generation.setdefault(key, value)
    generation.pop("transformers_version", None)
    _write_json(os.path.join(output, "generation_config.json"), generation)
    config_path = os.path.join(output, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    for key, value in ids.items():
        config.setdefault(key, value)
    _write_json(config_path, config)
    recorded = read_manifest(output)
    if recorded is not None:  # config.json changed: its digest (and the others) again
        write_manifest(output, digest_files(output, sorted(recorded)))


def write_readme(output: str, checkpoint: str, state: dict, tok: Tokenizer) -> None:
    cfg = state.get("config", {})
    layout = ", ".join(f"{k}={v}" for k, v in state.get("layout", {}).items())
    tokenizer_line = (f"`{tok.name}` (files included; from `{getattr(tok, 'path', '')}`)"
                      if isinstance(tok, HFTokenizer) else
                      "megatron_ext's byte tokenizer (UTF-8 bytes are ids 0-255, `<eos>` = 256, "
                      "`<pad>` = 257; no tokenizer files)")
    text = f"""---
library_name: transformers
pipeline_tag: text-generation
tags: [megatron_ext]
---
# Converted megatron_ext training checkpoint

* checkpoint: `{os.path.abspath(checkpoint)}` (step {state.get('step')}, {state.get('consumed_samples')} samples)
* model: `{cfg.get('model')}`{' (initialised from its HF weights)' if cfg.get('init_from_hf') and os.path.isdir(str(cfg.get('model'))) else ''}
* data: `{state.get('data')}`, seed {state.get('seed')}
* tokenizer: {tokenizer_line}
* training layout: {layout}
* settings: lr {cfg.get('lr')}, {cfg.get('train_steps')} steps x {cfg.get('global_batch_size')} x {cfg.get('seq_len')} tokens, dtype {cfg.get('dtype')}

Written by `megatron-ext-convert`; loads with `AutoModelForCausalLM.from_pretrained` and in any
megatron_ext layout with `CausalLM.from_pretrained(path, groups)`.
"""
    with open(os.path.join(output, "README.md"), "w") as f:
        f.write(text)


def _write_json(path: str, value: dict) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
