"""The C++ CPU backend (otq_kernels._C, csrc/cpu) against format.py, ot_rows and reference."""

import platform
import types

import numpy as np
import pytest
import torch
from _cpu_flags import cpu_flags
from hypothesis import given, settings
from hypothesis import strategies as st

import otq_kernels as otq
from otq_kernels import _native
from otq_kernels.backends import reference
from otq_kernels.format import pack_codes, unpack_planes
from otq_kernels.quantizers import ot_rows

_C = pytest.importorskip(
    "otq_kernels._C",
    reason="native extension not built: pip install --no-build-isolation -e . (make setup)",
)
from otq_kernels.backends import cpu  # noqa: E402

ODD_K = [1, 7, 33, 127, 1000]


def make_qt(n: int, k: int, bits: int, granularity: str, seed: int = 0):
    """A QuantizedTensor of a random [n, k] weight fitted by the reference quantizer."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return otq.fit_codebook(w, bits=bits, granularity=granularity, backend="reference")


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------- pack/unpack
@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 5),
       k=st.one_of(st.sampled_from(ODD_K), st.integers(1, 200)), seed=st.integers(0, 2**16))
def test_pack_unpack_bit_exact(bits, n, k, seed):
    codes = torch.randint(0, 2**bits, (n, k), generator=torch.Generator().manual_seed(seed))
    planes = cpu.pack(codes, bits)
    expect = pack_codes(codes, bits)
    assert len(planes) == len(expect)
    for got, want in zip(planes, expect, strict=True):
        assert got.dtype == torch.int32 and torch.equal(got, want)
    assert torch.equal(cpu.unpack(expect, bits, k), codes)
    assert torch.equal(unpack_planes(planes, bits, k), codes)


def test_pack_accepts_other_int_dtypes_and_views():
    codes = torch.randint(0, 8, (6, 70), dtype=torch.int32)
    view = codes[:, 3:40]  # not contiguous
    assert all(torch.equal(a, b) for a, b in
               zip(cpu.pack(view, 3), pack_codes(view, 3), strict=True))


# ----------------------------------------------------------------------------- fit_rows
@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 33, 127, 1000])
def test_fit_rows_matches_ot_rows(n, bits, assign):
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n + bits))
    codes, centroids = cpu.fit_rows(x, bits, assign)
    ref_codes, ref_centroids = ot_rows(x.double(), bits, assign)
    assert codes.dtype == torch.int64 and centroids.dtype == torch.float32
    assert centroids.shape == (5, 2**bits)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(centroids, ref_centroids.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_fit_rows_ties_match_stable_sort(dtype, assign):
    """Many equal values (and -0.0 vs +0.0): ranks follow a stable sort, as in ot_rows;
    nearest assignment (at 8 bits neighbouring chunks share a mean, so values sit exactly
    on midpoints) takes the lowest of the tied codes."""
    x = torch.randint(-3, 4, (4, 301), generator=torch.Generator().manual_seed(3)).to(dtype)
    x[:, ::7] = -0.0
    for bits in (2, 3, 8):
        codes, centroids = cpu.fit_rows(x, bits, assign)
        ref_codes, ref_centroids = ot_rows(x.double(), bits, assign)
        assert torch.equal(codes, ref_codes)
        torch.testing.assert_close(centroids, ref_centroids.float())


def test_fit_rows_tensor_granularity_long_row():
    x = torch.randn(1, 200_003, generator=torch.Generator().manual_seed(5))
    codes, centroids = cpu.fit_rows(x, 4)
    ref_codes, ref_centroids = ot_rows(x.double(), 4)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(centroids, ref_centroids.float())


def test_fit_codebook_through_ops_uses_cpu_backend(spy):
    w = torch.randn(9, 40)
    calls = spy(cpu, "fit_rows")
    a = otq.fit_codebook(w, bits=3, backend="cpu")
    assert [args[1] for args in calls] == [3]
    b = otq.fit_codebook(w, bits=3, backend="reference")
    assert len(calls) == 1
    assert torch.equal(a.codes(), b.codes())
    torch.testing.assert_close(a.codebook, b.codebook)


# ----------------------------------------------------------------------------- linear
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_matches_reference(bits, granularity):
    n, k = 33, 127
    qt = make_qt(n, k, bits, granularity, seed=bits)
    gen = torch.Generator().manual_seed(1)
    bias = torch.randn(n, generator=gen)
    for m in (1, 2, 3, 7, 16, 33):
        x = torch.randn(m, k, generator=gen)
        for b in (None, bias):
            y = cpu.linear(x, qt, b)
            assert y.shape == (m, n) and y.dtype == torch.float32
            assert rel_err(y, reference.linear(x.double(), qt, b)) < 1e-5


@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (5, 1000), (130, 7)])
def test_linear_odd_shapes(n, k):
    qt = make_qt(n, k, 5, "channel", seed=n * k)
    x = torch.randn(3, k)
    y = cpu.linear(x, qt, None)
    assert rel_err(y, reference.linear(x.double(), qt, None)) < 1e-5


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n,k", [(9, 1537), (5, 512), (4, 545)])
def test_linear_over_several_512_column_blocks(n, k, bits, granularity):
    # the AVX-512 kernel (csrc/cpu/lut_avx512.cpp) decodes 512 columns at a time
    qt = make_qt(n, k, bits, granularity, seed=n + k + bits)
    bias = torch.randn(n)
    for m in (1, 5):
        x = torch.randn(m, k)
        assert rel_err(cpu.linear(x, qt, bias), reference.linear(x.double(), qt, bias)) < 1e-5


def test_every_simd_path_matches_reference(monkeypatch):
    # OTQ_CPU_SIMD caps the path: on an AVX-512 CPU all three run here
    for bits in range(2, 9):
        for granularity in ("tensor", "channel"):
            for n, k in ((6, 1537), (5, 300)):
                qt = make_qt(n, k, bits, granularity, seed=bits * k)
                x = torch.randn(6, k)
                truth = reference.linear(x.double(), qt, None)
                for simd in cpu.SIMD_PATHS:
                    monkeypatch.setenv("OTQ_CPU_SIMD", simd)
                    assert torch.equal(cpu.dequantize(qt), qt.dequantize())
                    for m in (1, 3, 6):
                        assert rel_err(cpu.linear(x[:m], qt, None), truth[:m]) < 1e-5


def _expected_path(cap: str, m: int | None = None, k: int = 0) -> str:
    """The path of the rule in csrc/cpu (simd.h, lut_linear.cpp) on this CPU, under ``cap``:
    the widest it runs and the cap allows; for the linear (m given), one whose blocks of
    512 / 256 columns x's k fills past a quarter (m = 1) or a half (m > 1)."""
    flags = cpu_flags()
    runs = {"avx512": "avx512f" in flags, "avx2": {"avx2", "fma"} <= flags}
    allowed = cpu.SIMD_PATHS[cpu.SIMD_PATHS.index(cap):]
    for path, cols in (("avx512", 512), ("avx2", 256)):
        if runs[path] and path in allowed and (m is None or k > cols // (4 if m == 1 else 2)):
            return path
    return "none"


@pytest.mark.skipif(platform.machine() != "x86_64" or not cpu_flags(),
                    reason="the SIMD paths are x86-64 ones; the rule reads /proc/cpuinfo")
@pytest.mark.parametrize("cap", [None, *cpu.SIMD_PATHS])
def test_simd_path_is_the_widest_this_cpu_runs_and_the_cap_allows(cap, monkeypatch):
    if cap is None:
        monkeypatch.delenv("OTQ_CPU_SIMD", raising=False)
    else:
        monkeypatch.setenv("OTQ_CPU_SIMD", cap)
    assert cpu.simd_path("dequantize") == _expected_path(cap or "avx512")
    for m in (1, 2, 16):
        for k in (1, 64, 65, 128, 129, 256, 257, 4096):
            assert cpu.simd_path("linear", m, k) == _expected_path(cap or "avx512", m, k), (m, k)


def test_simd_path_refuses_bad_arguments():
    with pytest.raises(ValueError, match="op must be"):
        cpu.simd_path("conv2d")
    with pytest.raises(ValueError, match="m must be positive"):
        cpu.simd_path("linear", 0, 8)


def test_bad_simd_cap_raises(monkeypatch):
    monkeypatch.setenv("OTQ_CPU_SIMD", "sse9")
    qt = make_qt(3, 40, 4, "channel")
    with pytest.raises(ValueError, match="OTQ_CPU_SIMD"):
        cpu.linear(torch.randn(1, 40), qt, None)
    with pytest.raises(ValueError, match="OTQ_CPU_SIMD"):
        cpu.dequantize(qt)
    with pytest.raises(ValueError, match="OTQ_CPU_SIMD"):
        cpu.simd_path("dequantize")


def test_linear_holds_the_bias_memory_for_the_call(monkeypatch):
    """Another thread's ``layer.bias.data = ...`` during a call freed the memory the kernel
    read (the call passed the Parameter's pointer without holding its memory): wrong
    outputs, the size of whatever was allocated there next."""
    torch.manual_seed(0)
    layer = otq.nn.QuantLinear.from_float(torch.nn.Linear(32, 16), bits=4, backend="cpu")
    x = torch.randn(2, 32)
    want = layer(x)
    real = cpu.native()

    class SwappingBias:  # the native module, with a bias swap just before the kernel runs
        def __getattr__(self, name):
            return getattr(real, name)

        def cpu_lut_linear(self, *args):
            with torch.no_grad():
                layer.bias.data = layer.bias.data.clone()
            junk = torch.full((16,), 1000.0)  # (takes the freed memory, where it was freed)
            real.cpu_lut_linear(*args)
            del junk

    monkeypatch.setattr(cpu, "native", SwappingBias)
    assert torch.equal(layer(x), want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_half_activations_keep_dtype(dtype):
    qt = make_qt(17, 65, 4, "tensor")
    x = torch.randn(3, 65).to(dtype)
    bias = torch.randn(17).to(dtype)
    y = cpu.linear(x, qt, bias)
    assert y.dtype == dtype
    truth = reference.linear(x.double(), qt, bias.double())
    assert rel_err(y, truth) < (2e-3 if dtype == torch.float16 else 1e-2)


def test_codebook_linear_op_with_cpu_backend():
    qt = make_qt(11, 50, 3, "channel")
    x = torch.randn(2, 4, 50)
    y = otq.ops.codebook_linear(x, qt, backend="cpu")
    ref = otq.ops.codebook_linear(x, qt, backend="reference")
    assert y.shape == (2, 4, 11)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_bit_exact(bits, granularity, dtype):
    for n, k in ((1, 1), (6, 33), (4, 49), (3, 1000)):
        qt = make_qt(n, k, bits, granularity, seed=bits + k)
        out = cpu.dequantize(qt, dtype)
        assert out.dtype == dtype and torch.equal(out, qt.dequantize(dtype))


def test_dequantize_keeps_the_weight_shape_and_reads_views():
    w = torch.randn(8, 3, 3, 3)
    qt = otq.fit_codebook(w, bits=3, granularity="channel", backend="reference")
    assert torch.equal(cpu.dequantize(qt), qt.dequantize())
    wide = otq.QuantizedTensor([torch.cat([p, p], 1)[:, : p.shape[1]] for p in qt.planes],
                               qt.codebook, 3, qt.shape, "channel")  # non-contiguous planes
    assert torch.equal(cpu.dequantize(wide), qt.dequantize())


def test_dense_weight_on_cpu_uses_the_extension(monkeypatch):
    from otq_kernels.backends import dequant

    qt = make_qt(5, 40, 4, "channel")
    calls = []
    monkeypatch.setattr(cpu, "dequantize",
                        lambda q, dtype: calls.append(dtype) or q.dequantize(dtype))
    dequant.dense_weight(qt, torch.float16)
    assert calls == [torch.float16]
    monkeypatch.setattr(cpu, "unavailable", lambda device: "not built")
    assert torch.equal(dequant.dense_weight(qt, torch.float32), qt.dequantize()) and len(calls) == 1


def test_quantizing_a_layer_packs_and_expands_natively(monkeypatch):
    """Fitting packs, and the layer's stats and to_float expand, with the extension: the
    Python reference's int64 temporaries took 6-8x the layer's fp32 size each (a
    4096x4096 layer peaked near 0.6 GiB above its 64 MiB); results equal the reference's."""
    from otq_kernels import format as fmt

    torch.manual_seed(0)
    linear = torch.nn.Linear(70, 24)
    want = otq.nn.QuantLinear.from_float(linear, bits=5)
    dense = want.qweight.dequantize()

    def refuse(*args, **kwargs):
        raise AssertionError("the Python reference ran")

    monkeypatch.setattr(fmt, "pack_codes", refuse)
    monkeypatch.setattr(fmt, "unpack_planes", refuse)
    got = otq.nn.QuantLinear.from_float(linear, bits=5)
    assert all(torch.equal(a, b) for a, b in zip(got.qweight.planes, want.qweight.planes,
                                                 strict=True))
    assert got.stats == want.stats
    assert torch.equal(got.to_float().weight, dense)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequant_linear_expands_large_weights_by_row_chunks(monkeypatch, granularity, dtype):
    from otq_kernels.backends import dequant

    n, k = 10, 70
    qt = make_qt(n, k, 3, granularity)
    monkeypatch.setattr(dequant, "CPU_CHUNK_BYTES", 4 * k * 3)  # chunks of 3, 3, 3, 1 rows
    expanded = []
    dense_weight = dequant.dense_weight
    monkeypatch.setattr(dequant, "dense_weight",
                        lambda q, dt: expanded.append(q.n) or dense_weight(q, dt))
    x, bias = torch.randn(6, k).to(dtype), torch.randn(n).to(dtype)
    for b in (None, bias):
        y = dequant.linear(x, qt, b)
        assert y.dtype == dtype and y.shape == (6, n) and y.is_contiguous()
        truth = reference.linear(x.double(), qt, None if b is None else b.double())
        assert rel_err(y, truth) < (1e-6 if dtype == torch.float32 else 1e-2)
    assert expanded == [3, 3, 3, 1] * 2
    dequant.linear(x.requires_grad_(), qt, None)  # autograd keeps the whole weight
    assert expanded[-1] == n


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_value_errors():
    qt = make_qt(4, 40, 3, "channel")
    with pytest.raises(ValueError, match="bits"):
        cpu.pack(torch.zeros(2, 3, dtype=torch.int64), 9)
    with pytest.raises(ValueError, match=r"lie in \[0, 4\)"):
        cpu.pack(torch.full((2, 3), 4), 2)
    with pytest.raises(ValueError, match="integer"):
        cpu.pack(torch.zeros(2, 3), 2)
    with pytest.raises(ValueError, match="needs 2 planes"):
        cpu.unpack(qt.planes[:1], 3, 40)
    with pytest.raises(ValueError, match="int32"):
        cpu.unpack([p.to(torch.int64) for p in qt.planes], 3, 40)
    for k in (True, 0, 40.0):  # (True was taken as k = 1)
        with pytest.raises(ValueError, match="k must be a positive int"):
            cpu.unpack(qt.planes, 3, k)
    assert torch.equal(cpu.unpack(qt.planes, 3, np.int64(40)), cpu.unpack(qt.planes, 3, 40))
    with pytest.raises(ValueError, match=r"x must be \[M, 40\]"):
        cpu.linear(torch.randn(2, 41), qt, None)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        cpu.linear(torch.randn(2, 40).double(), qt, None)
    with pytest.raises(ValueError, match="bias"):
        cpu.linear(torch.randn(2, 40), qt, torch.randn(5))
    with pytest.raises(ValueError, match="NaN"):
        cpu.fit_rows(torch.tensor([[0.0, float("nan")]]), 2)
    with pytest.raises(ValueError, match="assign"):
        cpu.fit_rows(torch.randn(2, 5), 2, "closest")
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        cpu.dequantize(qt, torch.float64)
    with pytest.raises(ValueError, match="int32"):
        cpu.dequantize(otq.QuantizedTensor([p.to(torch.int64) for p in qt.planes], qt.codebook,
                                           3, qt.shape, "channel"))


def test_the_build_says_whether_it_has_cuda_kernels():
    assert _C.WITH_CUDA in (True, False)


def test_missing_extension_names_the_build_command(monkeypatch):
    monkeypatch.setattr(_native, "_load", lambda: (None, "ImportError: no module _C"))
    with pytest.raises(_native.NativeUnavailable, match="pip install --no-build-isolation -e ."):
        cpu.pack(torch.zeros(1, 4, dtype=torch.int64), 2)
    reason = cpu.unavailable(torch.device("cpu"))
    assert "ImportError" in reason and "make setup" in reason


@pytest.mark.parametrize("version", [None, _native.API_VERSION + 1])
def test_a_stale_build_is_unavailable_with_the_reason(version, monkeypatch):
    """A _C built from older sources (no API_VERSION, or another) is refused when loaded,
    so dispatch never picks it and a call says to rebuild (an AttributeError for a missing
    function deep inside before)."""
    stale = types.SimpleNamespace(cpu_pack=None, WITH_CUDA=False)
    if version is not None:
        stale.API_VERSION = version
    monkeypatch.setattr(_native, "_load", lambda: _native._checked(stale))
    with pytest.raises(_native.NativeUnavailable, match="a stale build.*make setup"):
        cpu.pack(torch.zeros(1, 4, dtype=torch.int64), 2)
    assert "stale build" in cpu.unavailable(torch.device("cpu"))


def test_pack_empty_codes_like_format():
    for shape in [(0, 5), (3, 0)]:
        codes = torch.zeros(shape, dtype=torch.int64)
        got, want = cpu.pack(codes, 3), pack_codes(codes, 3)
        assert [tuple(p.shape) for p in got] == [tuple(p.shape) for p in want]


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_the_cpu_backend_refuses_tensors_of_other_devices():
    """With the extension loaded, unavailable() is None on CPU and names the device for any
    other one (auto dispatch asks every backend; the C++ reads CPU memory only)."""
    assert cpu.unavailable(torch.device("cpu")) is None
    for device in (torch.device("cuda", 0), torch.device("meta")):
        assert cpu.unavailable(device) == f"the cpu backend runs on CPU tensors, not {device}"


def test_aligned_copies_only_a_misaligned_tensor():
    """Kernels take 128-bit loads: a 16-byte-aligned contiguous tensor is passed as it is,
    any other start is copied to an aligned clone of the same values."""
    from otq_kernels.backends._native_args import aligned

    base = torch.arange(64, dtype=torch.int32)
    for start in (0, 4, 8, 12):  # 16-byte steps
        view = base[start:]
        assert view.data_ptr() % 16 != 0 or aligned(view) is view
    assert base.data_ptr() % 16 == 0 and aligned(base) is base
    view = base[1:9]  # 4 bytes past an aligned start
    out = aligned(view)
    assert out.data_ptr() % 16 == 0 and torch.equal(out, view)


def test_require_device_given_a_device_takes_only_that_one():
    """The cuda backend passes the layer's device: a tensor elsewhere is refused even where
    its device type matches (a stand-in on CPU: the meta device given, a CPU tensor)."""
    from otq_kernels.backends._native_args import require_device

    require_device(torch.zeros(2), "x", "cpu")
    with pytest.raises(ValueError, match="cpu backend: x must be a CPU tensor on meta, got cpu"):
        require_device(torch.zeros(2), "x", "cpu", torch.device("meta"))


def test_fit_rows_refuses_rows_that_are_not_a_non_empty_matrix():
    """The backend's own check (ops.fit_rows checks before it; a direct call must not reach
    the C++ fit with them)."""
    for rows in (torch.empty(0, 8), torch.empty(3, 0), torch.randn(8), torch.randn(2, 3, 4)):
        with pytest.raises(ValueError, match=r"rows must be a non-empty 2-D \[R, n\] tensor"):
            cpu.fit_rows(rows, 3, "rank")
    with pytest.raises(ValueError, match="rows must be float16/bfloat16/float32/float64, got "
                                         "torch.int64"):
        cpu.fit_rows(torch.zeros(2, 8, dtype=torch.int64), 3, "rank")


def test_a_stale_build_says_which_bindings_it_has():
    for stale, theirs in ((types.SimpleNamespace(), "unversioned (older)"),
                          (types.SimpleNamespace(API_VERSION=0), "version 0")):
        module, why = _native._checked(stale)
        assert module is None
        assert f"its bindings are {theirs}, this code calls version {_native.API_VERSION}" in why


@pytest.mark.parametrize("with_cuda", [False, True])
def test_native_with_cuda_required_needs_a_cuda_build(with_cuda, monkeypatch):
    build = types.SimpleNamespace(API_VERSION=_native.API_VERSION, WITH_CUDA=with_cuda)
    monkeypatch.setattr(_native, "_load", lambda: _native._checked(build))
    assert _native.native() is build
    if with_cuda:
        assert _native.native(require_cuda=True) is build
        assert _native.unavailable_reason(require_cuda=True) is None
    else:
        with pytest.raises(_native.NativeUnavailable, match="built without CUDA kernels"):
            _native.native(require_cuda=True)
        assert "built without CUDA" in _native.unavailable_reason(require_cuda=True)


# ------------------------------------------------ pinned by a mutation campaign (session 71)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("assign", ["rank", "nearest"])
def test_fit_rows_one_value_apart_from_the_rest(dtype, assign):
    """A row of equal values but one (a sparse weight row): the sort's digit passes see all
    but one item in one bucket, and must still move that item."""
    x = torch.zeros(4, 50, dtype=dtype)
    x[2] = 1.0
    one_ulp_up = torch.nextafter(x[2, 7], torch.tensor(2.0, dtype=dtype))  # lowest key bit
    x[0, 0], x[1, -1], x[2, 7], x[3, 0] = 5.0, -5.0, one_ulp_up, -(2.0**-30)
    codes, centroids = cpu.fit_rows(x, 2, assign)
    ref_codes, ref_centroids = ot_rows(x.double(), 2, assign)
    assert torch.equal(codes, ref_codes)
    torch.testing.assert_close(centroids, ref_centroids.float())


def test_fit_rows_float64_means_use_the_float64_values():
    """A float64 row's chunk means are taken of its float64 values (rounded once to float32
    at the end): pairs 0.4 and 1.4 ulp(float32) above 1 + j/8 average to 0.9 ulp, which
    rounds up; the means of their float32 roundings (0 and 1 ulp) would round to even."""
    ulp = 2.0**-23
    j = torch.arange(4, dtype=torch.float64)
    x = torch.stack([1 + j / 8 + 0.4 * ulp, 1 + j / 8 + 1.4 * ulp], 1).reshape(1, 8)
    _, centroids = cpu.fit_rows(x, 2)
    assert torch.equal(centroids, ot_rows(x, 2)[1].float())
    assert torch.equal(centroids[0] - (1 + j.float() / 8), torch.full((4,), 2.0**-23))


def _native_planes(qt):
    from otq_kernels.backends._native_args import aligned

    planes = [aligned(p) for p in qt.planes]
    return planes, [p.data_ptr() for p in planes]


@pytest.mark.parametrize("simd", cpu.SIMD_PATHS)
def test_kernels_write_nothing_past_their_output(simd, monkeypatch):
    """n not a multiple of the 16-row chunks or the 4-row blocks, k not of the 8- or 16-lane
    stores: a guard after `out` / `y` keeps its values (masked stores end each row, the last
    chunk stops at row n)."""
    monkeypatch.setenv("OTQ_CPU_SIMD", simd)
    for bits in (2, 4, 7):
        n, k = 17, 45
        guard = 16 * k  # (a whole chunk of rows too many lands in it)
        qt = make_qt(n, k, bits, "channel", seed=bits)
        planes, ptrs = _native_planes(qt)
        out = torch.full((n * k + guard,), 7.0)
        _C.cpu_dequantize(ptrs, n, k, bits, qt.codebook.data_ptr(), n, out.data_ptr())
        assert torch.equal(out[: n * k].view(n, k), qt.dequantize())
        assert bool((out[n * k:] == 7.0).all())
        n, k, guard = 7, 545, 64
        qt = make_qt(n, k, bits, "channel", seed=bits)
        planes, ptrs = _native_planes(qt)
        for m in (1, 3):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = torch.full((m * n + guard,), 7.0)
            _C.cpu_lut_linear(x.data_ptr(), m, k, ptrs, bits, qt.codebook.data_ptr(), n, n, 0,
                              y.data_ptr())
            assert rel_err(y[: m * n].view(m, n), reference.linear(x.double(), qt, None)) < 1e-5
            assert bool((y[m * n:] == 7.0).all())


# each call passes pointer 1 where memory is expected: reaching the kernel would crash
NATIVE_REFUSALS = {
    "unpack-bits": (lambda: _C.cpu_unpack([1], 1, 32, 9, 1), "bits must be in 2..8"),
    "pack-null-codes": (lambda: _C.cpu_pack(0, 1, 32, 2, [1]), "null pointer"),
    "pack-planes": (lambda: _C.cpu_pack(1, 1, 32, 3, [1]), "needs 2 planes"),
    "fit_rows-no-rows": (lambda: _C.cpu_fit_rows(1, False, 0, 4, 2, False, 1, 1), "positive"),
    "dequantize-groups": (lambda: _C.cpu_dequantize([1, 1], 4, 32, 3, 1, 2, 1),
                          "groups must be 1 or n"),
    "dequantize-null-out": (lambda: _C.cpu_dequantize([1], 4, 32, 2, 1, 1, 0), "null pointer"),
    "fit_rows-row-of-2**32": (lambda: _C.cpu_fit_rows(1, False, 1, 2**32, 2, False, 1, 1),
                              r"rows longer than 2\*\*32 - 1"),
    "fit_rows-bits": (lambda: _C.cpu_fit_rows(1, False, 1, 4, 1, False, 1, 1),
                      "bits must be in 2..8, got 1"),
    "fit_rows-null-centroids": (lambda: _C.cpu_fit_rows(1, True, 1, 4, 2, True, 1, 0),
                                "centroids is a null pointer"),
    "pack-bits": (lambda: _C.cpu_pack(1, 1, 32, 9, [1, 1]), "bits must be in 2..8, got 9"),
    "unpack-null-codes": (lambda: _C.cpu_unpack([1], 1, 32, 2, 0), "codes is a null pointer"),
    "unpack-extra-plane": (lambda: _C.cpu_unpack([1, 1], 1, 32, 2, 1),
                           "bits=2 needs 1 planes, got 2"),
    "unpack-null-plane": (lambda: _C.cpu_unpack([1, 0], 1, 32, 3, 1), "plane is a null pointer"),
    "lut_linear-groups": (lambda: _C.cpu_lut_linear(1, 1, 32, [1], 2, 1, 2, 4, 0, 1),
                          "groups must be 1 or n"),
    "lut_linear-null-x": (lambda: _C.cpu_lut_linear(0, 1, 32, [1], 2, 1, 1, 4, 0, 1),
                          "x is a null pointer"),
    "lut_linear-bits": (lambda: _C.cpu_lut_linear(1, 1, 32, [1, 1], 9, 1, 1, 4, 0, 1),
                        "bits must be in 2..8, got 9"),
    "lut_linear-planes": (lambda: _C.cpu_lut_linear(1, 1, 32, [1], 3, 1, 1, 4, 0, 1),
                          "bits=3 needs 2 planes, got 1"),
    "lut_linear-null-y": (lambda: _C.cpu_lut_linear(1, 1, 32, [1], 2, 1, 1, 4, 0, 0),
                          "y is a null pointer"),
    "dequantize-planes": (lambda: _C.cpu_dequantize([1], 4, 32, 3, 1, 1, 1),
                          "bits=3 needs 2 planes, got 1"),
    "dequantize-null-codebook": (lambda: _C.cpu_dequantize([1], 4, 32, 2, 0, 1, 1),
                                 "codebook is a null pointer"),
}


@pytest.mark.parametrize("name", list(NATIVE_REFUSALS))
def test_native_entry_points_refuse_before_touching_memory(name):
    call, message = NATIVE_REFUSALS[name]
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("simd", cpu.SIMD_PATHS)
def test_linear_columns_past_k_add_nothing_whatever_entry_0_holds(simd, monkeypatch):
    """The padding columns past K decode to code 0; the SIMD kernels mask them out rather
    than trusting the zeroed activations, so an unused non-finite entry 0 cannot turn the
    output into NaN (inf * 0)."""
    monkeypatch.setenv("OTQ_CPU_SIMD", simd)
    n, bits = 5, 3
    for k in (255, 300):  # past a block's last column but one, and a span's; SIMD at m = 1, 3
        codes = torch.randint(1, 2**bits, (n, k), generator=torch.Generator().manual_seed(k))
        codebook = torch.randn(1, 2**bits, generator=torch.Generator().manual_seed(1))
        codebook[0, 0] = float("inf")
        qt = otq.QuantizedTensor(pack_codes(codes, bits), codebook, bits, (n, k), "tensor")
        for m in (1, 3):
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            y = cpu.linear(x, qt, None)
            assert rel_err(y, reference.linear(x.double(), qt, None)) < 1e-5
