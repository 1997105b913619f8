"""Primal upscaling: turn a coarse plan into a feasible fine plan, whose cost is an upper bound.

1. Spread each coarse mass P_IJ > 0 uniformly over the kappa^2 x kappa^2 pixel pairs of I, J.
2. Iterative proportional fitting (IPF) on that block-sparse support until the L1 error of
   both marginals is below xi.
3. Correction: scale rows, then columns, by min(1, target / current), so the plan is dominated
   by both marginals; the leftover masses alpha = mu - rows, beta = nu - cols (equal totals m)
   are coupled by the product plan alpha beta^T / m (closed form for p = 2, Jensen bound
   m * sqrt(E||X-Y||^2) for p = 1) or, crudely, by m * (largest cost) ("max").
The plan is stored as K active block pairs, each a dense [k, k] block (k = kappa^2).
"""

from __future__ import annotations

import torch

from ._wasserstein_grid import BlockMeasure
from ._wasserstein_lp import block_pair_costs

__all__ = ["local_refined_cost", "upscale_plan_cost"]


def _block_sums(P: torch.Tensor, idx: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """Pixel marginals of a block-sparse plan. P: [K, k, k] -> [n, k] (sum over `dim`)."""
    s = P.sum(dim)
    return torch.zeros(n, s.shape[1], dtype=P.dtype, device=P.device).index_add_(0, idx, s)


def _ratio(target: torch.Tensor, current: torch.Tensor, cap: bool) -> torch.Tensor:
    r = torch.where(current > 0, target / torch.where(current > 0, current, 1.0), 0.0)
    return r.clamp(max=1.0) if cap else r


def _ipf(P, I, J, mu, nu, xi: float, max_iter: int):
    """Alternate row/column scaling of P [K, k, k] towards mu.weight, nu.weight [n, k]."""
    n = len(mu.weight)
    for it in range(max_iter):
        P = P * _ratio(mu.weight, _block_sums(P, I, n, 2), False)[I][:, :, None]
        P = P * _ratio(nu.weight, _block_sums(P, J, n, 1), False)[J][:, None, :]
        err = (_block_sums(P, I, n, 2) - mu.weight).abs().sum()
        if err <= xi:
            return P, it + 1
    return P, max_iter


def _residual_cost(alpha, beta, xa, xb, p: int, mode: str, diam_p: float) -> float:
    """Cost of coupling leftovers alpha [N], beta [N] at coordinates xa, xb [N, 2]."""
    m, mb = float(alpha.sum()), float(beta.sum())
    if m <= 0 and mb <= 0:
        return 0.0
    if mode == "max" or m <= 0 or mb <= 0:  # one side is pure rounding noise: crude but safe
        return max(m, mb) * diam_p
    ma, va = (alpha @ xa) / m, (alpha @ xa.pow(2).sum(1)) / m
    mb_, vb = (beta @ xb) / mb, (beta @ xb.pow(2).sum(1)) / mb
    e_sq = float(va + vb - 2 * (ma * mb_).sum())  # E||X - Y||^2 under the product plan
    e_sq = max(e_sq, 0.0)
    return max(m, mb) * (e_sq if p == 2 else e_sq ** 0.5)


def _spread(coarse_plan, I, J, c: torch.Tensor) -> torch.Tensor:
    """Initial block-sparse plan [K, k, k]: each coarse mass spread uniformly over its pair."""
    k2 = c.shape[1] * c.shape[2]
    return (coarse_plan[I, J] / k2)[:, None, None].expand_as(c).contiguous()


def upscale_plan_cost(coarse_plan: torch.Tensor, mu: BlockMeasure, nu: BlockMeasure, p: int,
                      xi: float = 1e-10, max_iter: int = 2000, residual: str = "product",
                      ) -> tuple[float, dict]:
    """Upper bound from a coarse plan [n, n] (couples mu.mass and nu.mass).

    Returns (cost of a feasible fine plan, info dict with IPF iterations and leftover mass).
    """
    if residual not in ("product", "max"):
        raise ValueError(f"residual must be 'product' or 'max', got {residual!r}")
    I, J = torch.nonzero(coarse_plan > 0, as_tuple=True)
    d2 = (mu.coords[I][:, :, None, :] - nu.coords[J][:, None, :, :]).pow(2).sum(-1)
    c = d2 if p == 2 else d2.sqrt()  # [K, k, k] pixel costs of the active block pairs
    P, iters = _ipf(_spread(coarse_plan, I, J, c), I, J, mu, nu, xi, max_iter)
    n = len(mu.weight)
    P = P * _ratio(mu.weight, _block_sums(P, I, n, 2), True)[I][:, :, None]
    P = P * _ratio(nu.weight, _block_sums(P, J, n, 1), True)[J][:, None, :]
    alpha = (mu.weight - _block_sums(P, I, n, 2)).clamp_min(0).reshape(-1)
    beta = (nu.weight - _block_sums(P, J, n, 1)).clamp_min(0).reshape(-1)
    xa, xb = mu.coords.reshape(-1, 2), nu.coords.reshape(-1, 2)
    ext = torch.cat([xa, xb]).amax(0) - torch.cat([xa, xb]).amin(0)
    diam_p = float(ext.pow(2).sum()) ** (p / 2)
    res = _residual_cost(alpha, beta, xa, xb, p, residual, diam_p)
    return float((P * c).sum()) + res, {"ipf_iters": iters, "leftover_mass": float(alpha.sum()),
                                        "residual_cost": res}


def local_refined_cost(coarse_plan: torch.Tensor, mu: BlockMeasure, nu: BlockMeasure, p: int
                       ) -> float:
    """Cost of the lifted plan with each block pair coupled optimally (<= <plan, C^w>).

    The lifted plan gives pair (I, J) the marginals P_IJ a^I and P_IJ b^J; replacing their
    product coupling by an exact k x k OT keeps every fine marginal, so the cost is still an
    upper bound on W_p^p, and never above the weighted-cost bound of the same plan.
    """
    I, J = torch.nonzero(coarse_plan > 0, as_tuple=True)
    d2 = (mu.coords[I][:, :, None, :] - nu.coords[J][:, None, :, :]).pow(2).sum(-1)
    c = (d2 if p == 2 else d2.sqrt()).cpu().numpy()
    vals = block_pair_costs(mu.weight[I].cpu().numpy(), nu.weight[J].cpu().numpy(), c)
    mass = mu.mass[I].cpu().numpy()  # block_pair_costs solves at the scale of mu_I
    return float((coarse_plan[I, J].cpu().numpy() * vals / mass).sum())
