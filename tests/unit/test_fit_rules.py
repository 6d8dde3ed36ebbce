"""The launch check (``ModelConfig.check_fits``) refuses exactly what the parallel layers refuse.

Layers are built (tiny, on CPU) from process-group-free groups
(``ParallelGroups.without_process_groups``), one rank of every pipeline stage, with the launch
check switched off: a sweep of model shapes x layouts must raise in construction exactly when
``check_fits`` raises, so no ``ValueError`` of a layer's constructor can reach a launched job.
"""
from __future__ import annotations

import itertools

import pytest

from megatron_ext.models.config import ModelConfig
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology

BASE = ModelConfig.preset("tiny-qwen2-moe")  # shared expert, a dense layer among sparse ones

# One field varied at a time around sizes that fit attn_tp/moe sizes 1, 2 and 4.
SHAPES = [
    {},
    dict(num_heads=4, num_kv_heads=1),       # KV heads replicated over any attn_tp
    dict(num_heads=6, num_kv_heads=3),       # kv=3 < attn_tp=4 does not divide it
    dict(num_heads=12, num_kv_heads=6),      # kv=6 >= attn_tp=4 does not split over it
    dict(num_heads=2, num_kv_heads=2),       # heads < attn_tp
    dict(intermediate_size=36),              # dense width over attn_tp
    dict(num_experts=6),                     # experts over moe_ep
    dict(moe_intermediate_size=12),          # expert width over moe_tp
    dict(shared_expert_intermediate_size=20),  # shared expert over the MoE shard
    dict(num_layers=1, sparse_layers=(True,)),  # layers over pp
    dict(vocab_size=130),                    # vocabulary: padded, fits every attn_tp
]


def _layouts() -> list[Topology]:
    out = []
    for world, pp, tp, cp, mtp, ep in itertools.product((4, 8), (1, 2), (1, 2, 4), (1, 2),
                                                        (1, 2, 4), (1, 2, 4)):
        try:
            out.append(Topology(world=world, pp=pp, attn_tp=tp, attn_cp=cp, moe_tp=mtp,
                                moe_ep=ep))
        except ValueError:
            continue
    return out


def _construction_error(config: ModelConfig, topo: Topology, monkeypatch) -> str | None:
    """The first ``ValueError`` building every pipeline stage raises, launch check disabled."""
    with monkeypatch.context() as m:
        m.setattr(ModelConfig, "check_fits", lambda self, topo: None)
        try:
            for stage in range(topo.pp):
                groups = ParallelGroups.without_process_groups(topo, stage * topo.stage_size)
                CausalLM.for_stage(config, groups)
        except ValueError as err:
            return str(err)
    return None


def test_launch_check_refuses_exactly_what_the_layers_refuse(monkeypatch):
    layouts = _layouts()
    assert len(layouts) > 40
    # MoE shards smaller than an attention-TP group are in the sweep (issue 15)
    assert sum(t.shards_per_attn_tp_group > 1 for t in layouts) >= 10
    refused = accepted = 0
    for changes, topo in itertools.product(SHAPES, layouts):
        config = BASE.replace(**changes)
        try:
            config.check_fits(topo)
            launch_error = None
        except ValueError as err:
            launch_error = str(err)
        built_error = _construction_error(config, topo, monkeypatch)
        assert (launch_error is None) == (built_error is None), (changes, topo, launch_error,
                                                                 built_error)
        if built_error is not None:
            # the launch message carries the layer's rule, naming the same sizes
            assert launch_error.startswith("qwen2_moe model does not fit the layout: ")
            refused += 1
        else:
            accepted += 1
    assert refused > 100 and accepted > 100, (refused, accepted)


def test_kv_heads_fewer_than_attn_tp_must_divide_it():
    config = BASE.replace(num_heads=12, num_kv_heads=3)
    config.check_fits(Topology(world=2, attn_cp=2))  # attn_tp=1: no split
    with pytest.raises(ValueError, match=r"num_kv_heads=3 < attn_tp=4 replicates KV heads, so "
                                         r"it must divide attn_tp"):
        config.check_fits(Topology(world=4, attn_tp=4))


def test_commands_exit_2_with_the_rule_before_any_process_group(tmp_path):
    """pretrain, eval and generate with KV heads (3) fewer than attn_tp (4) and not dividing it:
    one line naming the rule and exit 2, started as rank 0 of 4 with nobody listening on the
    rendezvous port, so reaching any process group would hang instead."""
    import json
    import os
    import subprocess
    import sys

    from tests.helpers.cli import REPO, checkout_env
    from tests.helpers.multirank import free_port

    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    bad = ModelConfig.preset("tiny-qwen3-moe").replace(num_heads=12, num_kv_heads=3)
    (model_dir / "config.json").write_text(json.dumps(bad.to_hf_dict()))
    env = checkout_env(WORLD_SIZE="4", RANK="0", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(free_port()))
    rule = "num_kv_heads=3 < attn_tp=4 replicates KV heads, so it must divide attn_tp"
    commands = {
        "pretrain": [os.path.join(REPO, "examples", "pretrain.py"), "--attn-tp", "4",
                     "--model-override", "num_heads=12", "--model-override", "num_kv_heads=3",
                     "--output-dir", str(tmp_path / "run")],
        "eval": [os.path.join(REPO, "examples", "eval.py"), "--model", str(model_dir),
                 "--attn-tp", "4"],
        "generate": [os.path.join(REPO, "examples", "generate.py"), "--model", str(model_dir),
                     "--prompt", "hi", "--attn-tp", "4"],
    }
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, *argv], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 2, (name, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and rule in lines[0], (name, proc.stderr)
    assert not (tmp_path / "run").exists()
