"""The reference backend: dequantize in torch, then F.linear / F.conv2d.

It is the correctness oracle for every other backend and runs on any device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch_log import note_kernel
from ..format import QuantizedTensor, pack_codes, unpack_planes
from ..quantizers import fit_rows_reference


def unavailable(device) -> None:
    return None


def linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] with the dense dequantized weight in x.dtype."""
    weight = qt.dequantize(x.dtype).reshape(qt.n, qt.k)
    note_kernel("dequant_torch")
    note_kernel("F.linear")
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def conv2d(x, qt: QuantizedTensor, bias, stride, padding, dilation, groups):
    """x [B, C, H, W] -> [B, N, OH, OW] with the dense dequantized weight in x.dtype."""
    weight = qt.dequantize(x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    note_kernel("dequant_torch")
    note_kernel("F.conv2d")
    return F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)


def fit_rows(rows: torch.Tensor, bits: int, assign: str = "rank"):
    return fit_rows_reference(rows, bits, "ot", assign)


def pack(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    return pack_codes(codes, bits)


def unpack(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    return unpack_planes(planes, bits, k)
