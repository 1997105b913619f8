"""Weight-space metrics vs an independent numpy computation."""

import math

import numpy as np
import pytest
import torch

import otq_kernels as otq
from otq_kernels.metrics import weights as W


def _numpy_reference(w: np.ndarray, q: np.ndarray) -> dict:
    w, q = w.astype(np.float64).ravel(), q.astype(np.float64).ravel()
    err = w - q
    return {
        "mse": float(np.mean(err**2)),
        "sqnr_db": float(10 * np.log10(np.sum(w**2) / np.sum(err**2))),
        "w2": float(np.sqrt(np.mean((np.sort(w) - np.sort(q)) ** 2))),
    }


@pytest.mark.parametrize("bits,method", [(2, "ot"), (3, "uniform"), (4, "lloyd"), (8, "log2")])
def test_matches_numpy(bits, method):
    torch.manual_seed(bits)
    w = torch.randn(24, 5, 3, 3)
    w_hat = otq.fit_codebook(w, bits=bits, method=method).dequantize()
    got = W.weight_error(w, w_hat)
    ref = _numpy_reference(w.numpy(), w_hat.numpy())
    for key, value in ref.items():
        assert got[key] == pytest.approx(value, rel=1e-9, abs=1e-15), key


def test_quantized_tensor_input_and_ot_identity():
    """W2 <= sqrt(MSE) always, with equality for the rank-assigned tensor-wise OT quantizer."""
    torch.manual_seed(0)
    w = torch.randn(64, 40)
    qt = otq.fit_codebook(w, bits=3, method="ot", granularity="tensor")
    assert W.wasserstein_1d(w, qt) == pytest.approx(math.sqrt(W.mse(w, qt)), rel=1e-9)
    qt = otq.fit_codebook(w, bits=3, method="uniform")
    assert W.wasserstein_1d(w, qt) <= math.sqrt(W.mse(w, qt)) + 1e-12


def test_edge_cases():
    w = torch.randn(10)
    assert W.sqnr_db(w, w) == math.inf
    assert W.mse(w, w) == 0.0 and W.wasserstein_1d(w, w) == 0.0
    assert W.sqnr_db(torch.zeros(4), torch.ones(4)) == -math.inf
    # W2 ignores the order of values; MSE does not
    assert W.wasserstein_1d(w, w.flip(0)) == 0.0
    assert W.mse(w, w.flip(0)) > 0
    with pytest.raises(ValueError, match="differ in size"):
        W.mse(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="empty"):
        W.mse(torch.zeros(0), torch.zeros(0))


def test_half_precision_inputs_are_exact():
    w = torch.randn(100).half()
    q = (w * 0.9).half()
    ref = _numpy_reference(w.float().numpy(), q.float().numpy())
    assert W.wasserstein_1d(w, q) == pytest.approx(ref["w2"], rel=1e-12)
    assert W.sqnr_db(w, q) == pytest.approx(ref["sqnr_db"], rel=1e-12)


def test_stats_do_not_depend_on_the_thread_count():
    """The sums run on numpy on the CPU: torch's split a sum above 32,768 elements by
    threads, so the stats a checkpoint stores changed with torch.set_num_threads."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300_000, generator=gen)
    w_hat = w + 1e-3 * torch.randn(300_000, generator=gen)
    threads = torch.get_num_threads()
    try:
        got = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            got.append(W.weight_error(w, w_hat))
    finally:
        torch.set_num_threads(threads)
    assert got[0] == got[1] == got[2]


@pytest.mark.parametrize("magnitude", [1e-170, 1e-50, 1e30])
def test_tiny_and_huge_weights_give_the_scale_free_scores(magnitude):
    """SQNR does not depend on the weights' scale, mse and w2 scale with it: weights near
    1e-170 lost to zeros read 0/0 (their squares underflow) and scored a perfect fit."""
    w = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
    half = w.clone()
    half[::2] = 0.0
    unit = W.weight_error(w, half)
    for w_hat, sqnr in ((torch.zeros_like(w), 0.0), (half, unit["sqnr_db"])):
        got = W.weight_error(w * magnitude, w_hat * magnitude)
        assert got["sqnr_db"] == pytest.approx(sqnr, abs=1e-9)
        assert W.sqnr_db(w * magnitude, w_hat * magnitude) == got["sqnr_db"]
    got = W.weight_error(w * magnitude, half * magnitude)
    assert got["w2"] == pytest.approx(unit["w2"] * magnitude, rel=1e-12)
    assert got["mse"] == pytest.approx(unit["mse"] * magnitude**2, rel=1e-12, abs=1e-300)


def test_a_float64_layer_s_stats_compare_its_own_weights():
    """A float64 layer whose weights float32 cannot hold (below its smallest subnormal)
    fits all-zero codebooks: its stats say so (they compared the float32 copy, zeros
    too, and read a perfect fit); one past float32's range is named as such."""
    layer = torch.nn.Linear(8, 4, bias=False).double()
    with torch.no_grad():
        layer.weight.mul_(1e-50)
    q = otq.nn.QuantLinear.from_float(layer, bits=4)
    assert torch.count_nonzero(q.codebook) == 0
    assert q.stats["sqnr_db"] == pytest.approx(0.0, abs=1e-9) and q.stats["w2"] > 0
    with torch.no_grad():
        layer.weight[0, 0] = 1e39
    with pytest.raises(ValueError, match="beyond float32's range"):
        otq.nn.QuantLinear.from_float(layer, bits=4)


# ------------------------------------------------ pinned by a mutation campaign (session 69)
def test_weight_error_of_bfloat16_and_float16_weights():
    """Half-precision weights are compared as float32 (numpy has no bfloat16)."""
    w = torch.randn(8, 20)
    qt = otq.fit_codebook(w, 3)
    for dtype in (torch.bfloat16, torch.float16):
        half = w.to(dtype)
        got = W.weight_error(half, qt)
        assert got == W.weight_error(half.float(), qt)
        assert W.weight_error(qt, half) == W.weight_error(qt, half.float())
