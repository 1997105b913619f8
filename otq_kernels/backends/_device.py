"""Facts about a CUDA device that dispatch asks on every call, read once per device.

``torch.cuda.get_device_properties`` goes through Python wrappers on each call; a
quantized UNet step would ask it for every layer.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def _properties(index: int):
    return torch.cuda.get_device_properties(index)


def index(device: torch.device) -> int:
    """The CUDA device's index (the current device for an index-less "cuda")."""
    return torch.cuda.current_device() if device.index is None else device.index


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 for a non-CUDA device)."""
    if device.type != "cuda":
        return 1
    return _properties(index(device)).multi_processor_count


def gpu_name(device: torch.device) -> str:
    """The CUDA device's name, as ``torch.cuda.get_device_name`` gives it."""
    return _properties(index(device)).name
