"""The hand-written CUDA backend (wraps otq_kernels._C). Filled in by the native work."""

from __future__ import annotations

from .._native import unavailable_reason


def unavailable(device) -> str | None:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, not {device}"
    return unavailable_reason(require_cuda=True)
