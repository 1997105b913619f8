"""Triton dequantize: expand a QuantizedTensor to a transient dense weight.

Used by the ``dequant`` backend (dense weight, then cuBLAS/cuDNN). Bit-exact against
``qt.dequantize(dtype)``: both look up the float32 codebook and round once to ``dtype``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._grid import cdiv
from .decode import _decode_rows, codebook_args, plane_args

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _dequantize_kernel(p0_ptr, p1_ptr, p2_ptr, codebook_ptr, out_ptr, N, K, k_pad,
                       stride_p0n, stride_p1n, stride_p2n, stride_cbn, stride_outn,
                       W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                       PER_CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] = codebook[(n,) code[n, k]] for one [BLOCK_N, BLOCK_K] tile."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    w = _decode_rows(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n,
                     codebook_ptr, stride_cbn, offs_n, n_mask, k0, k_pad,
                     W0, W1, W2, PER_CHANNEL, BLOCK_N, BLOCK_K)
    mask = n_mask[:, None] & (offs_k[None, :] < K)
    out_ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_outn + offs_k[None, :]  # N*K > 2**31
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(qt, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """Dense weight of ``qt.shape`` in ``dtype`` (float16/bfloat16/float32)."""
    n, k = qt.n, qt.k
    out = torch.empty(n, k, dtype=dtype, device=qt.device)
    if out.numel() == 0:
        return out.reshape(qt.shape)
    planes, strides, widths = plane_args(qt)
    book, stride_cbn, per_channel = codebook_args(qt)
    block_n, block_k = (16, 32) if INTERPRET else (32, 128)
    grid = (cdiv(n, block_n), cdiv(k, block_k))
    _dequantize_kernel[grid](*planes, book, out, n, k, -(-k // 32) * 32, *strides, stride_cbn,
                             out.stride(0), **widths, PER_CHANNEL=per_channel,
                             BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out.reshape(qt.shape)
