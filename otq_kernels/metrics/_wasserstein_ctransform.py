"""Lazy c-transforms on a pixel grid: T(phi)(y) = min_x c(x, y) + phi(x), c = ||x - y||^p,
and the entropic (soft-min) version used to refine dual potentials for p = 2.

phi is +inf where x is not allowed (outside a measure's support). For p = 2 the cost is
separable, (dr)^2 + (dc)^2, so T is two 1-D min-plus passes (columns, then rows), O(H W (H + W))
and never builds the (HW)^2 cost matrix. For p = 1 a chunked dense pass is used.
All torch, float64, on phi's device.
"""

from __future__ import annotations

import torch

from ._wasserstein_grid import cost_matrix, grid_coords

__all__ = ["c_transform", "soft_c_transform_sq"]

_CHUNK = 1 << 22  # elements per temporary, keeps memory bounded at large grids


def _minplus_last(phi: torch.Tensor) -> torch.Tensor:
    """out[..., j] = min_i (i - j)^2 + phi[..., i]. phi: [R, L] -> [R, L]."""
    r, n = phi.shape
    idx = torch.arange(n, dtype=phi.dtype, device=phi.device)
    d2 = (idx[:, None] - idx[None, :]).pow(2)  # [i, j]
    out = torch.empty_like(phi)
    step = max(1, _CHUNK // (n * n))
    for s in range(0, r, step):
        out[s:s + step] = (phi[s:s + step, :, None] + d2).amin(1)
    return out


def _c_transform_sq(phi: torch.Tensor) -> torch.Tensor:
    """Squared-Euclidean c-transform on the grid. phi: [H, W] -> [H, W]."""
    h = _minplus_last(phi)  # min over columns, per row
    return _minplus_last(h.T.contiguous()).T.contiguous()  # then over rows, per column


def _c_transform_dense(phi: torch.Tensor) -> torch.Tensor:
    """Euclidean-distance c-transform over the allowed pixels. phi: [H, W] -> [H, W]."""
    h, w = phi.shape
    xy = grid_coords(h, w, phi.device)
    flat = phi.reshape(-1)
    keep = torch.isfinite(flat)
    src, val = xy[keep], flat[keep]
    out = torch.empty(h * w, dtype=phi.dtype, device=phi.device)
    step = max(1, _CHUNK // max(1, len(src)))
    for s in range(0, h * w, step):
        out[s:s + step] = (cost_matrix(xy[s:s + step], src, 1) + val[None, :]).amin(1)
    return out.reshape(h, w)


def c_transform(phi: torch.Tensor, p: int) -> torch.Tensor:
    """T(phi)(y) = min_x ||x - y||^p + phi(x) on an H x W grid.

    phi: float64 [H, W], +inf at excluded pixels (at least one must be finite) -> [H, W].
    """
    if not torch.isfinite(phi).any():
        raise ValueError("c_transform needs at least one finite entry")
    return _c_transform_sq(phi) if p == 2 else _c_transform_dense(phi)


def _logsumexp_last(phi: torch.Tensor, eps: float) -> torch.Tensor:
    """out[..., j] = logsumexp_i (phi[..., i] - (i - j)^2 / eps). phi: [R, L] -> [R, L]."""
    r, n = phi.shape
    idx = torch.arange(n, dtype=phi.dtype, device=phi.device)
    d2 = (idx[:, None] - idx[None, :]).pow(2) / eps
    out = torch.empty_like(phi)
    step = max(1, _CHUNK // (n * n))
    for s in range(0, r, step):
        out[s:s + step] = _logsumexp_dim1(phi[s:s + step, :, None] - d2)
    return out


def _logsumexp_dim1(z: torch.Tensor) -> torch.Tensor:
    """logsumexp over dim 1 that drops terms below e^-600 (no slow subnormals; -inf safe)."""
    m = z.amax(1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    d = z - m
    e = torch.where(d > -600.0, torch.exp(d.clamp(min=-600.0)), torch.zeros_like(d))
    return e.sum(1).log() + m.squeeze(1)


def soft_c_transform_sq(f: torch.Tensor, mu: torch.Tensor, eps: float) -> torch.Tensor:
    """Entropic (Sinkhorn) update for p = 2 on the grid, separable, in the log domain.

    g(y) = -eps log sum_x mu(x) exp((f(x) - ||x - y||^2) / eps). f, mu: [H, W] -> [H, W].
    """
    log_w = torch.where(mu > 0, mu.clamp_min(1e-300).log() + f / eps, -torch.inf)
    h = _logsumexp_last(log_w, eps)  # over columns, per row
    return -eps * _logsumexp_last(h.T.contiguous(), eps).T.contiguous()  # then over rows
