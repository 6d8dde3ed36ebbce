"""The memory estimator against what one process really holds: the bytes autograd saves for
backward (3 tiny models, fp32 and bf16, each recompute mode) and the optimizer's own accounting
of parameters, main weights and AdamW state. (Distributed-optimizer state per rank is checked
against the estimator in tests/integration/test_recompute.py's spawned layouts.)"""
from __future__ import annotations

import json
import os

import pytest
import torch

from megatron_ext.models.config import load_model_config
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.topology import Topology
from megatron_ext.training.memory import (activation_bytes, format_bytes, layouts_of, main,
                                          model_state_bytes)
from megatron_ext.training.optimizer import LRSchedule, TrainOptimizer
from tests.helpers.real_hf import SMOLLM2_CONFIG

B, S = 2, 64


def _saved_activation_bytes(model: CausalLM, config) -> int:
    """Unique storages autograd saves in one forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict = {}

    def pack(t: torch.Tensor):
        key = t.untyped_storage().data_ptr()
        if key not in params:
            seen[key] = t.untyped_storage().nbytes()
        return t

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, S), generator=gen)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, position_ids=torch.arange(S).expand(B, S), labels=ids, return_logits=False)
    return sum(seen.values())


@pytest.mark.parametrize("name", ["tiny-qwen3-moe", "tiny-qwen2-moe", "tiny-llama"])
def test_activation_estimate_matches_saved_bytes(name):
    """none / selective: within 10% of the saved bytes; full: the saved bytes plus at most the
    decoder layers' inputs (hidden + residual), which the checkpoint keeps outside autograd's
    saved tensors."""
    config = load_model_config(name)
    for dtype in (torch.float32, torch.bfloat16):
        b = torch.empty((), dtype=dtype).element_size()
        for mode in ("none", "selective", "full"):
            model = CausalLM(config, ParallelGroups.single_process(), dtype=dtype)
            model.set_recompute(mode)
            measured = _saved_activation_bytes(model, config)
            est = activation_bytes(config, Topology(world=1), S, B, mode, dtype == torch.bfloat16,
                                   kernels="torch")  # the CPU paths this test runs
            what = f"{name} {dtype} {mode}: estimate {est} vs saved {measured}"
            if mode == "full":
                layer_inputs = config.num_layers * 2 * B * S * config.hidden_size * b
                assert measured <= est <= measured + layer_inputs, what
            else:
                assert abs(est - measured) <= 0.10 * measured, what


def test_p2p_estimate_counts_the_kept_kv():
    """CP attention's p2p keeps one more local K/V per layer than all_gather (measured in
    test_cp_attention::test_p2p_keeps_one_more_local_kv_than_all_gather): the estimate differs
    by exactly that, and not at all without CP."""
    config = load_model_config("tiny-qwen3-moe")
    kv = 2 * config.num_kv_heads * config.head_dim * 2  # bf16 K and V per token
    for cp, want in ((2, config.num_layers * (B * S // 2) * kv), (1, 0)):
        topo = Topology(world=cp, attn_cp=cp)
        ag, p2p = (activation_bytes(config, topo, S, B, "none", True, cp_comm=c)
                   for c in ("all_gather", "p2p"))
        assert p2p - ag == want


def test_model_state_estimate_equals_optimizer_accounting():
    """One process, bf16 with fp32 main weights and fp32: parameter bytes, main weights + AdamW
    moments as the optimizer counts them, gradients as the buckets hold them."""
    config = load_model_config("tiny-qwen3-moe")
    for bf16 in (True, False):
        model = CausalLM(config, ParallelGroups.single_process())
        named = list(model.named_parameters())
        opt = TrainOptimizer(named, ParallelGroups.single_process(), LRSchedule(1e-3, 0, 0, 1),
                             1.0, 0.0, (0.9, 0.95), 1e-8,
                             param_dtype=torch.bfloat16 if bf16 else None)
        params, main_w, grads, optim = model_state_bytes(config, Topology(world=1), 0, bf16, True)
        assert params == sum(p.numel() * p.element_size() for _, p in named)
        assert main_w + optim == opt.state_bytes()
        assert grads == sum(b.main_grad.numel() * b.main_grad.element_size()
                            for b in opt.buckets)


def test_cli_prints_estimate_and_fitting_layouts(capsys):
    assert main(["--model", "tiny-qwen3-moe", "--world", "4", "--attn-cp", "2", "--moe-dp", "2",
                 "--seq-len", "64"]) == 0
    out = capsys.readouterr().out
    assert "recompute full" in out and "total" in out
    assert main(["--model", "tiny-qwen3-moe", "--world", "4", "--gpu-memory-gb", "1"]) == 0
    listed = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(listed) == len(layouts_of(4, load_model_config("tiny-qwen3-moe"))) > 3
    assert main(["--model", "tiny-qwen3-moe", "--world", "4", "--attn-cp", "3"]) == 2


def test_cli_reads_hf_configs_like_every_command(tmp_path, capsys):
    """A hub-written config.json (SmolLM2-135M's: ``_model_name_or_path``, ``unk_token_id``, …)
    loads silently; an unknown extra field is ignored with one note (the same line eval, generate
    and pretrain print) and the same estimate; ``--strict-config`` refuses it in one line naming
    the file and the field."""
    hub, extra = tmp_path / "hub", tmp_path / "extra"
    for path, hf in ((hub, SMOLLM2_CONFIG), (extra, {**SMOLLM2_CONFIG, "some_new_hub_field": 1})):
        path.mkdir()
        (path / "config.json").write_text(json.dumps(hf))
    args = ["--world", "1", "--seq-len", "64"]
    assert main(["--model", str(hub), *args]) == 0
    hub_out = capsys.readouterr().out.splitlines()
    assert not any(line.startswith("note:") for line in hub_out)
    params = [line for line in hub_out if "recompute none" in line][0].split(",")[0]
    assert params.endswith("parameters " + format_bytes(2 * 134_515_008))  # SmolLM2-135M in bf16
    assert main(["--model", str(extra), *args]) == 0
    extra_out = capsys.readouterr().out.splitlines()
    assert extra_out[0] == (f"note: {extra}: ignoring config field(s) some_new_hub_field (not "
                            f"known to change the model; --strict-config refuses them)")
    assert extra_out[2:] == hub_out[1:]  # the same per-rank estimate
    assert main(["--model", str(extra), *args, "--strict-config"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"memory: {os.path.join(extra, 'config.json')}: ")
    assert "does not know: some_new_hub_field" in err[0]
