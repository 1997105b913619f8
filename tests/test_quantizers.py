"""Quantizers (DESIGN §3) against independent numpy implementations written here."""

import numpy as np
import pytest
import torch

import otq_kernels as otq
from otq_kernels import quantizers as q
from otq_kernels.quantizers import fit_rows_reference

BITS = range(2, 9)


# ----------------------------------------------------------------------------- numpy oracles
def np_ot(row, bits, assign="rank"):
    k = min(2**bits, row.size)
    order = np.argsort(row, kind="stable")
    chunks = np.array_split(order, k)  # first n % k chunks are one longer
    centroids = np.array([row[c].mean() for c in chunks])
    codes = np.empty(row.size, dtype=np.int64)
    for j, c in enumerate(chunks):
        codes[c] = j
    if assign == "nearest":
        codes = np.abs(row[:, None] - centroids[None, :]).argmin(1)
    return codes, centroids


def np_lloyd(row, bits):
    codes, cents = np_ot(row, bits)
    for _ in range(50):
        new = np.abs(row[:, None] - cents[None, :]).argmin(1)
        if np.array_equal(new, codes):
            break
        codes = new
        cents = np.array([row[codes == j].mean() if (codes == j).any() else cents[j]
                          for j in range(cents.size)])
    return codes, cents


def np_uniform(row, bits):
    lo, hi = row.min(), row.max()
    s = (hi - lo) / (2**bits - 1)
    codes = np.zeros(row.size, np.int64) if s == 0 else np.round((row - lo) / s).astype(np.int64)
    return np.clip(codes, 0, 2**bits - 1), lo + np.arange(2**bits) * s


def np_piecewise(row, bits):
    k = min(2**bits, row.size)
    edges = np.quantile(row, np.linspace(0, 1, k + 1))
    codes = np.clip(np.searchsorted(edges, row, side="right") - 1, 0, k - 1)
    return codes, (edges[:-1] + edges[1:]) / 2


def np_log2(row, bits):
    k = min(2**bits, row.size)
    pos, neg = row[row > 0], -row[row < 0]
    n_pos = k // 2 if pos.size and neg.size else (k if pos.size else 0)
    levels = []
    if neg.size:
        levels += list(-(2 ** np.linspace(np.log2(neg.min()), np.log2(neg.max()), k - n_pos)))
    if pos.size:
        levels += list(2 ** np.linspace(np.log2(pos.min()), np.log2(pos.max()), n_pos))
    levels = np.sort(np.array(levels))
    return np.abs(row[:, None] - levels[None, :]).argmin(1), levels


ORACLES = {"ot": np_ot, "lloyd": np_lloyd, "uniform": np_uniform, "piecewise": np_piecewise,
           "log2": np_log2}


def _rows(r=5, n=57, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((r, n)))


# ----------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("method", otq.METHODS)
@pytest.mark.parametrize("bits", BITS)
def test_matches_numpy_oracle(method, bits):
    x = _rows(n=300 if method != "lloyd" else 120, seed=bits)
    codes, cents = fit_rows_reference(x, bits, method)
    for i, row in enumerate(x.numpy()):
        ref_codes, ref_cents = ORACLES[method](row, bits)
        used = ref_cents.size
        np.testing.assert_allclose(cents[i, :used].numpy(), ref_cents, rtol=2e-5, atol=1e-6)
        # padded levels repeat the last centroid
        assert torch.all(cents[i, used:] == cents[i, used - 1])
        np.testing.assert_array_equal(codes[i].numpy(), ref_codes)  # (no value is within
        # float64 rounding of a boundary in these rows: one code off is a bug)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ot_nearest_assignment(bits):
    x = _rows(n=200, seed=3)
    codes, cents = fit_rows_reference(x, bits, "ot", assign="nearest")
    for i, row in enumerate(x.numpy()):
        ref_codes, ref_cents = np_ot(row, bits, "nearest")
        np.testing.assert_array_equal(codes[i].numpy(), ref_codes)
        np.testing.assert_allclose(cents[i, : ref_cents.size].numpy(), ref_cents, rtol=2e-5)


@pytest.mark.parametrize("method", otq.METHODS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_centroids_ascending_and_codes_in_range(method, granularity):
    w = torch.randn(12, 3, 3, 3)
    qt = otq.fit_codebook(w, 3, method, granularity)
    assert torch.all(qt.codebook[:, 1:] >= qt.codebook[:, :-1])
    assert qt.codebook.shape == (1 if granularity == "tensor" else 12, 8)
    assert qt.dequantize().shape == w.shape


def _lloyd_all_rows_together(x, bits):
    """Lloyd-Max over all rows until none changes (the loop before rows left it one by
    one): the oracle of lloyd_rows, bit for bit."""
    k = min(2**bits, x.shape[1])
    codes, centroids = q.ot_rows(x, bits)
    centroids = centroids[:, :k]
    for _ in range(q.LLOYD_MAX_ITERS):
        new_codes = q.nearest_codes(x, centroids)
        if torch.equal(new_codes, codes):
            break
        codes, centroids = new_codes, q._cell_means(x, new_codes, centroids)
    return codes, q._pad_levels(centroids, bits)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lloyd_rows_leave_the_loop_one_by_one_with_the_same_result(bits):
    """Rows of other scales and lengths converge after different numbers of iterations;
    each leaves the loop once its codes stop changing, and every code and centroid is
    what iterating all rows together gives."""
    torch.manual_seed(bits)
    for r, n in ((1, 5), (7, 300), (256, 1024)):
        x = (torch.randn(r, n) * torch.rand(r, 1) * 3).double()
        x[0, :3] = x[0, 3]  # (ties)
        got, want = q.lloyd_rows(x, bits), _lloyd_all_rows_together(x, bits)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # a row of mixed magnitudes whose codes hold at the first iteration, while the other
    # row's change: its centroids are then its cells' means, summed in another order than
    # ot's chunk means (a row frozen at the first iteration kept ot's, a few ulps off)
    x = torch.tensor([[1.1634, 0.1520, 0.7091, 0.4072, -1.9383, -1.2799, -1.3482, 0.0602,
                       -0.2973, 1.5462, -0.4308, -0.5254],
                      [20439141.1380896, 9638077.47230351, 3278113892068.791,
                       -1444206977843.408, -138352219.99646828, -79.86725296561198,
                       -9275897.034521133, 77494926.10086201, 123690593190440.03,
                       -7698.547061117876, -99179528.05635366, 169.82459558094553]],
                     dtype=torch.float64)
    got, want = q.lloyd_rows(x, 2), _lloyd_all_rows_together(x, 2)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("method", ["ot", "lloyd", "uniform", "piecewise", "log2"])
def test_the_reference_fits_chunks_of_rows_with_the_same_result(method, monkeypatch):
    """Rows fitted a chunk at a time (the float64 temporaries of a whole layer took up to
    14x its fp32 size) give every row's codes and centroids bit for bit."""
    torch.manual_seed(1)
    x = torch.randn(300, 257) * torch.rand(300, 1) * 3
    whole = fit_rows_reference(x, 3, method)
    monkeypatch.setattr(q, "REFERENCE_CHUNK", 1000)  # (3 rows a chunk)
    chunked = fit_rows_reference(x, 3, method)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])
    assert chunked[0].dtype == torch.int64 and chunked[1].dtype == torch.float32


@pytest.mark.parametrize("bits", BITS)
def test_lloyd_never_worse_than_ot(bits):
    w = torch.randn(16, 200, dtype=torch.float64) ** 3  # heavy tails separate the two
    err = {m: (otq.fit_codebook(w, bits, m).dequantize(torch.float64) - w).pow(2).mean(1)
           for m in ("ot", "lloyd")}
    assert torch.all(err["lloyd"] <= err["ot"] * (1 + 1e-9) + 1e-15)


def test_ot_is_equal_mass():
    w = torch.randn(1, 103)
    codes = otq.unpack_codes(otq.fit_codebook(w, 3, "ot"))
    counts = torch.bincount(codes[0], minlength=8)
    assert counts.tolist() == [13, 13, 13, 13, 13, 13, 13, 12]


# ----------------------------------------------------------------------------- degenerate input
@pytest.mark.parametrize("method", otq.METHODS)
@pytest.mark.parametrize("value", [0.0, 1.5, -2.0])
def test_constant_rows_exact(method, value):
    w = torch.full((3, 40), value)
    qt = otq.fit_codebook(w, 4, method)
    assert torch.isfinite(qt.codebook).all()
    assert torch.equal(qt.dequantize(), w)


@pytest.mark.parametrize("method", ["ot", "lloyd"])
@pytest.mark.parametrize("bits", [3, 8])
def test_short_rows_exact(method, bits):
    w = torch.randn(4, 5)
    assert torch.allclose(otq.fit_codebook(w, bits, method).dequantize(), w)


@pytest.mark.parametrize("method", otq.METHODS)
def test_short_rows_finite(method):
    qt = otq.fit_codebook(torch.randn(4, 3), 8, method)
    assert torch.isfinite(qt.codebook).all() and torch.isfinite(qt.dequantize()).all()


@pytest.mark.parametrize("method", otq.METHODS)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_weights_near_float32_max(method, granularity):
    """Values up to float32's largest, whose sums overflow in float32: finite codebooks,
    and the same relative error as the same weights scaled down to ordinary values."""
    w = torch.rand(6, 50, generator=torch.Generator().manual_seed(0)) * 2 - 1
    w[0, :2] = torch.tensor([1.0, -1.0])
    big = w * torch.finfo(torch.float32).max
    qt = otq.fit_codebook(big, 3, method, granularity)
    small = otq.fit_codebook(w, 3, method, granularity)
    assert torch.isfinite(qt.codebook).all()
    err = (qt.dequantize(torch.float64) - big.double()).norm() / big.double().norm()
    small_err = (small.dequantize(torch.float64) - w.double()).norm() / w.double().norm()
    assert err == pytest.approx(float(small_err), rel=1e-3)


@pytest.mark.parametrize("bad, match", [
    (torch.tensor([[1.0, float("nan")]]), "NaN/Inf"),
    (torch.tensor([[1.0, float("inf")]]), "NaN/Inf"),
    (torch.tensor([[1.0, -1e39]], dtype=torch.float64), "beyond float32's range"),
    (torch.ones(2, 2, dtype=torch.int32), "floating-point"),
    (torch.ones(2, 2).to(torch.float8_e4m3fn), "floating-point tensor of torch.float32"),
    (torch.ones(2, 2).to_sparse(), "dense tensor, got layout torch.sparse_coo"),
    (torch.empty(0, 4), "non-empty"),
    (torch.tensor(1.0), "non-empty"),
    ([[1.0, 2.0]], "torch.Tensor"),
])
def test_bad_weights_rejected(bad, match):
    with pytest.raises(ValueError, match=match):
        otq.fit_codebook(bad, 4)


@pytest.mark.parametrize("kwargs, match", [
    ({"bits": 1}, "bits"), ({"bits": 9}, "bits"), ({"method": "kmeans"}, "method"),
    ({"granularity": "row"}, "granularity"), ({"assign": "closest"}, "assign"),
])
def test_bad_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        otq.fit_codebook(torch.randn(4, 8), **kwargs)


# ----------------------------------------------------------------------------- shapes / paper mode
@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 5), (6, 2, 3, 3), (10, 16)])
def test_any_weight_shape(shape):
    w = torch.randn(shape)
    qt = otq.fit_codebook(w, 8, "ot")
    assert qt.dequantize().shape == w.shape
    assert (qt.dequantize() - w).abs().max() < 0.1


def test_fake_quantize_state_dict_follows_seed_rules():
    sd = {
        "conv.weight": torch.randn(8, 2, 3, 3),
        "conv.bias": torch.randn(8),
        "tiny": torch.randn(3),  # fewer than 2**bits elements: untouched
        "steps": torch.tensor(7),  # integer: passes through
    }
    out = otq.fake_quantize_state_dict(sd, 3, "ot")
    assert torch.equal(out["tiny"], sd["tiny"]) and torch.equal(out["steps"], sd["steps"])
    per_row = otq.fit_codebook(sd["conv.weight"], 3, "ot", "channel").dequantize()
    assert torch.equal(out["conv.weight"], per_row)
    per_tensor = otq.fit_codebook(sd["conv.bias"], 3, "ot", "tensor").dequantize()
    assert torch.equal(out["conv.bias"], per_tensor)
    assert len(out["conv.weight"].unique()) <= 8 * 8
    uniform = otq.fake_quantize_state_dict(sd, 3, "uniform")
    assert not torch.equal(uniform["tiny"], sd["tiny"]) or sd["tiny"].unique().numel() <= 2


# ------------------------------------------------ pinned by a mutation campaign (session 69)
def test_piecewise_puts_a_value_on_an_inner_edge_in_the_upper_bin():
    """When the empirical quantiles fall on data points (n = K + 1: the edges are the
    sorted values), a value equal to an inner edge is binned by searchsorted(side='right')
    as DESIGN §3 / the seed code / numpy do: it starts the upper bin."""
    w = torch.tensor([[3.0, 0.0, 4.0, 1.0, 2.0]])
    codes, cents = q.fit_rows_reference(w, 2, "piecewise")
    assert codes[0].tolist() == [3, 0, 3, 1, 2]
    assert cents[0].tolist() == [0.5, 1.5, 2.5, 3.5]
    deq = otq.fit_codebook(w, 2, "piecewise").dequantize()
    assert deq[0].tolist() == [3.5, 0.5, 3.5, 1.5, 2.5]


def test_the_reference_fits_rows_longer_than_its_chunk(monkeypatch):
    """A row of more values than REFERENCE_CHUNK (one codebook per tensor of a layer past
    2**20 weights) is fitted one row per chunk, with the same result."""
    torch.manual_seed(0)
    x = torch.randn(3, 257)
    whole = q.fit_rows_reference(x, 3, "ot")
    monkeypatch.setattr(q, "REFERENCE_CHUNK", 100)
    part = q.fit_rows_reference(x, 3, "ot")
    assert torch.equal(whole[0], part[0]) and torch.equal(whole[1], part[1])


@pytest.mark.parametrize("method", otq.METHODS)
def test_the_reference_returns_int64_codes_and_float32_centroids(method):
    """fit_rows_reference's documented return types, on the one-chunk path too."""
    codes, cents = q.fit_rows_reference(torch.randn(4, 50), 3, method)
    assert codes.dtype == torch.int64 and cents.dtype == torch.float32


def test_fit_codebook_defaults_to_4_bits_ot_channel_rank():
    """The documented defaults (README/usage: bits=4, method "ot", granularity "channel")."""
    w = torch.randn(4, 40)
    qt = otq.fit_codebook(w)
    assert (qt.bits, qt.method, qt.granularity) == (4, "ot", "channel")
    assert torch.equal(qt.codes(), otq.fit_codebook(w, 4, "ot", "channel", "rank").codes())


def test_a_float64_weight_at_float32_max_is_accepted():
    """|w| == float32's largest value is within float32's range (only |w| beyond it is
    refused)."""
    big = torch.finfo(torch.float32).max
    w = torch.tensor([[big, -big, 0.0, 1.0]], dtype=torch.float64)
    qt = otq.fit_codebook(w, 2)
    assert torch.equal(qt.dequantize(torch.float64), w)


def test_an_unknown_assign_is_refused_for_every_method_on_the_reference_path():
    """The native CPU fit checks assign itself, which hid a missing check: on the torch
    path (backend="reference", or any method but ot) an unknown assign was ignored."""
    for method in otq.METHODS:
        with pytest.raises(ValueError, match="unknown assign 'closest'"):
            otq.fit_codebook(torch.randn(4, 8), 2, method, assign="closest", backend="reference")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fake_quantize_keeps_the_dtype(dtype):
    """fake_quantize: 'Quantize then dequantize w (same shape and dtype)'."""
    w = torch.randn(4, 3, 5).to(dtype)
    out = otq.fake_quantize(w, 3)
    assert out.dtype == dtype and out.shape == w.shape
    sd = otq.fake_quantize_state_dict({"w": w}, 3)
    assert sd["w"].dtype == dtype


def test_fake_quantize_state_dict_passes_non_float_entries_through_as_copies():
    """Integer tensors of any size and non-tensor entries pass through; tensors left
    unchanged are copies (the seed rule), never the caller's tensors."""
    idx = torch.arange(40)
    sd = {"idx": idx, "name": "unet", "n": 3, "tiny": torch.randn(3), "w": torch.randn(4, 20)}
    out = otq.fake_quantize_state_dict(sd, 3, "ot")
    assert torch.equal(out["idx"], idx) and out["name"] == "unet" and out["n"] == 3
    assert torch.equal(out["tiny"], sd["tiny"])
    for name in ("idx", "tiny"):
        assert out[name].data_ptr() != sd[name].data_ptr()
    out["tiny"].zero_()
    assert sd["tiny"].abs().sum() > 0


def test_fake_quantize_state_dict_size_threshold_is_2_to_the_bits():
    """'tensors with fewer than 2**bits elements are copied unchanged': 7 values at 3 bits
    stay, 8 are quantized (piecewise: 8 values do not map onto themselves)."""
    gen = torch.Generator().manual_seed(0)
    sd = {"seven": torch.randn(7, generator=gen), "eight": torch.randn(8, generator=gen)}
    out = otq.fake_quantize_state_dict(sd, 3, "piecewise")
    assert torch.equal(out["seven"], sd["seven"])
    want = otq.fit_codebook(sd["eight"], 3, "piecewise", "tensor").dequantize()
    assert torch.equal(out["eight"], want) and not torch.equal(out["eight"], sd["eight"])


def test_fake_quantize_state_dict_fits_2d_weights_per_output_channel():
    """A Linear weight (2-D) gets one codebook per output channel, like a conv's."""
    w = torch.randn(6, 40) * torch.linspace(0.1, 10, 6).unsqueeze(1)
    out = otq.fake_quantize_state_dict({"fc.weight": w}, 2, "ot")
    want = otq.fit_codebook(w, 2, "ot", "channel").dequantize()
    assert torch.equal(out["fc.weight"], want)
    assert not torch.equal(want, otq.fit_codebook(w, 2, "ot", "tensor").dequantize())
