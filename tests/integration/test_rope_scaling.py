"""RoPE scaling (linear, dynamic NTK, yarn, llama3) against ``transformers``.

* The cos/sin tables equal ``transformers``' rotary embedding bit for bit, for every type, several
  head sizes, and (dynamic NTK) inputs shorter and longer than ``max_position_embeddings``.
* Config forms: the legacy ``rope_scaling`` key (with ``type``), transformers 5's
  ``rope_parameters``; both survive HF export and training-checkpoint conversion.
* Whole models (tiny Llama and Qwen3-MoE, float64) on sequences beyond the original length:
  logits and gradients equal ``transformers`` (its float32 islands bound this at the project's
  ``HF_ATOL``; the RoPE tables themselves are exact), and the unscaled model is far from it, so
  scaling is what is being matched. In attn_cp 2 (every case) and attn_tp 2 × attn_cp 2
  (Qwen3-MoE dynamic, Llama llama3) the logits and gradients equal the single-process run to
  1e-10 (dynamic NTK's length is the full sequence's, not a CP shard's). Greedy generation in attn_cp 2 equals ``transformers``' ``generate`` (dynamic
  NTK grows with every decode step there too).
* ``examples/eval.py --task position_loss --max-positions-scale 2`` equals ``transformers`` with
  the equivalent ``rope_scaling``; without scaling the length is refused (exit 2, one line, before
  any process group: the command runs as rank 0 of a world of 2 that has no rank 1).

One 4-rank spawn and three subprocesses (run at once).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from megatron_ext.models.config import ModelConfig
from tests.helpers.cli import REPO, checkout_env
from tests.helpers.multirank import free_port, run_ranks
from tests.integration.test_eval_tasks import _check_position_loss, _hf_position_loss
from tests.integration.test_models_hf import (HF_ATOL, Layout, ModelCase, _check_errors,
                                              _groups, _hf_side, _run_layout, _single_process,
                                              check_single_process)

# (max_position_embeddings, HF rope_parameters): every sequence below is longer than the
# original length; theta 20 puts llama3's and yarn's bands across the 4 frequencies of head_dim 8
SCALINGS = {
    "linear": (32, {"rope_type": "linear", "factor": 2.0}),
    "dynamic": (32, {"rope_type": "dynamic", "factor": 3.0}),
    "yarn": (32, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "llama3": (64, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                    "high_freq_factor": 2.0, "original_max_position_embeddings": 16}),
}
MODELS = ("tiny-llama", "tiny-qwen3-moe")
CASES = tuple(f"{m}/{s}" for m in MODELS for s in SCALINGS)
B, S = 2, 46                 # 46 tokens: > every original length, CP padding in cp 2
PROMPT, NEW = 40, 5          # greedy generation: prompt + new tokens within the scaled limit
LAYOUTS = [
    Layout("attn_cp2 x attn_dp2", dict(attn_cp=2, moe_ep=2, moe_tp=1, moe_dp=2), models=CASES),
    Layout("attn_tp2 x attn_cp2", dict(attn_tp=2, attn_cp=2, moe_tp=4, moe_ep=1, moe_dp=1),
           models=("tiny-qwen3-moe/dynamic", "tiny-llama/llama3")),
]
ROPE_THETA = 20.0


def _config(preset: str, scaling: str, **changes) -> ModelConfig:
    max_pos, params = SCALINGS[scaling]
    return ModelConfig.preset(preset).replace(rope_theta=ROPE_THETA, max_position_embeddings=max_pos,
                                              rope_scaling=dict(params), **changes)


# ----------------------------------------------------------------------------- tables, configs
def test_tables_equal_transformers():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from megatron_ext.layers.rope import RotaryEmbedding
    from tests.helpers.hf_oracle import hf_config_object

    extra = {"yarn, betas and mscale": (32, {"rope_type": "yarn", "factor": 3.3,
                                             "original_max_position_embeddings": 20,
                                             "beta_fast": 16, "beta_slow": 2, "mscale": 0.8,
                                             "mscale_all_dim": 0.5, "truncate": False})}
    for name, (max_pos, params) in {**SCALINGS, **extra}.items():
        for head_dim, theta in ((8, ROPE_THETA), (16, 1e4), (64, 5e5)):
            cfg = ModelConfig.preset("tiny-llama").replace(
                head_dim=head_dim, rope_theta=theta, max_position_embeddings=max_pos,
                rope_scaling=params)
            ours = RotaryEmbedding(head_dim, theta, scaling=cfg.rope_scaling,
                                   max_position_embeddings=max_pos)
            hf_cfg = hf_config_object(cfg)
            hf = LlamaRotaryEmbedding(hf_cfg)
            assert torch.equal(ours.inv_freq, hf.inv_freq), (name, head_dim)
            assert ours.attention_scaling == hf.attention_scaling, (name, head_dim)
            for length in (max_pos - 7, max_pos, max_pos + 1, 3 * max_pos + 5):
                pos = torch.arange(length)[None]
                want = LlamaRotaryEmbedding(hf_cfg)(torch.zeros(1, dtype=torch.float64), pos)
                got = ours(pos, torch.float64, seq_len=torch.tensor(length))
                assert all(torch.equal(g, w) for g, w in zip(got, want)), (name, head_dim, length)
            if name == "dynamic":   # a longer input really changes the table
                assert not torch.equal(ours.frequencies(torch.tensor(max_pos + 1)), ours.inv_freq)


def test_config_forms_round_trips_and_refusals(tmp_path):
    from transformers import AutoConfig

    from megatron_ext.training.convert import training_to_hf
    from tests.helpers.hf_oracle import build_hf_model
    from tests.helpers.training_checkpoint import save_as_training_checkpoint

    base = ModelConfig.preset("tiny-llama").to_hf_dict()
    for name, (max_pos, params) in SCALINGS.items():
        new = dict(base, max_position_embeddings=max_pos,
                   rope_parameters=dict(params, rope_theta=ROPE_THETA))
        legacy = {k: v for k, v in new.items() if k != "rope_parameters"}
        legacy_params = {("type" if k == "rope_type" else k): v for k, v in params.items()}
        legacy.update(rope_theta=ROPE_THETA, rope_scaling=legacy_params)
        cfg = ModelConfig.from_hf_dict(new)
        assert ModelConfig.from_hf_dict(legacy) == cfg == _config("tiny-llama", name)
        # what we write is what transformers reads from either form
        hf_new = AutoConfig.for_model("llama", **{k: v for k, v in new.items()
                                                  if k not in ("model_type", "architectures")})
        hf_legacy = AutoConfig.for_model("llama", **{k: v for k, v in legacy.items()
                                                     if k not in ("model_type", "architectures")})
        written = cfg.replace().to_hf_dict()["rope_parameters"]
        read_legacy = {k: v for k, v in hf_legacy.rope_parameters.items() if k != "type"}
        assert written == hf_new.rope_parameters == read_legacy, name
    # HF directory -> training checkpoint -> HF directory keeps the scaling
    hf_dir, ckpt, out = (str(tmp_path / n) for n in ("hf", "ckpt", "out"))
    build_hf_model(_config("tiny-llama", "yarn"), hf_dir)
    save_as_training_checkpoint(hf_dir, ckpt)
    training_to_hf(ckpt, out)
    assert ModelConfig.from_hf_dir(out) == ModelConfig.from_hf_dir(hf_dir)
    with open(os.path.join(hf_dir, "config.json")) as f, open(os.path.join(out, "config.json")) as g:
        assert json.load(f)["rope_parameters"] == json.load(g)["rope_parameters"]
    refused = {
        "rope_type='longrope'": {"rope_type": "longrope", "factor": 2.0, "short_factor": [1.0],
                                 "long_factor": [2.0], "original_max_position_embeddings": 16},
        "entries ['beta_fast']": {"rope_type": "linear", "factor": 2.0, "beta_fast": 3},
        "needs a factor": {"rope_type": "dynamic"},
        "factor=0.5 must be a number >= 1": {"rope_type": "linear", "factor": 0.5},
        "high_freq_factor=1.0 > low_freq_factor=1.0": {
            "rope_type": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 1.0},
        "partial_rotary_factor": {"rope_type": "linear", "factor": 2.0,
                                  "partial_rotary_factor": 0.5},
    }
    for needle, params in refused.items():
        with pytest.raises(ValueError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            ModelConfig.from_hf_dict(dict(base, rope_parameters=params))
    with pytest.raises(ValueError, match="disagree"):
        ModelConfig.from_hf_dict(dict(base, rope_scaling={"type": "linear", "factor": 2.0},
                                      rope_parameters={"rope_type": "dynamic", "factor": 2.0}))


def test_max_positions_scale_override():
    plain = ModelConfig.preset("tiny-llama")
    assert plain.position_limit == 512
    assert plain.with_position_scale(4).rope_scaling.to_hf() == {"rope_type": "linear",
                                                                  "factor": 4}
    assert plain.with_position_scale(4).position_limit == 2048
    yarn = _config("tiny-llama", "yarn")           # the config's type, its other fields kept
    scaled = yarn.with_position_scale(8)
    assert scaled.rope_scaling.rope_type == "yarn" and scaled.rope_scaling.factor == 8
    assert scaled.rope_scaling.original_max_position_embeddings == 16
    assert scaled.position_limit == 128
    assert yarn.with_position_scale(2, "dynamic").rope_scaling.to_hf() == {
        "rope_type": "dynamic", "factor": 2}
    with pytest.raises(ValueError, match="llama3 needs low/high"):
        plain.with_position_scale(2, "llama3")


# ----------------------------------------------------------------------------- whole models
@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict[str, tuple[ModelCase, dict]]:
    """Per case: the float64 references (transformers and single process) and transformers'
    greedy generation (llama only) with the logits of its last step."""
    from megatron_ext.checkpoint.hf import load_hf_checkpoint
    from megatron_ext.models.decoder import CausalLM
    from megatron_ext.parallel.groups import ParallelGroups
    from tests.helpers.hf_oracle import build_hf_model, to_dtype

    out = {}
    for i, name in enumerate(CASES):
        preset, scaling = name.split("/")
        cfg = _config(preset, scaling)
        path = str(tmp_path_factory.mktemp(name.replace("/", "-")))
        hf = build_hf_model(cfg, path, seed=i)
        g = torch.Generator().manual_seed(10 + i)
        ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
        hf_logits, hf_grads, hf_aux, _ = _hf_side(hf, cfg, ids, labels, [S])
        sp_logits, sp_grads, sp_aux = _single_process(path, ids, labels)
        unscaled = CausalLM(cfg.replace(rope_scaling=None), ParallelGroups.single_process(),
                            dtype=torch.float64)
        load_hf_checkpoint(unscaled, path)
        with torch.no_grad():
            plain = unscaled(ids, position_ids=torch.arange(S).expand(B, S),
                             gather_logits=True).logits
        extra = {"unscaled_logits": plain}
        if preset == "tiny-llama":
            gen = to_dtype(hf, torch.float64).generate(
                ids[:, :PROMPT], attention_mask=torch.ones(B, PROMPT, dtype=torch.long),
                do_sample=False, max_new_tokens=NEW, eos_token_id=None, pad_token_id=0,
                output_logits=True, return_dict_in_generate=True)
            extra.update(gen_tokens=gen.sequences, gen_last_logits=gen.logits[-1])
        out[name] = (ModelCase(name, path, ids, labels, hf_logits, hf_grads, hf_aux, sp_logits,
                               sp_grads, sp_aux), extra)
    return out


@pytest.fixture(scope="module")
def cases_file(cases, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("rope_cases") / "cases.pt")
    torch.save({name: case for name, (case, _) in cases.items()}, path)
    return path


def test_single_process_matches_transformers(cases):
    for name, (c, extra) in cases.items():
        check_single_process(c)
        # the scaling is what is matched: without it the logits are far off
        assert float((extra["unscaled_logits"] - c.hf_logits).abs().max()) > 100 * HF_ATOL, name


def _rank_program(rank: int, world: int, cases_file: str) -> dict:
    from megatron_ext.models.decoder import CausalLM
    from megatron_ext.serving.generate import greedy_generate

    cases = torch.load(cases_file, weights_only=False)
    errors, generated = {}, {}
    for layout in LAYOUTS:
        groups = _groups(layout.sizes, world)
        for name in layout.models:
            errors[(layout.label, name)] = _run_layout(groups, layout, cases[name])
            if layout is LAYOUTS[0] and name.startswith("tiny-llama"):
                model = CausalLM.from_pretrained(cases[name].path, groups, dtype=torch.float64)
                out = greedy_generate(model, groups, cases[name].input_ids[:, :PROMPT], NEW)
                generated[name] = (out.tokens, out.last_logits)
    return {"errors": errors, "generated": generated}


def test_cp_and_tp_layouts_match(cases, cases_file):
    results = run_ranks(_rank_program, 4, cases_file, timeout=240)
    _check_errors(results, LAYOUTS)
    for name, (_, extra) in cases.items():
        if "gen_tokens" not in extra:
            continue
        for per_rank in results:
            tokens, last = per_rank["generated"][name]
            assert torch.equal(tokens, extra["gen_tokens"]), name
            torch.testing.assert_close(last.float(), extra["gen_last_logits"], atol=HF_ATOL, rtol=0,
                                       msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------- commands
def _command(script: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, os.path.join(REPO, "examples", script), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=checkout_env(OMP_NUM_THREADS="1", **env))


def test_eval_max_positions_scale_and_refusals(tmp_path):
    """position_loss with --max-positions-scale 2 equals transformers with rope_scaling linear
    factor 2; eval refuses lengths beyond the positions without scaling, generate beyond the
    scaled positions (the unscaled generate refusal: tests/integration/test_generate.py)."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from megatron_ext.data.dataset import open_dataset
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.evaluation.position_loss import PositionLoss
    from tests.helpers.hf_oracle import build_hf_model

    seq_len, samples = 48, 2
    plain = ModelConfig.preset("tiny-llama").replace(vocab_size=258, max_position_embeddings=32)
    hf_dir, scaled_dir, out = (str(tmp_path / n) for n in ("hf", "scaled", "out"))
    hf_plain = build_hf_model(plain, hf_dir)
    # the same weights with the equivalent rope_scaling in config.json
    build_hf_model(plain.replace(rope_scaling={"rope_type": "linear", "factor": 2.0}), scaled_dir)
    hf_scaled = AutoModelForCausalLM.from_pretrained(scaled_dir, dtype=torch.float32)
    hf_scaled.load_state_dict(hf_plain.state_dict())
    # rank 0 of a world of 2 without a rank 1: creating a process group would hang
    lone = dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(free_port()))
    common = ["--model", hf_dir, "--task", "position_loss", "--seq-len", str(seq_len),
              "--num-samples", str(samples), "--batch-size", "2", "--num-buckets", "5",
              "--dtype", "float64", "--tokenizer", "byte"]   # byte: no transformers import
    procs = {
        "scaled": _command("eval.py", *common, "--max-positions-scale", "2", "--output", out,
                           MASTER_PORT=str(free_port())),
        "eval refused": _command("eval.py", *common, "--attn-cp", "2", "--output",
                                 str(tmp_path / "refused"), **lone),
        "generate refused, scaled": _command("generate.py", "--model", hf_dir, "--prompt",
                                             "x" * 60, "--max-new-tokens", "8", "--attn-cp", "2",
                                             "--max-positions-scale", "2", "--tokenizer", "byte",
                                             **lone),
    }
    done = {k: (p.communicate(timeout=240), p.returncode) for k, p in procs.items()}
    (_, err), rc = done["scaled"]
    assert rc == 0, err
    expected = {
        "eval refused": ("eval.py: invalid evaluation: --seq-len=48 is beyond the model's "
                         "max_position_embeddings=32 (pass --max-positions-scale F to scale "
                         "RoPE for it, or --allow-long-context to evaluate there as is)"),
        "generate refused, scaled": (
            "generate.py: invalid generation: prompt of 60 tokens + max_new_tokens=8 needs "
            "positions up to 67, beyond the model's 64 positions (linear RoPE scaling "
            "factor=2.0 of 32; max_position_embeddings=32)"),
    }
    for key, line in expected.items():
        (stdout, stderr), rc = done[key]
        assert rc == 2 and stderr.strip().splitlines() == [line] and not stdout, (key, stderr)
    assert not os.path.exists(tmp_path / "refused")
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["model"]["config"]["rope_scaling"]["rope_type"] == "linear"
    assert results["model"]["config"]["rope_scaling"]["factor"] == 2.0
    got = PositionLoss.from_dict(results["tasks"]["position_loss"]["summary"])
    dataset = open_dataset(None, ByteTokenizer())
    windows = torch.as_tensor(np.stack([dataset.sample(i, seq_len)[:seq_len]
                                        for i in range(samples)]))
    want = _hf_position_loss(hf_scaled, windows, got.edges)
    _check_position_loss(got, want, 1e-7)
    unscaled = _hf_position_loss(hf_plain, windows, got.edges)
    assert abs(unscaled.loss_sum[-1] - got.loss_sum[-1]) > 1e-4 * abs(got.loss_sum[-1])
