"""The C++ CPU backend: wraps ``otq_kernels._C`` (csrc/cpu).

The wrappers validate and convert on the Python side (devices, dtypes, contiguity,
shapes, code ranges) so the C++ only ever sees well-formed contiguous buffers.
"""

from __future__ import annotations

import torch

from .._native import native, unavailable_reason
from ..dispatch_log import note_kernel
from ..format import QuantizedTensor, check_codes, padded_k, plane_widths
from . import as_dtype
from ._native_args import checked_codebook, checked_planes, fit_args, require_device, unpack_args

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Values of env OTQ_CPU_SIMD: the widest explicit-SIMD path of the LUT linear and the
# expansion (csrc/cpu/simd.h; each is taken only where the CPU has it). Unset: "avx512".
# The extension reads and checks it (ValueError on any other value).
SIMD_PATHS = ("avx512", "avx2", "none")


def simd_path(op: str = "linear", m: int = 1, k: int = 4096) -> str:
    """The explicit-SIMD path the C++ kernels take now: "avx512", "avx2" or "none" (the
    portable loops), for ``op`` "linear" (the LUT linear with x [m, k]: short rows take the
    portable loops) or "dequantize" (the expansion; m and k unused). The widest path built
    in that this CPU runs and env OTQ_CPU_SIMD allows (ValueError for a bad value)."""
    return native().cpu_simd_path(op, m, k)


def unavailable(device) -> str | None:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device}"
    return unavailable_reason()


def _require_cpu(t, name: str) -> None:
    require_device(t, name, "cpu")


def _ptrs(tensors: list[torch.Tensor]) -> list[int]:
    return [t.data_ptr() for t in tensors]


def pack(codes: torch.Tensor, bits: int) -> list[torch.Tensor]:
    """codes int [N, K] in [0, 2**bits) -> bit planes (list of int32 [N, K_pad*w/32])."""
    _require_cpu(codes, "codes")
    bits = check_codes(codes, bits)
    n, k = codes.shape
    codes = codes.to(torch.int64).contiguous()
    planes = [torch.empty(n, padded_k(k) * w // 32, dtype=torch.int32, device="cpu")
              for w in plane_widths(bits)]
    if codes.numel():
        native().cpu_pack(codes.data_ptr(), n, k, bits, _ptrs(planes))
    return planes


def unpack(planes: list[torch.Tensor], bits: int, k: int) -> torch.Tensor:
    """Bit planes -> codes int64 [N, k]."""
    bits, n, k = unpack_args(planes, bits, k)
    planes = checked_planes(planes, bits, n, k, "cpu")
    codes = torch.empty(n, k, dtype=torch.int64, device="cpu")
    if codes.numel():
        native().cpu_unpack(_ptrs(planes), n, k, bits, codes.data_ptr())
    return codes


def fit_rows(rows: torch.Tensor, bits: int, assign: str = "rank"):
    """Equal-mass ("ot") codebooks per row.

    rows [R, n] float (finite) -> (codes int64 [R, n], centroids float32 [R, 2**bits]).
    float64 rows are sorted in float64; other float dtypes in float32 (exact conversion).
    """
    _require_cpu(rows, "rows")
    bits = fit_args(rows, bits, assign)
    if not bool(torch.isfinite(rows).all()):
        raise ValueError("rows contain NaN/Inf; cannot fit a codebook")
    is_double = rows.dtype == torch.float64
    x = rows.contiguous() if is_double else rows.to(torch.float32).contiguous()
    r, n = x.shape
    codes = torch.empty(r, n, dtype=torch.int64, device="cpu")
    centroids = torch.empty(r, 2**bits, dtype=torch.float32, device="cpu")
    native().cpu_fit_rows(x.data_ptr(), is_double, r, n, bits, assign == "nearest",
                          codes.data_ptr(), centroids.data_ptr())
    return codes, centroids


def linear(x: torch.Tensor, qt: QuantizedTensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ W^T + bias with W decoded from ``qt``. x [M, K] -> [M, N] in x.dtype.

    Computes in float32 (fp16/bf16 activations are converted, the output cast back).
    """
    _require_cpu(x, "x")
    n, k = qt.n, qt.k
    if x.dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"x must be float16/bfloat16/float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {list(x.shape)}")
    planes = checked_planes(qt.planes, qt.bits, n, k, "cpu")
    book = checked_codebook(qt, "cpu")
    m = x.shape[0]
    y = torch.empty(m, n, dtype=torch.float32, device="cpu")
    if m == 0:
        return as_dtype(y, x.dtype)
    xf = as_dtype(x.detach(), torch.float32).contiguous()
    b = None
    if bias is not None:
        _require_cpu(bias, "bias")
        if bias.shape != (n,):
            raise ValueError(f"bias must be [{n}], got {list(bias.shape)}")
        b = as_dtype(bias.detach(), torch.float32).contiguous()  # (a reference to its memory
        # for the call: another thread's bias.data = ... would free it under the kernel)
    note_kernel("cpu_lut")
    native().cpu_lut_linear(xf.data_ptr(), m, k, _ptrs(planes), qt.bits, book.data_ptr(),
                            book.shape[0], n, 0 if b is None else b.data_ptr(), y.data_ptr())
    return as_dtype(y, x.dtype)


def dequantize(qt: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense weight of ``qt.shape`` in ``dtype`` (float16/bfloat16/float32): the float32
    codebook looked up in C++, rounded once to ``dtype``; bit-exact against
    ``qt.dequantize(dtype)``."""
    if dtype not in ACTIVATION_DTYPES:
        raise ValueError(f"dtype must be float16/bfloat16/float32, got {dtype}")
    planes = checked_planes(qt.planes, qt.bits, qt.n, qt.k, "cpu")
    book = checked_codebook(qt, "cpu")
    n, k = qt.n, qt.k
    out = torch.empty(qt.shape, dtype=torch.float32, device="cpu")  # (rows of k, as [n, k])
    if n * k:
        native().cpu_dequantize(_ptrs(planes), n, k, qt.bits, book.data_ptr(), book.shape[0],
                                out.data_ptr())
    return as_dtype(out, dtype)
