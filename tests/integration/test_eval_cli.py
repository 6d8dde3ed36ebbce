"""The eval command end to end on a training checkpoint (no conversion): results.json with every
task's numbers, the PNG plots and report.md; --resume recomputes only missing cells; an existing
results file is never overwritten without --resume (exit 2, file unchanged)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from megatron_ext.models.config import ModelConfig
from tests.helpers.cli import REPO, checkout_env
from tests.helpers.multirank import free_port

SEQ_LEN, SAMPLES = 48, 2
ARGS = ["--task", "perplexity", "position_loss", "passkey", "needle", "--seq-len", str(SEQ_LEN),
        "--num-samples", str(SAMPLES), "--batch-size", "2", "--num-buckets", "5",
        "--lengths", "400", "--depths", "0,1", "--samples-per-cell", "1", "--answer-tokens", "4"]


def _eval(model: str, output: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "examples", "eval.py"), "--model", model,
           "--output", output, *ARGS, *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env=checkout_env(OMP_NUM_THREADS="1", MASTER_PORT=str(free_port())))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from tests.helpers.hf_oracle import build_hf_model
    from tests.helpers.training_checkpoint import save_as_training_checkpoint

    root = tmp_path_factory.mktemp("eval_cli")
    hf = str(root / "hf")
    build_hf_model(ModelConfig.preset("tiny-llama").replace(vocab_size=258), hf)
    ckpt = str(root / "ckpt")
    save_as_training_checkpoint(hf, ckpt)
    out = str(root / "out")
    proc = _eval(ckpt, out)
    assert proc.returncode == 0, proc.stderr
    return hf, ckpt, out, proc


def test_outputs_of_a_training_checkpoint(run):
    from megatron_ext.data.dataset import open_dataset
    from megatron_ext.data.tokenizer import ByteTokenizer
    from megatron_ext.evaluation.loss import evaluate_loss
    from megatron_ext.models.decoder import CausalLM
    from megatron_ext.parallel.groups import ParallelGroups

    hf, ckpt, out, proc = run
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["model"]["kind"] == "training" and results["model"]["step"] == 7
    assert results["layout"]["attn_cp"] == 1 and "--task" in results["command"]
    tasks = results["tasks"]
    # the perplexity of the same windows, from the HF directory of the same weights
    dataset = open_dataset(None, ByteTokenizer())
    windows = torch.as_tensor(np.stack([dataset.sample(i, SEQ_LEN)[:SEQ_LEN]
                                        for i in range(SAMPLES)]))
    model = CausalLM.from_pretrained(hf, ParallelGroups.single_process())
    want = evaluate_loss(model, ParallelGroups.single_process(), windows, vocab_size=258)
    got = tasks["perplexity"]["summary"]
    assert got["tokens"] == want.tokens == SAMPLES * (SEQ_LEN - 1)
    assert abs(got["loss"] - want.loss) < 1e-6
    curve = tasks["position_loss"]["summary"]
    assert sum(curve["tokens"]) == want.tokens
    assert abs(sum(curve["loss_sum"]) - want.loss_sum) < 1e-4
    for name in ("passkey", "needle"):
        summary = tasks[name]["summary"]
        assert summary["samples"] == 2 and len(tasks[name]["cells"]) == 2
        assert summary["accuracy"][0] == [tasks[name]["cells"][f"L=400,d={d}"]["accuracy"]
                                          for d in (0, 1)]
    for png in ("position_loss.png", "passkey_heatmap.png", "needle_heatmap.png",
                "accuracy_by_length.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "report.md")) as f:
        report = f.read()
    assert "## passkey" in report and "![position_loss.png](position_loss.png)" in report
    assert "ETA" in proc.stderr and "tokens/s" in proc.stderr


def test_resume_recomputes_only_missing_cells_and_refuses_to_overwrite(run):
    _, ckpt, out, _ = run
    path = os.path.join(out, "results.json")
    with open(path) as f:
        before = json.load(f)
    refused = _eval(ckpt, out)   # no --resume: refuse, leave the file as it was
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("eval.py: invalid evaluation: ")
    assert "pass --resume" in refused.stderr
    with open(path) as f:
        assert json.load(f) == before
    # an interrupted run: one passkey cell and one window batch missing
    partial = json.loads(json.dumps(before))
    del partial["tasks"]["passkey"]["cells"]["L=400,d=1"]
    del partial["tasks"]["perplexity"]["cells"]["samples=0-1"]
    with open(path, "w") as f:
        json.dump(partial, f)
    resumed = _eval(ckpt, out, "--resume", "--no-plots")
    assert resumed.returncode == 0, resumed.stderr
    assert "[passkey] 1/1 cells" in resumed.stderr and "[needle]" not in resumed.stderr
    with open(path) as f:
        after = json.load(f)
    kept = before["tasks"]["passkey"]["cells"]["L=400,d=0"]
    assert after["tasks"]["passkey"]["cells"]["L=400,d=0"] == kept       # not rerun
    redone = after["tasks"]["passkey"]["cells"]["L=400,d=1"]
    assert redone["answers"] == before["tasks"]["passkey"]["cells"]["L=400,d=1"]["answers"]
    for key in ("loss_sum", "tokens"):
        assert after["tasks"]["perplexity"]["cells"]["samples=0-1"][key] == pytest.approx(
            before["tasks"]["perplexity"]["cells"]["samples=0-1"][key], rel=1e-12)
    assert len(after["runs"]) == 2
