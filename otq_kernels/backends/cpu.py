"""The C++ CPU backend (wraps otq_kernels._C). Filled in by the native-extension work."""

from __future__ import annotations

from .._native import unavailable_reason


def unavailable(device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device}"
    return unavailable_reason()
