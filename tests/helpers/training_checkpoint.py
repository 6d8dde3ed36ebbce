"""A training checkpoint of an HF directory's weights, written the trainer's way (DCP global
tensors under layout-independent names, plus the training state), for tests that evaluate
training checkpoints directly."""
from __future__ import annotations


def save_as_training_checkpoint(hf_path: str, root: str, step: int = 7) -> str:
    from megatron_ext.checkpoint.training_state import (collect_shards, param_pieces,
                                                       save_checkpoint)
    from megatron_ext.models.decoder import CausalLM
    from megatron_ext.parallel.groups import ParallelGroups
    from megatron_ext.training.trainer import checkpoint_name

    model = CausalLM.from_pretrained(hf_path, ParallelGroups.single_process())
    fields = model.config.to_dict()
    state = {"step": step, "model": fields, "config": {"tokenizer": "byte"}}
    named = [(checkpoint_name(n, model.config), p) for n, p in model.named_parameters()]
    return save_checkpoint(root, step, collect_shards(param_pieces(named)), state)
