"""The one place that asks whether Triton exists.

Kernel modules under :mod:`megatron_ext.kernels` are plain Triton code (``import triton`` at the
top, ``@triton.jit`` functions at module level, so kernels can call shared device functions such as
:func:`megatron_ext.kernels.symm_barrier.symm_barrier`). Layers never import them directly: they ask
:func:`kernel_module`, which imports a kernel module on first use and returns ``None`` where Triton
is missing (CPU machines), so every other module imports without Triton.
"""
from __future__ import annotations

import functools
import importlib
from types import ModuleType
from typing import Optional


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether Triton imports here (any failure counts as absent)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


@functools.lru_cache(maxsize=None)
def kernel_module(name: str) -> Optional[ModuleType]:
    """``megatron_ext.kernels.<name>`` (compiled on first launch), or ``None`` without Triton."""
    if not triton_available():
        return None
    return importlib.import_module(f"megatron_ext.kernels.{name}")
