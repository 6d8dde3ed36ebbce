"""Training checkpoint -> HF directory: transformers loads the result and computes the same logits
as the trained megatron_ext model; the stored tensors are the checkpoint's global tensors."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

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


def test_convert_into_an_existing_sharded_directory_replaces_it_whole(trained, tmp_path, capsys):
    """An old sharded HF directory at --output: refused without --overwrite (untouched); with it,
    the result holds only the new files, and megatron_ext and transformers load the same model."""
    from transformers import AutoModelForCausalLM

    from megatron_ext.cli.convert import main as convert_main
    from megatron_ext.models.decoder import CausalLM

    trainer, cfg = trained
    out = str(tmp_path / "hf")
    with torch.no_grad():  # an older, different model saved in 3+ shards
        old = CausalLM(trainer.plan.model_config, ParallelGroups.single_process())
        old.init_weights(seed=99)
    old.save_pretrained(out, max_shard_size="40KB")
    before = sorted(os.listdir(out))
    assert "model.safetensors.index.json" in before and len(before) > 4

    assert convert_main(["--checkpoint", cfg.checkpoint_dir, "--output", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"output {out} is not empty; pass --overwrite" in err[0], err
    assert sorted(os.listdir(out)) == before

    assert convert_main(["--checkpoint", cfg.checkpoint_dir, "--output", out,
                         "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json",
                                       "manifest.json", "model.safetensors"]
    assert not [n for n in os.listdir(tmp_path) if n != "hf"]  # no staging leftovers
    ours = CausalLM.from_pretrained(out, ParallelGroups.single_process())
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                              attn_implementation="eager")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = ours(ids, position_ids=torch.arange(12)[None], gather_logits=True).logits
        b = hf(input_ids=ids).logits
        c = trainer.model(ids, position_ids=torch.arange(12)[None], gather_logits=True).logits
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def _flip_byte(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


def test_damaged_files_are_named(trained, tmp_path, capsys):
    """A flipped byte in a converted HF file or in a training checkpoint, NaN weights without a
    manifest, a broken safetensors header, files of two saves: errors naming the file/tensor."""
    from megatron_ext.checkpoint.manifest import MANIFEST_FILE
    from megatron_ext.cli.convert import main as convert_main
    from megatron_ext.models.decoder import CausalLM

    trainer, cfg = trained
    single = ParallelGroups.single_process()
    out = str(tmp_path / "hf")
    training_to_hf(cfg.checkpoint_dir, out)
    weights = os.path.join(out, "model.safetensors")
    size = os.path.getsize(weights)
    _flip_byte(weights, size - 5)  # tensor data, far from the header
    with pytest.raises(ValueError, match=f"{weights} is corrupted"):
        CausalLM.from_pretrained(out, single)

    os.remove(os.path.join(out, MANIFEST_FILE))  # unverifiable: NaN bytes are still refused
    saved = load_file(weights)
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    saved[key][0, 0] = float("nan")
    save_file(saved, weights)
    with pytest.raises(ValueError, match=f"tensor {key} in {weights} holds NaN or inf"):
        CausalLM.from_pretrained(out, single)
    with open(weights, "r+b") as f:
        f.write(b"\xff" * 8)  # header length: garbage
    with pytest.raises(ValueError, match=f"{weights} is not a readable safetensors file"):
        CausalLM.from_pretrained(out, single)
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        f.write('{"weight_map": {}}')
    with pytest.raises(ValueError, match="holds both model.safetensors and model.safetensors.in"):
        CausalLM.from_pretrained(out, single)

    from megatron_ext.checkpoint.training_state import latest_checkpoint
    from megatron_ext.checkpoint.manifest import read_manifest

    step = latest_checkpoint(cfg.checkpoint_dir)
    data = next(n for n in sorted(read_manifest(step)) if n.endswith(".distcp"))
    _flip_byte(os.path.join(step, data), os.path.getsize(os.path.join(step, data)) // 2)
    try:
        assert convert_main(["--checkpoint", step, "--output", str(tmp_path / "o")]) == 2
    finally:
        _flip_byte(os.path.join(step, data), os.path.getsize(os.path.join(step, data)) // 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{data} is corrupted" in err[0], err
    assert not os.path.exists(tmp_path / "o")
