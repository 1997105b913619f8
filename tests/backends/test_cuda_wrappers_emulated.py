"""The cuda backend's Python wrappers (otq_kernels/backends/cuda.py) end to end on CPU.

The wrappers pick the kernel, size the workspaces, build the runtime layouts and pass
pointers and size lists to the extension. Only a GPU runs them otherwise. Here they run
on CPU tensors against the extension's real ``cuda_*`` bindings (csrc/bindings.cpp with
OTQ_WITH_CUDA), built over the emulated launchers (_cuda_emulation.build_bindings). The
only stand-ins are the device checks, the stream, the SM count and torch.cuda.device.
test_cuda_emulated.py checks the launchers themselves, with exactly sized buffers.
"""

import contextlib

import pytest
import torch
from _cuda_emulation import ROOT, build_bindings, compiler, load_bindings
from _triton_tolerance import assert_matches_reference, make_qt, randn

from otq_kernels import dispatch_log, ops
from otq_kernels.backends import _device, _native_args, cuda, reference
from otq_kernels.dispatch_log import record_dispatch
from otq_kernels.format import pack_codes
from otq_kernels.quantizers import ot_rows

SMS = 132  # an H100/H200's SM count, for the split-K heuristics


@pytest.fixture(scope="module")
def bindings():
    if compiler() is None:
        pytest.skip("no host C++ compiler for the CUDA emulation")
    pytest.importorskip("pybind11")
    return load_bindings(build_bindings(ROOT / "build" / "cuda_emulation"))


@pytest.fixture
def gpu(bindings, monkeypatch):
    """CPU tensors stand for CUDA ones; ``gpu(entry)`` sets the linear tuning entry."""
    check = _native_args.require_device

    def on_cpu(t, name, device_type, device=None):
        check(t, name, "cpu" if device_type == "cuda" else device_type, device)

    monkeypatch.setattr(_native_args, "require_device", on_cpu)
    monkeypatch.setattr(cuda, "require_device", on_cpu)
    monkeypatch.setattr(cuda, "native", lambda require_cuda=False: bindings)
    monkeypatch.setattr(cuda, "_stream", lambda device: 0)
    monkeypatch.setattr(_device, "sm_count", lambda device: SMS)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    tables = {}
    monkeypatch.setattr(ops, "_tuning_entry", lambda device, op, name, absent: tables.get(
        op, {}).get(name, absent))
    return lambda entry=None: tables.update(linear=entry or {})


class _Recording:
    """The bindings, recording each call's positional arguments by function name."""

    def __init__(self, module):
        self.module, self.calls = module, {}

    def __getattr__(self, name):
        fn = getattr(self.module, name)

        def recorded(*args, **kwargs):
            self.calls.setdefault(name, []).append(args)
            return fn(*args, **kwargs)

        return recorded


def check_linear(m, n, k, bits, granularity, dtype, **kwargs):
    qt = make_qt((n, k), bits, granularity, "cpu", seed=bits + n + k)
    x = randn((m, k), "cpu", dtype, seed=m)
    bias = randn((n,), "cpu", dtype, seed=n)
    y = cuda.linear(x, qt, bias, **kwargs)
    truth = reference.linear(x.double(), qt, bias.double())
    assert_matches_reference(y, reference.linear(x, qt, bias), truth, dtype)


@pytest.mark.parametrize("kwargs", [
    {"tensor_cores": False}, {"tensor_cores": True}, {"fragment": True},
    {"block_rows": 32}], ids=["gemv", "mma", "frag", "frag32"])
@pytest.mark.parametrize("m, n, k, bits, granularity, dtype", [
    (1, 40, 300, 4, "channel", torch.float16),
    (5, 33, 160, 2, "tensor", torch.bfloat16),
    (16, 24, 200, 3, "channel", torch.float16),
    (21, 17, 96, 3, "tensor", torch.float16),  # more rows than one launch: chunks
], ids=["m1-4b", "m5-2b", "m16-3b", "m21-chunks"])
def test_linear_each_kernel(gpu, kwargs, m, n, k, bits, granularity, dtype):
    gpu()
    if kwargs.get("block_rows") == 32 and granularity == "channel" and bits > 3:
        with pytest.raises(ValueError, match="2 and 3 bits"):  # two 4-bit tables: too big
            check_linear(m, n, k, bits, granularity, dtype, **kwargs)
        return
    check_linear(m, n, k, bits, granularity, dtype, **kwargs)


@pytest.mark.parametrize("kwargs, kernel", [
    ({"tensor_cores": False}, "lut_gemv"), ({"tensor_cores": True}, "lut_mma"),
    ({"fragment": True}, "lut_frag"), ({"block_rows": 32}, "lut_frag32")],
    ids=["gemv", "mma", "frag", "frag32"])
def test_dispatch_log_names_the_kernel_launched(gpu, bindings, kwargs, kernel, monkeypatch):
    """What record_dispatch notes is the kernel code that reaches the binding, with the
    split-K factor passed to it."""
    gpu()
    recording = _Recording(bindings)
    monkeypatch.setattr(cuda, "native", lambda require_cuda=False: recording)
    qt = make_qt((24, 640), 2, "tensor", "cpu")
    x = randn((5, 640), "cpu", torch.float16)
    with record_dispatch() as log:
        with dispatch_log.recorded_call("linear", "cuda", x, qt.shape, 2, 5):
            cuda.linear(x, qt, None, split_k=3, **kwargs)
    (args,) = recording.calls["cuda_lut_linear"]
    assert cuda.LINEAR_KERNELS[kernel.removeprefix("lut_")] == args[-1] and args[-4] == 3
    assert log[0].kernels == [f"{kernel} split_k=3"]


@pytest.mark.parametrize("channels_last", [False, True])
def test_dispatch_log_names_the_conv_and_its_copy_of_x(gpu, channels_last):
    gpu()
    w = make_qt((8, 8, 3, 3), 4, "channel", "cpu")
    x = randn((1, 8, 6, 6), "cpu", torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with record_dispatch() as log:
        with dispatch_log.recorded_call("conv2d", "cuda", x, w.shape, 4, 36):
            cuda.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1, split_k=1)
    assert log[0].kernels == ([] if channels_last else ["x to channels-last"]) + ["lut_conv"]


@pytest.mark.parametrize("split_k", [2, 5])
def test_linear_split_k_workspace(gpu, split_k):
    """Forced splits: the wrapper sizes the fp32 workspace for the launch's row chunk."""
    gpu()
    check_linear(11, 48, 640, 4, "channel", torch.float16, split_k=split_k, tensor_cores=True)
    check_linear(11, 48, 640, 4, "channel", torch.float32, split_k=split_k)


@pytest.mark.parametrize("split_k", [0, -1, True, 2.0])
def test_split_k_must_be_a_positive_int(gpu, split_k):
    gpu()
    qt, w = make_qt((8, 64), 4, "channel", "cpu"), make_qt((8, 8, 3, 3), 4, "channel", "cpu")
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        cuda.linear(randn((2, 64), "cpu", torch.float16), qt, None, split_k=split_k)
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        cuda.conv2d(randn((1, 8, 6, 6), "cpu", torch.float16), w, None, (1, 1), (1, 1),
                    (1, 1), 1, split_k=split_k)


def test_linear_eight_bits_and_float32(gpu):
    gpu({"cuda_tensor_cores": True, "cuda_gemv_max_m_by_bits": {"8": 1}})
    check_linear(4, 20, 260, 8, "tensor", torch.float16)   # lut_frag, 8-bit per tensor
    check_linear(4, 20, 260, 8, "channel", torch.float16)  # the GEMV
    check_linear(4, 20, 260, 4, "channel", torch.float32)  # the GEMV


@pytest.mark.parametrize("entry, want", [
    ({}, [0, 0]),
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m_by_bits": {"4": 1}}, [0, 1]),
    ({"cuda_tensor_cores": True, "cuda_mma_fragment": True}, [2, 2]),
    ({"cuda_tensor_cores": True, "cuda_mma_fragment": True, "cuda_frag_32_rows_min_m": 9},
     [2, 3]),
], ids=["gemv", "mma-above-1", "frag", "frag32-from-9"])
def test_linear_automatic_choice_runs_the_tuned_kernel(gpu, bindings, entry, want, monkeypatch):
    """tensor_cores/fragment/block_rows None: the entry picks the kernel code that reaches
    the binding, and each gives the reference's result (4-bit per tensor, M = 1 and 12)."""
    gpu(entry)
    qt = make_qt((40, 200), 4, "tensor", "cpu")
    x = randn((12, 200), "cpu", torch.float16)
    expect = reference.linear(x.double(), qt, None)
    ys = [cuda.linear(x[:m], qt, None) for m in (1, 12)]
    for y, m in zip(ys, (1, 12), strict=True):
        assert_matches_reference(y, reference.linear(x[:m], qt, None), expect[:m], torch.float16)
    recording = _Recording(bindings)
    monkeypatch.setattr(cuda, "native", lambda require_cuda=False: recording)
    for m in (1, 12):
        cuda.linear(x[:m], qt, None)
    assert [args[-1] for args in recording.calls["cuda_lut_linear"]] == want


def test_linear_fragment_layout_follows_in_place_changes(gpu):
    """The cached fragment-order copy is refreshed after the planes change in place."""
    gpu({"cuda_tensor_cores": True, "cuda_mma_fragment": True})
    qt = make_qt((24, 130), 3, "channel", "cpu")
    other = make_qt((24, 130), 3, "channel", "cpu", seed=7)
    x = randn((3, 130), "cpu", torch.float16)
    cuda.linear(x, qt, None)
    for plane, new in zip(qt.planes, other.planes, strict=True):
        plane.copy_(new)
    qt.codebook.copy_(other.codebook)
    truth = reference.linear(x.double(), other, None)
    assert_matches_reference(cuda.linear(x, qt, None), reference.linear(x, other, None), truth,
                             torch.float16)


@pytest.mark.parametrize("x_shape, w_shape, stride, padding, dilation, channels_last", [
    ((2, 12, 7, 6), (20, 12, 3, 3), (1, 1), (1, 1), (1, 1), False),
    ((1, 8, 9, 10), (16, 8, 1, 3), (2, 1), (0, 2), (1, 2), True),  # every pair asymmetric
    ((1, 16, 8, 5), (9, 16, 3, 1), (1, 2), (2, 0), (2, 1), False),
    ((1, 1, 6, 6), (8, 1, 3, 3), (1, 1), (1, 1), (1, 1), True),    # C = 1
], ids=["3x3", "1x3-asymmetric-nhwc", "3x1-asymmetric", "c1-nhwc"])
@pytest.mark.parametrize("split_k", [None, 3])
def test_conv2d(gpu, x_shape, w_shape, stride, padding, dilation, channels_last, split_k):
    """Sizes and (kh, kw, stride, padding, dilation) reach lut_conv in the bound order; y
    is laid out as x (channels-last in, channels-last out)."""
    gpu()
    w = make_qt(w_shape, 4, "channel", "cpu", seed=sum(w_shape))
    x = randn(x_shape, "cpu", torch.float16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = randn((w_shape[0],), "cpu", torch.float16)
    args = (stride, padding, dilation, 1)
    y = cuda.conv2d(x, w, bias, *args, split_k=split_k)
    truth = reference.conv2d(x.double(), w, bias.double(), *args)
    assert_matches_reference(y, reference.conv2d(x, w, bias, *args), truth, torch.float16)
    layout = torch.channels_last if channels_last and x_shape[1] > 1 else torch.contiguous_format
    assert y.is_contiguous(memory_format=layout)


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_is_bit_exact(gpu, bits, dtype):
    gpu()
    qt = make_qt((7, 3, 3, 5), bits, "channel", "cpu")
    assert torch.equal(cuda.dequantize(qt, dtype), qt.dequantize(dtype))


@pytest.mark.parametrize("bits", [2, 5, 7])
def test_pack_and_unpack(gpu, bits):
    gpu()
    codes = torch.randint(0, 2**bits, (6, 77), generator=torch.Generator().manual_seed(bits))
    planes = cuda.pack(codes, bits)
    for got, want in zip(planes, pack_codes(codes, bits), strict=True):
        assert torch.equal(got, want)
    assert torch.equal(cuda.unpack(planes, bits, 77), codes)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
def test_fit_rows(gpu, assign):
    gpu()
    rows = torch.randn(5, 300, generator=torch.Generator().manual_seed(3))
    codes, centroids = cuda.fit_rows(rows, 3, assign)
    want_codes, want_centroids = ot_rows(rows, 3, assign)
    assert torch.equal(codes, want_codes)
    torch.testing.assert_close(centroids, want_centroids, rtol=1e-6, atol=1e-6)


def _set_backend(model, backend: str) -> None:
    for module in model.modules():
        if hasattr(module, "codebook") and hasattr(module, "backend"):
            module.backend = backend


ENDS_AT_8_BITS = {"input_blocks.0.0": {"bits": 8}, "out.2": {"bits": 8}}


@pytest.mark.parametrize("backend, overrides, off_lut_conv", [
    ("cuda", {}, 0), ("auto", ENDS_AT_8_BITS, 2)], ids=["forced", "auto-8-bit-ends"])
def test_a_quantized_unet_runs_on_the_cuda_backend(gpu, bindings, backend, overrides,
                                                   off_lut_conv, monkeypatch):
    """The digits UNet (random weights: its output conv starts at zero), 4-bit per channel,
    bf16, its quantized layers on the cuda backend: lut_conv for each conv (the attention's
    pointwise Conv1d layers too) and lut_frag for the linear layers, forced, or by auto
    dispatch under a tuning that measured both faster, where the usual 8-bit first and last
    convs go on to dequant. The error against the float32 model is the reference backend's
    in bf16, within 25%."""
    import otq_kernels as otq
    from otq_kernels.models import build_model

    gpu({"cuda_tensor_cores": True, "cuda_mma_fragment": True})
    monkeypatch.setattr(cuda, "unavailable", lambda device: None)
    plan, cpu_plan = (("cuda", 0, 1024), ("dequant", 0, ops.UNLIMITED),
                      ("reference", 0, ops.UNLIMITED)), ops._auto_plan
    monkeypatch.setattr(ops, "_auto_plan", lambda op, device, bits=None, kernel=None: (
        plan if op in ("linear", "conv2d") else cpu_plan(op, device, bits)))  # (fit: CPU)
    recording = _Recording(bindings)
    monkeypatch.setattr(cuda, "native", lambda require_cuda=False: recording)
    torch.manual_seed(0)
    model = build_model("digits").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    otq.quantize_model(model, bits=4, overrides=overrides, progress=False)
    x, t = torch.randn(1, 1, 16, 16), torch.full((1,), 0.3)
    with torch.inference_mode():
        _set_backend(model, "reference")
        truth = model(x, t).double()
        model.to(torch.bfloat16)
        ref = model(x.bfloat16(), t)
        _set_backend(model, backend)
        with record_dispatch(model) as log:
            y = model(x.bfloat16(), t)
    convs = sum(isinstance(m, (otq.nn.QuantConv1d, otq.nn.QuantConv2d)) for m in model.modules())
    assert len(recording.calls["cuda_lut_conv2d"]) == convs - off_lut_conv
    assert len(recording.calls["cuda_lut_linear"]) >= 1
    # the log names each layer's path: lut_conv / lut_frag, the 8-bit ends on dequant
    on_dequant = sorted(r.layer for r in log if r.backend == "dequant")
    assert on_dequant == sorted(overrides)
    assert sum(r.kernels[-1].startswith("lut_conv") for r in log) == convs - off_lut_conv
    linear = [r for r in log if r.op == "linear"]
    assert len(linear) == len(recording.calls["cuda_lut_linear"])
    assert all(r.backend == "cuda" and r.kernels[0].startswith("lut_frag") for r in linear)

    def err(a):
        return float((a.double() - truth).norm() / truth.norm())

    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert err(y) <= 1.25 * err(ref), (err(y), err(ref))


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_conv_split_k_heuristic_reaches_the_binding(gpu, bindings, monkeypatch):
    """conv_split_k_for: two blocks per SM over (16-row blocks) x (pixel tiles of 16, or
    64 past 16 pixels), at least 8 K' groups a split, at most MAX_SPLIT_K; conv2d passes
    its value (split_k=None) to lut_conv."""
    assert cuda.conv_split_k_for(256, 49, 2304, SMS) == 9  # 16 blocks: 72 groups // 8
    assert cuda.conv_split_k_for(256, 784, 2304, SMS) == 2  # 208 blocks
    assert cuda.conv_split_k_for(256, 32, 1 << 16, SMS) == 17  # one 64-pixel tile a row block
    assert cuda.conv_split_k_for(16, 16, 1 << 20, SMS) == cuda.MAX_SPLIT_K
    assert cuda.conv_split_k_for(16, 16, 255, SMS) == 1  # 8 groups: one split
    gpu()
    recording = _Recording(bindings)
    monkeypatch.setattr(cuda, "native", lambda require_cuda=False: recording)
    w = make_qt((16, 64, 3, 3), 4, "channel", "cpu")  # K' = 576: 18 groups, 2 splits
    x = randn((1, 64, 4, 4), "cpu", torch.float16)
    y = cuda.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1)
    (args,) = recording.calls["cuda_lut_conv2d"]
    assert args[-3] == cuda.conv_split_k_for(16, 16, 576, SMS) == 2
    truth = reference.conv2d(x.double(), w, None, (1, 1), (1, 1), (1, 1), 1)
    assert_matches_reference(y, reference.conv2d(x, w, None, (1, 1), (1, 1), (1, 1), 1), truth,
                             torch.float16)


@pytest.mark.parametrize("x_shape, w_shape, padding", [
    ((1, 8, 3, 3), (16, 8, 3, 3), (0, 0)),   # a 1x1 output
    ((1, 8, 3, 5), (16, 8, 3, 5), (0, 0)),
    ((1, 8, 1, 4), (16, 8, 3, 3), (1, 0)),   # one row, two columns
])
def test_conv2d_one_pixel_wide_outputs(gpu, x_shape, w_shape, padding):
    """Outputs one pixel high or wide run (the size check refuses only empty ones)."""
    gpu()
    w = make_qt(w_shape, 4, "channel", "cpu")
    x = randn(x_shape, "cpu", torch.float16)
    args = ((1, 1), padding, (1, 1), 1)
    y = cuda.conv2d(x, w, None, *args)
    truth = reference.conv2d(x.double(), w, None, *args)
    assert_matches_reference(y, reference.conv2d(x, w, None, *args), truth, torch.float16)
    with pytest.raises(ValueError, match="too small"):
        cuda.conv2d(x[..., :2, :2], w, None, (1, 1), (0, 0), (1, 1), 1)
