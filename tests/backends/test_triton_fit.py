"""Fused Triton equal-mass binning and the torch.sort path against quantizers.ot_rows."""

import pytest
import torch

pytest.importorskip("triton")

import otq_kernels as otq  # noqa: E402
from otq_kernels.backends.triton.fit import (  # noqa: E402
    fit_rows_torch_sort,
    fit_rows_triton,
)
from otq_kernels.quantizers import chunk_of_rank, ot_rows  # noqa: E402

FITTERS = {"triton": fit_rows_triton, "torch_sort": fit_rows_torch_sort}


def continuous_rows(r: int, n: int, seed: int, device) -> torch.Tensor:
    """[r, n] float32 rows with all values distinct within a row."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(r, n, generator=gen)
    for i in range(r):  # float32 draws collide now and then (n=11520, seed 11520: 3 pairs)
        while x[i].unique().numel() < n:
            x[i] = torch.randn(n, generator=gen)
    return x.to(device)


def assert_matches_reference(x, bits, assign, codes, centroids):
    ref_codes, ref_cents = ot_rows(x.double().cpu(), bits, assign)
    assert codes.dtype == torch.int64 and centroids.dtype == torch.float32
    assert centroids.shape == (x.shape[0], 2**bits)
    assert torch.equal(codes.cpu(), ref_codes)
    torch.testing.assert_close(centroids.cpu().double(), ref_cents, rtol=1e-5, atol=1e-6)


def assert_equal_mass(x, bits, codes, centroids):
    """Codes are an equal-mass split of the sorted row; centroids are the chunk means."""
    r, n = x.shape
    k = min(2**bits, n)
    sizes = torch.bincount(chunk_of_rank(n, k), minlength=k)
    x, codes, centroids = x.double().cpu(), codes.cpu(), centroids.double().cpu()
    for row in range(r):
        assert torch.equal(torch.bincount(codes[row], minlength=k), sizes)
        means = torch.stack([x[row][codes[row] == c].mean() for c in range(k)])
        torch.testing.assert_close(centroids[row, :k], means, rtol=1e-5, atol=1e-6)
        for c in range(k - 1):
            assert x[row][codes[row] == c].max() <= x[row][codes[row] == c + 1].min()
        assert torch.equal(centroids[row, k:], centroids[row, k - 1].expand(2**bits - k))


def assert_nearest(x, codes, centroids):
    """Every code names a nearest centroid."""
    x, centroids = x.double().cpu(), centroids.double().cpu()
    dist = (x.unsqueeze(-1) - centroids.unsqueeze(1)).abs()
    chosen = dist.gather(2, codes.cpu().unsqueeze(-1)).squeeze(-1)
    assert torch.all(chosen <= dist.min(-1).values + 1e-6)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("n", [1, 3, 7, 33, 100, 128])
@pytest.mark.parametrize("bits", range(2, 9))
def test_triton_matches_ot_rows(bits, n, assign, device):
    x = continuous_rows(2, n, seed=bits * 1000 + n, device=device)
    assert_matches_reference(x, bits, assign, *fit_rows_triton(x, bits, assign))


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("n", [1, 3, 7, 33, 100, 128, 1000])
@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_torch_sort_matches_ot_rows(bits, n, assign, device):
    x = continuous_rows(3, n, seed=bits * 1000 + n, device=device)
    assert_matches_reference(x, bits, assign, *fit_rows_torch_sort(x, bits, assign))


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("fitter", FITTERS)
def test_rows_near_float32_max(fitter, assign, device):
    """A row whose fp32 chunk sums would overflow (max|x| * n > float32's max) is fitted
    scaled by a power of two: finite centroids, exactly 2**64 times those of the row scaled
    down, as ot_rows gives them; an ordinary row beside it is fitted as alone."""
    x = continuous_rows(2, 100, seed=5, device=device)
    x[0] *= torch.finfo(torch.float32).max / x[0].abs().max()
    codes, cents = FITTERS[fitter](x, 3, assign)
    assert torch.isfinite(cents).all()
    assert_matches_reference(x, 3, assign, codes, cents)
    down = x.clone()
    down[0] *= 2.0**-64
    codes_down, cents_down = FITTERS[fitter](down, 3, assign)
    assert torch.equal(codes, codes_down)
    assert torch.equal(cents[0], cents_down[0] * 2.0**64) and torch.equal(cents[1], cents_down[1])


@pytest.mark.parametrize("fitter", FITTERS)
@pytest.mark.parametrize("bits,n", [(2, 40), (3, 7), (4, 100), (8, 128)])
def test_ties_give_equal_mass_chunks(fitter, bits, n, device):
    gen = torch.Generator().manual_seed(n)
    x = torch.randint(-2, 3, (3, n), generator=gen).float() * 0.25
    x[1] = 0.7  # constant row
    x[2, ::3] = -0.0  # signed zeros tie with +0.0
    x = x.to(device)
    codes, centroids = FITTERS[fitter](x, bits, "rank")
    assert_equal_mass(x, bits, codes, centroids)
    # keys break ties by position, like the reference's stable sort
    assert torch.equal(codes.cpu(), ot_rows(x.double().cpu(), bits)[0])
    codes, centroids = FITTERS[fitter](x, bits, "nearest")
    assert_nearest(x, codes, centroids)


def test_nearest_codes_of_subnormal_and_huge_rows_are_exact(device):
    """A row of four fp32 subnormals (each its own centroid) and one near fp32's maximum:
    every value gets its own code, as in the reference (fp32 midpoints rounded the
    subnormal ones onto the upper centroid, and overflowed to inf for the huge ones)."""
    tiny = torch.finfo(torch.float32).smallest_normal * 2.0**-23
    big = torch.finfo(torch.float32).max
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.25, 0.5, 1.0]]) * torch.tensor(
        [[tiny], [big]])
    codes, centroids = fit_rows_triton(x.to(device), 2, "nearest")
    assert torch.equal(codes.cpu(), torch.arange(4).expand(2, 4))
    assert torch.equal(torch.gather(centroids.cpu(), 1, codes.cpu()), x)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter's bfloat16 (CPU)")
def test_bfloat16_subnormal_rows_fit_as_the_reference_does():
    """bfloat16 rows of subnormals on the CPU (the interpreter widened them wrongly:
    centroids 3.5x too large): the same codes and centroids as the reference."""
    from otq_kernels import ops

    x = (torch.tensor([[1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 34.0]]) * 1e-39).bfloat16()
    for assign in ("rank", "nearest"):
        got = ops.fit_rows(x, 2, "ot", assign, backend="triton")
        want = ops.fit_rows(x, 2, "ot", assign, backend="reference")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("rows,n,row_tile", [(5, 7, 2048), (3, 33, 32), (9, 20, 64)])
def test_row_tiling_and_masked_rows(rows, n, row_tile, device):
    x = continuous_rows(rows, n, seed=rows + n, device=device)
    codes, centroids = fit_rows_triton(x, 4, row_tile=row_tile)
    assert_matches_reference(x, 4, "rank", codes, centroids)


def test_long_rows_fall_back_to_torch_sort(device):
    x = continuous_rows(2, 300, seed=3, device=device)
    codes, centroids = fit_rows_triton(x, 5, "nearest", max_n=256)
    assert_matches_reference(x, 5, "nearest", codes, centroids)


@pytest.mark.parametrize("assign", ["rank", "nearest"])
@pytest.mark.parametrize("bits,n", [(3, 40), (8, 100)])
def test_half_rows_use_int32_keys(bits, n, assign, device):
    """fp16 rows (int32 sort keys), with ties and signed zeros; strided input."""
    x = continuous_rows(n, 3, seed=n, device=device).t().half()  # [3, n], non-contiguous
    x[0, ::4] = 0.0
    x[1, 1::5] = -0.0
    codes, centroids = fit_rows_triton(x, bits, assign)
    assert_matches_reference(x, bits, assign, codes, centroids)
    if assign == "rank":
        assert_equal_mass(x, bits, codes, centroids)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_long_rows_on_gpu(dtype):
    """Blocks of 4096 and 16384 (the H100 target's 11520-value rows) compile and match.

    max_n=16384 forces the fused kernel past the default MAX_N (4096) for float32, so the
    GPU shows whether the big block compiles (or falls back on OutOfResources) and is
    right; one such variant takes ~45 s to compile on a 2-core CPU, so the 16-bit dtypes
    take the default (torch.sort for 11520) to keep the cuda step short.
    """
    max_n = 16384 if dtype == torch.float32 else None
    for n in (4096, 11520):
        x = continuous_rows(3, n, seed=n, device=torch.device("cuda")).to(dtype)
        for assign in ("rank", "nearest"):
            codes, centroids = fit_rows_triton(x, 8, assign, max_n=max_n)
            ref_codes, ref_cents = ot_rows(x.double(), 8, assign)
            if assign == "rank":
                assert torch.equal(codes, ref_codes)
            assert (codes != ref_codes).float().mean() < 1e-3
            torch.testing.assert_close(centroids.double(), ref_cents, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fitter", FITTERS)
def test_empty_rows(fitter, device):
    codes, centroids = FITTERS[fitter](torch.zeros(0, 9, device=device), 3)
    assert codes.shape == (0, 9) and centroids.shape == (0, 8)


def test_bad_arguments(device):
    x = continuous_rows(1, 4, seed=0, device=device)
    with pytest.raises(ValueError):
        fit_rows_triton(x, 3, "median")
    with pytest.raises(ValueError):
        fit_rows_triton(x, 1)
    with pytest.raises(ValueError):
        fit_rows_torch_sort(x.long(), 3)


@pytest.mark.parametrize("shape,granularity", [((6, 2, 3, 3), "channel"), ((4, 20), "tensor"),
                                               ((50,), "tensor")])
def test_fit_codebook_end_to_end(shape, granularity, device, spy):
    gen = torch.Generator().manual_seed(len(shape))
    w = torch.randn(shape, generator=gen).to(device)
    calls = spy(otq.backends.get("triton"), "fit_rows")
    got = otq.fit_codebook(w, bits=4, granularity=granularity, backend="triton")
    assert len(calls) == 1
    ref = otq.fit_codebook(w, bits=4, granularity=granularity, backend="reference")
    assert got.granularity == ref.granularity and got.shape == ref.shape
    assert torch.equal(otq.unpack_codes(got).cpu(), otq.unpack_codes(ref).cpu())
    torch.testing.assert_close(got.codebook.cpu(), ref.codebook.cpu(), rtol=1e-5, atol=1e-6)
