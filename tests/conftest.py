import os

# Single-threaded math keeps multi-rank CPU tests deterministic and avoids oversubscribing 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as an HF directory (built once per machine, cached on disk)."""
    from tests.helpers.real_hf import smollm2_dir as build

    return build()


@pytest.fixture(scope="session")
def real_style_dir(tmp_path_factory, smollm2_dir) -> str:
    """A tiny random Llama shaped and configured like SmolLM2, with its tokenizer files."""
    from tests.helpers.real_hf import real_style_tiny_dir

    return real_style_tiny_dir(str(tmp_path_factory.mktemp("real_style")))
