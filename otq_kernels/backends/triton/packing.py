"""Bit-plane pack / unpack kernels (the canonical format of DESIGN §2, bit-exact with format.py).

One program handles ``BLOCK_K`` codes (a multiple of 32, so every word it writes is whole)
of one row, for every plane at once. Plane p of width w stores element k in word
``k * w // 32`` at bit ``(k * w) % 32``; the widest plane holds the low bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...format import WORD_BITS, check_bits, check_codes, padded_k, plane_widths
from ._grid import cdiv

BLOCK_K = 256
MAX_PLANES = 3


@triton.jit
def _bit_or(a, b):
    return a | b


@triton.jit
def _pack_plane(codes_row_ptr, plane_row_ptr, k, n_words, k0,
                WIDTH: tl.constexpr, OFFSET: tl.constexpr, BLOCK_K: tl.constexpr):
    """Pack codes [k0, k0 + BLOCK_K) of one row into BLOCK_K * WIDTH / 32 words of one plane."""
    PER_WORD: tl.constexpr = 32 // WIDTH
    WORDS: tl.constexpr = BLOCK_K // PER_WORD
    word = k0 // PER_WORD + tl.arange(0, WORDS)
    slot = tl.arange(0, PER_WORD)
    col = word[:, None] * PER_WORD + slot[None, :]
    code = tl.load(codes_row_ptr + col, mask=col < k, other=0).to(tl.int32)
    field = ((code >> OFFSET) & ((1 << WIDTH) - 1)) << (slot[None, :] * WIDTH)
    tl.store(plane_row_ptr + word, tl.reduce(field, 1, _bit_or), mask=word < n_words)


@triton.jit
def _unpack_plane(plane_row_ptr, col, n_words, WIDTH: tl.constexpr, OFFSET: tl.constexpr):
    """Bits [OFFSET, OFFSET + WIDTH) of the codes at columns ``col`` [BLOCK_K] (int32)."""
    word = col * WIDTH // 32
    packed = tl.load(plane_row_ptr + word, mask=word < n_words, other=0)
    return ((packed >> (col * WIDTH % 32)) & ((1 << WIDTH) - 1)) << OFFSET


@triton.jit
def _pack_kernel(codes_ptr, p0_ptr, p1_ptr, p2_ptr, k, kp,
                 stride_cn, stride_p0n, stride_p1n, stride_p2n,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, BLOCK_K: tl.constexpr):
    """codes [N, k] -> planes of widths W0 >= W1 >= W2 (0 = no plane); grid (N, cdiv(kp, BLOCK_K))."""
    row = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    codes_row_ptr = codes_ptr + row * stride_cn
    _pack_plane(codes_row_ptr, p0_ptr + row * stride_p0n, k, kp * W0 // 32, k0, W0, 0, BLOCK_K)
    if W1 > 0:
        _pack_plane(codes_row_ptr, p1_ptr + row * stride_p1n, k, kp * W1 // 32, k0, W1, W0, BLOCK_K)
    if W2 > 0:
        _pack_plane(codes_row_ptr, p2_ptr + row * stride_p2n, k, kp * W2 // 32, k0, W2, W0 + W1, BLOCK_K)


@triton.jit
def _unpack_kernel(codes_ptr, p0_ptr, p1_ptr, p2_ptr, k, kp,
                   stride_cn, stride_p0n, stride_p1n, stride_p2n,
                   W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, BLOCK_K: tl.constexpr):
    """planes -> codes int64 [N, k]; grid (N, cdiv(kp, BLOCK_K))."""
    row = tl.program_id(0).to(tl.int64)
    col = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    code = _unpack_plane(p0_ptr + row * stride_p0n, col, kp * W0 // 32, W0, 0)
    if W1 > 0:
        code |= _unpack_plane(p1_ptr + row * stride_p1n, col, kp * W1 // 32, W1, W0)
    if W2 > 0:
        code |= _unpack_plane(p2_ptr + row * stride_p2n, col, kp * W2 // 32, W2, W0 + W1)
    tl.store(codes_ptr + row * stride_cn + col, code.to(tl.int64), mask=col < k)


def _plane_args(planes: list[torch.Tensor], bits: int):
    """(pointers, row strides, widths) padded to MAX_PLANES entries (unused: plane 0, width 0)."""
    widths = plane_widths(bits)
    pad = MAX_PLANES - len(widths)
    ptrs = list(planes) + [planes[0]] * pad
    strides = [p.stride(0) for p in planes] + [0] * pad
    return ptrs, strides, widths + [0] * pad


def _grid(n: int, k: int, block_k: int):
    return (n, cdiv(padded_k(k), block_k))


def pack_triton(codes: torch.Tensor, bits: int, block_k: int = BLOCK_K) -> list[torch.Tensor]:
    """Pack codes int [N, K] (values in [0, 2**bits)) into int32 bit planes [N, K_pad * w / 32]."""
    bits = check_codes(codes, bits)
    n, k = codes.shape
    kp = padded_k(k)
    planes = [torch.empty(n, kp * w // WORD_BITS, dtype=torch.int32, device=codes.device)
              for w in plane_widths(bits)]
    if n == 0 or k == 0:
        return [p.zero_() for p in planes]
    codes = codes.contiguous()
    ptrs, strides, widths = _plane_args(planes, bits)
    _pack_kernel[_grid(n, k, block_k)](codes, *ptrs, k, kp, codes.stride(0), *strides,
                                       *widths, BLOCK_K=block_k)
    return planes


def unpack_triton(planes: list[torch.Tensor], bits: int, k: int,
                  block_k: int = BLOCK_K) -> torch.Tensor:
    """Inverse of :func:`pack_triton`: int32 planes -> codes int64 [N, k]."""
    bits = check_bits(bits)
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"bits={bits} needs {len(widths)} planes, got {len(planes)}")
    n, kp = planes[0].shape[0], padded_k(k)
    for plane, width in zip(planes, widths, strict=True):
        if tuple(plane.shape) != (n, kp * width // WORD_BITS) or plane.dtype != torch.int32:
            raise ValueError(f"plane of width {width} must be int32 [{n}, {kp * width // 32}], "
                             f"got {plane.dtype} {tuple(plane.shape)}")
    codes = torch.empty(n, k, dtype=torch.int64, device=planes[0].device)
    if n == 0 or k == 0:
        return codes
    planes = [p.contiguous() for p in planes]
    ptrs, strides, widths = _plane_args(planes, bits)
    _unpack_kernel[_grid(n, k, block_k)](codes, *ptrs, k, kp, codes.stride(0), *strides,
                                         *widths, BLOCK_K=block_k)
    return codes

