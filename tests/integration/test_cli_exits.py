"""eval and generate end the way users expect: 0 after a clean teardown under torchrun (no
SIGABRT from gloo's destructors), 2 with one line on rank 0 for bad input found before or after
the process groups exist (too long a sequence, a corrupted weight file)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_ext.models.config import ModelConfig
from megatron_ext.parallel.groups import ParallelGroups
from tests.helpers.cli import checkout_env
from tests.helpers.multirank import free_port

LAYOUT = ["--attn-tp", "2", "--attn-cp", "2", "--moe-dp", "1"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny model saved by megatron_ext (so with a manifest), vocabulary for the byte
    tokenizer."""
    from megatron_ext.models.decoder import CausalLM

    path = str(tmp_path_factory.mktemp("hf"))
    config = ModelConfig.preset("tiny-qwen3-moe").replace(vocab_size=320)
    model = CausalLM(config, ParallelGroups.single_process())
    model.init_weights(seed=3)
    model.save_pretrained(path)
    return path


def _one_process() -> dict[str, str]:
    """One process still starts a (1-rank) group: on a free port, not the shared default."""
    return checkout_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))


def _torchrun(module: str, args: list[str], world: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
                           str(world), "--master-port", str(free_port()), "-m", module, *args],
                          env=checkout_env(OMP_NUM_THREADS="1"), capture_output=True, text=True,
                          timeout=240)


def _ranks(module: str, args: list[str], world: int) -> list[subprocess.CompletedProcess]:
    """``world`` plain processes (no torchrun agent adding its own report to stderr)."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", module, *args], env=checkout_env(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r), LOCAL_RANK=str(r),
        WORLD_SIZE=str(world), OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True) for r in range(world)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_eval_and_generate_exit_0_under_torchrun(hf_dir):
    ev = _torchrun("megatron_ext.cli.eval", ["--model", hf_dir, "--seq-len", "64",
                                             "--num-samples", "2", *LAYOUT], 4)
    assert ev.returncode == 0, ev.stderr
    assert "perplexity: loss" in ev.stdout and "over 126 tokens" in ev.stdout
    gen = _torchrun("megatron_ext.cli.generate", ["--model", hf_dir, "--prompt", "ROMEO:",
                                                  "--max-new-tokens", "4", *LAYOUT], 4)
    assert gen.returncode == 0, gen.stderr
    assert "[0] ROMEO:" in gen.stdout
    for proc in (ev, gen):
        assert "terminate called" not in proc.stderr and "Traceback" not in proc.stderr


def test_bad_input_is_one_line_on_rank_0_and_exit_2(hf_dir, tmp_path):
    long = subprocess.run([sys.executable, "-m", "megatron_ext.cli.eval", "--model", hf_dir,
                           "--seq-len", "600", "--num-samples", "1"], env=_one_process(),
                          capture_output=True, text=True, timeout=120)
    assert long.returncode == 2, long.stderr
    assert long.stderr.strip().splitlines() == [
        "eval.py: invalid evaluation: --seq-len=600 is beyond the model's "
        "max_position_embeddings=512 (pass --max-positions-scale F to scale RoPE for it, or "
        "--allow-long-context to evaluate there as is)"]
    allowed = subprocess.run([sys.executable, "-m", "megatron_ext.cli.eval", "--model", hf_dir,
                              "--seq-len", "600", "--num-samples", "1", "--allow-long-context"],
                             env=_one_process(), capture_output=True, text=True, timeout=120)
    assert allowed.returncode == 0 and "over 599 tokens" in allowed.stdout, allowed.stderr

    # replicated decode rows need CP (and attn_tp 1): refused with the topology named, on rank 0
    ranks = _ranks("megatron_ext.cli.generate", ["--model", hf_dir, "--prompt", "x", "--attn-tp",
                                                 "2", "--decode-rows", "replicated"], 2)
    assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
    assert ranks[0].stderr.strip().splitlines() == [
        "generate.py: invalid generation: --decode-rows: decode_rows='replicated' needs "
        "attn_cp > 1, attn_tp 1 and the MoE token group = the CP group; this topology has "
        "attn_cp=1, attn_tp=2, token group 1"], ranks[0].stderr
    assert ranks[1].stderr.strip() == ""
    bad = subprocess.run([sys.executable, "-m", "megatron_ext.cli.generate", "--model", hf_dir,
                          "--prompt", "x", "--decode-rows", "everywhere"], env=_one_process(),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines() == [
        "generate.py: invalid generation: --decode-rows: decode_rows='everywhere' must be one "
        "of ('auto', 'owner', 'replicated')"], bad.stderr

    weights = os.path.join(hf_dir, "model.safetensors")
    with open(weights, "r+b") as f:  # one flipped bit in the tensor data
        f.seek(os.path.getsize(weights) - 100)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))
    for module, args in (("megatron_ext.cli.eval", ["--seq-len", "64", "--num-samples", "2"]),
                         ("megatron_ext.cli.generate", ["--prompt", "x"])):
        ranks = _ranks(module, ["--model", hf_dir, "--attn-tp", "2", *args], 2)
        assert [r.returncode for r in ranks] == [2, 2], [r.stderr for r in ranks]
        lines = ranks[0].stderr.strip().splitlines()
        assert len(lines) == 1 and f"{weights} is corrupted" in lines[0], ranks[0].stderr
        assert ranks[1].stderr.strip() == ""
