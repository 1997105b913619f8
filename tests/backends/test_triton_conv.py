"""Fused Triton codebook conv2d (implicit GEMM, 1x1 via linear) against the reference backend."""

import itertools

import pytest
import torch

pytest.importorskip("triton")

from _triton_tolerance import DTYPES, assert_matches_reference, make_qt, randn  # noqa: E402

import otq_kernels as otq  # noqa: E402
from otq_kernels.backends import reference  # noqa: E402
from otq_kernels.backends.triton.conv import conv2d_triton  # noqa: E402


def check_conv(x_shape, c_out, ksize, bits, granularity, dtype, device, stride=1, padding=0,
               dilation=1, groups=1, with_bias=True, channels_last=False, **options):
    """conv2d_triton on random inputs vs the reference backend (same codes)."""
    b, c, h, w = x_shape
    qt = make_qt((c_out, c // groups, ksize, ksize), bits, granularity, device,
                 seed=bits * 10 + ksize + groups)
    x = randn(x_shape, device, dtype, seed=b + h)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bias = randn((c_out,), device, dtype, seed=3) if with_bias else None
    conv = (stride, stride), (padding, padding), (dilation, dilation), groups
    y = conv2d_triton(x, qt, bias, *conv, **options)
    truth = reference.conv2d(x.double(), qt, None if bias is None else bias.double(), *conv)
    assert_matches_reference(y, reference.conv2d(x, qt, bias, *conv), truth, dtype)
    assert y.is_contiguous(memory_format=otq.backends.conv_output_format(x))
    return y


GEOMETRIES = list(itertools.product([1, 3], [1, 2], [0, 1], [1, 2], [1, 2]))


@pytest.mark.parametrize("ksize,stride,padding,dilation,groups", GEOMETRIES)
def test_geometry_sweep(ksize, stride, padding, dilation, groups, device):
    batch = 1 + 2 * ((stride + padding + dilation) % 2)
    check_conv((batch, 4, 5, 7), 6, ksize, 3, "channel", torch.float32, device, stride,
               padding, dilation, groups, with_bias=groups == 1, kernel="implicit")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ksize,stride,padding,dilation,groups,batch",
                         [(3, 1, 1, 1, 1, 3), (3, 2, 1, 2, 2, 1), (1, 2, 0, 1, 2, 3)])
def test_geometry_half_precision(ksize, stride, padding, dilation, groups, batch, dtype, device):
    check_conv((batch, 6, 7, 5), 4, ksize, 4, "tensor", dtype, device, stride, padding,
               dilation, groups)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width(bits, granularity, dtype, device):
    check_conv((1, 5, 5, 7), 7, 3, bits, granularity, dtype, device, padding=1,
               with_bias=bits % 2 == 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", ["implicit", "linear", None])
def test_pointwise_paths(kernel, dtype, device):
    check_conv((3, 33, 5, 7), 9, 1, 5, "channel", dtype, device, kernel=kernel)


def test_more_channels_than_one_block(device):
    check_conv((1, 40, 5, 7), 38, 3, 4, "channel", torch.float32, device, padding=1, groups=2)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("split_k,groups,bits", [(2, 1, 4), (3, 1, 3), (5, 1, 2), (2, 2, 8)])
def test_split_channel_blocks(split_k, groups, bits, dtype, device):
    """Forced splits: uneven, past the last channel block (empty splits write zeros),
    grouped; float32 partials summed with the bias by the reduce kernel."""
    check_conv((2, 40 * groups, 5, 6), 6 * groups, 3, bits, "channel", dtype, device,
               padding=1, groups=groups, kernel="implicit", split_k=split_k)


@pytest.mark.parametrize("ksize,groups", [(3, 1), (3, 2), (1, 1)])
def test_nchw_copied_to_channels_last_above_the_in_place_limit(ksize, groups, device,
                                                                monkeypatch):
    """Large M takes the channels-last copy (vector loads) instead of strided NCHW reads."""
    from otq_kernels.backends.triton import conv

    monkeypatch.setattr(conv, "NCHW_IN_PLACE_MAX_M", 0)
    check_conv((2, 6, 5, 7), 4, ksize, 3, "channel", torch.float32, device, padding=ksize // 2,
               groups=groups, kernel="implicit", split_k=2)


def test_pointwise_routing():
    from otq_kernels.backends.triton import conv

    qt = make_qt((8, 16, 1, 1), 4, "channel", torch.device("cpu"))

    def route(x):
        return conv._choose_kernel(x, qt, x.shape[0] * x.shape[2] * x.shape[3], (1, 1), (0, 0), 1)

    nchw = torch.empty(1, 16, 7, 7)
    assert route(nchw) == "implicit"  # read in place: no transposing copies
    assert route(nchw.to(memory_format=torch.channels_last)) == "linear"  # NHWC view is free
    assert route(torch.empty(1, 16, 2, 2)) == "linear"  # M = 4: the GEMV
    assert route(torch.empty(64, 16, 7, 7)) == "linear"  # M = 3136: GEMM tiles on a copy
    assert conv._choose_kernel(nchw, make_qt((8, 16, 3, 3), 4, "channel", torch.device("cpu")),
                               49, (1, 1), (1, 1), 1) == "implicit"


def test_split_heuristic_fills_the_gpu(monkeypatch):
    from otq_kernels.backends import _device
    from otq_kernels.backends.triton import conv

    monkeypatch.setattr(_device, "sm_count", lambda device: 132)
    gpu = torch.device("cuda", 0)
    assert conv.choose_conv_split(49, 256, 256, 1, gpu) == 16  # 8 tiles; C / 16 caps it
    assert conv.choose_conv_split(196, 256, 256, 1, gpu) == 10  # 28 tiles -> 280 programs
    assert conv.choose_conv_split(64 * 49, 256, 256, 1, gpu) == 1  # batch 64 fills the GPU
    assert conv.choose_conv_split(49, 256, 8, 1, gpu) == 1  # less than one channel block


@pytest.mark.parametrize("split_k", [-1, 0, 2.0, True])
def test_split_k_must_be_positive(split_k, device):
    qt = make_qt((6, 4, 3, 3), 2, "tensor", device)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        conv2d_triton(randn((1, 4, 5, 5), device, torch.float32), qt, split_k=split_k)


@pytest.mark.parametrize("ksize,kernel,split_k", [(3, None, None), (3, "implicit", 3),
                                                   (1, "implicit", 2), (1, "linear", None)],
                         ids=["implicit", "implicit-split", "pointwise-split", "linear"])
def test_channels_last_input_gives_channels_last_output(ksize, kernel, split_k, device):
    """A channels-last x is read in place and y follows it (split partials laid out like y,
    bias along the channel dimension); the values match the reference either way."""
    y = check_conv((2, 20, 5, 7), 6, ksize, 3, "tensor", torch.float32, device,
                   padding=ksize // 2, channels_last=True, kernel=kernel, split_k=split_k)
    assert y.stride(1) == 1 and not y.is_contiguous()


def test_through_ops(device):
    qt = make_qt((6, 2, 3, 3), 4, "channel", device)
    x = randn((2, 4, 5, 7), device, torch.float32)
    bias = randn((6,), device, torch.float32)
    y = otq.ops.codebook_conv2d(x, qt, bias, 2, 1, 1, 2, backend="triton")
    torch.testing.assert_close(y, reference.conv2d(x, qt, bias, (2, 2), (1, 1), (1, 1), 2))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU-only machines")
def test_interpreter_refuses_bfloat16():
    """The interpreter's tl.dot multiplies bfloat16 bit patterns: the backend refuses
    bfloat16 x on CPU with a clear error, and auto runs the conv elsewhere."""
    qt = make_qt((6, 4, 3, 3), 4, "channel", "cpu")
    x, bias = randn((1, 4, 5, 7), "cpu", torch.bfloat16), randn((6,), "cpu", torch.bfloat16)
    with pytest.raises(ValueError, match="interpreter .* no bfloat16"):
        otq.ops.codebook_conv2d(x, qt, bias, 1, 1, backend="triton")
    y = otq.ops.codebook_conv2d(x, qt, bias, 1, 1)
    truth = reference.conv2d(x.double(), qt, bias.double(), (1, 1), (1, 1), (1, 1), 1)
    assert_matches_reference(y, reference.conv2d(x, qt, bias, (1, 1), (1, 1), (1, 1), 1), truth,
                             torch.bfloat16)


def test_linear_path_needs_pointwise(device):
    qt = make_qt((6, 4, 3, 3), 2, "tensor", device)
    with pytest.raises(ValueError, match="1x1"):
        conv2d_triton(randn((1, 4, 5, 5), device, torch.float32), qt, kernel="linear")


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_conv_pruning_keeps_the_tiles_the_problem_fills(monkeypatch):
    """_prune_conv on the shipped GPU tiles: BLOCK_M, BLOCK_N and BLOCK_C no larger than
    the (power-of-two rounded, at least 16) M, N and C; else the one smallest tile."""
    from otq_kernels.backends.triton import conv

    monkeypatch.setattr(conv, "INTERPRET", False)  # the GPU config list
    configs = conv._conv_configs()

    def kept(m, n, c):
        return sorted((k.kwargs["BLOCK_M"], k.kwargs["BLOCK_N"], k.kwargs["BLOCK_C"])
                      for k in conv._prune_conv(configs, {"M": m, "N": n, "C": c}))

    assert kept(49, 256, 16) == [(32, 64, 16), (64, 32, 16), (64, 64, 16), (64, 128, 16)]
    assert kept(4096, 64, 64) == [(32, 64, 16), (64, 32, 16), (64, 64, 16), (64, 64, 32),
                                  (128, 64, 16)]
    assert kept(1, 1, 1) == [(32, 64, 16)]  # none fits: the smallest


def test_unknown_conv_kernel_rejected(device):
    qt = make_qt((6, 4, 3, 3), 2, "tensor", device)
    with pytest.raises(ValueError, match="unknown conv kernel 'gemm'"):
        conv2d_triton(randn((1, 4, 5, 5), device, torch.float32), qt, kernel="gemm")


# ------------------------------------------------ pinned by a mutation campaign (session 71)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_asymmetric_geometry(channels_last, device):
    """A 3x2 kernel, stride (2, 1), padding (1, 0), dilation (1, 2) on a 7x9 image: the
    kernel body keeps h and w apart (the other tests use square kernels and one value for
    both axes: a kernel reading tap kh * KH + kw, or dil_w, stride_h or pad_h for the
    other axis, passed them)."""
    qt = make_qt((6, 4, 3, 2), 4, "channel", device, seed=5)
    x = randn((2, 4, 7, 9), device, torch.float32, seed=2)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    bias = randn((6,), device, torch.float32, seed=3)
    conv = (2, 1), (1, 0), (1, 2), 1
    y = conv2d_triton(x, qt, bias, *conv, kernel="implicit", split_k=1)
    assert y.shape == (2, 6, 4, 7)
    truth = reference.conv2d(x.double(), qt, bias.double(), *conv)
    assert_matches_reference(y, reference.conv2d(x, qt, bias, *conv), truth, torch.float32)
