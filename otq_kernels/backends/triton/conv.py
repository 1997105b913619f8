"""Fused codebook conv2d: implicit GEMM on channels-last activations, weights decoded in-kernel.

GEMM view per group g: M = B * OH * OW output pixels, N = C_out / groups output channels,
K = (C_in / groups) * KH * KW in torch's (c, kh, kw) order. The K loop walks channel
blocks of BLOCK_C and, inside, the KH * KW filter taps: each step loads an activation tile
[BLOCK_M, BLOCK_C] (zero outside the padded image; contiguous along channels from a
channels-last x, strided from an NCHW x, which is read in place up to NCHW_IN_PLACE_MAX_M
rather than copied to NHWC), decodes the matching weight tile [BLOCK_C, BLOCK_N]
(k = c * KH * KW + tap, a strided walk of the canonical order, so the decoder gathers
words; the words of one channel block stay in L1 across its taps) and accumulates with
``tl.dot`` in float32.
The output tile is stored through y's strides, y dense in ``conv_output_format(x)``: along
output pixels for NCHW, along channels for channels-last.

Small M (batch 1 at low resolution) leaves most SMs idle with long K loops (7x7 with
256 -> 256 channels: 8 tiles of 32x64, 144 steps each), so program axis 2 splits the
channel blocks (:func:`choose_conv_split`, about two waves of programs); float32 partials
[split, B, N, OH, OW] are summed, with the bias, by ``matmul._splitk_reduce_kernel``.

1x1 / stride 1 / no padding / groups 1 convs go to :func:`linear_triton` on the NHWC
view of x where that view is free or M is tiny or large (:func:`_choose_kernel`).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ...dispatch_log import note_kernel, recording
from .. import _device, checked_split_k, conv_output_format
from ._grid import cdiv, next_power_of_2
from .decode import _decode_gather, _grouped_tile, codebook_args, plane_args
from .matmul import GEMV_MAX_M, _dot_precision, _k_range, _reduce_splits, linear_triton

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
KERNELS = ("implicit", "linear")
NCHW_IN_PLACE_MAX_M = 1024  # up to this M an NCHW x is read in place (strided loads, no copy)
MIN_BLOCK_C = 16  # the smallest BLOCK_C of _conv_configs: splits <= C / 16 channel blocks
MAX_SPLIT = 32


def _conv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_C": 16, "GROUP_M": 8},
                              num_warps=1)]
    # Spill-free on sm_90 for fp16/bf16 (python/triton_aot_check.py fails otherwise):
    # the per-element word + codebook gathers cost ~4 registers a weight, so tiles stay small.
    shapes = [(128, 64, 16, 8, 3), (64, 128, 16, 8, 3), (64, 64, 32, 8, 3), (64, 64, 16, 4, 3),
              (32, 64, 16, 4, 3), (64, 32, 16, 4, 3)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_C": c, "GROUP_M": 8},
                          num_warps=w, num_stages=s) for m, n, c, w, s in shapes]


def _prune_conv(configs, named_args, **kwargs):
    """Drop tiles larger than the (power-of-two rounded) problem."""
    args = {**named_args, **kwargs}

    def fits(block, size):
        return block <= max(16, next_power_of_2(size))

    kept = [c for c in configs if fits(c.kwargs["BLOCK_M"], args["M"])
            and fits(c.kwargs["BLOCK_N"], args["N"]) and fits(c.kwargs["BLOCK_C"], args["C"])]
    return kept or sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]


@triton.autotune(_conv_configs(), key=["M", "N", "C", "KH", "KW", "W0", "W1", "W2"],
                 prune_configs_by={"early_config_prune": _prune_conv})
@triton.jit
def _conv2d_kernel(x_ptr, p0_ptr, p1_ptr, p2_ptr, codebook_ptr, bias_ptr, y_ptr,
                   M, N, C, in_h, in_w, out_h, out_w, k_pad,
                   stride_xb, stride_xh, stride_xw, stride_xc,
                   stride_p0n, stride_p1n, stride_p2n, stride_cbn,
                   stride_ys, stride_yb, stride_yc, stride_yh, stride_yw,
                   conv_stride_h, conv_stride_w, pad_h, pad_w, dil_h, dil_w,
                   W0: tl.constexpr, W1: tl.constexpr, W2: tl.constexpr,
                   PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                   GROUP_M: tl.constexpr):
    """Grid (M tiles * N tiles, groups, splits). x [B, H, W, C] by strides (channel stride
    1 for NHWC: vector loads; H * W for NCHW read in place); N, C are per group. Axis 2
    splits the channel blocks; with more than one split y is the float32 workspace
    [splits, B, N, OH, OW] (split stride ``stride_ys``) and HAS_BIAS is False."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    group = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = group * N + offs_n
    m_mask = offs_m < M
    n_mask = offs_n < N
    batch = (offs_m // (out_h * out_w)).to(tl.int64)  # B * H * W * C may pass 2**31
    pix = offs_m % (out_h * out_w)
    ih0 = (pix // out_w) * conv_stride_h - pad_h
    iw0 = (pix % out_w) * conv_stride_w - pad_w
    x_base = x_ptr + batch * stride_xb + group * C * stride_xc
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    c_lo, c_hi = _k_range(C, BLOCK_C, 2)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        w_mask = c_mask[:, None] & n_mask[None, :]
        for kh in range(KH):
            ih = ih0 + kh * dil_h
            h_ok = m_mask & (ih >= 0) & (ih < in_h)
            for kw in range(KW):
                iw = iw0 + kw * dil_w
                ok = h_ok & (iw >= 0) & (iw < in_w)
                a_ptrs = x_base[:, None] + (ih * stride_xh + iw * stride_xw)[:, None] \
                    + offs_c[None, :] * stride_xc
                a = tl.load(a_ptrs, mask=ok[:, None] & c_mask[None, :], other=0.0)
                cols = offs_c * (KH * KW) + (kh * KW + kw)
                w = _decode_gather(p0_ptr, p1_ptr, p2_ptr, stride_p0n, stride_p1n, stride_p2n,
                                   codebook_ptr, stride_cbn, rows[None, :], cols[:, None], w_mask,
                                   W0, W1, W2, PER_CHANNEL)
                acc = tl.dot(a, w.to(a.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    y_row = batch * stride_yb + (pix // out_w) * stride_yh + (pix % out_w) * stride_yw
    y_ptrs = y_ptr + tl.program_id(2).to(tl.int64) * stride_ys + y_row[:, None] \
        + rows[None, :] * stride_yc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _is_pointwise(qt, stride, padding, groups) -> bool:
    return tuple(qt.shape[2:]) == (1, 1) and tuple(stride) == (1, 1) \
        and tuple(padding) == (0, 0) and groups == 1


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last)


def _choose_kernel(x, qt, m, stride, padding, groups) -> str:
    """1x1 convs go to the linear kernels where x's NHWC view is free (channels-last x),
    where M is tiny (GEMV) or large (GEMM tiles); else the implicit kernel, which reads an
    NCHW x in place instead of paying two transposing copies."""
    if not _is_pointwise(qt, stride, padding, groups):
        return "implicit"
    small = GEMV_MAX_M < m <= NCHW_IN_PLACE_MAX_M
    return "implicit" if small and not _channels_last(x) else "linear"


def _activation_view(x: torch.Tensor, m: int) -> torch.Tensor:
    """x [B, C, H, W] as [B, H, W, C] for the implicit kernel: a view when x is channels-last
    or M is small (the kernel then reads NCHW in place), else a channels-last copy."""
    if _channels_last(x) or m <= NCHW_IN_PLACE_MAX_M:
        return x.permute(0, 2, 3, 1)
    return x.permute(0, 2, 3, 1).contiguous()


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def choose_conv_split(m: int, n_g: int, c_g: int, groups: int, device: torch.device) -> int:
    """Channel-block splits so that about two waves of programs run (1 when the tiles fill
    the GPU): a batch-1 UNet conv at 7x7 (M = 49, N = 256) has only 8 tiles of 32x64."""
    tiles = cdiv(m, 32) * cdiv(n_g, 64) * groups
    wanted = cdiv(2 * _device.sm_count(device), tiles)
    return int(max(1, min(wanted, c_g // MIN_BLOCK_C, MAX_SPLIT)))


def conv2d_triton(x: torch.Tensor, qt, bias: torch.Tensor | None = None, stride=1, padding=0,
                  dilation=1, groups: int = 1, kernel: str | None = None,
                  split_k: int | None = None) -> torch.Tensor:
    """x [B, C, H, W] (any strides) -> y [B, N, OH, OW] in x.dtype, dense in
    ``conv_output_format(x)`` (channels-last for a channels-last x, else NCHW).

    qt: codebook weight [N, C / groups, KH, KW]. kernel: "implicit" or "linear" to force
    a path ("linear" only for 1x1 / stride 1 / no padding / groups 1); None picks.
    split_k: splits of the implicit GEMM's channel blocks (float32 partials summed by a
    second kernel); None = :func:`choose_conv_split`.
    """
    stride, padding, dilation = _pair(stride), _pair(padding), _pair(dilation)
    n_out, c_g, kh, kw = qt.shape
    b, c_in, h, w = x.shape
    if c_in != c_g * groups or n_out % groups:
        raise ValueError(f"conv2d_triton: x {list(x.shape)} does not match weight "
                         f"{list(qt.shape)} with groups={groups}")
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    m = b * oh * ow
    out_format = conv_output_format(x)
    kernel = kernel or _choose_kernel(x, qt, m, stride, padding, groups)
    if kernel not in KERNELS:
        raise ValueError(f"unknown conv kernel {kernel!r}; choose one of {KERNELS}")
    if kernel == "linear":
        if not _is_pointwise(qt, stride, padding, groups):
            raise ValueError("kernel='linear' needs a 1x1 conv with stride 1, padding 0, groups 1")
        x_nhwc = x.permute(0, 2, 3, 1).contiguous()
        if recording() and x_nhwc.data_ptr() != x.data_ptr():  # a copy, not a view
            note_kernel("x to channels-last")
        y = linear_triton(x_nhwc.view(b * h * w, c_in), _as_matrix(qt), bias)
        return y.view(b, h, w, n_out).permute(0, 3, 1, 2).contiguous(memory_format=out_format)
    y = torch.empty(b, n_out, oh, ow, dtype=x.dtype, device=x.device, memory_format=out_format)
    if y.numel() == 0:
        return y
    x_nhwc = _activation_view(x, m)
    if recording() and x_nhwc.data_ptr() != x.data_ptr():  # a copy, not a view
        note_kernel("x to channels-last")
    split = checked_split_k(split_k) or choose_conv_split(m, n_out // groups, c_g, groups,
                                                          x.device)
    bias = bias.contiguous() if bias is not None else None
    note_kernel("triton_conv", split)
    if split == 1:
        _launch(x_nhwc, qt, bias, y, 1, stride, padding, dilation, groups)
        return y
    partials = _partials_like(y, split)
    _launch(x_nhwc, qt, None, partials, split, stride, padding, dilation, groups)
    _reduce_splits(partials, bias, y)
    return y


def _partials_like(y: torch.Tensor, split: int) -> torch.Tensor:
    """float32 [split, *y.shape] whose every split is laid out like y (NCHW or
    channels-last), so that the reduce kernel sums flat offsets."""
    b, n, oh, ow = y.shape
    if y.is_contiguous():
        return torch.empty(split, b, n, oh, ow, dtype=torch.float32, device=y.device)
    nhwc = torch.empty(split, b, oh, ow, n, dtype=torch.float32, device=y.device)
    return nhwc.permute(0, 1, 4, 2, 3)


def _as_matrix(qt):
    """The same planes and codebook viewed as a [N, K] linear weight."""
    from ...format import QuantizedTensor

    return QuantizedTensor(qt.planes, qt.codebook, qt.bits, (qt.n, qt.k), qt.granularity,
                           qt.method)


def _launch(x_nhwc, qt, bias, out, split, stride, padding, dilation, groups) -> None:
    """Run the implicit-GEMM kernel: x [B, H, W, C] (any strides) -> out = y [B, N, OH, OW]
    (any strides) when split == 1, else float32 partials [split, B, N, OH, OW] (bias None)."""
    n_out, c_g, kh, kw = qt.shape
    b, h, w, _ = x_nhwc.shape
    oh, ow = out.shape[-2:]
    m, n_g = b * oh * ow, n_out // groups
    planes, strides, widths = plane_args(qt)
    book, stride_cbn, per_channel = codebook_args(qt)
    y_strides = out.stride() if split > 1 else (0, *out.stride())
    grid = lambda meta: (cdiv(m, meta["BLOCK_M"]) * cdiv(n_g, meta["BLOCK_N"]),
                         groups, split)
    _conv2d_kernel[grid](
        x_nhwc, *planes, book, bias if bias is not None else out, out,
        m, n_g, c_g, h, w, oh, ow, -(-qt.k // 32) * 32,
        *x_nhwc.stride(),
        *strides, stride_cbn, *y_strides, *stride, *padding, *dilation,
        **widths, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
        DOT_PRECISION=_dot_precision(x_nhwc.dtype), KH=kh, KW=kw)
