"""Fused codebook linear: y = x @ W^T + bias with W decoded from bit planes in-kernel.

Three kernels, chosen by M (:func:`choose_kernel`) unless forced (``KERNELS`` also names
two variants that read x in the other layout):

- ``gemv``   M <= 8: broadcast-multiply + ``tl.sum`` in float32; each program decodes a
  [BLOCK_N, BLOCK_K] weight tile once and applies it to up to 8 activation rows.
- ``splitk`` 8 < M <= 64: ``tl.dot`` tiles with a small BLOCK_M, x read in place
  (strided activation loads). ``splitk_fm`` is the same on field-major x (below); dispatch
  takes it instead where the GPU's tuning entry has ``triton_splitk_field_major: true``
  (``bench_linear --write-tuning`` sets it from measured times; shipped off).
- ``gemm``   M > 64: ``tl.dot`` tiles, grouped program order, no split; x is first
  reordered field-major per K tile (:func:`field_major`, one copy of x) so that every
  activation load in the K loop is contiguous (vectorized and pipelined by Triton).
  ``gemm_strided`` is the same kernel on x as it is (strided loads; kept to measure
  the copy's worth). ``gemm_tile`` (not timed yet) decodes each whole K tile in natural
  column order and runs one ``tl.dot`` per tile, the weights as its first operand (held
  in registers by the wgmma, whose work stays in flight while the next tile is decoded):
  on sm_90 ``gemm`` compiles to one K = 16 wgmma per field position, each waited for
  before the next field is decoded (8 waits per K tile at 4 bits), so decode and tensor
  cores never overlap. Dispatch takes ``gemm_tile`` instead of ``gemm`` where the GPU's
  tuning entry has ``triton_gemm_tile: true`` (``bench_linear --write-tuning`` sets it;
  shipped off).

``gemv`` and the splitk kernels split K over ``split_k`` programs when N alone cannot
fill the GPU; float32 partials go to a workspace [split_k, M, N] that ``_splitk_reduce_kernel``
sums (deterministic, no atomics), adding the bias and casting to x.dtype. The dense
weight is never materialized: codes are unpacked and looked up tile by tile, one field
position of the packed words at a time (``decode._decode_field``), so no kept config
spills registers on sm_90.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...dispatch_log import note_kernel
from ...format import plane_widths
from .. import _device, checked_split_k
from ._grid import cdiv, next_power_of_2
from .decode import (
    _decode_field,
    _decode_rows,
    _grouped_tile,
    _tile_words,
    codebook_args,
    plane_args,
)

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ("gemv", "splitk", "splitk_fm", "gemm", "gemm_strided", "gemm_tile")
FIELD_MAJOR_KERNELS = ("splitk_fm", "gemm")  # the kernels that read field_major(x)
GEMV_MAX_M = 8
SPLITK_MAX_M = 64
FIELD_K = 16  # K of one field's tl.dot (plane-0 words per K tile), the same in every config
X_STAGE_LIMIT = 100 * 1024  # bytes of pipelined activation tiles a field-major config may use


# ----------------------------------------------------------------------------- configs
def _gemv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_N": 16, "BLOCK_K": 32}, num_warps=1)]
    shapes = [(64, 128, 4), (128, 128, 4), (32, 256, 8), (128, 256, 8), (32, 128, 4),
              (16, 128, 4), (64, 256, 8), (16, 256, 4), (32, 64, 4), (8, 128, 4)]
    return [triton.Config({"BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=2)
            for n, k, w in shapes]


def _dot_configs(kind: str) -> list[triton.Config]:
    """tl.dot tiles; FIELD_K is the K of one field's dot, the K tile is FIELD_K * 32 // W0.

    Every config here compiles without spills for widths 8, 4, 2, 2+1 and 4+2+1 on sm_90
    (python/triton_aot_check.py fails otherwise).
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "FIELD_K": FIELD_K, "GROUP_M": 8},
                              num_warps=1)]
    if kind == "splitk":
        shapes = [(16, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (16, 128, 8, 3),
                  (32, 64, 8, 3)]
    else:
        shapes = [(128, 128, 8, 3), (64, 128, 8, 3), (64, 64, 4, 3), (128, 128, 8, 4),
                  (128, 64, 8, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "FIELD_K": FIELD_K, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _tile_configs() -> list[triton.Config]:
    """``gemm_tile``'s tiles: BLOCK_K columns decoded per step (>= 32: one word of a 1-bit
    plane). python/triton_aot_check.py compiles each for sm_90 without spills."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 8},
                              num_warps=1)]
    shapes = [(128, 128, 64, 8, 3), (128, 128, 32, 8, 4), (64, 128, 64, 8, 3),
              (128, 64, 32, 4, 4)]  # 128x64x64 on 4 warps spilled 32 B at 7 bits
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8},
                          num_warps=w, num_stages=st) for m, n, k, w, st in shapes]


def _prune_tile(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (as _prune_dot)."""
    args = {**named_args, **kwargs}
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], args["M"]) and _fits(c.kwargs["BLOCK_N"], args["N"])]
    return kept or sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]


def _fits(limit: int, size: int) -> bool:
    """A block no larger than the (power-of-two rounded) problem size, minimum 16/32."""
    return limit <= max(16, next_power_of_2(size))


def gemv_fits_registers(block_m: int, block_n: int, block_k: int, widths, num_warps: int) -> bool:
    """Whether a GEMV tile stays in registers on sm_90 (the limits come from
    python/triton_aot_check.py, which fails if a kept config spills more than 16 B).

    Per thread: every plane's words on plane 0's grid plus the float32 accumulator
    [BLOCK_M, BLOCK_N, WORDS0] (live words), the accumulator alone, and the codes.
    """
    threads = 32 * num_warps
    words0 = block_n * block_k * widths[0] // 32 / threads
    planes = sum(1 for w in widths if w > 0)
    return ((planes + block_m) * words0 <= 24 and block_m * words0 <= 16
            and block_n * block_k / threads <= 64)


def _prune_gemv(configs, named_args, **kwargs):
    """Drop tiles wider than the problem or too large to stay in registers."""
    args = {**named_args, **kwargs}
    widths = (args["W0"], args["W1"], args["W2"])
    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_N"], args["N"]) and _fits(c.kwargs["BLOCK_K"] // 2, args["K"])
            and gemv_fits_registers(args["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"],
                                    widths, c.num_warps)]
    return kept or sorted(configs, key=lambda c: c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])[:1]


def x_stage_bytes(config, w0: int, x_bytes: int) -> int:
    """Shared memory of the pipelined activation tiles of a field-major ``gemm`` config:
    num_stages copies of [BLOCK_M, BLOCK_K] (the strided loads are not pipelined)."""
    block_k = config.kwargs["FIELD_K"] * 32 // w0
    return config.num_stages * config.kwargs["BLOCK_M"] * block_k * x_bytes


def _prune_dot(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem, and field-major configs whose pipelined
    activations alone pass X_STAGE_LIMIT (with the decoder's buffers they would not fit
    sm_90's 227 KB: python/triton_aot_check.py checks every kept config)."""
    args = {**named_args, **kwargs}

    def fits_smem(c):
        return not args.get("X_FIELD_MAJOR") or \
            x_stage_bytes(c, args["W0"], args["x_ptr"].element_size()) <= X_STAGE_LIMIT

    kept = [c for c in configs
            if _fits(c.kwargs["BLOCK_M"], args["M"]) and _fits(c.kwargs["BLOCK_N"], args["N"])
            and _fits(c.kwargs["FIELD_K"] * 16 // args["W0"], args["K"]) and fits_smem(c)]
    return kept or sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _k_range(K, BLOCK_K: tl.constexpr, AXIS: tl.constexpr):
    """[k_lo, k_hi) of this program's slice of K in whole BLOCK_K steps (program axis
    AXIS splits K; a split past the last block gets an empty range)."""
    per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(AXIS)) * BLOCK_K
    k_lo = tl.program_id(AXIS) * per_split
    return k_lo, tl.minimum(k_lo + per_split, K)


@triton.jit
def _field_activations(x_rows, offs_m, M, K, k0, j: tl.constexpr, FIELDS: tl.constexpr,
                       COUNT: tl.constexpr):
    """x[offs_m, k0 + w * FIELDS + j] for w < COUNT -> [BLOCK_M, COUNT], 0 past M or K.

    The activations that meet field j of COUNT words (``decode._decode_field``).
    """
    offs_k = k0 + tl.arange(0, COUNT) * FIELDS + j
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    return tl.load(x_rows + offs_k[None, :], mask=mask, other=0.0)


@triton.jit
def _field_major_activations(x_rows, offs_m, M, k0, j: tl.constexpr, COUNT: tl.constexpr):
    """x_fm[offs_m, k0 + j * COUNT + w] for w < COUNT -> [BLOCK_M, COUNT], 0 past M.

    The same activations as ``_field_activations`` from x reordered by :func:`field_major`,
    where they are contiguous (x_fm is zero-padded to whole K tiles: no K mask).
    """
    offs_k = k0 + j * COUNT + tl.arange(0, COUNT)
    return tl.load(x_rows + offs_k[None, :], mask=offs_m[:, None] < M, other=0.0)


@triton.jit
def _store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_ys, bias_ptr,
                HAS_BIAS: tl.constexpr, WRITE_PARTIAL: tl.constexpr):
    """Write acc float32 [BLOCK_M, BLOCK_N]: a float32 partial of split pid(1), or the output."""
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None] * stride_ym  # M * N may pass 2**31
    if WRITE_PARTIAL:
        y_ptrs = y_ptr + tl.program_id(1).to(tl.int64) * stride_ys + rows + offs_n[None, :]
        tl.store(y_ptrs, acc, mask=mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows + offs_n[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _output_tile(x_ptr, stride_xm, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 GROUP_M: tl.constexpr):
    """This program's output tile of the tl.dot kernels (grouped order over grid axis 0):
    offs_m [BLOCK_M], offs_n [BLOCK_N], the mask offs_n < N and x's row pointers."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # M * K may pass 2**31
    return offs_m, offs_n, offs_n < N, x_rows


@triton.jit
def _linear_gemv_kernel(x_ptr, p0_ptr, p1_ptr, p2_ptr, codebook_ptr, bias_ptr, y_ptr,
                        M, N, K, k_pad, stride_xm, stride_p0n, stride_p1n, stride_p2n,
                        stride_cbn, stride_ym, stride_ys,
                        W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                        PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        WRITE_PARTIAL: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Grid (N tiles, split_k, M tiles): y[m, n] = sum_k x[m, k] * W[n, k] in float32.

    Each K tile is decoded one field position j at a time (``_decode_field``): the weights
    of columns k0 + w * 32 // W0 + j meet the activations of those (strided) columns.
    """
    FIELDS: tl.constexpr = 32 // W0
    WORDS0: tl.constexpr = BLOCK_K * W0 // 32
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    # products accumulate elementwise; the one cross-lane reduction over WORDS0 is at the end
    acc = tl.zeros((BLOCK_M, BLOCK_N, WORDS0), dtype=tl.float32)
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm  # M * K may pass 2**31
    k_lo, k_hi = _k_range(K, BLOCK_K, 1)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words0, words1, words2 = _tile_words(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n,
                                             stride_p2n, offs_n, n_mask, k0, k_pad,
                                             W0, W1, W2, BLOCK_K)
        for j in tl.static_range(FIELDS):
            w = _decode_field(words0, words1, words2, j, codebook_ptr, stride_cbn, offs_n,
                              n_mask, W0, W1, W2, PER_CHANNEL, BLOCK_K)
            x = _field_activations(x_rows, offs_m, M, K, k0, j, FIELDS, WORDS0)
            acc += x.to(tl.float32)[:, None, :] * w[None, :, :]
    _store_tile(y_ptr, tl.sum(acc, axis=2), offs_m, offs_n, M, N, stride_ym, stride_ys, bias_ptr,
                HAS_BIAS, WRITE_PARTIAL)


@triton.jit
def _linear_gemm_kernel(x_ptr, p0_ptr, p1_ptr, p2_ptr, codebook_ptr, bias_ptr, y_ptr,
                        M, N, K, k_pad, stride_xm, stride_p0n, stride_p1n, stride_p2n,
                        stride_cbn, stride_ym, stride_ys,
                        W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                        PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        WRITE_PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                        X_FIELD_MAJOR: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, FIELD_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (M tiles * N tiles, split_k): per K tile of FIELD_K words of plane 0, one
    tl.dot per field position j of the activation columns k0 + w * 32 // W0 + j with the
    weights decoded for them (``_decode_field``). X_FIELD_MAJOR: x is ``field_major(x)``."""
    FIELDS: tl.constexpr = 32 // W0
    BLOCK_K: tl.constexpr = FIELD_K * FIELDS
    offs_m, offs_n, n_mask, x_rows = _output_tile(x_ptr, stride_xm, M, N, BLOCK_M, BLOCK_N,
                                                  GROUP_M)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_lo, k_hi = _k_range(K, BLOCK_K, 1)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        words0, words1, words2 = _tile_words(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n,
                                             stride_p2n, offs_n, n_mask, k0, k_pad,
                                             W0, W1, W2, BLOCK_K)
        for j in tl.static_range(FIELDS):
            w = _decode_field(words0, words1, words2, j, codebook_ptr, stride_cbn, offs_n,
                              n_mask, W0, W1, W2, PER_CHANNEL, BLOCK_K)
            if X_FIELD_MAJOR:
                x = _field_major_activations(x_rows, offs_m, M, k0, j, FIELD_K)
            else:
                x = _field_activations(x_rows, offs_m, M, K, k0, j, FIELDS, FIELD_K)
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=DOT_PRECISION)
    _store_tile(y_ptr, acc, offs_m, offs_n, M, N, stride_ym, stride_ys, bias_ptr,
                HAS_BIAS, WRITE_PARTIAL)


@triton.jit
def _linear_tile_gemm_kernel(x_ptr, p0_ptr, p1_ptr, p2_ptr, codebook_ptr, bias_ptr, y_ptr,
                             M, N, K, k_pad, stride_xm, stride_p0n, stride_p1n, stride_p2n,
                             stride_cbn, stride_ym, stride_ys,
                             W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                             PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                             WRITE_PARTIAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (M tiles * N tiles, 1): per K tile, the weights [BLOCK_N, BLOCK_K] of columns
    k0..k0+BLOCK_K decoded at once (``_decode_rows``), x's tile of the same columns read in
    place, one tl.dot computing yᵀ's tile [BLOCK_N, BLOCK_M] = w · xᵀ.

    The decoded weights are the dot's first operand: on sm_90 a wgmma takes that one from
    registers (the second must be in shared memory), so they are never stored to shared
    memory, and the tile's wgmmas stay in flight while the next tile is decoded (TTGIR:
    ``warp_group_dot_wait {pendings = 1}`` with triton 3.9, 3 with 3.6; as x · wᵀ every
    tile waited for its wgmma, ``pendings = 0``, before decoding the next)."""
    offs_m, offs_n, n_mask, x_rows = _output_tile(x_ptr, stride_xm, M, N, BLOCK_M, BLOCK_N,
                                                  GROUP_M)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        w = _decode_rows(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n,
                         codebook_ptr, stride_cbn, offs_n, n_mask, k0, k_pad,
                         W0, W1, W2, PER_CHANNEL, BLOCK_N, BLOCK_K)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_rows + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)
        acc = tl.dot(w.to(x.dtype), tl.trans(x), acc, input_precision=DOT_PRECISION)
    _store_tile(y_ptr, tl.trans(acc), offs_m, offs_n, M, N, stride_ym, stride_ys, bias_ptr,
                HAS_BIAS, WRITE_PARTIAL)


@triton.jit
def _splitk_reduce_kernel(ws_ptr, bias_ptr, y_ptr, numel, N, inner, SPLIT_K: tl.constexpr,
                          HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """y (dense, numel) = sum over splits of ws [SPLIT_K, numel] float32 (same element
    order), + bias.

    bias [N] runs along y's dimension of stride ``inner``: y [M, N] and a channels-last
    conv output have inner = 1, an NCHW conv output [B, N, OH, OW] inner = OH * OW.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # int64 like numel
    mask = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    ws_ptrs = ws_ptr + offs
    for _ in range(SPLIT_K):
        acc += tl.load(ws_ptrs, mask=mask, other=0.0)
        ws_ptrs += numel  # pointer steps, never an int32 s * numel
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs // inner % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


_gemv_tuned = triton.autotune(_gemv_configs(), key=["M", "N", "K", "W0", "W1", "W2"],
                              prune_configs_by={"early_config_prune": _prune_gemv})(
    _linear_gemv_kernel)
# X_FIELD_MAJOR is in the keys: its configs are pruned for shared memory, strided x's not
_splitk_tuned = triton.autotune(_dot_configs("splitk"),
                                key=["M", "N", "K", "W0", "W1", "W2", "X_FIELD_MAJOR"],
                                prune_configs_by={"early_config_prune": _prune_dot})(
    _linear_gemm_kernel)
_gemm_tuned = triton.autotune(_dot_configs("gemm"),
                              key=["M", "N", "K", "W0", "W1", "W2", "X_FIELD_MAJOR"],
                              prune_configs_by={"early_config_prune": _prune_dot})(
    _linear_gemm_kernel)
_tile_tuned = triton.autotune(_tile_configs(), key=["M", "N", "K", "W0", "W1", "W2"],
                              prune_configs_by={"early_config_prune": _prune_tile})(
    _linear_tile_gemm_kernel)


# ----------------------------------------------------------------------------- host
def choose_kernel(m: int, device: torch.device | None = None) -> str:
    """The kernel for M activation rows: gemv (M <= 8), splitk (M <= 64; splitk_fm where
    ``device``'s tuning entry says so), else gemm (gemm_tile where it says so)."""
    if m <= GEMV_MAX_M:
        return "gemv"
    if m <= SPLITK_MAX_M:
        return "splitk_fm" if _tuned(device, "triton_splitk_field_major") else "splitk"
    return "gemm_tile" if _tuned(device, "triton_gemm_tile") else "gemm"


def _tuned(device: torch.device | None, flag: str) -> bool:
    """Whether ``device``'s tuning entry sets the linear section's ``flag`` (a measured
    choice between two Triton kernels; False without a device)."""
    from ...ops import tuning_flag  # ops imports the backends

    return device is not None and tuning_flag(device, "linear", flag)


def choose_split_k(kernel: str, m: int, n: int, k: int, device: torch.device) -> int:
    """K splits so that about two waves of programs run; 1 for gemm or when N fills the GPU."""
    if kernel == "gemm":
        return 1
    tiles = cdiv(n, 64) * (cdiv(m, GEMV_MAX_M) if kernel == "gemv" else cdiv(m, 16))
    wanted = cdiv(2 * _device.sm_count(device), tiles)
    return int(max(1, min(wanted, k // 512, 32)))


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: float32 activations follow torch's TF32 switch."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def linear_triton(x: torch.Tensor, qt, bias: torch.Tensor | None = None,
                  kernel: str | None = None, split_k: int | None = None) -> torch.Tensor:
    """x [M, K] -> y [M, N] in x.dtype with the codebook weight qt [N, K].

    kernel: one of KERNELS to force it (benchmarks, tests); None picks by M.
    split_k: K splits for gemv/splitk/splitk_fm (None: enough programs to fill the GPU).
    """
    if x.dim() != 2 or x.shape[1] != qt.k:
        raise ValueError(f"linear_triton: x must be [M, {qt.k}], got {list(x.shape)}")
    kernel = kernel or choose_kernel(x.shape[0], x.device)
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {KERNELS}")
    split_k = checked_split_k(split_k)
    m, k, n = x.shape[0], qt.k, qt.n
    if x.stride(1) != 1:
        x = x.contiguous()
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:
        return y.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(y))
    gemm = kernel.startswith("gemm")
    split = 1 if gemm else (split_k or choose_split_k(kernel, m, n, k, x.device))
    bias = bias.contiguous() if bias is not None else None
    out = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else y
    if kernel in FIELD_MAJOR_KERNELS:
        note_kernel("x to field-major")
        x = field_major(x, plane_widths(qt.bits)[0])
    note_kernel(f"triton_{kernel}", split)
    _launch(kernel, x, qt, bias, out, split)
    if split > 1:
        _reduce_splits(out, bias, y)
    return y


def _launch(kernel: str, x, qt, bias, out, split: int) -> None:
    """Run ``kernel`` writing y [M, N] (split == 1) or partials [split, M, N] into ``out``
    (for FIELD_MAJOR_KERNELS x is ``field_major(x)``, wider than K)."""
    m, k, n = x.shape[0], qt.k, qt.n
    planes, strides, widths = plane_args(qt)
    book, stride_cbn, per_channel = codebook_args(qt)
    args = (x, *planes, book, bias if bias is not None else out, out,
            m, n, k, -(-k // 32) * 32, x.stride(0), *strides, stride_cbn,
            out.stride(-2), out.stride(0) if split > 1 else 0)
    flags = dict(**widths, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
                 WRITE_PARTIAL=split > 1)
    if kernel == "gemv":
        block_m = min(next_power_of_2(m), GEMV_MAX_M)
        grid = lambda meta: (cdiv(n, meta["BLOCK_N"]), split, cdiv(m, block_m))
        _gemv_tuned[grid](*args, **flags, BLOCK_M=block_m)
        return
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n, meta["BLOCK_N"]), split)
    if kernel == "gemm_tile":
        _tile_tuned[grid](*args, **flags, DOT_PRECISION=_dot_precision(x.dtype))
        return
    tuned = _splitk_tuned if kernel.startswith("splitk") else _gemm_tuned
    tuned[grid](*args, **flags, DOT_PRECISION=_dot_precision(x.dtype),
                X_FIELD_MAJOR=kernel in FIELD_MAJOR_KERNELS)


def field_major(x: torch.Tensor, w0: int) -> torch.Tensor:
    """x [M, K] -> x_fm [M, K_pad]: K zero-padded to whole K tiles of FIELD_K * 32 // w0
    columns, each tile reordered so that field position j's columns (k0 + w * 32 // w0 + j,
    w < FIELD_K) come together: x_fm[:, k0 + j * FIELD_K + w].

    >>> field_major(torch.arange(128.).view(1, 128), 4)[0, :4].tolist()
    [0.0, 8.0, 16.0, 24.0]
    """
    fields = 32 // w0
    tile = FIELD_K * fields
    m, k = x.shape
    k_pad = cdiv(k, tile) * tile
    if k_pad != k:
        x = torch.nn.functional.pad(x, (0, k_pad - k))
    return x.view(m, k_pad // tile, FIELD_K, fields).transpose(2, 3).reshape(m, k_pad)


def _reduce_splits(partials: torch.Tensor, bias, y: torch.Tensor) -> None:
    """y = partials [S, *y.shape].sum(0) + bias along y's dimension 1, in y.dtype. y is
    dense ([M, N] for linear; NCHW or channels-last [B, N, OH, OW] for conv) and every
    split of partials is laid out like it: the kernel sums flat offsets."""
    block = 64 if INTERPRET else 1024
    numel = y.numel()
    _splitk_reduce_kernel[(cdiv(numel, block),)](
        partials, bias if bias is not None else y, y, numel, y.shape[1], y.stride(1),
        SPLIT_K=partials.shape[0], HAS_BIAS=bias is not None, BLOCK=block)
