"""What an evaluation runs on: an HF directory or a training checkpoint (any layout it was saved
in), opened the same way so no conversion step is needed.

:func:`open_model_source` reads only configs (one process, no collectives), so every setting can
be checked before process groups exist; :meth:`ModelSource.load` then builds the model in the
evaluation's layout and reads this rank's slices (HF: safetensors slices; training: DCP chunks,
through :func:`megatron_ext.training.convert.load_training_weights`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel.groups import ParallelGroups

HF = "hf"
TRAINING = "training"


@dataclass(frozen=True)
class ModelSource:
    """``kind``: ``"hf"`` or ``"training"``; ``path``: the directory read (for a training run
    directory, its newest complete ``step_N``); ``tokenizer``: the model's own tokenizer (an HF
    directory holding tokenizer files, or the one a training run was trained with), else
    ``None``. ``strict_config``: unknown HF config fields are an error."""

    kind: str
    path: str
    config: ModelConfig
    tokenizer: Optional[str] = None
    step: Optional[int] = None
    strict_config: bool = False

    def describe(self) -> dict:
        return {"kind": self.kind, "path": os.path.abspath(self.path), "step": self.step,
                "architecture": self.config.architecture,
                "config": _config_record(self.config)}

    def load(self, groups: ParallelGroups, *, dtype: Optional[torch.dtype] = None,
             device: Optional[torch.device] = None, **model_kwargs):
        """This rank's :class:`~megatron_ext.models.decoder.CausalLM` of :attr:`config` in
        ``groups``' layout, in eval mode (collective over the world for a training checkpoint)."""
        from megatron_ext.models.decoder import CausalLM

        model = CausalLM.for_stage(self.config, groups, dtype=dtype, device=device,
                                   **model_kwargs)
        if self.kind == HF:   # self.config, not the file's: it may carry --max-positions-scale
            from megatron_ext.checkpoint.hf import load_hf_checkpoint

            load_hf_checkpoint(model, self.path, strict=True)
        else:
            from megatron_ext.training.convert import load_training_weights

            load_training_weights(model, self.path)
        return model.eval()


def _config_record(config: ModelConfig) -> dict:
    """The config as results.json records it; ``rope_scaling`` only when set, so results files
    written before RoPE scaling existed still resume (their configs have no such entry)."""
    record = config.to_dict()
    if record["rope_scaling"] is None:
        del record["rope_scaling"]
    return record


def open_model_source(path: str, *, strict_config: bool = False) -> ModelSource:
    """An HF directory (``config.json``) or a training checkpoint (a ``step_N`` directory or the
    directory holding them); ``ValueError`` naming ``path`` otherwise."""
    from megatron_ext.data.tokenizer import has_tokenizer_files

    if not os.path.isdir(path):
        raise ValueError(f"--model {path!r} is not a directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        return ModelSource(HF, path, ModelConfig.from_hf_dir(path, strict=strict_config),
                           path if has_tokenizer_files(path) else None,
                           strict_config=strict_config)
    from megatron_ext.training.convert import checkpoint_model_config

    try:
        config, resolved, state = checkpoint_model_config(path)
    except ValueError as err:
        raise ValueError(f"--model {path!r} is neither an HF directory (no config.json) nor a "
                         f"training checkpoint: {err}") from err
    return ModelSource(TRAINING, resolved, config, _training_tokenizer(state), state.get("step"))


def _training_tokenizer(state: dict) -> Optional[str]:
    """Where the run's tokenizer is: recorded by the run (path, or byte), else its setting."""
    recorded = state.get("tokenizer")
    if recorded:
        return "byte" if recorded.get("name") == "byte" else recorded.get("path")
    spec = (state.get("config") or {}).get("tokenizer")
    return None if spec in (None, "auto") else spec
