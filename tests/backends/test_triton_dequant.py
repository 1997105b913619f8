"""Triton dequantize: bit-exact against QuantizedTensor.dequantize (the ground truth)."""

import pytest
import torch

pytest.importorskip("triton")

from _triton_tolerance import DTYPES, make_qt  # noqa: E402

from otq_kernels.backends import dequant  # noqa: E402
from otq_kernels.backends.triton.dequant import dequantize_triton  # noqa: E402


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", range(2, 9))
def test_every_bit_width_bit_exact(bits, granularity, dtype, device):
    qt = make_qt((7, 3, 3, 3), bits, granularity, device, seed=bits)
    dense = dequantize_triton(qt, dtype)
    assert dense.dtype == dtype and dense.shape == qt.shape
    assert torch.equal(dense, qt.dequantize(dtype))


@pytest.mark.parametrize("shape", [(1, 1), (1, 5), (33, 127), (17, 40), (5,)])
def test_odd_shapes_bit_exact(shape, device):
    qt = make_qt(shape, 3, "channel", device)
    assert torch.equal(dequantize_triton(qt, torch.float16), qt.dequantize(torch.float16))


def test_dequant_backend_uses_same_weight(device):
    qt = make_qt((9, 40), 6, "channel", device)
    assert torch.equal(dequant.dense_weight(qt, torch.float32), qt.dequantize(torch.float32))
