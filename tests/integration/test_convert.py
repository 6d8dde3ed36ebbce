"""Training checkpoint -> HF directory: transformers loads the result and computes the same logits
as the trained megatron_ext model; the stored tensors are the checkpoint's global tensors."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from megatron_ext.training.convert import training_to_hf
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.checkpoint.training_state import load_global_tensors
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.trainer import Trainer, validate_launch


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = TrainConfig(model="tiny-qwen3-moe", seq_len=32, global_batch_size=4, train_steps=3,
                      warmup_steps=1, lr=3e-3, progress=False, tensorboard=False,
                      save_interval=0, save_at_end=True, output_dir=str(root))
    groups = ParallelGroups.single_process()
    trainer = Trainer(cfg, groups, validate_launch(cfg, 1))
    trainer.train()
    return trainer, cfg


def test_converted_model_matches_trained_model_in_transformers(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    trainer, cfg = trained
    out = str(tmp_path / "hf")
    path = training_to_hf(cfg.checkpoint_dir, out)
    assert os.path.basename(path).startswith("step_")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              attn_implementation="eager")
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(16).expand(2, 16)
    with torch.no_grad():
        ours = trainer.model(ids, position_ids=positions, gather_logits=True).logits
        theirs = hf(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=2e-5, atol=2e-5)

    saved = load_file(os.path.join(out, "model.safetensors"))
    tensors = load_global_tensors(path)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(saved[q], tensors["model/" + q])
    experts = tensors["model/model.layers.1.mlp.experts.up_proj"]  # fused [E, I, H] in training
    assert torch.equal(saved["model.layers.1.mlp.experts.3.up_proj.weight"], experts[3])


def test_convert_errors_name_the_problem(trained, tmp_path):
    _, cfg = trained
    with pytest.raises(ValueError, match="is not a directory"):
        training_to_hf(str(tmp_path / "missing"), str(tmp_path / "o"))
    os.makedirs(tmp_path / "empty" / "step_5.partial")
    with pytest.raises(ValueError, match="no complete checkpoint"):
        training_to_hf(str(tmp_path / "empty"), str(tmp_path / "o"))
    with pytest.raises(ValueError, match="dtype='int8'"):
        training_to_hf(cfg.checkpoint_dir, str(tmp_path / "o"), dtype="int8")
