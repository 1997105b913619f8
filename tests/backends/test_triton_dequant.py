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


def _gpu_memory_at_least(gib: int) -> bool:
    return torch.cuda.is_available() and \
        torch.cuda.get_device_properties(0).total_memory >= gib * 2**30


@pytest.mark.cuda
@pytest.mark.skipif(not _gpu_memory_at_least(16), reason="needs a GPU with 16 GiB")
def test_more_than_2_31_elements():
    """Output offsets n * K past 2**31 (int64 row offsets): the last rows are right."""
    from otq_kernels.format import QuantizedTensor

    n, k, tail = 2**20 + 32, 2048, 64  # n * k = 2**31 + 65536
    device = torch.device("cuda")
    plane = torch.randint(-2**31, 2**31 - 1, (n, k * 2 // 32), dtype=torch.int32, device=device)
    book = torch.tensor([[-1.5, -0.5, 0.25, 1.0]], device=device)
    dense = dequantize_triton(QuantizedTensor([plane], book, 2, (n, k), "tensor"), torch.float16)
    last = QuantizedTensor([plane[-tail:].contiguous()], book, 2, (tail, k), "tensor")
    assert torch.equal(dense[-tail:], last.dequantize(torch.float16))
    del dense
