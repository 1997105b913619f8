"""Dual upscaling: coarse potentials -> admissible fine potentials -> a lower bound.

Given optimal coarse potentials (F, G) of a block-level OT problem with cost C [n, n]:
1. complete the potentials by coarse c-transforms, F = G^C on all blocks, G = F^C (G is
   NaN on empty blocks; F from G alone: for an admissible pair G^C >= F, so the LP's F is
   not needed);
2. interpolate F (block centres -> pixel centres, bilinear, edge-clamped) to f0 [H, W];
3. g = (f0)^c over supp(mu), f = g^c over supp(nu): now f_i + g_j <= c_ij on the supports;
4. the bound is <mu, f> + <nu, g> <= W_p^p (weak duality).
The same is done starting from G, and the larger of the two bounds is kept.
Refinement (p = 2, sinkhorn_iters > 0): before step 3, f0 is improved by entropic dual
ascent on the fine grid (log-domain Sinkhorn with a separable Gaussian kernel, eps annealed
from kappa^2 / 2 down to 0.5 pixel^2). Step 3 still makes the pair exactly admissible, so the
result stays a valid lower bound; the best of refined and plain bounds is returned.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn

from ._wasserstein_ctransform import c_transform, soft_c_transform_sq

__all__ = ["dual_upscale_bound"]


def _fill_coarse(v: torch.Tensor, C: torch.Tensor):
    """Potentials on every block from v [n] (NaN on empty blocks) by coarse c-transforms
    of cost C [n, n]. -> [n], [n]."""
    v_ok = torch.isfinite(v)
    u_full = (C[:, v_ok] - v[v_ok][None, :]).amin(1)
    v_full = (C - u_full[:, None]).amin(0)
    return u_full, v_full


def _interpolate(pot: torch.Tensor, grid: tuple[int, int], kappa: int, h: int, w: int):
    """Bilinear upscaling of block potentials [n] on grid (nr, nc) to pixels [h, w]."""
    coarse = pot.reshape(1, 1, *grid)
    if kappa == 1:
        return coarse[0, 0, :h, :w]
    fine = F_nn.interpolate(coarse, scale_factor=kappa, mode="bilinear", align_corners=False)
    return fine[0, 0, :h, :w]


def _masked(phi: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    return torch.where(support, phi, torch.inf)


def _bound_from(f0: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, p: int) -> float:
    """Admissible pair from an initial potential f0 on mu's side; returns <mu,f> + <nu,g>."""
    g = c_transform(_masked(-f0, mu > 0), p)
    f = c_transform(_masked(-g, nu > 0), p)
    return float((mu * f).sum() + (nu * g).sum())


def sinkhorn_refine(f: torch.Tensor, mu: torch.Tensor, nu: torch.Tensor, kappa: int,
                    iters: int, eps_min: float = 0.5) -> torch.Tensor:
    """Entropic dual ascent (p = 2) from potential f [H, W] on mu's side -> refined f [H, W]."""
    for j in range(iters):
        eps = max(eps_min, kappa * kappa / 2.0 ** (j + 1))
        g = soft_c_transform_sq(f, mu, eps)
        f = soft_c_transform_sq(g, nu, eps)
    return f


def dual_upscale_bound(v: torch.Tensor, C: torch.Tensor, grid, kappa: int,
                       mu: torch.Tensor, nu: torch.Tensor, p: int, sinkhorn_iters: int = 20
                       ) -> float:
    """Lower bound on W_p^p(mu, nu).

    v: [n] the coarse potential on nu's side (NaN on empty blocks) of the LP with cost
    C [n, n];
    mu, nu: [H, W] fine images of mass 1; sinkhorn_iters: refinement sweeps (p = 2 only).
    """
    h, w = mu.shape
    u_full, v_full = _fill_coarse(v, C)
    f0 = _interpolate(u_full, grid, kappa, h, w)
    g0 = _interpolate(v_full, grid, kappa, h, w)
    best = max(_bound_from(f0, mu, nu, p), _bound_from(g0, nu, mu, p))
    if p == 2 and sinkhorn_iters > 0:
        f1 = sinkhorn_refine(f0, mu, nu, kappa, sinkhorn_iters)
        best = max(best, _bound_from(f1, mu, nu, p))
    return best
