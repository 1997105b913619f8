"""Shared @triton.jit helpers: decode canonical bit planes (DESIGN §2) and look codes up.

Two decoders, both returning float32 weights (codebook values) for a tile of rows n and
columns k, never touching a dense weight in memory:

- ``_decode_rows``: a contiguous K range [k0, k0 + BLOCK_K) of BLOCK_N rows. Each plane
  is read as whole words ([BLOCK_N, BLOCK_K * w / 32] int32, contiguous along K, so the
  loads vectorize), fields are split off with shifts in registers and the tile is
  reshaped to [BLOCK_N, BLOCK_K]. Used by the dequantize kernel and ``gemm_tile``.
- ``_tile_words`` + ``_decode_field``: the same K range, decoded one field position at a
  time. Every plane's words are aligned to plane 0's word grid ([BLOCK_N, BLOCK_K * W0 /
  32]); field j of word w is column k0 + w * (32 / W0) + j. Only one [BLOCK_N, WORDS0]
  slice of codes is live at a time and nothing is reshaped, so no kept linear config
  spills registers (see docs/kernels.md). Used by the GEMV and ``gemm`` (split-K too).
- ``_decode_gather``: arbitrary (rows, cols) index tensors of any broadcast shape; every
  element loads its own word. Used by the conv kernel, whose K order (kh, kw, c) walks
  the canonical (c, kh, kw) order with a stride.

Codebook lookup is a ``tl.load`` gather from the float32 codebook row (tiny, L1/L2
resident): ``codebook[code]`` for tensor granularity, ``codebook[n, code]`` per channel.
A plane width of 0 means "no such plane" (codes have at most 3 planes: 7 -> [4, 2, 1]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...format import plane_widths


@triton.jit
def _plane_fields_rows(plane_ptr, stride_pn, offs_n, n_mask, k0, words_per_row,
                       W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Fields of width W for rows offs_n [BLOCK_N], columns k0..k0+BLOCK_K -> int32 [BLOCK_N, BLOCK_K].

    k0 must be a multiple of BLOCK_K: the word block then starts on a multiple of WORDS.
    """
    WORDS: tl.constexpr = BLOCK_K * W // 32
    PER_WORD: tl.constexpr = 32 // W
    offs_w = tl.max_contiguous(tl.multiple_of(k0 * W // 32 + tl.arange(0, WORDS), WORDS), WORDS)
    mask = n_mask[:, None] & (offs_w[None, :] < words_per_row)
    words = tl.load(plane_ptr + offs_n[:, None] * stride_pn + offs_w[None, :], mask=mask, other=0)
    shifts = tl.arange(0, PER_WORD) * W
    fields = (words[:, :, None] >> shifts[None, None, :]) & ((1 << W) - 1)
    return tl.reshape(fields, (BLOCK_N, BLOCK_K))


@triton.jit
def _lookup(codebook_ptr, stride_cbn, rows, codes, mask, PER_CHANNEL: tl.constexpr):
    """codebook[code] (tensor) or codebook[row, code] (channel) as float32, shape of ``codes``."""
    if PER_CHANNEL:
        return tl.load(codebook_ptr + rows * stride_cbn + codes, mask=mask, other=0.0).to(tl.float32)
    return tl.load(codebook_ptr + codes).to(tl.float32)


@triton.jit
def _decode_rows(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n,
                 codebook_ptr, stride_cbn, offs_n, n_mask, k0, k_pad,
                 W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights float32 [BLOCK_N, BLOCK_K] of rows offs_n, columns k0..k0+BLOCK_K (k0 % BLOCK_K == 0).

    k_pad: padded row length (multiple of 32); columns past it decode as code 0.
    """
    codes = _plane_fields_rows(p0_ptr, stride_p0n, offs_n, n_mask, k0, k_pad * W0 // 32,
                               W0, BLOCK_N, BLOCK_K)
    if W1 > 0:
        codes |= _plane_fields_rows(p1_ptr, stride_p1n, offs_n, n_mask, k0, k_pad * W1 // 32,
                                    W1, BLOCK_N, BLOCK_K) << W0
    if W2 > 0:
        codes |= _plane_fields_rows(p2_ptr, stride_p2n, offs_n, n_mask, k0, k_pad * W2 // 32,
                                    W2, BLOCK_N, BLOCK_K) << (W0 + W1)
    return _lookup(codebook_ptr, stride_cbn, offs_n[:, None], codes, n_mask[:, None], PER_CHANNEL)


@triton.jit
def _plane_words(plane_ptr, stride_pn, offs_n, n_mask, k0, k_pad, W: tl.constexpr,
                 W0: tl.constexpr, BLOCK_K: tl.constexpr):
    """Words of a width-W plane on plane 0's word grid -> int32 [BLOCK_N, BLOCK_K * W0 // 32].

    Entry (n, w) is the word holding the columns of plane-0 word w: W0 // W neighbouring
    entries repeat one word (same address, one memory transaction).
    """
    WORDS0: tl.constexpr = BLOCK_K * W0 // 32
    if W == W0:  # k0 is a multiple of BLOCK_K, so the run starts on a multiple of WORDS0
        offs_w = tl.max_contiguous(tl.multiple_of(k0 * W // 32 + tl.arange(0, WORDS0), WORDS0),
                                   WORDS0)
    else:
        offs_w = k0 * W // 32 + tl.arange(0, WORDS0) // (W0 // W)
    mask = n_mask[:, None] & (offs_w[None, :] < k_pad * W // 32)
    return tl.load(plane_ptr + offs_n[:, None] * stride_pn + offs_w[None, :], mask=mask, other=0)


@triton.jit
def _tile_words(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n, offs_n, n_mask,
                k0, k_pad, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """The three planes' words for columns k0..k0+BLOCK_K, each [BLOCK_N, BLOCK_K * W0 // 32].

    Missing planes (width 0) return plane 0's words, never decoded.
    """
    words0 = _plane_words(p0_ptr, stride_p0n, offs_n, n_mask, k0, k_pad, W0, W0, BLOCK_K)
    words1 = words0
    words2 = words0
    if W1 > 0:
        words1 = _plane_words(p1_ptr, stride_p1n, offs_n, n_mask, k0, k_pad, W1, W0, BLOCK_K)
    if W2 > 0:
        words2 = _plane_words(p2_ptr, stride_p2n, offs_n, n_mask, k0, k_pad, W2, W0, BLOCK_K)
    return words0, words1, words2


@triton.jit
def _plane_field(words, j: tl.constexpr, W: tl.constexpr, W0: tl.constexpr,
                 WORDS0: tl.constexpr):
    """Field of column w * (32 // W0) + j for every entry w of aligned ``words`` -> int32."""
    shift = ((tl.arange(0, WORDS0) % (W0 // W)) * (32 // W0) + j) * W
    return (words >> shift[None, :]) & ((1 << W) - 1)


@triton.jit
def _decode_field(words0, words1, words2, j: tl.constexpr, codebook_ptr, stride_cbn, offs_n,
                  n_mask, W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                  PER_CHANNEL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Weights float32 [BLOCK_N, WORDS0] of columns k0 + w * (32 // W0) + j (w < WORDS0)."""
    WORDS0: tl.constexpr = BLOCK_K * W0 // 32
    codes = _plane_field(words0, j, W0, W0, WORDS0)
    if W1 > 0:
        codes |= _plane_field(words1, j, W1, W0, WORDS0) << W0
    if W2 > 0:
        codes |= _plane_field(words2, j, W2, W0, WORDS0) << (W0 + W1)
    return _lookup(codebook_ptr, stride_cbn, offs_n[:, None], codes, n_mask[:, None], PER_CHANNEL)


@triton.jit
def _plane_fields_gather(plane_ptr, stride_pn, rows, cols, mask, W: tl.constexpr):
    """Fields of width W at (rows, cols) (broadcastable int tensors) -> int32 of their shape."""
    bit = cols * W
    words = tl.load(plane_ptr + rows * stride_pn + (bit >> 5), mask=mask, other=0)
    return (words >> (bit & 31)) & ((1 << W) - 1)


@triton.jit
def _decode_gather(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n,
                   codebook_ptr, stride_cbn, rows, cols, mask,
                   W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr, PER_CHANNEL: tl.constexpr):
    """Weights float32 at (rows, cols), broadcast shape; masked-off elements decode as code 0."""
    codes = _plane_fields_gather(p0_ptr, stride_p0n, rows, cols, mask, W0)
    if W1 > 0:
        codes |= _plane_fields_gather(p1_ptr, stride_p1n, rows, cols, mask, W1) << W0
    if W2 > 0:
        codes |= _plane_fields_gather(p2_ptr, stride_p2n, rows, cols, mask, W2) << (W0 + W1)
    return _lookup(codebook_ptr, stride_cbn, rows, codes, mask, PER_CHANNEL)


@triton.jit
def _grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of program ``pid``, walking GROUP_M tile rows at a time for L2 reuse."""
    per_group = GROUP_M * num_pid_n
    first_m = (pid // per_group) * GROUP_M
    rows_in_group = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows_in_group
    pid_n = (pid % per_group) // rows_in_group
    return pid_m, pid_n


def plane_args(qt) -> tuple[list, list, dict]:
    """Host side: (plane tensors x3, row strides x3, width constexprs W0..W2) of ``qt``.

    Missing planes repeat plane 0 with width 0 (never read).
    """
    widths = plane_widths(qt.bits) + [0] * (3 - len(qt.planes))
    planes = [p.contiguous() for p in qt.planes]
    planes += [planes[0]] * (3 - len(planes))
    strides = [p.stride(0) for p in planes]
    return planes, strides, {"W0": widths[0], "W1": widths[1], "W2": widths[2]}


def codebook_args(qt):
    """Host side: (float32 codebook [G, 2**b], its row stride, PER_CHANNEL flag)."""
    book = qt.codebook.to(torch.float32).contiguous()
    per_channel = qt.granularity == "channel" and book.shape[0] > 1
    return book, (book.stride(0) if per_channel else 0), per_channel

