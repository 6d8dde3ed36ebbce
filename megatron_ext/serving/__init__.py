"""Serving: greedy generation with the training layers (CP prefill, CP decode with a KV cache
spread over the CP ranks). See :mod:`megatron_ext.serving.generate` for the rules."""
from megatron_ext.serving.generate import (GenerationOutput, check_generate_inputs, generate,
                                           greedy_generate, prompt_lengths)
from megatron_ext.serving.kv_cache import KVCache, LayerKVCache, decode_owner, decode_slots

__all__ = ["GenerationOutput", "KVCache", "LayerKVCache", "check_generate_inputs", "decode_owner",
           "decode_slots", "generate", "greedy_generate", "prompt_lengths"]
