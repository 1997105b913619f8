"""The Triton backend. Importable without triton; unavailable() says why it cannot run."""

from __future__ import annotations

import os

import torch


def unavailable(device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "Triton kernels need a CUDA device (or TRITON_INTERPRET=1 for CPU tests)"
    return None


def _on_its_gpu(t: torch.Tensor | None, launch, *args):
    """``launch(*args)`` with ``t``'s GPU current: Triton launches its kernels on the
    current device, so a model on ``cuda:1`` while ``cuda:0`` is current would run them on
    the wrong GPU. The device guard is entered only when the GPUs differ."""
    if isinstance(t, torch.Tensor) and t.is_cuda and t.get_device() != torch.cuda.current_device():
        with torch.cuda.device(t.device):
            return launch(*args)
    return launch(*args)


def _refuse_interpreted_bfloat16(x) -> None:
    """The Triton interpreter (CPU tensors) has no bfloat16: its ``tl.dot`` multiplies the
    raw bit patterns (triton-lang/triton#11584), so the split-K, GEMM and conv kernels would
    return values near 1e10 instead of failing."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.bfloat16 and x.is_cpu:
        raise ValueError("the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) has no "
                         "bfloat16 matmul; run bfloat16 on a GPU, or on CPU with backend "
                         "'auto', which picks one that takes it")


# Each kernel family lives in its own module, imported on first use (never at package
# import, so no GPU query or compilation happens then). A submodule must not share an
# entry point's name: importing it would rebind the package attribute to the module.
def linear(x, qt, bias):
    """x [M, K] -> [M, N]: GEMV / split-K / tiled GEMM on codes decoded in-kernel."""
    from .matmul import linear_triton

    _refuse_interpreted_bfloat16(x)
    return _on_its_gpu(x, linear_triton, x, qt, bias)


def conv2d(x, qt, bias, stride, padding, dilation, groups):
    """Implicit-GEMM conv on channels-last tiles. x [B, C, H, W] -> [B, N, OH, OW]."""
    from .conv import conv2d_triton

    _refuse_interpreted_bfloat16(x)
    return _on_its_gpu(x, conv2d_triton, x, qt, bias, stride, padding, dilation, groups)


def fit_rows(rows, bits, assign="rank"):
    """Fused sort-based equal-mass binning, one program per row."""
    from .fit import fit_rows_triton

    if isinstance(rows, torch.Tensor) and rows.dtype == torch.bfloat16 and rows.is_cpu:
        rows = rows.float()  # (exact; the interpreter widens bfloat16 subnormals wrongly)
    return _on_its_gpu(rows, fit_rows_triton, rows, bits, assign)


def pack(codes, bits):
    from .packing import pack_triton

    return _on_its_gpu(codes, pack_triton, codes, bits)


def unpack(planes, bits, k):
    from .packing import unpack_triton

    return _on_its_gpu(planes[0] if planes else None, unpack_triton, planes, bits, k)


def dequantize_triton(qt, dtype):
    """Dense weight of qt.shape in ``dtype``, expanded by a Triton kernel."""
    from .dequant import dequantize_triton as impl

    return _on_its_gpu(qt.codebook, impl, qt, dtype)
