"""The hand-written CUDA backend (csrc/cuda) against format.py, ot_rows and reference.

Every test needs a GPU and an extension built with its CUDA sources (OTQ_WITH_CUDA).
"""

import pytest
import torch

import otq_kernels as otq
from otq_kernels.backends import reference
from otq_kernels.format import pack_codes
from otq_kernels.quantizers import ot_rows

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


@pytest.fixture(scope="module")
def cuda_backend():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from otq_kernels.backends import cuda

    reason = cuda.unavailable(torch.device("cuda"))
    if reason:
        pytest.skip(reason)
    return cuda


def make_qt(n: int, k: int, bits: int, granularity: str, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    return otq.fit_codebook(w, bits=bits, granularity=granularity,
                            backend="reference").to("cuda")


def rel_err(y: torch.Tensor, truth: torch.Tensor) -> float:
    return float((y.double() - truth).norm() / truth.norm().clamp_min(1e-30))


def check_linear(cuda, m, n, k, bits, granularity, dtype, with_bias, split_k=None,
                 tensor_cores=False, fragment=False, block_rows=None):
    """Within 2x the reference's own error in ``dtype`` (vs float64), plus one roundoff."""
    qt = make_qt(n, k, bits, granularity, seed=bits * 1000 + n + k)
    check_linear_qt(cuda, qt, m, dtype, with_bias, split_k, seed=m, tensor_cores=tensor_cores,
                    fragment=fragment, block_rows=block_rows)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_every_bit_width(cuda_backend, bits, granularity, dtype):
    for m in (1, 2, 3, 7):
        for with_bias in (False, True):
            check_linear(cuda_backend, m, 33, 127, bits, granularity, dtype, with_bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_linear_one_row_long_k(cuda_backend, bits, granularity, dtype):
    """M = 1 (the one-row kernels, which load a step ahead) over 4099 columns: 129 groups,
    several steps per lane, a partial last group; heuristic, none and an uneven split."""
    for split_k in (None, 1, 3):
        check_linear(cuda_backend, 1, 70, 4099, bits, granularity, dtype, True, split_k)


@pytest.mark.parametrize("fragment", [False, True], ids=["canonical", "fragment"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mma_kernel_every_bit_width(cuda_backend, bits, granularity, dtype, fragment):
    """The tensor-core kernels (lut_mma.cu; lut_frag.cu on fragment-order codes) on the
    GPU: M 1..20, K tails, split-K, and long K (whole groups in load-ahead chunks plus a
    remainder: 5000 columns, 39 groups a warp)."""
    for m, n, k, split_k in ((1, 33, 127, None), (3, 16, 4096, None), (9, 257, 300, 3),
                             (20, 40, 512, None), (16, 70, 5000, 1), (5, 40, 5000, 2)):
        check_linear(cuda_backend, m, n, k, bits, granularity, dtype, True, split_k,
                     tensor_cores=True, fragment=fragment)


@pytest.mark.parametrize("fragment", [False, True], ids=["canonical", "fragment"])
def test_mma_kernel_large_layer(cuda_backend, fragment):
    qt = random_qt(14336, 4096, 4, "channel", seed=3)
    check_linear_qt(cuda_backend, qt, 1, torch.float16, True, tensor_cores=True,
                    fragment=fragment)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fragment_kernel_eight_bits_per_tensor(cuda_backend, dtype):
    """8-bit codes with one codebook per layer on the fragment-order kernel (a table of
    single entries); per-channel 8-bit codes are refused with a clear error."""
    for m, n, k, split_k in ((1, 33, 127, None), (3, 16, 4096, None), (9, 257, 300, 3),
                             (16, 70, 5000, 1), (20, 40, 512, None)):
        check_linear(cuda_backend, m, n, k, 8, "tensor", dtype, True, split_k,
                     tensor_cores=True, fragment=True)
    with pytest.raises(ValueError, match="per-tensor codebook"):
        check_linear(cuda_backend, 1, 8, 64, 8, "channel", dtype, False, tensor_cores=True,
                     fragment=True)
    assert cuda_backend.linear_kernel(dtype, 8, 2, torch.device("cuda"), False,
                                      tensor_cores=True) in ("frag", "frag32")
    check_linear(cuda_backend, 2, 24, 256, 8, "tensor", dtype, False, tensor_cores=True,
                 fragment=None)  # (tensor_cores alone: 8 bits take lut_frag)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bits,granularity", [(2, "tensor"), (2, "channel"), (3, "tensor"),
                                              (3, "channel"), (4, "tensor"), (8, "tensor")],
                         ids=str)
def test_fragment_kernel_32_row_blocks(cuda_backend, bits, granularity, dtype):
    """lut_frag.cu in blocks of 32 weight rows (two row blocks per warp sharing x): a
    partial second row block (33, 40 rows), K tails, splits, long K, M 1..20, and a
    2048 x 8192 layer."""
    for m, n, k, split_k in ((1, 33, 127, None), (3, 16, 4096, None), (9, 257, 300, 3),
                             (20, 40, 512, None), (16, 70, 5000, 1), (5, 40, 5000, 2)):
        check_linear(cuda_backend, m, n, k, bits, granularity, dtype, True, split_k,
                     fragment=True, block_rows=32)
    if dtype == torch.float16:  # 64 blocks of 32 rows, 64 spans: the heuristic's split
        qt = random_qt(2048, 8192, bits, granularity, seed=bits)
        check_linear_qt(cuda_backend, qt, 16, dtype, True, fragment=True, block_rows=32)


def test_fragment_kernel_32_row_blocks_refusals(cuda_backend):
    """The codes 32-row blocks do not take, blocks off the fragment-order kernel and other
    row counts are refused with clear errors; block_rows=32 alone implies that kernel."""
    with pytest.raises(ValueError, match="2 and 3 bits"):
        check_linear(cuda_backend, 1, 40, 64, 4, "channel", torch.float16, False,
                     fragment=True, block_rows=32)
    with pytest.raises(ValueError, match="fragment"):
        check_linear(cuda_backend, 1, 40, 64, 4, "tensor", torch.float16, False,
                     tensor_cores=True, fragment=False, block_rows=32)
    check_linear(cuda_backend, 3, 40, 64, 4, "tensor", torch.float16, True, block_rows=32)
    with pytest.raises(ValueError, match="16 or 32"):
        check_linear(cuda_backend, 1, 40, 64, 4, "tensor", torch.float16, False,
                     fragment=True, block_rows=64)


def test_fragment_layout_follows_weight_changes(cuda_backend):
    """The fragment-order codes follow an in-place write to the planes (refreshed at the
    next call); fragment=True implies the tensor-core kernel and is refused without it."""
    qt = make_qt(40, 512, 3, "channel")
    x = torch.randn(2, 512, device="cuda", dtype=torch.float16)
    first = cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=True)
    qt.planes[0].copy_(qt.planes[0].flip(0))
    got = cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=True)
    torch.testing.assert_close(
        got, cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=False))
    assert not torch.equal(got, first)
    with pytest.raises(ValueError, match="fragment"):
        cuda_backend.linear(x, qt, None, tensor_cores=False, fragment=True)
    torch.testing.assert_close(cuda_backend.linear(x, qt, None, fragment=True), got)


def test_mma_kernel_rejects_float32_and_wide_codes(cuda_backend):
    with pytest.raises(ValueError, match="tensor_cores"):
        check_linear(cuda_backend, 1, 8, 64, 4, "tensor", torch.float32, False,
                     tensor_cores=True)
    with pytest.raises(ValueError, match="tensor_cores"):
        check_linear(cuda_backend, 1, 8, 64, 5, "tensor", torch.float16, False,
                     tensor_cores=True)


@pytest.mark.parametrize("n,k", [(1, 1), (7, 33), (17, 1000), (130, 7), (257, 4099)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_odd_shapes(cuda_backend, n, k, dtype):
    check_linear(cuda_backend, 3, n, k, 5, "channel", dtype, True)


@pytest.mark.parametrize("split_k", [1, 2, 3, 64])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_linear_split_k(cuda_backend, split_k, granularity):
    check_linear(cuda_backend, 2, 45, 3000, 4, granularity, torch.float16, True, split_k)


@pytest.mark.parametrize("m", [8, 9, 20])
def test_linear_larger_m_runs_in_chunks(cuda_backend, m):
    check_linear(cuda_backend, m, 19, 300, 3, "tensor", torch.bfloat16, True, split_k=2)


def test_linear_unaligned_activations(cuda_backend):
    qt = make_qt(9, 64, 4, "tensor")
    x = torch.randn(2, 65, device="cuda", dtype=torch.float16)[:, 1:]  # offset start
    y = cuda_backend.linear(x, qt, None)
    truth = reference.linear(x.double(), qt, None)
    assert rel_err(y, truth) <= 2 * rel_err(reference.linear(x, qt, None), truth) + 1e-3


def test_codebook_linear_op_with_cuda_backend(cuda_backend):
    qt = make_qt(40, 96, 4, "channel")
    x = torch.randn(2, 3, 96, device="cuda", dtype=torch.float16)
    y = otq.ops.codebook_linear(x, qt, backend="cuda")
    ref = otq.ops.codebook_linear(x, qt, backend="reference")
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("r,n", [(5, 1), (5, 7), (3, 33), (4, 127), (6, 1000)])
def test_fit_rows_matches_ot_rows(cuda_backend, r, n, bits, assign):
    x = torch.randn(r, n, generator=torch.Generator().manual_seed(n + bits))
    codes, centroids = cuda_backend.fit_rows(x.cuda(), bits, assign)
    ref_codes, ref_centroids = ot_rows(x.double(), bits, assign)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu(), ref_centroids.float(), rtol=1e-6, atol=1e-7)


def test_fit_rows_ties_match_stable_sort(cuda_backend):
    x = torch.randint(-3, 4, (4, 301), generator=torch.Generator().manual_seed(3)).float()
    x[:, ::7] = -0.0
    codes, centroids = cuda_backend.fit_rows(x.cuda(), 3)
    ref_codes, ref_centroids = ot_rows(x.double(), 3)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu(), ref_centroids.float())


@pytest.mark.parametrize("r,n", [(1, 300_007), (70_000, 9), (2, 2_000_003)])
def test_fit_rows_long_rows_and_batches(cuda_backend, r, n):
    """One long row (tensor granularity), more rows than a grid dimension, several batches."""
    x = torch.randn(r, n, generator=torch.Generator().manual_seed(r))
    codes, centroids = cuda_backend.fit_rows(x.cuda(), 4)
    ref_codes, ref_centroids = ot_rows(x.double(), 4)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu(), ref_centroids.float())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 7, 33, 127, 1000])
def test_pack_unpack_bit_exact(cuda_backend, bits, k):
    codes = torch.randint(0, 2**bits, (5, k), generator=torch.Generator().manual_seed(k))
    planes = cuda_backend.pack(codes.cuda(), bits)
    for got, want in zip(planes, pack_codes(codes, bits), strict=True):
        assert torch.equal(got.cpu(), want)
    assert torch.equal(cuda_backend.unpack(planes, bits, k).cpu(), codes)


def test_kernel_image_found_on_the_built_architectures():
    """On an sm_80/sm_90 GPU (setup.py's default OTQ_CUDA_ARCHS) the backend's image check
    passes: a wrong check would skip every other test of this file instead of failing."""
    from otq_kernels._native import unavailable_reason
    from otq_kernels.backends import cuda

    if not torch.cuda.is_available() or unavailable_reason(require_cuda=True):
        pytest.skip("needs a CUDA GPU and the extension's CUDA part")
    if torch.cuda.get_device_capability() not in ((8, 0), (9, 0)):
        pytest.skip("the default build has images for sm_80 and sm_90 only")
    assert cuda.unavailable(torch.device("cuda")) is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_dequantize_bit_exact(cuda_backend, bits, granularity, dtype):
    """dequant.cu against format.py over K % 8 == 0 (16-byte stores) and odd K."""
    for n, k in ((5, 72), (3, 1), (7, 33), (130, 1000)):
        qt = make_qt(n, k, bits, granularity, seed=bits + k)
        got = cuda_backend.dequantize(qt, dtype)
        assert got.shape == qt.shape and got.dtype == dtype
        assert torch.equal(got.cpu(), qt.to("cpu").dequantize(dtype))


def test_dequantize_more_than_2_31_elements(cuda_backend):
    """Output offsets past 2**31 (int64 indexing) and items past one pass of the capped
    grid (grid-stride): the last rows are right."""
    from otq_kernels.format import QuantizedTensor

    if torch.cuda.get_device_properties(0).total_memory < 16 * 2**30:
        pytest.skip("needs a GPU with 16 GiB")
    n, k, tail = 2**20 + 32, 2048, 64  # n * k = 2**31 + 65536
    plane = torch.randint(-2**31, 2**31 - 1, (n, k * 2 // 32), dtype=torch.int32,
                          device="cuda")
    book = torch.tensor([[-1.5, -0.5, 0.25, 1.0]], device="cuda")
    dense = cuda_backend.dequantize(QuantizedTensor([plane], book, 2, (n, k), "tensor"))
    last = QuantizedTensor([plane[-tail:].contiguous()], book, 2, (tail, k), "tensor")
    assert torch.equal(dense[-tail:], last.dequantize(torch.float16))


def test_dequant_path_expands_small_layers_natively(cuda_backend, monkeypatch):
    """The dequant backend takes dequant.cu up to the weight count, Triton above it."""
    from otq_kernels.backends import dequant, triton

    qt = make_qt(16, 64, 4, "channel")
    calls = []
    real = triton.dequantize_triton
    monkeypatch.setattr(triton, "dequantize_triton", lambda *a: calls.append(a) or real(*a))
    want = qt.to("cpu").dequantize(torch.float16)
    assert torch.equal(dequant.dense_weight(qt, torch.float16).cpu(), want)
    assert calls == []
    monkeypatch.setattr(cuda_backend, "NATIVE_DEQUANT_MAX_NUMEL", qt.n * qt.k - 1)
    assert cuda_backend.expands_natively(qt) is False
    assert torch.equal(dequant.dense_weight(qt, torch.float16).cpu(), want)
    assert len(calls) == 1


def test_bad_inputs_raise_value_errors(cuda_backend):
    qt = make_qt(4, 40, 3, "channel")
    with pytest.raises(ValueError, match="CUDA"):
        cuda_backend.linear(torch.randn(2, 40), qt, None)
    with pytest.raises(ValueError, match=r"x must be \[M, 40\]"):
        cuda_backend.linear(torch.randn(2, 41, device="cuda"), qt, None)
    with pytest.raises(ValueError, match="split_k"):
        cuda_backend.linear(torch.randn(2, 40, device="cuda"), qt, None, split_k=0)
    with pytest.raises(ValueError, match="NaN"):
        cuda_backend.fit_rows(torch.tensor([[0.0, float("inf")]], device="cuda"), 2)
    with pytest.raises(ValueError, match="lie in"):
        cuda_backend.pack(torch.full((2, 3), 9, device="cuda"), 3)


# ---------------------------------------------------------------- review (docs/gpu-review-cuda.md)
def random_qt(n: int, k: int, bits: int, granularity: str, seed: int = 0):
    """A QuantizedTensor from random codes and sorted random centroids, packed on the GPU."""
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    groups = 1 if granularity == "tensor" else n
    book = torch.randn(groups, 2**bits, generator=gen).sort(dim=1).values
    planes = [p.cuda() for p in pack_codes(codes, bits)]
    return otq.QuantizedTensor(planes, book.cuda(), bits, (n, k), granularity)


def check_linear_qt(cuda, qt, m, dtype, with_bias, split_k=None, seed=0, tensor_cores=False,
                    fragment=False, block_rows=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, qt.k, generator=gen).to("cuda", dtype)
    bias = torch.randn(qt.n, generator=gen).to("cuda", dtype) if with_bias else None
    y = cuda.linear(x, qt, bias, split_k=split_k, tensor_cores=tensor_cores, fragment=fragment,
                    block_rows=block_rows)
    assert y.dtype == dtype and y.shape == (m, qt.n)
    truth = reference.linear(x.double(), qt, None if bias is None else bias.double())
    ref_err = rel_err(reference.linear(x, qt, bias), truth)
    assert rel_err(y, truth) <= 2 * ref_err + FLOOR[dtype]


@pytest.mark.parametrize("split_k", [None, 2])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 5, 6, 7])
@pytest.mark.parametrize("k", [32, 64, 96, 160])
def test_linear_plane_rows_of_few_words(cuda_backend, k, bits, granularity, split_k):
    """K_pad/32 odd: 1-bit rows are 4-byte, 2-bit rows 8-byte aligned (uint2/scalar loads)."""
    for n, m in ((1, 1), (17, 9), (16, 8)):
        qt = random_qt(n, k, bits, granularity, seed=k + bits)
        check_linear_qt(cuda_backend, qt, m, torch.float16, True, split_k, seed=m)


def test_linear_on_a_side_stream(cuda_backend):
    """Kernels and the split-K fix-up run on the current (non-default) stream."""
    qt = random_qt(300, 4096, 4, "channel")
    x = torch.randn(5, 4096, device="cuda", dtype=torch.float16)
    want = cuda_backend.linear(x, qt, None, split_k=4)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = cuda_backend.linear(x, qt, None, split_k=4)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)  # split-K is deterministic


@pytest.mark.parametrize("m", [1, 9])
def test_linear_large_layer(cuda_backend, m):
    """14336 x 4096 (58.7 M weights): 64-bit offsets, many row blocks, heuristic split-K."""
    qt = random_qt(14336, 4096, 4, "channel", seed=m)
    check_linear_qt(cuda_backend, qt, m, torch.bfloat16, True)


def test_linear_split_k_beyond_grid_limit(cuda_backend):
    """A forced split_k above gridDim.y's 65535 is capped, not an error (65,600 groups)."""
    qt = random_qt(3, 65_600 * 32, 4, "tensor")
    check_linear_qt(cuda_backend, qt, 2, torch.float32, True, split_k=70_000)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("r,n", [(1, 300_007), (70_000, 9), (3, 40_000)])
def test_fit_rows_long_rows_both_assigns(cuda_backend, r, n, assign):
    x = torch.randn(r, n, generator=torch.Generator().manual_seed(r + n))
    codes, centroids = cuda_backend.fit_rows(x.cuda(), 3, assign)
    ref_codes, ref_centroids = ot_rows(x.double(), 3, assign)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu(), ref_centroids.float())


@pytest.mark.parametrize("assign", ["rank", "nearest"])
def test_fit_rows_keep_subnormal_weights(cuda_backend, assign):
    """setup.py's --use_fast_math turns plain float<->double casts into cvt.ftz, which
    flushes float32 subnormals to zero; the fit converts without it (the compile check
    reads the PTX): codes and centroids as the reference's."""
    x = torch.randn(3, 257, generator=torch.Generator().manual_seed(11)) * 1e-39
    x[0, :8] = torch.tensor([-2e-40, -1e-40, 1e-40, 2e-40] * 2)
    codes, centroids = cuda_backend.fit_rows(x.cuda(), 2, assign)
    ref_codes, ref_centroids = ot_rows(x.double(), 2, assign)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu(), ref_centroids.float(), rtol=1e-6, atol=0)


def test_fit_rows_float64_beyond_float32_range_raises(cuda_backend):
    with pytest.raises(ValueError, match="NaN"):
        cuda_backend.fit_rows(torch.tensor([[1e300, 0.0, 1.0]], device="cuda",
                                           dtype=torch.float64), 2)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_fit_codebook_through_ops_on_cuda(cuda_backend, granularity, spy):
    """otq.fit_codebook(backend="cuda") end to end: same codes as the reference backend."""
    w = torch.randn(70, 5000, generator=torch.Generator().manual_seed(7))
    calls = spy(cuda_backend, "fit_rows")
    got = otq.fit_codebook(w.cuda(), bits=3, granularity=granularity, backend="cuda")
    assert len(calls) == 1
    want = otq.fit_codebook(w, bits=3, granularity=granularity, backend="reference")
    assert torch.equal(otq.unpack_codes(got).cpu(), otq.unpack_codes(want))
    torch.testing.assert_close(got.codebook.cpu(), want.codebook)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
def test_fit_rows_ties_and_signed_zeros_in_one_long_row(cuda_backend, assign):
    """The single-row path (DeviceRadixSort, onesweep) keeps ties stable and -0.0 == +0.0."""
    x = torch.randint(-3, 4, (1, 300_001), generator=torch.Generator().manual_seed(5)).float()
    x[:, ::7] = -0.0
    codes, centroids = cuda_backend.fit_rows(x.cuda(), 4, assign)
    ref_codes, ref_centroids = ot_rows(x.double(), 4, assign)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu(), ref_centroids.float())


@pytest.mark.parametrize("fragment", [False, True], ids=["canonical", "fragment"])
def test_mma_kernel_in_a_cuda_graph(cuda_backend, fragment):
    """Capture (incl. the >48 KB shared-memory opt-in of 4-bit per-channel tables) and
    replay; the fragment-order codes are built by the warm-up call, before capture."""
    qt = random_qt(300, 1024, 4, "channel", seed=5)
    x = torch.randn(3, 1024, device="cuda", dtype=torch.float16)
    want = cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=fragment)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=fragment)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(got, cuda_backend.linear(x, qt, None, tensor_cores=True))
    assert not torch.equal(got, want)


def test_graph_reads_refreshed_fragment_layout(cuda_backend):
    """A graph captured on the fragment-order codes, the planes then changed in place: one
    call outside the graph refreshes the cached layout in place, and the replay uses it."""
    qt = random_qt(64, 512, 2, "channel", seed=11)
    other = random_qt(64, 512, 2, "channel", seed=12)
    x = torch.randn(1, 512, device="cuda", dtype=torch.float16)
    cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=True)
    for mine, theirs in zip(qt.planes, other.planes, strict=True):
        mine.copy_(theirs)
    qt.codebook.copy_(other.codebook)
    cuda_backend.linear(x, qt, None, tensor_cores=True, fragment=True)  # refreshes
    graph.replay()
    torch.testing.assert_close(got, cuda_backend.linear(x, other, None, tensor_cores=True))


def check_conv(cuda, x_shape, w_shape, bits, granularity, dtype, stride=(1, 1),
               padding=(0, 0), dilation=(1, 1), split_k=None, channels_last=False):
    """lut_conv.cu against the reference conv in ``dtype`` (vs float64), as check_linear."""
    w = torch.randn(w_shape, generator=torch.Generator().manual_seed(sum(w_shape)))
    qt = otq.fit_codebook(w, bits=bits, granularity=granularity, backend="reference").to("cuda")
    gen = torch.Generator().manual_seed(sum(x_shape))
    x = torch.randn(x_shape, generator=gen).to("cuda", dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(w_shape[0], generator=gen).to("cuda", dtype)
    args = (stride, padding, dilation, 1)
    y = cuda.conv2d(x, qt, bias, *args, split_k=split_k)
    truth = reference.conv2d(x.double(), qt, bias.double(), *args)
    assert y.dtype == dtype and y.shape == truth.shape
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last and x_shape[1] > 1
                           else torch.contiguous_format)
    ref_err = rel_err(reference.conv2d(x, qt, bias, *args), truth)
    assert rel_err(y, truth) <= 2 * ref_err + FLOOR[dtype]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("hw", [7, 14, 28], ids=lambda s: f"{s}x{s}")
def test_conv_kernel_on_the_mnist_unet_3x3_shapes(cuda_backend, hw, bits, granularity, dtype):
    """256 -> 256 3x3 convs at batch 1 (the UNet's resolutions; 7x7 splits K)."""
    check_conv(cuda_backend, (1, 256, hw, hw), (256, 256, 3, 3), bits, granularity, dtype,
               padding=(1, 1))


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,dilation,split_k,channels_last", [
    ((1, 1, 28, 28), (256, 1, 3, 3), (1, 1), (1, 1), (1, 1), None, False),  # C = 1
    ((2, 512, 14, 14), (256, 512, 1, 1), (1, 1), (0, 0), (1, 1), None, True),  # skip conv
    ((3, 24, 9, 11), (40, 24, 3, 3), (2, 2), (1, 1), (1, 1), 3, False),
    ((1, 40, 10, 10), (17, 40, 1, 3), (1, 2), (0, 2), (1, 2), 64, True),
], ids=["c1", "pointwise-512-nhwc", "stride2-split3", "1x3-dilated-split64-nhwc"])
def test_conv_kernel_odd_shapes(cuda_backend, x_shape, w_shape, stride, padding, dilation,
                                split_k, channels_last):
    check_conv(cuda_backend, x_shape, w_shape, 4, "channel", torch.float16, stride, padding,
               dilation, split_k, channels_last)


def test_conv_kernel_rejects_what_it_does_not_run(cuda_backend):
    qt = otq.fit_codebook(torch.randn(8, 4, 3, 3), bits=4, backend="reference").to("cuda")
    x = torch.randn(1, 4, 5, 5, device="cuda")
    with pytest.raises(ValueError, match="float16/bfloat16"):
        cuda_backend.conv2d(x, qt, None, (1, 1), (1, 1), (1, 1), 1)
    with pytest.raises(ValueError, match="groups=1"):
        cuda_backend.conv2d(x.half(), qt, None, (1, 1), (1, 1), (1, 1), 2)
    wide = otq.fit_codebook(torch.randn(8, 4, 3, 3), bits=8, backend="reference").to("cuda")
    with pytest.raises(ValueError, match="bits <= 4"):
        cuda_backend.conv2d(x.half(), wide, None, (1, 1), (1, 1), (1, 1), 1)
    huge = torch.empty(1, 4, 1, 1, device="cuda", dtype=torch.float16).expand(1, 4, 2**15, 2**14)
    with pytest.raises(ValueError, match="below 2\\*\\*31"):
        cuda_backend.conv2d(huge, qt, None, (1, 1), (1, 1), (1, 1), 1)


def test_conv_kernel_more_pixel_tiles_than_grid_z(cuda_backend):
    """4.4 M output pixels: 68,906 tiles of 64, launched in two parts (gridDim.z <= 65535)."""
    qt = otq.fit_codebook(torch.randn(16, 8, 1, 1), bits=4, backend="reference").to("cuda")
    x = torch.randn(1, 8, 2100, 2100, device="cuda", dtype=torch.float16)
    y = cuda_backend.conv2d(x, qt, None, (1, 1), (0, 0), (1, 1), 1)
    want = reference.conv2d(x, qt, None, (1, 1), (0, 0), (1, 1), 1)
    torch.testing.assert_close(y, want, rtol=2e-2, atol=2e-2)


def test_conv_kernel_in_a_cuda_graph_and_after_a_weight_change(cuda_backend):
    """Graph capture and replay (the tap-major layout is built before capture), then an
    in-place change of the planes rebuilds the layout (the cache keys on their versions)."""
    qt = otq.fit_codebook(torch.randn(32, 64, 3, 3), bits=4, backend="reference").to("cuda")
    x = torch.randn(1, 64, 14, 14, device="cuda", dtype=torch.float16)
    args = ((1, 1), (1, 1), (1, 1), 1)
    want = cuda_backend.conv2d(x, qt, None, *args)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = cuda_backend.conv2d(x, qt, None, *args)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(got, cuda_backend.conv2d(x, qt, None, *args))
    assert not torch.equal(got, want)
    other = otq.fit_codebook(torch.randn(32, 64, 3, 3), bits=4, backend="reference").to("cuda")
    for mine, theirs in zip(qt.planes, other.planes, strict=True):
        mine.copy_(theirs)
    qt.codebook.copy_(other.codebook)
    torch.testing.assert_close(cuda_backend.conv2d(x, qt, None, *args),
                               reference.conv2d(x, other, None, *args), rtol=2e-2, atol=2e-2)
