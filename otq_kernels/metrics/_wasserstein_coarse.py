"""Coarse (block-to-block) cost matrices for the quantization bounds.

For two sum-pooled images (BlockMeasure mu, nu with n blocks each):
- weighted cost  C^w_IJ = sum_{i in I, j in J} a_i b_j c(x_i, y_j), a = mu_i / mu_I: any optimal
  coarse plan lifted by a_i b_j is a feasible fine plan of the same cost -> upper bound;
- min cost       C^min_IJ = min over supported pixels of I and J of c(x_i, y_j), taken over
  the support bounding boxes (a subset-free relaxation, so still <=) -> lower bound;
- centre cost    ||c_I - c_J||^p between geometric block centres (used to get potentials).
All matrices are float64 [n, n] on the input device.
"""

from __future__ import annotations

import torch

from ._wasserstein_grid import BlockMeasure, cost_matrix

__all__ = ["centre_cost", "min_cost", "weighted_cost"]

_CHUNK = 1 << 23


def _weighted_cost_sq(mu: BlockMeasure, nu: BlockMeasure) -> torch.Tensor:
    """Closed form for p = 2: ||m_I - m'_J||^2 + Var_I + Var'_J."""
    m1, v1 = mu.centroid_and_variance()
    m2, v2 = nu.centroid_and_variance()
    return cost_matrix(m1, m2, 2) + v1[:, None] + v2[None, :]


def _weighted_cost_dense(mu: BlockMeasure, nu: BlockMeasure, p: int) -> torch.Tensor:
    """Direct sum over pixel pairs, chunked over the blocks of mu (any p)."""
    def in_block(bm: BlockMeasure) -> torch.Tensor:
        safe = torch.where(bm.mass > 0, bm.mass, torch.ones_like(bm.mass))
        return bm.weight / safe[:, None]

    a, b = in_block(mu), in_block(nu)
    n, k = a.shape
    yb = nu.coords.reshape(-1, 2)
    out = torch.empty(n, len(b), dtype=a.dtype, device=a.device)
    step = max(1, _CHUNK // (k * len(yb)))
    for s in range(0, n, step):
        xa = mu.coords[s:s + step].reshape(-1, 2)
        c = cost_matrix(xa, yb, p).reshape(-1, k, len(b), k)  # [I, s, J, t]
        out[s:s + step] = torch.einsum("isjt,is,jt->ij", c, a[s:s + step], b)
    return out


def weighted_cost(mu: BlockMeasure, nu: BlockMeasure, p: int) -> torch.Tensor:
    """C^w [n, n]; rows/cols of empty blocks hold finite placeholder values."""
    return _weighted_cost_sq(mu, nu) if p == 2 else _weighted_cost_dense(mu, nu, p)


def min_cost(mu: BlockMeasure, nu: BlockMeasure, p: int) -> torch.Tensor:
    """C^min [n, n] from the per-axis gaps between the support boxes of I and J."""
    gap = torch.maximum(nu.lo[None, :, :] - mu.hi[:, None, :],
                        mu.lo[:, None, :] - nu.hi[None, :, :]).clamp_min(0)
    sq = gap.pow(2).sum(-1)
    return sq if p == 2 else sq.sqrt()


def centre_cost(mu: BlockMeasure, nu: BlockMeasure, p: int) -> torch.Tensor:
    """||c_I - c_J||^p between geometric block centres: [n, n]."""
    return cost_matrix(mu.centres(), nu.centres(), p)
