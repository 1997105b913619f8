"""The dequantized baseline: expand the layer to a transient dense weight, then
cuBLAS / cuDNN (F.linear / F.conv2d). The right choice at large M.

The expansion uses a CUDA kernel of the extension on small CUDA layers, the Triton
dequantize kernel on the rest (:func:`otq_kernels.backends.cuda.expands_natively`), the
extension's C++ kernel on CPU tensors and torch where the extension is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..format import QuantizedTensor


def unavailable(device) -> None:
    return None


def dense_weight(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of qt's shape in ``dtype`` (transient)."""
    if qt.device.type == "cuda":
        from . import cuda

        if cuda.expands_natively(qt):
            return cuda.dequantize(qt, dtype)
        from .triton import dequantize_triton

        return dequantize_triton(qt, dtype)
    if qt.device.type == "cpu":
        from . import cpu

        if cpu.unavailable(qt.device) is None:
            return cpu.dequantize(qt, dtype)
    return qt.dequantize(dtype)


def linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N]."""
    weight = dense_weight(qt, x.dtype).reshape(qt.n, qt.k)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def conv2d(x, qt: QuantizedTensor, bias, stride, padding, dilation, groups):
    """x [B, C, H, W] -> [B, N, OH, OW]."""
    weight = dense_weight(qt, x.dtype)
    bias = None if bias is None else bias.to(x.dtype)
    return F.conv2d(x, weight, bias, tuple(stride), tuple(padding), tuple(dilation), groups)
