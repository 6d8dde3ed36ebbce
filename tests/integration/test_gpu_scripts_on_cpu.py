"""GPU-only scripts on a machine without CUDA end with one line naming the script ("needs CUDA")
and exit 2 — not a traceback from deep inside ``torch.cuda`` or NCCL. Every script under
benchmarks/ and scripts/ is listed here as GPU-only or CPU-capable, so a new one must be sorted."""
from __future__ import annotations

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
    "benchmarks/eval_position_loss.py": [],
    "benchmarks/fused_reduce_norm.py": [],
    "benchmarks/moe_layer.py": [],
    "benchmarks/prefill.py": [],
    "benchmarks/reduction_latency.py": [],
    "benchmarks/te_backend.py": [],
    "benchmarks/train_scale.py": ["--impl", "ours"],
    "benchmarks/train_step.py": [],
    "scripts/gpu_parity.py": [],
}
CPU_CAPABLE = {"benchmarks/_common.py", "benchmarks/cpu_forward.py",
               "scripts/eval_transformers_reference.py", "scripts/checkpoint_vs_transformers.py"}


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
