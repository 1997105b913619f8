"""The canonical packed codebook format (DESIGN §2): bit planes + codebook.

A weight of shape [N, ...] is viewed as rows ``W.reshape(N, K)``. Codes of ``bits`` bits
are split into bit planes of power-of-two widths (widest plane = low bits); plane p is an
int32 tensor [N, K_pad * w_p / 32] with K_pad = K rounded up to 32, and element k of a
row sits in word ``k * w // 32`` at bit ``(k * w) % 32``. This module is the ground truth
that every other pack/unpack implementation is tested against.
"""

from __future__ import annotations

import math
import operator
import sys
from dataclasses import dataclass

import torch

MIN_BITS, MAX_BITS = 2, 8
GRANULARITIES = ("tensor", "channel")
WORD_BITS = 32


def integer_value(value) -> int | None:
    """The int an integer of any type holds (a numpy integer, a 0-d integer tensor); None
    for anything else, bools included."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_dtype(dtype) -> None:
    """ValueError unless ``dtype`` is a dtype a dense weight is computed in (float8 types
    hold values but torch's look-ups do not produce them)."""
    if dtype not in WEIGHT_DTYPES:
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dtype!r}")


def is_number(value) -> bool:
    """Whether ``value`` is a Python int or float that a float holds (not a bool, not an
    integer beyond float's range)."""
    return isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                        and abs(value) <= sys.float_info.max)


def check_bits(bits) -> int:
    """``bits`` as an int (from any integer type: a numpy integer, a 0-d integer tensor),
    or ValueError if it is not an integer in 2..8."""
    value = integer_value(bits)
    if value is None or not MIN_BITS <= value <= MAX_BITS:
        raise ValueError(f"bits must be an integer in {MIN_BITS}..{MAX_BITS}, got {bits!r}")
    return value


# Bit-plane widths of each bit width, widest first (the binary decomposition: 7 -> 4, 2, 1).
PLANE_WIDTHS = {b: tuple(w for w in (8, 4, 2, 1) if b & w) for b in range(MIN_BITS, MAX_BITS + 1)}


def plane_widths(bits: int) -> list[int]:
    """Bit-plane widths, widest first: the binary decomposition of ``bits`` (7 -> [4, 2, 1])."""
    return list(PLANE_WIDTHS[check_bits(bits)])


def plane_offsets(bits: int) -> list[int]:
    """Bit offset of each plane inside a code (running sum of the widths)."""
    widths = plane_widths(bits)
    return [sum(widths[:i]) for i in range(len(widths))]


def padded_k(k: int) -> int:
    """K rounded up to a multiple of 32 (one word of 1-bit codes)."""
    return -(-k // WORD_BITS) * WORD_BITS


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret non-negative int64 values < 2**32 as int32 (two's complement)."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def check_codes(codes: torch.Tensor, bits) -> int:
    """Raise ValueError unless ``codes`` is an integer [N, K] tensor in [0, 2**bits) that
    holds values (not on the meta device); -> bits."""
    bits = check_bits(bits)
    if not isinstance(codes, torch.Tensor) or codes.is_meta:
        what = "a meta tensor" if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a torch.Tensor holding values, got {what}")
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2**bits):
        raise ValueError(f"codes must lie in [0, {2**bits}) for bits={bits}")
    return bits


def pack_codes(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """Pack codes int [N, K] in [0, 2**bits) into bit planes: int32 [N, K_pad * w / 32] each."""
    bits = check_codes(codes, bits)
    n, k = codes.shape
    kp = padded_k(k)
    padded = torch.zeros(n, kp, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    planes = []
    for width, offset in zip(plane_widths(bits), plane_offsets(bits), strict=True):
        per_word = WORD_BITS // width
        fields = (padded >> offset) & ((1 << width) - 1)
        shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * width
        words = (fields.view(n, kp // per_word, per_word) << shifts).sum(-1)
        planes.append(_to_int32(words))
    return planes


def unpack_planes(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: bit planes -> codes int64 [N, k]."""
    bits = check_bits(bits)
    widths = plane_widths(bits)
    if len(planes) != len(widths):
        raise ValueError(f"bits={bits} needs {len(widths)} planes, got {len(planes)}")
    n = planes[0].shape[0]
    kp = padded_k(k)
    codes = torch.zeros(n, kp, dtype=torch.int64, device=planes[0].device)
    for plane, width, offset in zip(planes, widths, plane_offsets(bits), strict=True):
        per_word = WORD_BITS // width
        if tuple(plane.shape) != (n, kp * width // WORD_BITS) or plane.dtype != torch.int32:
            raise ValueError(
                f"plane of width {width} must be int32 [{n}, {kp * width // WORD_BITS}], "
                f"got {plane.dtype} {tuple(plane.shape)}"
            )
        words = plane.to(torch.int64) & 0xFFFFFFFF
        shifts = torch.arange(per_word, device=plane.device, dtype=torch.int64) * width
        fields = (words.unsqueeze(-1) >> shifts) & ((1 << width) - 1)
        codes = codes | (fields.reshape(n, kp) << offset)  # (not in place: vmap batches it)
    return codes[:, :k].contiguous()


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """Packed codes + codebook of one weight: checked when made, then read-only (a field
    changed afterwards was re-checked by some backends only, and a layer's ``.qweight``
    is its cached view of its buffers); equal and hashed by identity, as tensors are.

    planes:      list of int32 [N, K_pad * w / 32], one per bit plane (widest first).
    codebook:    float [G, 2**bits], G = 1 ("tensor") or N ("channel"); ascending rows.
    bits:        2..8.
    shape:       the original weight shape; N = shape[0], K = prod(shape[1:]).
    granularity: "tensor" or "channel".
    method:      the quantizer that produced it (informative).
    """

    planes: list[torch.Tensor]
    codebook: torch.Tensor
    bits: int
    shape: tuple[int, ...]
    granularity: str = "channel"
    method: str = "ot"

    def __post_init__(self):
        object.__setattr__(self, "bits", check_bits(self.bits))  # (frozen: set once here)
        shape = tuple(integer_value(s) for s in self.shape)
        if not shape or None in shape or min(shape) < 1:
            raise ValueError(f"shape must be a non-empty sequence of positive integers, got "
                             f"{self.shape!r}")
        object.__setattr__(self, "shape", shape)
        tensors = [*self.planes, self.codebook]
        if not all(isinstance(t, torch.Tensor) and t.layout == torch.strided for t in tensors):
            raise ValueError("planes and codebook must be dense torch tensors, got "
                             f"{[getattr(t, 'layout', type(t).__name__) for t in tensors]}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        groups = 1 if self.granularity == "tensor" else self.n
        if not self.codebook.is_floating_point():
            raise ValueError(f"codebook must be a float tensor, got {self.codebook.dtype}")
        if tuple(self.codebook.shape) != (groups, 2**self.bits):
            raise ValueError(
                f"codebook must be [{groups}, {2**self.bits}] for {self.granularity} granularity, "
                f"got {tuple(self.codebook.shape)}"
            )
        for plane, width in zip(self.planes, plane_widths(self.bits), strict=False):
            expect = (self.n, padded_k(self.k) * width // WORD_BITS)
            if tuple(plane.shape) != expect or plane.dtype != torch.int32:
                raise ValueError(f"plane of width {width} must be int32 {list(expect)}, "
                                 f"got {plane.dtype} {list(plane.shape)}")
        if len(self.planes) != len(plane_widths(self.bits)):
            raise ValueError(f"bits={self.bits} needs {len(plane_widths(self.bits))} planes")
        device = self.codebook.device
        if any(plane.device != device for plane in self.planes):  # (per op call: cheap)
            raise ValueError(f"planes on {sorted({str(p.device) for p in self.planes})} but "
                             f"the codebook on {device}: move them together (qt.to(device))")

    @property
    def n(self) -> int:
        """Rows (output channels)."""
        return self.shape[0] if len(self.shape) > 1 else 1

    @property
    def k(self) -> int:
        """Elements per row (reduction length)."""
        return math.prod(self.shape) // self.n

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Stored bytes: every plane word (row padding included) plus the fp32 codebook."""
        words = sum(p.numel() for p in self.planes)
        return words * 4 + self.codebook.numel() * 4

    @property
    def bits_per_weight(self) -> float:
        """True storage cost in bits per weight, codebooks and padding included."""
        return 8.0 * self.nbytes / max(self.numel, 1)

    def codes(self) -> torch.Tensor:
        """Codes int64 [N, K]."""
        return unpack_planes(self.planes, self.bits, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense weight of the original shape: codebook[g, code]."""
        check_float_dtype(dtype)
        codes = self.codes()
        book = self.codebook.to(dtype)
        if self.granularity == "tensor":
            dense = book[0][codes]
        else:
            dense = torch.gather(book, 1, codes)
        return dense.reshape(self.shape)

    def to(self, device=None, codebook_dtype: torch.dtype | None = None) -> QuantizedTensor:
        """The same weight on ``device`` (planes keep int32; codebook optionally cast);
        tensors already there, in that dtype, are shared, as ``Tensor.to`` shares them."""
        if isinstance(device, torch.dtype):
            raise ValueError(f"to(device, codebook_dtype=None) moves the weight; cast the "
                             f"codebook with codebook_dtype={device} (planes stay int32)")
        book = self.codebook.to(device=device, dtype=codebook_dtype or self.codebook.dtype)
        return QuantizedTensor(
            planes=[p.to(device) for p in self.planes],
            codebook=book,
            bits=self.bits,
            shape=self.shape,
            granularity=self.granularity,
            method=self.method,
        )

    def __repr__(self) -> str:
        return (f"QuantizedTensor(shape={list(self.shape)}, bits={self.bits}, "
                f"granularity={self.granularity!r}, method={self.method!r}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, device={self.device})")


def unpack_codes(qt: QuantizedTensor) -> torch.Tensor:
    """Codes int64 [N, K] of a QuantizedTensor (public API)."""
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"unpack_codes takes a QuantizedTensor, got {type(qt).__name__} (for "
                         "planes of your own: format.unpack_planes(planes, bits, k))")
    return qt.codes()
