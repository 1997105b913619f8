"""Host-side integer helpers for grids and block sizes.

Plain Python on purpose: ``triton.cdiv`` and ``triton.next_power_of_2`` are
``ConstexprFunction`` objects in recent Triton (a few µs a call on the host, several times
per kernel launch).
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for non-negative a and positive b.

    >>> cdiv(49, 32), cdiv(64, 32), cdiv(0, 8)
    (2, 2, 0)
    """
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n for n >= 1 (0 for 0, as Triton's).

    >>> next_power_of_2(1), next_power_of_2(5), next_power_of_2(64)
    (1, 8, 64)
    """
    return 0 if n == 0 else 1 << (n - 1).bit_length()
