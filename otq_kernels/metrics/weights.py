"""Weight-space error of a quantized tensor: MSE, SQNR and the exact 1-D W2.

All functions take the original weight ``w`` and its quantized version ``w_hat`` (same
number of elements, any shapes; a :class:`~otq_kernels.format.QuantizedTensor` is
dequantized first) and compute in float64 over all elements of the tensor.

- ``mse = mean((w - ŵ)²)``
- ``sqnr_db = 10·log10(sum(w²) / sum((w - ŵ)²))`` (+inf when ŵ == w; -inf when w == 0 ≠ ŵ)
- ``w2 = sqrt(mean((sort(w) - sort(ŵ))²))``: the exact 2-Wasserstein distance between
  the empirical distributions of the values (the OT quantizer's objective). It is at most
  sqrt(mse) and equals it for the rank-assigned ``ot`` quantizer with one codebook per
  tensor (per channel, sqrt(mse) is the rows' W2 and the whole tensor's can be smaller).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..format import QuantizedTensor

__all__ = ["mse", "sqnr_db", "wasserstein_1d", "weight_error"]


def _pair(w, w_hat) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten both to [n] (float32, or float64 if either is) on w's device; ValueError on
    size mismatch. Reductions below are done in float64."""
    if isinstance(w_hat, QuantizedTensor):
        w_hat = w_hat.dequantize()
    if isinstance(w, QuantizedTensor):
        w = w.dequantize()
    a = _tensor(w).detach().reshape(-1)
    b = _tensor(w_hat).detach().reshape(-1).to(a.device)
    dtype = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    a, b = a.to(dtype), b.to(dtype)
    if a.numel() != b.numel():
        raise ValueError(f"weights differ in size: {a.numel()} vs {b.numel()} elements")
    if a.numel() == 0:
        raise ValueError("weights are empty")
    return a, b


def _tensor(x) -> torch.Tensor:
    """x itself if a tensor (torch.as_tensor would move it to a default-device context's
    device, ``with torch.device("meta")`` say), else x as a tensor."""
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(x)


# Elements per float64 chunk of the sums below: their temporaries stay a few MiB, not
# twice the weight in float64 (a 4096x4096 layer's stats took 8x its fp32 size).
CHUNK = 1 << 20


def _scale(a: torch.Tensor, b: torch.Tensor) -> float:
    """The power of two nearest the largest |value| of a and b: the sums below divide by
    it (exact), so weights near 1e-170 do not give 0/0 and a perfect SQNR, their squares
    underflowing."""
    peak = max(float(torch.linalg.vector_norm(t, math.inf)) for t in (a, b))  # (no |t| copy)
    return 2.0 ** min(max(math.frexp(peak)[1], -1000), 1000) if peak > 0 else 1.0


def _sums(a: torch.Tensor, b: torch.Tensor, scale: float) -> tuple[float, float]:
    """(Σ(a/s - b/s)², Σ(a/s)²) in float64 for s = ``scale``, chunk by chunk. a, b: [n]."""
    noise = signal = 0.0
    for start in range(0, a.numel(), CHUNK):
        x, y = a[start:start + CHUNK].double() / scale, b[start:start + CHUNK].double() / scale
        noise += _sum((x - y) ** 2)
        signal += _sum(x * x)
    return noise, signal


def _sum(t: torch.Tensor) -> float:
    """Σt; on the CPU by numpy, whose sum does not depend on the thread count (torch's
    splits a long one by threads, and the stats saved in checkpoints would follow)."""
    return float(t.numpy().sum()) if t.device.type == "cpu" else float(torch.sum(t))


def _sqnr(noise: float, signal: float) -> float:
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def mse(w, w_hat) -> float:
    """Mean squared error over all elements. w, w_hat: any shapes with equal numel."""
    a, b = _pair(w, w_hat)
    scale = _scale(a, b)
    return _sums(a, b, scale)[0] / a.numel() * scale * scale


def sqnr_db(w, w_hat) -> float:
    """Signal-to-quantization-noise ratio in dB: 10·log10(Σw² / Σ(w - ŵ)²)."""
    a, b = _pair(w, w_hat)
    return _sqnr(*_sums(a, b, _scale(a, b)))


def _sorted(t: torch.Tensor) -> torch.Tensor:
    """t [n] in ascending order (the same as in float64); on the CPU by numpy, which
    makes no int64 indices (torch.sort's are twice a float32 tensor's size)."""
    if t.device.type == "cpu":
        return torch.from_numpy(np.sort(t.numpy()))
    return torch.sort(t).values


def _w2(a: torch.Tensor, b: torch.Tensor, scale: float) -> float:
    return math.sqrt(_sums(_sorted(a), _sorted(b), scale)[0] / a.numel()) * scale


def wasserstein_1d(w, w_hat) -> float:
    """Exact W2 between the value distributions: sqrt(mean((sort(w) - sort(ŵ))²))."""
    a, b = _pair(w, w_hat)
    return _w2(a, b, _scale(a, b))


def weight_error(w, w_hat) -> dict:
    """All three at once: {"mse", "sqnr_db", "w2"} (floats)."""
    a, b = _pair(w, w_hat)
    scale = _scale(a, b)  # (once: the sorted values have the same peak)
    noise, signal = _sums(a, b, scale)
    return {"mse": noise / a.numel() * scale * scale, "sqnr_db": _sqnr(noise, signal),
            "w2": _w2(a, b, scale)}
