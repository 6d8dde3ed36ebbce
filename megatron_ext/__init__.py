"""megatron_ext: Megatron-style training and serving in which attention context parallelism and MoE
data parallelism are independent choices (design: ``docs/design.md``).

The names below are the public surface; each is imported on first use (PEP 562), so ``import
megatron_ext`` stays cheap and pulls in no submodule until one is asked for::

    from megatron_ext import Topology, build_groups, init_distributed, CausalLM
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # rank math and process groups
    "Axis": "megatron_ext.parallel.axes",
    "Topology": "megatron_ext.parallel.topology",
    "AxisGroup": "megatron_ext.parallel.groups",
    "ParallelGroups": "megatron_ext.parallel.groups",
    "build_groups": "megatron_ext.parallel.groups",
    "init_distributed": "megatron_ext.parallel.groups",
    # the residual stream
    "ScatterMode": "megatron_ext.communication.scatter_modes",
    "LayerScatterModes": "megatron_ext.communication.scatter_modes",
    "LayerCommunicator": "megatron_ext.communication.communicator",
    "CPStrategy": "megatron_ext.communication.choices",
    "MoEDispatcher": "megatron_ext.communication.choices",
    # models
    "ModelConfig": "megatron_ext.models.config",
    "CausalLM": "megatron_ext.models.decoder",
    "CausalLMOutput": "megatron_ext.models.decoder",
    # checkpoints
    "load_hf_checkpoint": "megatron_ext.checkpoint.hf",
    "save_hf_checkpoint": "megatron_ext.checkpoint.hf",
    "training_to_hf": "megatron_ext.training.convert",
    # training, serving, evaluation
    "TrainConfig": "megatron_ext.training.config",
    "Trainer": "megatron_ext.training.trainer",
    "generate": "megatron_ext.serving.generate",
    "greedy_generate": "megatron_ext.serving.generate",
    "evaluate_loss": "megatron_ext.evaluation.loss",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_ext' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
