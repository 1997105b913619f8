"""The dequantized baseline: expand the layer to a transient dense weight, then
cuBLAS / cuDNN (F.linear / F.conv2d). The right choice at large M.

The expansion uses a CUDA kernel of the extension on small CUDA layers, the Triton
dequantize kernel on the rest (:func:`otq_kernels.backends.cuda.expands_natively`), the
extension's C++ kernel on CPU tensors and torch where the extension is not built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dispatch_log import note_kernel
from ..format import QuantizedTensor
from . import as_dtype

# On the CPU, a linear layer whose dense weight would exceed this is expanded and
# multiplied a chunk of rows at a time: a fresh weight-sized buffer is slow to allocate
# there (above 32 MiB glibc maps new pages on every call: ~22 ms for 64 MiB on the 2-core
# test machine, against 2.2 ms for the expansion itself) and a chunk stays in cache.
CPU_CHUNK_BYTES = 1 << 23


def unavailable(device) -> None:
    return None


def dense_weight(qt: QuantizedTensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight of qt's shape in ``dtype`` (transient; float64 is expanded by
    torch, the other dtypes by a native kernel where one runs)."""
    if dtype == torch.float64:
        note_kernel("dequant_torch")
        return qt.dequantize(dtype)
    book = qt.codebook
    if book.is_cpu:
        from . import cpu  # (here, not at import: it would add the C++ backend's imports)

        if cpu.unavailable(book.device) is None:
            note_kernel("dequant_cpu")
            return cpu.dequantize(qt, dtype)
    elif book.is_cuda:
        from . import cuda

        if cuda.expands_natively(qt):
            note_kernel("dequant_cuda")
            return cuda.dequantize(qt, dtype)
        from .triton import dequantize_triton

        note_kernel("dequant_triton")
        return dequantize_triton(qt, dtype)
    note_kernel("dequant_torch")
    return qt.dequantize(dtype)


def _row_chunk(qt: QuantizedTensor, first: int, last: int) -> QuantizedTensor:
    """Rows [first, last) of qt as a QuantizedTensor [last - first, K] (views, no copy)."""
    book = qt.codebook if qt.granularity == "tensor" else qt.codebook[first:last]
    return QuantizedTensor([p[first:last] for p in qt.planes], book, qt.bits,
                           (last - first, qt.k), qt.granularity, qt.method)


def _linear_by_row_chunks(x: torch.Tensor, qt: QuantizedTensor,
                          bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N] as y^T[rows] = W[rows] @ x^T, chunk by chunk of weight rows."""
    rows = max(1, CPU_CHUNK_BYTES // (4 * qt.k))
    yt = torch.empty(qt.n, x.shape[0], dtype=x.dtype, device=x.device)
    for first in range(0, qt.n, rows):
        last = min(qt.n, first + rows)
        torch.mm(dense_weight(_row_chunk(qt, first, last), x.dtype), x.T, out=yt[first:last])
        note_kernel("torch.mm by row chunks")
    y = yt.T.contiguous()
    return y if bias is None else y.add_(as_dtype(bias, x.dtype))


def linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> [M, N]."""
    # (torch.mm with out= refuses inputs that require grad: such an x takes F.linear)
    if x.is_cpu and 4 * qt.numel > CPU_CHUNK_BYTES and not x.requires_grad:
        return _linear_by_row_chunks(x, qt, bias)
    weight = dense_weight(qt, x.dtype).reshape(qt.n, qt.k)
    note_kernel("F.linear")
    return F.linear(x, weight, None if bias is None else as_dtype(bias, x.dtype))


def conv2d(x, qt: QuantizedTensor, bias, stride, padding, dilation, groups):
    """x [B, C, H, W] -> [B, N, OH, OW]."""
    weight = dense_weight(qt, x.dtype)
    bias = None if bias is None else as_dtype(bias, x.dtype)
    note_kernel("F.conv2d")
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)
