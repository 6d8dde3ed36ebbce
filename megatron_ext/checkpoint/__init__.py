"""Checkpoint conversion: Hugging Face directories to and from any parallel layout."""
from megatron_ext.checkpoint.hf import (HFCheckpointReader, HFConvertible, check_checkpoint_tensors,
                                        load_hf_checkpoint, load_params, save_hf_checkpoint,
                                        shard_plan, shard_plan_like)
from megatron_ext.checkpoint.hf_sources import (Concat, HFSource, HFTensor, Stacked, Unflatten,
                                                stacked_keys)

__all__ = ["HFCheckpointReader", "HFConvertible", "check_checkpoint_tensors", "load_hf_checkpoint",
           "load_params", "save_hf_checkpoint", "shard_plan", "shard_plan_like", "Concat",
           "HFSource", "HFTensor", "Stacked", "Unflatten", "stacked_keys"]
