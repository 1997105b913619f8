"""Triton bit-plane pack/unpack: bit-exact against format.py (the ground truth)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

import otq_kernels as otq  # noqa: E402
from otq_kernels.backends.triton.packing import pack_triton, unpack_triton  # noqa: E402
from otq_kernels.format import pack_codes, padded_k, plane_widths, unpack_planes  # noqa: E402


def random_codes(n: int, k: int, bits: int, seed: int, device, dtype=torch.int64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (n, k), generator=gen).to(device=device, dtype=dtype)


def assert_planes_equal(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.int32 and g.shape == e.shape
        assert torch.equal(g.cpu(), e.cpu())


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("k", [1, 7, 33, 127])
def test_pack_unpack_match_format(bits, k, device):
    codes = random_codes(3, k, bits, seed=bits * 1000 + k, device=device)
    planes = pack_triton(codes, bits)
    assert_planes_equal(planes, pack_codes(codes, bits))
    assert torch.equal(unpack_triton(planes, bits, k), codes)


@pytest.mark.parametrize("bits", [3, 7])
def test_several_programs_per_row(bits, device):
    codes = random_codes(2, 600, bits, seed=bits, device=device)
    planes = pack_triton(codes, bits, block_k=64)
    assert_planes_equal(planes, pack_codes(codes, bits))
    assert torch.equal(unpack_triton(planes, bits, 600, block_k=32), codes)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32])
def test_pack_accepts_small_integer_codes(dtype, device):
    codes = random_codes(2, 45, 8 if dtype != torch.int16 else 5, seed=1, device=device,
                         dtype=dtype)
    bits = 8 if dtype != torch.int16 else 5
    assert_planes_equal(pack_triton(codes, bits), pack_codes(codes.long(), bits))


@pytest.mark.parametrize("bits", [2, 5, 7, 8])
def test_unpack_arbitrary_words(bits, device):
    """Every bit pattern, sign bit included, decodes as format.unpack_planes does."""
    n, k = 2, 70
    gen = torch.Generator().manual_seed(bits)
    planes = [torch.randint(-2**31, 2**31, (n, padded_k(k) * w // 32), generator=gen,
                            dtype=torch.int64).to(torch.int32).to(device)
              for w in plane_widths(bits)]
    assert torch.equal(unpack_triton(planes, bits, k).cpu(), unpack_planes(planes, bits, k).cpu())


@settings(max_examples=25, deadline=None)
@given(bits=st.integers(2, 8), n=st.integers(1, 4), k=st.integers(1, 130),
       seed=st.integers(0, 2**16))
def test_pack_fuzz(bits, n, k, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    codes = random_codes(n, k, bits, seed, device)
    planes = pack_triton(codes, bits)
    assert_planes_equal(planes, pack_codes(codes, bits))
    assert torch.equal(unpack_triton(planes, bits, k), codes)


def test_empty_rows(device):
    codes = torch.zeros(0, 5, dtype=torch.int64, device=device)
    planes = pack_triton(codes, 3)
    assert [tuple(p.shape) for p in planes] == [(0, 2), (0, 1)]
    assert unpack_triton(planes, 3, 5).shape == (0, 5)


def test_bad_arguments(device):
    codes = random_codes(2, 5, 3, seed=0, device=device)
    with pytest.raises(ValueError):
        pack_triton(codes.float(), 3)
    with pytest.raises(ValueError):
        pack_triton(codes, 9)
    planes = pack_codes(codes, 3)
    with pytest.raises(ValueError):
        unpack_triton(planes[:1], 3, 5)
    with pytest.raises(ValueError):
        unpack_triton(planes, 3, 40)


def test_ops_route_to_triton(device, spy):
    w = torch.randn(4, 3, 5, device=device)
    qt = otq.fit_codebook(w, bits=5, backend="reference")
    triton_backend = otq.backends.get("triton")
    unpacked, packed = spy(triton_backend, "unpack"), spy(triton_backend, "pack")
    assert torch.equal(otq.ops.unpack(qt, backend="triton"), otq.unpack_codes(qt))
    assert_planes_equal(otq.ops.pack(otq.unpack_codes(qt), 5, backend="triton"), qt.planes)
    assert (len(unpacked), len(packed)) == (1, 1)
