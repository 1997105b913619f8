"""Fused sort-based equal-mass ("ot") binning, DESIGN §3.

One program owns ``BLOCK_R`` whole rows of ``BLOCK = next_pow2(n)`` values (several short
rows share a program, a long row gets one to itself) and does, in registers:

1. key = order-preserving int32 image of the fp32 value in the high word, column in the low
   word (int64); pads are +inf with columns >= n so they sort last. One ``tl.sort`` of the
   keys is a *stable* sort of the values carrying their positions.
2. rank -> equal-mass chunk id analytically (K = min(2**bits, n) chunks, the first n mod K
   one longer).
3. chunk sums with a segmented ``tl.associative_scan`` (sum restarts at each chunk), so a
   chunk's sum is exact fp32 accumulation of its own values only (no prefix differences).
   The last element of each chunk stores its mean: centroids ascending, fp32 accumulation.
4. unused levels (K < 2**bits) get the last centroid.
5. codes = chunk id ("rank") or a binary search over centroid midpoints ("nearest"),
   scattered back to the original columns with the recovered positions.

Rows longer than ``max_n`` (and launches that run out of GPU resources) go to
:func:`fit_rows_torch_sort`, a torch.sort-based path vectorized over rows.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...format import check_bits
from ...quantizers import ASSIGNS, chunk_of_rank, nearest_codes
from ._grid import cdiv, next_power_of_2

# Longest row sorted in one program. 4096 (16 int64 keys a thread at 8 warps) is the safe
# default until a GPU run shows 16384 (32 keys a thread at 16 warps: register spills, a
# long bitonic compile) is both compiled and faster than the torch.sort path.
MAX_N = int(os.environ.get("OTQ_TRITON_FIT_MAX_N", 4096))
KEY16_DTYPES = (torch.float16, torch.bfloat16)
ROW_TILE = 2048  # values per program when several short rows share one
_FAILED_LAUNCHES: set[tuple] = set()  # (block, bits, nearest, dtype) that ran out of resources


# ----------------------------------------------------------------------------- kernel
@triton.jit
def _segment_sum(a, seg_a, b, seg_b):
    return tl.where(seg_a == seg_b, a + b, b), seg_b


@triton.jit
def _sort_key(x, col):
    """fp32 x, int32 col (both [BLOCK_R, BLOCK]) -> int64 keys ordered by (x, col)."""
    bits = x.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (ordered.to(tl.int64) << 32) | col.to(tl.int64)


@triton.jit
def _key_value(key):
    """Inverse of :func:`_sort_key`: int64 keys -> (fp32 value, int32 column)."""
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True), key.to(tl.int32)


@triton.jit
def _sort_key16(x, col):
    """16-bit float x, col < 2**16 -> int32 keys ordered by (x, col): half the sort traffic."""
    bits = x.to(tl.int16, bitcast=True).to(tl.int32)
    ordered = tl.where(bits < 0, bits ^ 0x7FFF, bits)
    return (ordered << 16) | col


@triton.jit
def _key_value16(key, DTYPE: tl.constexpr):
    """Inverse of :func:`_sort_key16`: int32 keys -> (fp32 value, int32 column)."""
    ordered = key >> 16
    bits = tl.where(ordered < 0, ordered ^ 0x7FFF, ordered).to(tl.int16)
    return bits.to(DTYPE, bitcast=True).to(tl.float32), key & 0xFFFF


@triton.jit
def _sorted_row_values(x_ptr, offsets, valid, rank, KEY16: tl.constexpr):
    """Load rows (+inf pads) and sort them with their columns. -> (fp32 values, int32 columns)."""
    x = tl.load(x_ptr + offsets, mask=valid, other=float("inf"))
    x = tl.where(x == 0, tl.zeros_like(x), x)  # -0.0 ties with +0.0, as in torch.sort
    if KEY16:
        v, col = _key_value16(tl.sort(_sort_key16(x, rank), dim=1), x_ptr.dtype.element_ty)
    else:
        v, col = _key_value(tl.sort(_sort_key(x.to(tl.float32), rank), dim=1))
    return v, col


@triton.jit
def _chunk_of(rank, q, r):
    """Equal-mass chunk id of ``rank``: chunks of q + 1 values for the first r, then of q."""
    big = r * (q + 1)
    return tl.where(rank < big, rank // (q + 1), r + (rank - big) // q)


@triton.jit
def _nearest(cent_rows_ptr, v, k, valid, BITS: tl.constexpr):
    """Count of centroid midpoints < v (= nearest centroid, lowest on ties): binary search.
    The midpoints in float64, where they are exact (in fp32, (c0 + c1) * 0.5 rounds: to c1
    for subnormal neighbours, to inf past fp32's maximum)."""
    lo = tl.zeros(v.shape, dtype=tl.int32)
    hi = lo + (k - 1)
    for _ in tl.static_range(BITS):
        active = (lo < hi) & valid
        mid = (lo + hi) // 2
        c0 = tl.load(cent_rows_ptr + mid, mask=active, other=0.0)
        c1 = tl.load(cent_rows_ptr + mid + 1, mask=active, other=0.0)
        above = (c0.to(tl.float64) + c1.to(tl.float64)) * 0.5 < v.to(tl.float64)
        lo = tl.where(active & above, mid + 1, lo)
        hi = tl.where(active & ~above, mid, hi)
    return lo


@triton.jit
def _fit_rows_kernel(x_ptr, codes_ptr, cent_ptr, n_rows, n,
                     stride_xr, stride_codesr, stride_centr,
                     BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_R: tl.constexpr,
                     NEAREST: tl.constexpr, KEY16: tl.constexpr):
    """x [R, n] -> codes int64 [R, n], centroids fp32 [R, 2**BITS]; grid (cdiv(R, BLOCK_R),)."""
    LEVELS: tl.constexpr = 2**BITS
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    rank = tl.broadcast_to(tl.arange(0, BLOCK)[None, :], (BLOCK_R, BLOCK))
    row_ok = rows < n_rows
    valid = row_ok & (rank < n)
    rows = rows.to(tl.int64)

    v, col = _sorted_row_values(x_ptr, rows * stride_xr + rank, valid, rank, KEY16)

    k = tl.minimum(n, LEVELS)
    q = n // k
    r = n % k
    chunk = _chunk_of(rank, q, r)
    is_last = valid & ((rank == n - 1) | (_chunk_of(rank + 1, q, r) != chunk))
    seg, _ = tl.associative_scan((tl.where(valid, v, 0.0), chunk), 1, _segment_sum)
    mean = seg / tl.where(chunk < r, q + 1, q).to(tl.float32)
    cent_rows_ptr = cent_ptr + rows * stride_centr
    tl.store(cent_rows_ptr + chunk, mean, mask=is_last)

    last = tl.sum(tl.where(valid & (rank == n - 1), mean, 0.0), axis=1)
    level = tl.arange(0, LEVELS)[None, :]
    tl.store(cent_rows_ptr + level, tl.broadcast_to(last[:, None], (BLOCK_R, LEVELS)),
             mask=row_ok & (level >= k))

    if NEAREST:
        tl.debug_barrier()  # centroids stored by other threads of this program
        code = _nearest(cent_rows_ptr, v, k, valid, BITS)
    else:
        code = chunk
    tl.store(codes_ptr + rows * stride_codesr + col, code.to(tl.int64), mask=valid)


# ----------------------------------------------------------------------------- launchers
def _block(n: int) -> int:
    return max(2, next_power_of_2(n))


def _key16(dtype: torch.dtype, block: int) -> bool:
    """Whether (value, column) fits an int32 sort key."""
    return dtype in KEY16_DTYPES and block <= 2**16


def _num_warps(block: int) -> int:
    """Warps per program: scales with the values a program sorts (untuned heuristic)."""
    return max(4, min(16, block // 512))


def _check(rows: torch.Tensor, bits: int, assign: str) -> None:
    check_bits(bits)
    if assign not in ASSIGNS:
        raise ValueError(f"unknown assign {assign!r}; choose one of {ASSIGNS}")
    if rows.dim() != 2 or not rows.dtype.is_floating_point:
        raise ValueError(f"rows must be a float tensor [R, n], got {rows.dtype} "
                         f"{tuple(rows.shape)}")


def _empty(rows: torch.Tensor, bits: int):
    """Result for R == 0 or n == 0: (codes int64 [R, n], centroids f32 [R, 2**bits]) of zeros."""
    r, n = rows.shape
    return (torch.zeros(r, n, dtype=torch.int64, device=rows.device),
            torch.zeros(r, 2**bits, dtype=torch.float32, device=rows.device))


def _launch(rows: torch.Tensor, bits: int, nearest: bool, row_tile: int):
    """One launch of the fused kernel for all rows. rows [R, n] contiguous."""
    r, n = rows.shape
    block = _block(n)
    # The pad-level store is a [BLOCK_R, 2**bits] tile: bound it too (short rows at 8 bits
    # would otherwise make [1024, 256] tiles that spill ~14 KB a thread on sm_90).
    block_r = max(1, min(row_tile // max(block, 2**bits), next_power_of_2(r)))
    codes = torch.empty(r, n, dtype=torch.int64, device=rows.device)
    cents = torch.empty(r, 2**bits, dtype=torch.float32, device=rows.device)
    grid = (cdiv(r, block_r),)
    _fit_rows_kernel[grid](rows, codes, cents, r, n, rows.stride(0), codes.stride(0),
                           cents.stride(0), BITS=bits, BLOCK=block, BLOCK_R=block_r,
                           NEAREST=nearest, KEY16=_key16(rows.dtype, block),
                           num_warps=_num_warps(block_r * block))
    return codes, cents


# Rows scaled by OVERFLOW_SCALE where max|row| * n could pass float32's max: a power of
# two, so the scaled sums and means are exact images of the unscaled ones (values below
# 2**-62 in such a row lose bits as subnormals, 2**190 below its largest).
OVERFLOW_SCALE = 2.0**-64


def _overflow_scales(rows: torch.Tensor) -> torch.Tensor | None:
    """Per-row scales [R, 1] (1 or ``OVERFLOW_SCALE``) for rows whose fp32 chunk sums
    could overflow to inf; None where none could (every ordinary weight: one reduction)."""
    if rows.dtype == torch.float16:  # |x| <= 65504: sums of 2**31 of them stay finite
        return None
    limit = torch.finfo(torch.float32).max / (2 * rows.shape[1])
    low, high = torch.aminmax(rows, dim=1, keepdim=True)  # no [R, n] copy, as abs() makes
    big = (high > limit) | (low < -limit)
    if not bool(big.any()):
        return None
    return torch.where(big, OVERFLOW_SCALE, 1.0).to(torch.float32)


def _fit_scaled(fit, rows: torch.Tensor, bits: int, assign: str, *args):
    """``fit(rows, bits, assign, *args)``, on rows scaled down where their fp32 sums could
    overflow (centroids scaled back up): the same codes and centroids as exact fp32
    arithmetic without overflow would give."""
    scales = _overflow_scales(rows)
    if scales is None:
        return fit(rows, bits, assign, *args)
    codes, cents = fit(rows.to(torch.float32) * scales, bits, assign, *args)
    return codes, cents / scales


def fit_rows_triton(rows: torch.Tensor, bits: int, assign: str = "rank",
                    max_n: int | None = None, row_tile: int = ROW_TILE):
    """Equal-mass binning per row. rows [R, n] float -> (codes int64 [R, n], centroids f32 [R, 2**bits]).

    Values are compared and accumulated in fp32 (float64 input is rounded to fp32 first;
    rows whose sums could overflow are scaled by a power of two and back). Rows longer
    than ``max_n`` (default ``MAX_N``, env ``OTQ_TRITON_FIT_MAX_N``) use
    :func:`fit_rows_torch_sort`, as does a block size whose launch ran out of resources.
    """
    _check(rows, bits, assign)
    r, n = rows.shape
    if r == 0 or n == 0:
        return _empty(rows, bits)
    return _fit_scaled(_fit_rows_fused, rows, bits, assign, max_n, row_tile)


def _fit_rows_fused(rows: torch.Tensor, bits: int, assign: str, max_n: int | None,
                    row_tile: int):
    n, nearest = rows.shape[1], assign == "nearest"
    config = (_block(n), bits, nearest, rows.dtype)
    if n > (MAX_N if max_n is None else max_n) or config in _FAILED_LAUNCHES:
        return _fit_rows_sorted(rows, bits, assign)
    from triton.runtime.errors import OutOfResources

    try:
        return _launch(rows.contiguous(), bits, nearest, row_tile)
    except OutOfResources:
        _FAILED_LAUNCHES.add(config)
        return _fit_rows_sorted(rows, bits, assign)


# ----------------------------------------------------------------------------- torch.sort path
def _chunk_sums(values: torch.Tensor, k: int) -> torch.Tensor:
    """Sums of the K equal-mass chunks of sorted rows. values [R, n] -> [R, K]."""
    r, n = values.shape
    q, rem = divmod(n, k)
    big = rem * (q + 1)
    long = values[:, :big].reshape(r, rem, q + 1).sum(-1)
    short = values[:, big:].reshape(r, k - rem, q).sum(-1)
    return torch.cat([long, short], dim=1)


def _chunk_counts(n: int, k: int, device) -> torch.Tensor:
    """Values per equal-mass chunk, float32 [K]."""
    q, rem = divmod(n, k)
    return q + (torch.arange(k, device=device) < rem).to(torch.float32)


def fit_rows_torch_sort(rows: torch.Tensor, bits: int, assign: str = "rank"):
    """torch.sort-based equal-mass binning, vectorized over rows (fp32 accumulation).

    rows [R, n] float -> (codes int64 [R, n], centroids f32 [R, 2**bits]); the baseline the
    fused kernel is benchmarked against and its fallback for rows too long for one program.
    """
    _check(rows, bits, assign)
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return _empty(rows, bits)
    return _fit_scaled(_fit_rows_sorted, rows, bits, assign)


def _fit_rows_sorted(rows: torch.Tensor, bits: int, assign: str):
    r, n = rows.shape
    x = rows.to(torch.float32)
    k = min(2**bits, n)
    values, order = torch.sort(x, dim=1, stable=True)
    cents = _chunk_sums(values, k) / _chunk_counts(n, k, x.device)
    if assign == "nearest":
        codes = nearest_codes(x, cents)
    else:
        chunk = chunk_of_rank(n, k, x.device).expand(r, n).contiguous()
        codes = torch.empty_like(order).scatter_(1, order, chunk)
    pad = cents[:, -1:].expand(r, 2**bits - k)
    return codes, torch.cat([cents, pad], dim=1).contiguous()
