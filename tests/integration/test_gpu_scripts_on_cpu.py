"""GPU-only scripts on a machine without CUDA end with one line naming the script ("needs CUDA")
and exit 2 — not a traceback from deep inside ``torch.cuda`` or NCCL. Every script under
benchmarks/ and scripts/ is listed here as GPU-only or CPU-capable, so a new one must be sorted."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.cli import REPO, checkout_env

# script -> the arguments a normal invocation needs (the required ones only)
GPU_ONLY = {
    "benchmarks/cp_attention.py": [],
    "benchmarks/decode.py": [],  # --cpu-smoke runs it on the CPU
    "benchmarks/decode_collectives.py": [],
    "benchmarks/decode_attention.py": [],
    "benchmarks/eval_position_loss.py": [],
    "benchmarks/fused_reduce_norm.py": [],
    "benchmarks/moe_decode_experts.py": [],
    "benchmarks/moe_layer.py": [],
    "benchmarks/moe_route.py": [],
    "benchmarks/prefill.py": [],
    "benchmarks/reduction_latency.py": [],
    "benchmarks/sampling.py": [],
    "benchmarks/skinny_linear.py": [],
    "benchmarks/te_backend.py": [],
    "benchmarks/train_scale.py": ["--impl", "ours"],
    "benchmarks/train_step.py": [],
    "scripts/gpu_parity.py": [],
    "scripts/symm_collectives_check.py": [],
}
CPU_CAPABLE = {"benchmarks/_common.py", "benchmarks/cpu_forward.py",
               "benchmarks/train_memory_cpu.py", "scripts/checkpoint_vs_transformers.py",
               "scripts/eval_transformers_reference.py"}


def test_every_script_is_sorted_into_gpu_only_or_cpu_capable():
    found = {f"{d}/{name}" for d in ("benchmarks", "scripts")
             for name in os.listdir(os.path.join(REPO, d)) if name.endswith(".py")}
    assert found == set(GPU_ONLY) | CPU_CAPABLE


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only machine's refusal")
def test_gpu_only_scripts_exit_2_with_one_line_on_cpu():
    env = checkout_env(MASTER_ADDR="127.0.0.1", MASTER_PORT="1")  # a group would fail loudly
    procs = {script: subprocess.Popen([sys.executable, script, *args], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for script, args in GPU_ONLY.items()}
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=120)
        lines = err.strip().splitlines()
        assert proc.returncode == 2, (script, err)
        assert len(lines) == 1 and out == "", (script, out, err)
        name = os.path.basename(script)
        assert lines[0].startswith(f"{name}: needs CUDA"), (script, err)
        if script == "benchmarks/decode.py":
            assert "--cpu-smoke" in lines[0]


def _dry_run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/train_scale.py", "--impl", "ours",
                           "--dry-run", *args], cwd=REPO, env=checkout_env(), capture_output=True,
                          text=True, timeout=120)


def test_train_scale_dry_run_plans_one_and_two_gpus_at_the_same_per_gpu_batch():
    """The scaling pair of issue 14 (layout a on 1 GPU vs 2, --layers 4): world 1 is all sizes 1,
    world 2 is attn_dp 2 / moe_ep 2, both process the same tokens per GPU per step, and the
    per-rank memory prediction is the estimator's for that layout; a layout the model cannot
    split exits 2 with one line."""
    from megatron_ext.models.config import load_model_config
    from megatron_ext.parallel.topology import Topology
    from megatron_ext.training.memory import estimate

    plans = {}
    for world in (1, 2):
        done = _dry_run("--layout", "a", "--layers", "4", "--world", str(world),
                        "--recompute", "selective")
        assert done.returncode == 0, done.stderr
        plans[world] = json.loads(done.stdout)
    assert plans[1]["layout_sizes"] == {"attn_dp": 1, "moe_ep": 1, "moe_dp": 1}
    assert plans[2]["layout_sizes"] == {"attn_dp": 2, "moe_ep": 2, "moe_dp": 1}
    assert plans[2]["tokens_per_step"] == 2 * plans[1]["tokens_per_step"] == 2 * 4096
    mc = load_model_config("qwen3-30b-a3b-12l")
    mc = mc.replace(num_layers=4, sparse_layers=(True,) * 4)
    for world, got in plans.items():
        topo = Topology(world=world, attn_dp=world, moe_ep=world, moe_dp=1)
        want = estimate(mc, topo, seq_len=4096, micro_batch_size=1, recompute="selective")
        assert got["layers"] == 4 and got["estimate_bytes"] == want.total, (world, got)
    bad = _dry_run("--layout", "c", "--world", "3")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "attn_tp=3" in bad.stderr
