"""Argument checks shared by the backends that hand raw pointers to ``otq_kernels._C``.

The C++/CUDA code only ever sees well-formed buffers: every device, dtype, shape and
layout problem is a ValueError here.
"""

from __future__ import annotations

import torch

from ..format import (
    PLANE_WIDTHS,
    WORD_BITS,
    QuantizedTensor,
    check_bits,
    integer_value,
    padded_k,
    plane_widths,
)
from ..quantizers import ASSIGNS
from . import as_dtype

FIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require_device(t, name: str, device_type: str, device: torch.device | None = None) -> None:
    """ValueError unless ``t`` is a tensor on ``device`` (or any ``device_type`` device:
    "cpu" or "cuda")."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    # (is_cpu / is_cuda: a tenth of the cost of building t.device.type, on every call)
    on = t.device == device if device is not None else (
        t.is_cuda if device_type == "cuda" else t.is_cpu)
    if not on:
        where = f" on {device}" if device is not None else ""
        raise ValueError(f"{device_type} backend: {name} must be a {device_type.upper()} "
                         f"tensor{where}, got {t.device}")


def aligned(t: torch.Tensor) -> torch.Tensor:
    """Contiguous with a 16-byte-aligned start (kernels use 128-bit loads)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def checked_planes(planes, bits: int, n: int, k: int, device_type: str,
                   device: torch.device | None = None) -> list[torch.Tensor]:
    """Planes as aligned int32 tensors [n, K_pad * w / 32] on the device (ValueError else)."""
    widths = PLANE_WIDTHS.get(bits) or plane_widths(bits)  # (the latter raises)
    if len(planes) != len(widths):
        raise ValueError(f"bits={bits} needs {len(widths)} planes, got {len(planes)}")
    words = padded_k(k) // WORD_BITS  # per row and bit of width
    out = []
    for plane, width in zip(planes, widths, strict=True):
        require_device(plane, "plane", device_type, device)
        if plane.dtype != torch.int32 or plane.shape != (n, words * width):
            raise ValueError(f"plane of width {width} must be int32 {[n, words * width]}, "
                             f"got {plane.dtype} {list(plane.shape)}")
        out.append(aligned(plane))
    return out


def checked_codebook(qt: QuantizedTensor, device_type: str,
                     device: torch.device | None = None) -> torch.Tensor:
    """qt's codebook as an aligned float32 tensor [G, 2**bits], G in {1, N}."""
    book = qt.codebook
    require_device(book, "codebook", device_type, device)
    if book.dim() != 2 or book.shape[0] not in (1, qt.n) or book.shape[1] != 2**qt.bits:
        raise ValueError(f"codebook must be [1 or {qt.n}, {2**qt.bits}], got {list(book.shape)}")
    return aligned(as_dtype(book, torch.float32))


def unpack_args(planes, bits, k) -> tuple[int, int, int]:
    """Validate unpack's scalar arguments -> (bits, n rows, k) as ints (a numpy integer k
    taken, a bool refused)."""
    bits = check_bits(bits)
    if not planes:
        raise ValueError("unpack needs at least one plane")
    length = integer_value(k)
    if length is None or length <= 0:
        raise ValueError(f"k must be a positive int, got {k!r}")
    return bits, planes[0].shape[0], length


def fit_args(rows, bits, assign: str) -> int:
    """Validate fit_rows' arguments (rows [R, n] non-empty float) -> bits."""
    bits = check_bits(bits)
    if assign not in ASSIGNS:
        raise ValueError(f"unknown assign {assign!r}; choose one of {ASSIGNS}")
    if rows.dim() != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"rows must be a non-empty 2-D [R, n] tensor, got {list(rows.shape)}")
    if rows.dtype not in FIT_DTYPES:
        raise ValueError(f"rows must be float16/bfloat16/float32/float64, got {rows.dtype}")
    return bits
