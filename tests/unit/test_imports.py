"""Product code imports without megatron-core, transformers, Triton and TE (the GPU image has no
megatron-core; serving machines need no transformers): they are loaded lazily where used. Triton
kernel modules (``megatron_ext.kernels.*`` that ``import triton`` at the top) are the exception
by design: only :func:`megatron_ext.kernels.triton_loader.kernel_module` imports them, and without
Triton they must fail with an ImportError about Triton, not with anything else."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import megatron_ext

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"megatron", "transformers", "triton", "transformer_engine"}:
            raise ImportError(f"blocked for this test: {name}")
        return None
sys.meta_path.insert(0, Block())
import importlib
plain, kernels = sys.argv[1].split(","), sys.argv[2].split(",")
for name in plain:
    importlib.import_module(name)
for name in kernels:
    try:
        importlib.import_module(name)
    except ImportError as err:
        assert "triton" in str(err), (name, err)
    else:
        raise AssertionError(f"{name} imported without Triton")
print("imported", len(plain), "refused", len(kernels))
"""


def _modules() -> list[str]:
    names = [megatron_ext.__name__]
    names += [m.name for m in pkgutil.walk_packages(megatron_ext.__path__, "megatron_ext.")]
    return names


def _is_triton_module(name: str) -> bool:
    path = Path(megatron_ext.__path__[0]).parent / (name.replace(".", "/") + ".py")
    if not path.exists():
        return False
    tree = ast.parse(path.read_text())
    return any(isinstance(node, ast.Import) and any(a.name == "triton" for a in node.names)
               for node in tree.body)


def test_product_modules_import_without_optional_packages():
    names = _modules()
    assert "megatron_ext.communication.communicator" in names
    assert "megatron_ext.models.decoder" in names
    kernels = [n for n in names if _is_triton_module(n)]
    plain = [n for n in names if n not in kernels]
    assert all(n.startswith("megatron_ext.kernels.") for n in kernels), kernels
    assert "megatron_ext.kernels.rms_norm" in kernels and "megatron_ext.kernels.symm_barrier" in kernels
    proc = subprocess.run([sys.executable, "-c", BLOCKER, ",".join(plain), ",".join(kernels)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"imported {len(plain)} refused {len(kernels)}" in proc.stdout


def test_public_names_resolve_to_their_modules():
    """Every name of ``megatron_ext.__all__`` resolves, and is the object its module defines."""
    import importlib

    for name in megatron_ext.__all__:
        value = getattr(megatron_ext, name)
        module = importlib.import_module(megatron_ext._EXPORTS[name])
        assert value is getattr(module, name), name
    assert {"Topology", "ParallelGroups", "build_groups", "init_distributed", "LayerCommunicator",
            "CausalLM", "ModelConfig", "TrainConfig"} <= set(megatron_ext.__all__)
