"""Shared helpers of the Triton matmul/conv tests: inputs and the DESIGN §6 tolerance rule.

Rule: the backend's relative error vs a float64 truth is at most 2x the reference
backend's own error in the same dtype, plus a floor of one unit roundoff of the dtype
(the reference can be exact on tiny shapes where the kernel still rounds once).
"""

import pytest
import torch

import otq_kernels as otq

HAS_CUDA = torch.cuda.is_available()
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
NO_BF16 = pytest.mark.skipif(not HAS_CUDA, reason="interpreter has no bf16")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=NO_BF16)]


def make_qt(shape, bits: int, granularity: str, device, seed: int = 0):
    """A QuantizedTensor of a random weight ``shape`` (ot codebook, fitted on CPU)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=gen)
    return otq.fit_codebook(w, bits=bits, method="ot", granularity=granularity,
                            backend="reference").to(device)


def randn(shape, device, dtype, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def rel_err(y: torch.Tensor, truth: torch.Tensor) -> float:
    return float((y.double() - truth).norm() / truth.norm().clamp_min(1e-30))


def assert_matches_reference(y, ref_in_dtype, truth, dtype) -> None:
    """y (backend) and ref_in_dtype (reference backend, same dtype) vs a float64 truth."""
    assert y.dtype == dtype and y.shape == truth.shape, (y.dtype, y.shape, truth.shape)
    err, ref_err = rel_err(y, truth), rel_err(ref_in_dtype, truth)
    assert err <= 2 * ref_err + FLOOR[dtype], f"rel err {err:.3g} vs reference {ref_err:.3g}"
