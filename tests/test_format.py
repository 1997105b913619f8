"""The canonical packed format (DESIGN §2) against an independent bit-level packer."""

import dataclasses
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import otq_kernels as otq
from otq_kernels.format import QuantizedTensor, padded_k, plane_offsets, unpack_planes

EXPECTED_WIDTHS = {8: [8], 7: [4, 2, 1], 6: [4, 2], 5: [4, 1], 4: [4], 3: [2, 1], 2: [2]}


def pack_by_bits(codes: np.ndarray, bits: int) -> list[np.ndarray]:
    """Independent packer: place every field bit by bit with Python ints (uint32 words)."""
    n, k = codes.shape
    kp = -(-k // 32) * 32
    planes, offset = [], 0
    for width in EXPECTED_WIDTHS[bits]:
        words = np.zeros((n, kp * width // 32), dtype=np.uint64)
        for row in range(n):
            for col in range(k):
                field = (int(codes[row, col]) >> offset) & ((1 << width) - 1)
                words[row, col * width // 32] += field << ((col * width) % 32)
        planes.append(words.astype(np.uint32))
        offset += width
    return planes


@pytest.mark.parametrize("bits", range(2, 9))
def test_plane_widths_and_offsets(bits):
    assert otq.plane_widths(bits) == EXPECTED_WIDTHS[bits]
    assert sum(otq.plane_widths(bits)) == bits
    assert plane_offsets(bits)[0] == 0


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 7, 32, 33, 127])
def test_pack_matches_bit_level_layout(bits, k):
    gen = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2**bits, (3, k), generator=gen)
    planes = otq.pack_codes(codes, bits)
    expected = pack_by_bits(codes.numpy(), bits)
    assert len(planes) == len(expected)
    for plane, ref in zip(planes, expected, strict=True):
        assert plane.dtype == torch.int32
        np.testing.assert_array_equal(plane.numpy().view(np.uint32), ref)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 5), k=st.integers(1, 200), seed=st.integers(0, 99))
def test_pack_unpack_round_trip(bits, n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=gen)
    planes = otq.pack_codes(codes, bits)
    assert torch.equal(unpack_planes(planes, bits, k), codes)
    for plane, width in zip(planes, otq.plane_widths(bits), strict=True):
        assert plane.shape == (n, padded_k(k) * width // 32)


def test_padding_codes_are_zero():
    codes = torch.full((2, 5), 255)
    planes = otq.pack_codes(codes, 8)
    words = planes[0].numpy().view(np.uint32)
    assert (words[:, 2:] == 0).all() and (words[:, 1] == 0xFF).all()


@pytest.mark.parametrize("bad", [1, 9, 0, 4.0, "4", True, np.float32(4), torch.tensor(4.0)],
                         ids=repr)
def test_bad_bits_rejected(bad):
    with pytest.raises(ValueError, match="bits"):
        otq.pack_codes(torch.zeros(1, 4, dtype=torch.long), bad)


@pytest.mark.parametrize("bits", [np.int64(3), np.uint8(3), torch.tensor(3)], ids=repr)
def test_bits_of_any_integer_type_become_an_int(bits):
    """A numpy integer (a sweep over np.arange) or a 0-d integer tensor is taken as the
    int it holds, and stored as one (the layers' metadata is JSON)."""
    assert [p.shape for p in otq.pack_codes(torch.zeros(1, 4, dtype=torch.long), bits)] == [
        p.shape for p in otq.pack_codes(torch.zeros(1, 4, dtype=torch.long), 3)]
    qt = otq.fit_codebook(torch.randn(4, 40), bits)
    assert type(qt.bits) is int and qt.bits == 3
    model = otq.quantize_model(torch.nn.Sequential(torch.nn.Linear(40, 4), torch.nn.Linear(4, 2)),
                               bits=bits, overrides={"1": {"bits": bits}}, progress=False)
    assert [type(m.bits) for m in model] == [int, int]


@pytest.mark.parametrize("shape", [(6.5, 40), (), ("6", 40), (True, 40), (0, 40), (6, 0),
                                   (6, -40)], ids=repr)
def test_a_shape_that_is_not_positive_integers_is_refused(shape):
    """(a 0 in it raised ZeroDivisionError, or ran every op into a reshape error)"""
    planes = otq.pack_codes(torch.zeros(6, 40, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="shape must be a non-empty sequence of positive "
                                         "integers"):
        QuantizedTensor(planes, torch.zeros(1, 4), 2, shape, "tensor")
    assert QuantizedTensor(planes, torch.zeros(1, 4), 2, (np.int64(6), 40), "tensor").shape == (
        6, 40)


def test_codes_out_of_range_or_float_rejected():
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        otq.pack_codes(torch.tensor([[0, 4]]), 2)
    with pytest.raises(ValueError, match="integer"):
        otq.pack_codes(torch.zeros(1, 4), 2)
    with pytest.raises(ValueError, match="2-D"):
        otq.pack_codes(torch.zeros(4, dtype=torch.long), 2)
    for codes, what in ((np.zeros((1, 4), np.int64), "ndarray"), (None, "NoneType"),
                        (torch.zeros(1, 4, dtype=torch.long, device="meta"), "a meta tensor")):
        with pytest.raises(ValueError, match=f"codes must be a torch.Tensor holding values, "
                                             f"got {what}"):
            otq.pack_codes(codes, 2)
    with pytest.raises(ValueError, match="unpack_codes takes a QuantizedTensor, got list"):
        otq.unpack_codes(otq.pack_codes(torch.zeros(1, 4, dtype=torch.long), 2))
    with pytest.raises(ValueError, match="unpack takes a QuantizedTensor, got list"):
        otq.ops.unpack(otq.pack_codes(torch.zeros(1, 4, dtype=torch.long), 2))
    with pytest.raises(ValueError, match="bits must be an integer in 2..8, got '4'"):
        otq.ops.pack(torch.zeros(1, 4, dtype=torch.long), "4")
    for dtype in ("float32", torch.float8_e5m2):  # (float8: a NotImplementedError in gather)
        with pytest.raises(ValueError, match="dtype must be float16, bfloat16, float32 or"):
            _qt()[0].dequantize(dtype)


def _qt(bits=3, shape=(4, 10), granularity="channel"):
    codes = torch.randint(0, 2**bits, (shape[0], int(np.prod(shape[1:]))))
    groups = shape[0] if granularity == "channel" else 1
    book = torch.sort(torch.randn(groups, 2**bits), dim=1).values
    return QuantizedTensor(otq.pack_codes(codes, bits), book, bits, shape, granularity), codes


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_dequantize_looks_up_codebook(granularity):
    qt, codes = _qt(granularity=granularity, shape=(4, 2, 5))
    dense = qt.dequantize()
    rows = torch.arange(4).unsqueeze(1) if granularity == "channel" else 0
    assert dense.shape == (4, 2, 5)
    assert torch.equal(dense.reshape(4, 10), qt.codebook[rows, codes])
    assert torch.equal(otq.unpack_codes(qt), codes)


def test_bits_per_weight_counts_codebook_and_padding():
    qt, _ = _qt(bits=3, shape=(4, 10), granularity="channel")
    stored_bits = 4 * 32 * 3 + 4 * 8 * 32  # padded codes + fp32 codebooks
    assert qt.nbytes * 8 == stored_bits
    assert qt.bits_per_weight == pytest.approx(stored_bits / 40)


def test_to_preserves_content():
    qt, _ = _qt()
    moved = qt.to("cpu", codebook_dtype=torch.float64)
    assert moved.codebook.dtype == torch.float64
    assert torch.equal(moved.dequantize(), qt.dequantize().double())


def test_inconsistent_quantized_tensor_rejected():
    qt, _ = _qt(bits=3, shape=(4, 10))
    with pytest.raises(ValueError, match="codebook"):
        QuantizedTensor(qt.planes, qt.codebook[:2], 3, (4, 10), "channel")
    with pytest.raises(ValueError, match="plane"):
        QuantizedTensor([qt.planes[0][:, :1], qt.planes[1]], qt.codebook, 3, (4, 10))
    with pytest.raises(ValueError, match="planes"):
        QuantizedTensor(qt.planes[:1], qt.codebook, 3, (4, 10))
    with pytest.raises(ValueError, match="granularity"):
        QuantizedTensor(qt.planes, qt.codebook, 3, (4, 10), "row")
    with pytest.raises(ValueError, match="codebook must be a float tensor, got torch.int32"):
        QuantizedTensor(qt.planes, qt.codebook.int(), 3, (4, 10))
    with pytest.raises(ValueError, match=r"planes on \['cpu'\] but the codebook on meta"):
        QuantizedTensor(qt.planes, qt.codebook.to("meta"), 3, (4, 10))


def test_a_quantized_tensor_is_read_only_and_compared_by_identity():
    """Fields are checked once, when made: changing one afterwards ran on some backends
    unchecked (triton read past a cut plane) and changed a layer's output but not its
    saved codes (``.qweight`` is the layer's cached view). ``==`` and hash are identity,
    as for tensors (== raised on the tensor fields, hash was missing)."""
    qt = otq.fit_codebook(torch.randn(8, 40), bits=3)
    for field, value in [("bits", 4), ("codebook", qt.codebook * 2), ("shape", (8, 20)),
                         ("granularity", "tensor"), ("planes", qt.planes[:1])]:
        with pytest.raises(dataclasses.FrozenInstanceError, match=f"'{field}'"):
            setattr(qt, field, value)
    other = dataclasses.replace(qt, method="lloyd")  # (the way to another one: checked)
    assert other.method == "lloyd" and other.planes is qt.planes
    assert qt == qt and qt != other and qt in [other, qt] and len({qt, other, qt}) == 2


@pytest.mark.parametrize("part", ["plane", "codebook"])
def test_sparse_or_non_tensor_parts_are_refused(part):
    """(they were taken, and every op failed inside torch)"""
    planes = otq.pack_codes(torch.zeros(6, 40, dtype=torch.long), 2)
    book = torch.zeros(1, 4)
    if part == "plane":
        planes = [planes[0].to_sparse()]
    else:
        book = book.to_sparse()
    with pytest.raises(ValueError, match="planes and codebook must be dense torch tensors"):
        QuantizedTensor(planes, book, 2, (6, 40), "tensor")
    with pytest.raises(ValueError, match="must be dense torch tensors"):
        QuantizedTensor(otq.pack_codes(torch.zeros(6, 40, dtype=torch.long), 2),
                        [[0.0, 1.0, 2.0, 3.0]], 2, (6, 40), "tensor")


def test_to_a_dtype_names_codebook_dtype():
    qt = otq.fit_codebook(torch.randn(4, 40), bits=2)
    with pytest.raises(ValueError, match="codebook_dtype=torch.float16"):
        qt.to(torch.float16)
    assert qt.to(codebook_dtype=torch.float64).codebook.dtype == torch.float64


# ------------------------------------------------ pinned by a mutation campaign (session 69)
def test_pack_codes_rejects_negative_codes():
    """A negative code is out of [0, 2**bits) as much as 2**bits is: packed, -1 would
    silently become the all-ones field (code 3 at 2 bits)."""
    for codes in (torch.tensor([[-1, 0]]), torch.tensor([[0, 1, -4]], dtype=torch.int8)):
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
            otq.pack_codes(codes, 2)


def test_unpack_planes_checks_the_planes_it_is_given():
    """unpack_planes is what unpack_codes' error message points users to ("for planes of
    your own"): wrong plane counts, dtypes or shapes are ValueErrors naming the plane,
    not an IndexError/zip error or silently decoded garbage."""
    qt, codes = _qt(3, (2, 40))
    planes = qt.planes
    assert torch.equal(unpack_planes(planes, 3, 40), codes)
    with pytest.raises(ValueError, match="bits=3 needs 2 planes, got 0"):
        unpack_planes([], 3, 40)
    with pytest.raises(ValueError, match="bits=3 needs 2 planes, got 1"):
        unpack_planes(planes[:1], 3, 40)
    with pytest.raises(ValueError, match="plane of width 2 must be int32"):
        unpack_planes([planes[0].long(), planes[1]], 3, 40)  # right shape, wrong dtype
    with pytest.raises(ValueError, match="plane of width 2 must be int32"):
        unpack_planes(planes, 3, 70)  # K_pad 96, the planes hold 64
    with pytest.raises(ValueError, match="plane of width 1 must be int32"):
        unpack_planes([planes[0], planes[1][:1]], 3, 40)  # another row count


@pytest.mark.parametrize("bits", [np.int64(3), torch.tensor(3)], ids=repr)
def test_quantized_tensor_stores_bits_as_an_int(bits):
    """bits of any integer type, given to the constructor directly, are stored as the int
    they hold (the layers' metadata is JSON)."""
    planes = _qt(3, (2, 40))[0].planes
    qt = QuantizedTensor(planes, torch.zeros(2, 8), bits, (2, 40))
    assert type(qt.bits) is int and qt.bits == 3


@pytest.mark.parametrize("shape", [[6, 40], (np.int64(6), np.int32(40)), torch.Size([6, 40]),
                                   (torch.tensor(6), 40)], ids=repr)
def test_quantized_tensor_stores_shape_as_a_tuple_of_ints(shape):
    planes = otq.pack_codes(torch.zeros(6, 40, dtype=torch.long), 2)
    qt = QuantizedTensor(planes, torch.zeros(1, 4), 2, shape, "tensor")
    assert type(qt.shape) is tuple and qt.shape == (6, 40)
    assert all(type(s) is int for s in qt.shape)


def test_quantized_tensor_refuses_planes_of_another_integer_dtype():
    """A plane of the right shape but not int32 (an int64 or uint8 plane) is refused
    when made, not read by a kernel as int32 words."""
    planes = _qt(3, (2, 40))[0].planes
    for dtype in (torch.int64, torch.int16):
        with pytest.raises(ValueError, match=r"plane of width 2 must be int32 \[2, 4\], got "
                                             f"{dtype}"):
            QuantizedTensor([planes[0].to(dtype), planes[1]], torch.zeros(2, 8), 3, (2, 40))


def test_is_number_takes_every_int_up_to_float_max():
    """is_number (checkpoint stats, UNet channel multipliers): an int a float holds."""
    from otq_kernels.format import is_number

    assert is_number(int(sys.float_info.max)) and is_number(-int(sys.float_info.max))
    assert not is_number(10**400) and not is_number(True)


def test_to_moves_planes_and_codebook_together():
    qt = otq.fit_codebook(torch.randn(4, 40), bits=3)
    moved = qt.to("meta")
    assert {p.device.type for p in moved.planes} == {"meta"}
    assert moved.codebook.device.type == "meta"
    back = qt.to("cpu")
    assert all(a is b for a, b in zip(back.planes, qt.planes, strict=True))
    assert back.codebook is qt.codebook
