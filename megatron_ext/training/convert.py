"""Training checkpoint (any layout) -> self-contained Hugging Face directory, in one process.

Training checkpoints hold layout-independent global tensors under HF module names
(``megatron_ext.checkpoint.training_state``), so conversion needs no process group: build the model as a
one-rank layout, copy every global tensor in, and write it with the HF saver. From an HF directory
any layout loads again (``CausalLM.from_pretrained``), which closes "any layout -> any layout".
"""
from __future__ import annotations

import os
from typing import Optional

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16}


def resolve_checkpoint(path: str) -> str:
    """``path`` itself if it is a complete checkpoint, else the newest complete one below it."""
    from megatron_ext.checkpoint.training_state import latest_checkpoint

    if not os.path.isdir(path):
        raise ValueError(f"checkpoint path {path!r} is not a directory")
    if os.path.exists(os.path.join(path, ".metadata")):
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise ValueError(f"no complete checkpoint in {path!r} (a step_N directory with DCP "
                         f"metadata; step_N.partial directories are unfinished saves)")
    return latest


def checkpoint_model_config(path: str):
    """The :class:`ModelConfig` a training checkpoint was trained with (one process, no
    collectives) and the complete checkpoint directory it came from."""
    from megatron_ext.checkpoint.training_state import read_train_state
    from megatron_ext.models.config import ModelConfig

    resolved = resolve_checkpoint(path)
    state = read_train_state(resolved)
    fields = dict(state["model"])
    fields["sparse_layers"] = tuple(fields["sparse_layers"])
    return ModelConfig(**fields), resolved, state


def load_training_weights(model, path: str) -> None:
    """Load the weights of the complete training checkpoint ``path`` into ``model``, built in any
    layout: each rank reads only the slices its parameters hold (DCP; collective over the world
    when ``torch.distributed`` is initialised)."""
    from megatron_ext.checkpoint.training_state import (collect_shards, load_checkpoint,
                                                       param_pieces)
    from megatron_ext.training.trainer import checkpoint_name

    named = [(checkpoint_name(n, model.config), p) for n, p in model.named_parameters()]
    load_checkpoint(path, collect_shards(param_pieces(named)))


def training_to_hf(checkpoint: str, output: str, dtype: Optional[str] = None,
                   overwrite: bool = False, tokenizer: Optional[str] = None) -> str:
    """Write the model of training checkpoint ``checkpoint`` as a self-contained HF directory
    ``output``: weights, ``config.json``, ``generation_config.json``, the run's tokenizer files
    (``tokenizer``: a directory holding them when the recorded path is gone) and a README.
    Verified against its manifest first; written to a staging directory that replaces ``output``
    whole, which must be new or empty unless ``overwrite``. Returns the checkpoint directory that
    was converted."""
    from megatron_ext.training.hf_export import (training_tokenizer, write_generation_files,
                                                 write_readme)

    from megatron_ext.parallel.groups import ParallelGroups
    from megatron_ext.checkpoint.staging import check_target, staged_directory
    from megatron_ext.checkpoint.training_state import load_global_tensors, verify_checkpoint
    from megatron_ext.training.trainer import checkpoint_name
    from megatron_ext.models.decoder import CausalLM

    if dtype is not None and dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r}; use one of {sorted(_DTYPES)}")
    check_target(output, overwrite)
    verify_checkpoint(resolve_checkpoint(checkpoint))
    config, path, state = checkpoint_model_config(checkpoint)
    tok = training_tokenizer(state, tokenizer)  # before writing anything
    tensors = load_global_tensors(path)
    # one process holds every global tensor whole: no vocabulary padding needed
    model = CausalLM(config, ParallelGroups.single_process(), dtype=torch.float32,
                     make_vocab_size_divisible_by=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = "model/" + checkpoint_name(name, config)  # see training.checkpoint.collect_shards
            if key not in tensors:
                raise ValueError(f"checkpoint {path} has no tensor {key!r} for parameter {name}")
            saved = tensors[key]
            if tuple(saved.shape) != tuple(param.shape):
                raise ValueError(f"tensor {key}: checkpoint shape {tuple(saved.shape)} but the "
                                 f"model expects {tuple(param.shape)}")
            param.copy_(saved)
    with staged_directory(output, overwrite) as staging:
        model.save_pretrained(staging, dtype=_DTYPES[dtype] if dtype else None)
        base = state["config"].get("model")
        write_generation_files(staging, tok, base if base and os.path.isdir(base) else None)
        write_readme(staging, path, state, tok)
    return path
