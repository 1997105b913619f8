"""Triton dequantize: bit-exact against QuantizedTensor.dequantize (the ground truth)."""

import pytest
import torch

pytest.importorskip("triton")

from _triton_tolerance import DTYPES, make_qt  # noqa: E402

from otq_kernels.backends import dequant  # noqa: E402
from otq_kernels.backends.triton import dequant as triton_dequant  # noqa: E402
from otq_kernels.backends.triton.dequant import (  # noqa: E402
    dequantize_triton,
    k_tiles_per_program,
)


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


@pytest.mark.parametrize("tiles", [1, 3, 4, 10])
@pytest.mark.parametrize("bits, granularity", [(3, "channel"), (8, "channel"), (2, "tensor")])
def test_programs_walking_several_k_tiles_bit_exact(bits, granularity, tiles, device):
    """Each program expands `tiles` consecutive K tiles (10 tiles of 32 columns under the
    interpreter: ranges of 1, 3 (the last one tile), 4 (the last partial) and all)."""
    qt = make_qt((37, 300), bits, granularity, device, seed=tiles)
    dense = dequantize_triton(qt, torch.float16, tiles_per_program=tiles)
    assert torch.equal(dense, qt.dequantize(torch.float16))


def test_walking_grid_follows_tuning_table(monkeypatch, device):
    """walk_k=None asks the GPU's tuning entry (dequant_walk_k, absent in the shipped
    table: one tile per program); walk_k forces either grid; both are bit-exact."""
    from otq_kernels import ops

    assert "dequant_walk_k" not in ops.tuning_table("some unknown GPU")["linear"]
    qt = make_qt((37, 300), 4, "channel", device)
    ref = qt.dequantize(torch.float16)
    splits = []
    monkeypatch.setattr(triton_dequant, "k_tiles_per_program",
                        lambda *args: splits.append(args) or 3)
    for tuned, walk_k, walks in ((False, None, False), (True, None, True),
                                 (True, False, False), (False, True, True)):
        monkeypatch.setattr(triton_dequant, "tuned_walk_k", lambda dev, tuned=tuned: tuned)
        splits.clear()
        assert torch.equal(dequantize_triton(qt, torch.float16, walk_k), ref)
        assert bool(splits) == walks, (tuned, walk_k)
    with pytest.raises(ValueError, match="tiles_per_program"):
        dequantize_triton(qt, torch.float16, tiles_per_program=0)
    assert torch.equal(dequantize_triton(qt, torch.float16, tiles_per_program=2**40), ref)


def test_k_tiles_per_program():
    assert k_tiles_per_program(256, 64, 132) == 32  # 8192 x 8192: 2 K ranges, 512 programs
    assert k_tiles_per_program(448, 32, 132) == 32  # 14336 x 4096: whole rows, 448 programs
    assert k_tiles_per_program(100, 64, 132) == 13  # 5 K ranges (13, 13, 13, 13, 12)
    assert k_tiles_per_program(4, 9, 132) == 1  # a small layer: a program per tile
    assert k_tiles_per_program(3, 1, 1) == 1


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
