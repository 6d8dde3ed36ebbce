"""Product code imports without megatron-core, transformers and Triton (the GPU image has no
megatron-core; serving machines need no transformers): they are loaded lazily where used."""
from __future__ import annotations

import pkgutil
import subprocess
import sys

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
for name in sys.argv[1:]:
    importlib.import_module(name)
print("imported", len(sys.argv) - 1)
"""


def _modules() -> list[str]:
    names = []
    for package in (megatron_ext,):
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    return names


def test_product_modules_import_without_optional_packages():
    names = _modules()
    assert "megatron_ext.communication.communicator" in names and "megatron_ext.models.decoder" in names
    proc = subprocess.run([sys.executable, "-c", BLOCKER, *names], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"imported {len(names)}" in proc.stdout
