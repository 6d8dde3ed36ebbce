"""Whether TransformerEngine can run here, probed once per process.

TE needs CUDA; on the CPU machines it never imports. Any exception during the import counts as
"absent" (a broken install must not take the native path down with it); the reason is kept so
``--transformer-impl te`` can say why it is refused. Nothing is emulated without TE.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch


@functools.lru_cache(maxsize=None)
def _import() -> tuple[Optional[object], str]:
    try:
        import transformer_engine.pytorch as te_pt
    except Exception as exc:  # noqa: BLE001 - any import failure means "no TE"
        return None, f"transformer_engine is not importable ({type(exc).__name__}: {exc})"
    return te_pt, "transformer_engine " + str(getattr(_version_module(), "__version__", "?"))


def _version_module():
    try:
        import transformer_engine

        return transformer_engine
    except Exception:  # noqa: BLE001
        return None


def te_module():
    """``transformer_engine.pytorch``; RuntimeError naming the import failure if absent."""
    te_pt, why = _import()
    if te_pt is None:
        raise RuntimeError(why)
    return te_pt


def te_importable() -> bool:
    return _import()[0] is not None


def te_unavailable_reason(cuda_available: Optional[bool] = None) -> Optional[str]:
    """``None`` when TE can run on this machine, else one line saying why not (CUDA first: on a
    machine without CUDA that is the reason, whatever the import would say)."""
    cuda = torch.cuda.is_available() if cuda_available is None else cuda_available
    if not cuda:
        return "CUDA is not available (TransformerEngine runs on NVIDIA GPUs only)"
    te_pt, why = _import()
    return None if te_pt is not None else why
