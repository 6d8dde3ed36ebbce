"""The layer backend is chosen once per model build: ``native``, ``te`` or ``auto``.

TransformerEngine never imports on the CPU machines, so here ``auto`` must build the native
model (same parameters, names and specs) and ``te`` must be refused with a reason — by the
library before anything is built and by the commands with one line and exit code 2 before any
process group exists. The TE modules themselves are checked against the native ones on GPUs in
``tests/gpu/test_te_backend.py``.
"""
from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_ext.layers.backend import LayerBackend, resolve_transformer_impl
from megatron_ext.layers.te.runtime import te_importable, te_unavailable_reason
from megatron_ext.models.config import ModelConfig
from megatron_ext.models.decoder import CausalLM
from megatron_ext.parallel.groups import ParallelGroups
from megatron_ext.parallel.param_meta import get_spec
from tests.helpers.cli import REPO, checkout_env

pytestmark = pytest.mark.skipif(te_importable(), reason="checks the machines without TE")


def test_resolution_without_te():
    assert resolve_transformer_impl("native") == "native"
    assert resolve_transformer_impl("auto") == "native"
    assert resolve_transformer_impl("auto", cuda_available=True) == "native"  # no TE import
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_transformer_impl("te", cuda_available=False)
    with pytest.raises(ValueError, match="transformer_engine is not importable"):
        resolve_transformer_impl("te", cuda_available=True)
    with pytest.raises(ValueError, match="must be one of native, te, auto"):
        resolve_transformer_impl("apex")
    with pytest.raises(ValueError, match="resolve 'auto'"):
        LayerBackend("auto")
    assert "not importable" in te_unavailable_reason(cuda_available=True)


def test_auto_builds_the_native_model_and_says_so():
    config = ModelConfig.preset("tiny-qwen3-moe")
    groups = ParallelGroups.single_process()
    auto = CausalLM(config, groups, transformer_impl="auto")
    native = CausalLM(config, groups)
    assert auto.backend.impl == native.backend.impl == "native"
    kinds = auto.backend.choices
    assert set(kinds) >= {"attn_linear", "norm", "cp_attention", "grouped_experts"}, kinds
    assert all(got == {"native"} for got in kinds.values()), kinds
    assert auto.backend.describe().startswith("transformer-impl native: ")
    a, n = dict(auto.named_parameters()), dict(native.named_parameters())
    assert list(a) == list(n)
    for name in a:
        assert get_spec(a[name]) == get_spec(n[name]) and a[name].shape == n[name].shape, name
    with pytest.raises(ValueError, match="transformer_impl=te needs TransformerEngine"):
        CausalLM(config, groups, transformer_impl="te")


@pytest.mark.parametrize("command,argv,prefix", [
    ("pretrain", ["--transformer-impl", "te"], "pretrain.py: invalid launch:"),
    ("eval", ["--model", "no-such-dir", "--transformer-impl", "te"], "eval.py: invalid evaluation:"),
    ("generate", ["--model", "no-such-dir", "--prompt", "a", "--transformer-impl", "te"],
     "generate.py: invalid generation:"),
])
def test_commands_refuse_te_with_one_line_and_exit_2(tmp_path, command, argv, prefix):
    out = subprocess.run([sys.executable, "-m", f"megatron_ext.cli.{command}", *argv,
                          *(["--output-dir", str(tmp_path / "run")] if command == "pretrain"
                            else [])],
                         cwd=REPO, env=checkout_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix), out.stderr
    assert "transformer_impl=te needs TransformerEngine on CUDA" in lines[0]
    assert not (tmp_path / "run").exists()


def test_auto_with_te_takes_te_only_where_it_measured_faster(monkeypatch):
    """With TE importable, ``auto`` builds a module kind on TE only where TE measured faster
    (``AUTO_TE_KINDS``: none since §13c), and says so per kind. TE itself is faked here: only the
    choice is checked (no TE module is built); the mechanism is checked with a faked entry."""
    import megatron_ext.layers.backend as backend_mod
    from megatron_ext.layers.norm import RMSNorm

    monkeypatch.setattr(backend_mod, "te_unavailable_reason", lambda *a, **k: None)
    assert resolve_transformer_impl("auto", cuda_available=True) == "auto"
    assert resolve_transformer_impl("te", cuda_available=True) == "te"
    assert backend_mod.AUTO_TE_KINDS == frozenset()
    auto = LayerBackend.resolve("auto")
    assert auto.impl == "auto" and not auto.uses_te
    assert auto.attention_kernel("p2p") == auto.attention_kernel("all_gather") == "torch"
    assert "faster than TE" in auto.describe()
    monkeypatch.setattr(backend_mod, "AUTO_TE_KINDS", frozenset({"cp_attention_p2p"}))
    auto = LayerBackend.resolve("auto")
    assert auto.attention_kernel("p2p") == "auto"          # TE's DotProductAttention
    assert auto.attention_kernel("all_gather") == "torch"  # ours
    assert isinstance(auto.rms_norm(8, 1e-6), RMSNorm)
    line = auto.describe()
    assert "cp_attention=" in line and "te p2p" in line and "faster than TE" in line, line
    assert LayerBackend("te").attention_kernel("all_gather") == "auto"
    assert LayerBackend("native").attention_kernel("p2p") == "torch"
