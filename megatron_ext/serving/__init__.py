"""Serving: batched generation with the training layers (CP prefill, decode with one owner per
token or rows replicated over CP and a KV cache spread over the CP ranks, sampling, CUDA-graph
decode steps). See :mod:`megatron_ext.serving.generate` for the rules."""
from megatron_ext.serving.decode_step import (DECODE_ROWS, batch_bucket, owned_rows,
                                              resolve_decode_rows)
from megatron_ext.serving.engine import Completion, Engine, left_pad
from megatron_ext.serving.generate import (GenerationOutput, check_generate_inputs,
                                           cuda_graphs_supported, generate, generate_batch,
                                           greedy_generate, prompt_lengths)
from megatron_ext.serving.kv_cache import KVCache, LayerKVCache, decode_owner, decode_slots
from megatron_ext.serving.sampling import (SamplingParams, filtered_probs, request_uniform,
                                           sample_tokens)

__all__ = ["Completion", "DECODE_ROWS", "Engine", "GenerationOutput", "left_pad", "KVCache",
           "LayerKVCache", "SamplingParams", "batch_bucket", "resolve_decode_rows",
           "check_generate_inputs", "cuda_graphs_supported", "decode_owner", "decode_slots",
           "generate", "generate_batch", "greedy_generate", "owned_rows", "prompt_lengths",
           "request_uniform", "sample_tokens", "filtered_probs"]
