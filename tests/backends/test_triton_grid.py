"""Host-side grid helpers agree with Triton's own (which cost µs per call in Triton >= 3.4)."""

import pytest

triton = pytest.importorskip("triton")

from otq_kernels.backends.triton._grid import cdiv, next_power_of_2  # noqa: E402


def test_cdiv_matches_triton():
    for a in range(0, 700):
        for b in (1, 2, 3, 16, 32, 64, 1000):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)
    assert cdiv(2**40 + 1, 2**20) == triton.cdiv(2**40 + 1, 2**20)


def test_next_power_of_2_matches_triton():
    for n in list(range(0, 5000)) + [2**31 - 1, 2**31, 2**31 + 1]:
        assert next_power_of_2(n) == triton.next_power_of_2(n), n
