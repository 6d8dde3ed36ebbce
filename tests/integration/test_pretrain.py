"""The training loop in four layouts against the one-process run of the same job, and resuming a
checkpoint in a different layout (4 CPU ranks, one spawn, tiny Qwen3-MoE, float32).

The one-process reference runs micro-batches of ``attn_dp x micro_batch_size`` samples, the samples
a stage processes together (see ``megatron_ext/data/batching.py``), so the MoE load-balancing term
is over the same tokens. ``seq_len=30`` is not a multiple of ``2·attn_cp``: CP pads and masks.
"""
from __future__ import annotations

import math
import os
import shutil

import pytest

from megatron_ext.parallel.groups import ParallelGroups, build_groups
from megatron_ext.checkpoint import training_state as ckpt
from megatron_ext.training.config import TrainConfig
from megatron_ext.training.trainer import run_training
from tests.helpers.multirank import run_ranks

COMMON = dict(model="tiny-qwen3-moe", seq_len=30, global_batch_size=8, train_steps=5,
              warmup_steps=1, lr=3e-3, progress=False, tensorboard=False, save_at_end=False,
              save_interval=0, dist_timeout_s=60.0)
FOUR_LAYERS = {"num_layers": 4}
TIED = {"tie_word_embeddings": True}
# name -> (layout, micro_batch_size, model overrides); attn_dp x micro_batch_size = 2 everywhere
LAYOUTS = {
    "attn_tp2": (dict(attn_tp=2, attn_dp=2), 1, {}),                  # moe_tp 2, moe_dp 2
    "seed": (dict(attn_tp=2, attn_cp=2, moe_dp=1), 2, {}),              # moe_tp 4, MOE_FULL k=2
    "cp2_moedp2_ep2": (dict(attn_cp=2, moe_dp=2, moe_ep=2), 1, {}),     # attn_dp 2, k=2
    "pp2_cp2": (dict(pp=2, attn_cp=2), 2, {}),                          # moe_dp 2 per stage
    "pp4": (dict(pp=4), 2, FOUR_LAYERS),                                # 1F1B, 4 micro-batches
    "pp2_tp2_tied": (dict(pp=2, attn_tp=2), 2, TIED),                   # LM head = embedding
    "seed_tied": (dict(attn_tp=2, attn_cp=2, moe_dp=1), 2, TIED),       # on 2 stages
}
RESUMES = {  # resumed layout <- layout that saved at step 3
    "pp2_cp2": "attn_tp2",
    "cp2_moedp2_ep2": "pp2_cp2",
    "seed_tied": "pp2_tp2_tied",
}
SAVE_STEP = 3


def _config(name: str, root: str, **extra) -> TrainConfig:
    layout, mbs, overrides = LAYOUTS[name]
    return TrainConfig(**{**COMMON, **extra}, **layout, micro_batch_size=mbs,
                       model_overrides=overrides, output_dir=f"{root}/{name}")


def _record(history) -> list[tuple[float, float, float]]:
    return [(m.loss, m.aux_loss, m.grad_norm) for m in history]


def _layouts_rank(rank: int, world: int, root: str) -> dict:
    groups_of: dict = {}

    def groups(cfg: TrainConfig):
        topo = cfg.topology(world)
        if topo not in groups_of:
            groups_of[topo] = build_groups(topo, timeout_s=60)
        return groups_of[topo]

    out = {}
    for name in LAYOUTS:
        saves = name in RESUMES.values()
        cfg = _config(name, root, save_interval=SAVE_STEP if saves else 0)
        out[name] = _record(run_training(cfg, groups(cfg)))
    for name, source in RESUMES.items():
        path = ckpt.checkpoint_path(_config(source, root).checkpoint_dir, SAVE_STEP)
        cfg = _config(name, root + "/resumed", resume=path)
        out[f"{name}<-{source}"] = _record(run_training(cfg, groups(cfg)))
    return out


def _assert_close(got, want, what: str) -> None:
    assert len(got) == len(want), (what, got, want)
    for step, (g, w) in enumerate(zip(got, want), 1):
        for label, a, b, rtol in (("loss", g[0], w[0], 2e-6), ("aux", g[1], w[1], 1e-5),
                                  ("grad_norm", g[2], w[2], 1e-4)):
            assert math.isclose(a, b, rel_tol=rtol), f"{what} step {step} {label}: {a} vs {b}"


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs: the 2-layer default model and the 4-layer one (for pp 4)."""
    out = {}
    for i, overrides in enumerate(({}, FOUR_LAYERS, TIED)):
        cfg = TrainConfig(**COMMON, micro_batch_size=2, model_overrides=overrides,
                          output_dir=str(tmp_path_factory.mktemp(f"ref{i}")))
        out[tuple(overrides.items())] = _record(run_training(cfg, ParallelGroups.single_process()))
    return out


def _reference_of(name: str, references: dict):
    return references[tuple(LAYOUTS[name][2].items())]


def test_reference_learns(references):
    for reference in references.values():
        losses = [r[0] for r in reference]
        assert losses[-1] < losses[0] - 0.2
        assert all(math.isfinite(x) for r in reference for x in r)


def test_layouts_and_cross_layout_resume_match_one_process(tmp_path, references):
    """attn_tp 2; seed layout (attn_tp 2 x attn_cp 2, MoE TP 4); attn_cp 2 + moe_dp 2 + moe_ep 2;
    pp 2 + attn_cp 2; pp 4 (4-layer model); pp 2 x attn_tp 2 and the seed layout with a tied
    embedding / LM head: the loss, MoE aux loss and gradient norm of 5 steps equal the
    one-process run. Checkpoints at step 3 of attn_tp 2 (resumed at pp 2 x attn_cp 2) and of pp 2 x attn_cp 2
    (resumed at attn_cp 2 + moe_dp 2 + moe_ep 2): steps 4-5 equal the uninterrupted run."""
    results = run_ranks(_layouts_rank, 4, str(tmp_path), timeout=240)
    assert all(r == results[0] for r in results[1:]), "ranks report different metrics"
    got = results[0]
    for name in LAYOUTS:
        _assert_close(got[name], _reference_of(name, references), name)
    for name, source in RESUMES.items():
        _assert_close(got[f"{name}<-{source}"], _reference_of(name, references)[SAVE_STEP:],
                      f"{name}<-{source}")


def test_model_from_hf_directory_starts_from_its_weights(tmp_path):
    """--model <HF dir>: config and weights come from the directory (one process)."""
    import torch

    from megatron_ext.training.trainer import Trainer, validate_launch

    cfg = TrainConfig(**{**COMMON, "train_steps": 2}, micro_batch_size=2,
                      output_dir=str(tmp_path / "a"))
    groups = ParallelGroups.single_process()
    source = Trainer(cfg, groups, validate_launch(cfg, 1))
    with torch.no_grad():  # weights no seed would give
        for _, p in source.named_params:
            p.mul_(1.5)
    source.model.save_pretrained(str(tmp_path / "hf"))
    cfg_hf = TrainConfig(**{**cfg.to_dict(), "model": str(tmp_path / "hf"),
                            "output_dir": str(tmp_path / "b")})
    loaded = Trainer(cfg_hf, groups, validate_launch(cfg_hf, 1))
    assert loaded.plan.model_config.vocab_size == 320  # the grown preset vocabulary, from config.json
    for (n, a), (m, b) in zip(source.named_params, loaded.named_params):
        assert n == m and torch.equal(a, b), n
    assert loaded.describe_weights() == f"weights: loaded from {tmp_path / 'hf'}"
    # an override that changes no shape keeps the weights: the first loss is the same
    cfg_kept = TrainConfig(**{**cfg_hf.to_dict(), "model_overrides": {"router_aux_loss_coef": 0.5}})
    kept = Trainer(cfg_kept, groups, validate_launch(cfg_kept, 1))
    assert kept.plan.init_from == str(tmp_path / "hf") and kept.aux_coef == 0.5
    first = source.train_step().loss
    assert first == loaded.train_step().loss == kept.train_step().loss

    for overrides, field in (({"hidden_size": 64, "router_aux_loss_coef": 0.1}, "hidden_size"),
                             ({"num_layers": 1}, "num_layers")):
        bad = TrainConfig(**{**cfg_hf.to_dict(), "model_overrides": overrides})
        with pytest.raises(ValueError, match=f"model_overrides {field} change the shapes of the "
                                             f"weights in {tmp_path / 'hf'}"):
            validate_launch(bad, 1)
        fresh = TrainConfig(**{**bad.to_dict(), "init_from_hf": False})
        assert validate_launch(fresh, 1).init_from is None  # asked for: random init
    os.makedirs(tmp_path / "config_only")
    shutil.copy(tmp_path / "hf" / "config.json", tmp_path / "config_only")
    empty = TrainConfig(**{**cfg_hf.to_dict(), "model": str(tmp_path / "config_only")})
    with pytest.raises(ValueError, match=f"model {tmp_path / 'config_only'} has no "
                                         f"model.safetensors or model.safetensors.index.json"):
        validate_launch(empty, 1)
    random = Trainer(TrainConfig(**{**empty.to_dict(), "init_from_hf": False}), groups,
                     validate_launch(TrainConfig(**{**empty.to_dict(), "init_from_hf": False}), 1))
    assert random.describe_weights() == f"weights: random init (seed {cfg.seed})"


def test_config_from_yaml_then_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("attn-cp: 2\nmoe_dp: 2\nlr: 1.0e-3\nmodel_overrides:\n  num_layers: 4\n"
                    "progress: false\n")
    cfg = TrainConfig.from_args(["--config", str(path), "--lr", "2e-3", "--model-override",
                                 "num_experts=4", "--resume"])
    assert (cfg.attn_cp, cfg.moe_dp, cfg.lr, cfg.progress, cfg.resume) == (2, 2, 2e-3, False,
                                                                          "latest")
    assert cfg.model_overrides == {"num_layers": 4, "num_experts": 4}
    topo = cfg.topology(4)
    assert (topo.attn_dp, topo.moe_tp, topo.moe_ep) == (2, 2, 1)
    assert TrainConfig().topology(4).describe() == \
        TrainConfig(attn_tp=2, attn_cp=2, moe_dp=1).topology(4).describe()  # default = seed
    path.write_text("lr: -1\n")
    with pytest.raises(ValueError, match=r"lr=-1\.0 must be > 0"):
        TrainConfig.from_args(["--config", str(path)])
