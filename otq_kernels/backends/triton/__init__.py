"""The Triton backend. Importable without triton; unavailable() says why it cannot run."""

from __future__ import annotations

import os


def unavailable(device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"
    return None
