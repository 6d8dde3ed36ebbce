"""Host-side launch arithmetic shared by the Triton kernels' callers (no Triton needed)."""
from __future__ import annotations

import functools

import torch


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= ``n`` (Triton block sizes)."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the current one when it has no index)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count_of(index)


@functools.lru_cache(maxsize=None)
def _sm_count_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def hopper_or_newer(device: torch.device) -> bool:
    """Whether a CUDA device is sm_90 or newer (programmatic dependent launch)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _capability_of(index)[0] >= 9


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)
