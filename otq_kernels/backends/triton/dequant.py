"""Triton dequantize: expand a QuantizedTensor to a transient dense weight.

Used by the ``dequant`` backend (dense weight, then cuBLAS/cuDNN). Bit-exact against
``qt.dequantize(dtype)``: both look up the float32 codebook and round once to ``dtype``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .. import _device
from ._grid import cdiv
from .decode import _decode_rows, codebook_args, plane_args

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
PROGRAMS_PER_SM = 4  # programs of the walking grid per SM (each 4 warps), where N allows


@triton.jit
def _dequantize_kernel(p0_ptr, p1_ptr, p2_ptr, codebook_ptr, out_ptr, N, K, k_pad,
                       stride_p0n, stride_p1n, stride_p2n, stride_cbn, stride_outn,
                       tiles_per_program,
                       W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                       PER_CHANNEL: tl.constexpr, WALK_K: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out [N, K] = codebook[(n,) code[n, k]] for BLOCK_N rows (grid (N blocks, K ranges)):
    one [BLOCK_N, BLOCK_K] tile per program, or with WALK_K ``tiles_per_program``
    consecutive tiles, their loads pipelined."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    if WALK_K:
        first = tl.program_id(1) * tiles_per_program * BLOCK_K
        for k0 in tl.range(first, tl.minimum(first + tiles_per_program * BLOCK_K, K), BLOCK_K,
                           num_stages=3):
            _expand_tile(p0_ptr, p1_ptr, p2_ptr, codebook_ptr, out_ptr, K, k_pad, stride_p0n,
                         stride_p1n, stride_p2n, stride_cbn, stride_outn, offs_n, n_mask, k0,
                         W0, W1, W2, PER_CHANNEL, BLOCK_N, BLOCK_K)
    else:
        _expand_tile(p0_ptr, p1_ptr, p2_ptr, codebook_ptr, out_ptr, K, k_pad, stride_p0n,
                     stride_p1n, stride_p2n, stride_cbn, stride_outn, offs_n, n_mask,
                     tl.program_id(1) * BLOCK_K, W0, W1, W2, PER_CHANNEL, BLOCK_N, BLOCK_K)


@triton.jit
def _expand_tile(p0_ptr, p1_ptr, p2_ptr, codebook_ptr, out_ptr, K, k_pad, stride_p0n,
                 stride_p1n, stride_p2n, stride_cbn, stride_outn, offs_n, n_mask, k0,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                 PER_CHANNEL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out's rows offs_n, columns k0..k0+BLOCK_K."""
    w = _decode_rows(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n,
                     codebook_ptr, stride_cbn, offs_n, n_mask, k0, k_pad,
                     W0, W1, W2, PER_CHANNEL, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    mask = n_mask[:, None] & (offs_k[None, :] < K)
    # int64 row offsets: N * K may pass 2**31
    out_ptrs = out_ptr + offs_n.to(tl.int64)[:, None] * stride_outn + offs_k[None, :]
    tl.store(out_ptrs, w.to(out_ptr.dtype.element_ty), mask=mask)


def k_tiles_per_program(n_blocks: int, k_tiles: int, sms: int) -> int:
    """K tiles that each program of the walking grid expands: K split into as many ranges
    as give about PROGRAMS_PER_SM programs per SM (one wave: a program pipelines its tiles
    in ~40 KB of shared memory, so 5 fit on an sm_90 SM; N blocks beyond that many
    programs walk whole rows), each program walking consecutive tiles of its rows, so that
    a per-channel codebook row is fetched into L1 once per program rather than once per
    tile (8-bit rows are 1 KB); one tile per program when the layer is too small to fill
    the GPU that way.

    >>> k_tiles_per_program(256, 64, 132)  # 8192 x 8192 in 32 x 128 tiles: 512 programs
    32
    >>> k_tiles_per_program(4, 9, 132)  # the mnist UNet's 128 x 1152: a program per tile
    1
    """
    splits = min(k_tiles, max(1, PROGRAMS_PER_SM * sms // n_blocks))
    return -(-k_tiles // splits)


def tuned_walk_k(device: torch.device) -> bool:
    """Whether this GPU's tuning entry says the walking grid beat one tile per program."""
    from ...ops import tuning_flag  # ops imports the backends

    return tuning_flag(device, "linear", "dequant_walk_k")


def dequantize_triton(qt, dtype: torch.dtype = torch.float16, walk_k: bool | None = None,
                      tiles_per_program: int | None = None) -> torch.Tensor:
    """Dense weight of ``qt.shape`` in ``dtype`` (float16/bfloat16/float32).

    walk_k: programs walk consecutive K tiles (:func:`k_tiles_per_program`) instead of
    expanding one tile each; None: the GPU's tuning entry (``dequant_walk_k``; absent:
    false, as shipped, since it has not been timed). tiles_per_program: K tiles per
    program, overriding both (tests; at least 1, at most all).
    """
    n, k = qt.n, qt.k
    out = torch.empty(n, k, dtype=dtype, device=qt.device)
    if out.numel() == 0:
        return out.reshape(qt.shape)
    planes, strides, widths = plane_args(qt)
    book, stride_cbn, per_channel = codebook_args(qt)
    block_n, block_k = (16, 32) if INTERPRET else (32, 128)
    n_blocks, k_tiles = cdiv(n, block_n), cdiv(k, block_k)
    walk = tuned_walk_k(qt.device) if walk_k is None else walk_k
    if tiles_per_program is not None:
        if tiles_per_program < 1:
            raise ValueError(f"tiles_per_program must be >= 1, got {tiles_per_program}")
        tiles = min(tiles_per_program, k_tiles)
    elif walk:
        tiles = k_tiles_per_program(n_blocks, k_tiles, _device.sm_count(qt.device))
    else:
        tiles = 1
    grid = (n_blocks, cdiv(k_tiles, tiles))
    _dequantize_kernel[grid](*planes, book, out, n, k, -(-k // 32) * 32, *strides, stride_cbn,
                             out.stride(0), tiles, **widths, PER_CHANNEL=per_channel,
                             WALK_K=tiles > 1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out.reshape(qt.shape)
