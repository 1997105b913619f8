"""Wasserstein distance between images: exact values and quantization-based bounds.

After Bobrutsky & Moscovich, "Quantization-based Bounds on the Wasserstein Metric"
(arXiv 2506.00976); constructions follow docs/wasserstein.md. Images are non-negative
[H, W] (or batches [B, H, W]), normalized here to mass 1, on a pixel grid with ground cost
||x - y||^p in pixel units, p in {1, 2}. All values are W_p^p (W_2^2 for p = 2, W_1 for
p = 1). Single images give Python floats, batches give float64 tensors [B] on the input's
device. Only the LP (POT's network simplex) runs on CPU numpy; the rest is torch on the
input's device.

    from otq_kernels.metrics import wasserstein as W
    W.exact_wasserstein(a, b, p=2)
    lo, hi = W.wasserstein_bounds(a, b, p=2, kappa=2)   # lo <= exact <= hi
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ._wasserstein_coarse import centre_cost, min_cost, weighted_cost
from ._wasserstein_dual import dual_upscale_bound
from ._wasserstein_grid import as_image_pair, check_kappa, coarsen, cost_matrix, grid_coords
from ._wasserstein_lp import solve_ot
from ._wasserstein_primal import local_refined_cost, upscale_plan_cost

__all__ = [
    "DEFAULT_BOUNDS",
    "LOWER_BOUNDS",
    "UPPER_BOUNDS",
    "all_bounds",
    "exact_wasserstein",
    "lower_dual_upscaling",
    "lower_min_cost",
    "paired_pixel_w2",
    "upper_primal_upscaling",
    "upper_weighted_cost",
    "wasserstein_bounds",
]


def _per_pair(fn: Callable, a, b, p, *args, **kw):
    """Apply fn(a_i [H, W], b_i [H, W], p, ...) -> float to each pair; float or tensor [B]."""
    a, b, batched, p = as_image_pair(a, b, p)
    vals = [fn(a[i], b[i], p, *args, **kw) for i in range(a.shape[0])]
    if not batched:
        return vals[0]
    return torch.tensor(vals, dtype=torch.float64, device=a.device)


def _exact(mu: torch.Tensor, nu: torch.Tensor, p: int) -> float:
    x = grid_coords(*mu.shape, device=mu.device)
    return solve_ot(mu.reshape(-1), nu.reshape(-1), cost_matrix(x, x, p)).cost


def exact_wasserstein(a, b, p: int = 2):
    """Exact W_p^p between images a, b: [H, W] or [B, H, W] (dense LP: 10-60 s at 64x64)."""
    return _per_pair(_exact, a, b, p)


def _coarse_pair(mu, nu, kappa):
    kappa = check_kappa(kappa, *mu.shape)
    return coarsen(mu, kappa), coarsen(nu, kappa)


def _upper_weighted(mu, nu, p, kappa, local_refine=True):
    cm, cn = _coarse_pair(mu, nu, kappa)
    lp = solve_ot(cm.mass, cn.mass, weighted_cost(cm, cn, p))
    if not local_refine or cm.kappa == 1:
        return lp.cost
    return min(lp.cost, local_refined_cost(lp.plan, cm, cn, p))


def _lower_min(mu, nu, p, kappa):
    cm, cn = _coarse_pair(mu, nu, kappa)
    return solve_ot(cm.mass, cn.mass, min_cost(cm, cn, p)).cost


def _upper_primal(mu, nu, p, kappa, xi=1e-10, residual="product"):
    cm, cn = _coarse_pair(mu, nu, kappa)
    plan = solve_ot(cm.mass, cn.mass, centre_cost(cm, cn, p)).plan
    return upscale_plan_cost(plan, cm, cn, p, xi=xi, residual=residual)[0]


def _lower_dual(mu, nu, p, kappa, sinkhorn_iters=20):
    cm, cn = _coarse_pair(mu, nu, kappa)
    C = centre_cost(cm, cn, p)
    lp = solve_ot(cm.mass, cn.mass, C)
    return dual_upscale_bound(lp.v, C, cm.grid, cm.kappa, mu, nu, p, sinkhorn_iters)


def upper_weighted_cost(a, b, p: int = 2, kappa: int = 2, local_refine: bool = True):
    """Upper bound: coarse OT with the weighted block cost C^w (lifts to a feasible plan).

    local_refine: couple each used block pair by its exact kappa^2 x kappa^2 OT instead of the
    product a_i b_j (same marginals, never costlier); False gives the plain <plan, C^w>.
    """
    return _per_pair(_upper_weighted, a, b, p, kappa, local_refine=local_refine)


def lower_min_cost(a, b, p: int = 2, kappa: int = 2):
    """Lower bound: coarse OT with the smallest pixel-to-pixel cost between blocks."""
    return _per_pair(_lower_min, a, b, p, kappa)


def upper_primal_upscaling(a, b, p: int = 2, kappa: int = 2, xi: float = 1e-10,
                           residual: str = "product"):
    """Upper bound: coarse plan (block-centre cost) -> IPF to tolerance xi -> feasible fix-up.

    residual: how leftover mass after the fix-up is coupled, "product" or "max" (mass x diam^p).
    """
    return _per_pair(_upper_primal, a, b, p, kappa, xi=xi, residual=residual)


def lower_dual_upscaling(a, b, p: int = 2, kappa: int = 2, sinkhorn_iters: int = 20):
    """Lower bound: coarse potentials -> bilinear upscaling -> c-transforms -> dual value.

    sinkhorn_iters: entropic refinement sweeps of the upscaled potential before the exact
    c-transforms (p = 2 only; 0 gives the plain paper construction).
    """
    return _per_pair(_lower_dual, a, b, p, kappa, sinkhorn_iters=sinkhorn_iters)


LOWER_BOUNDS = {"lower_min_cost": _lower_min, "lower_dual_upscaling": _lower_dual}
UPPER_BOUNDS = {"upper_weighted_cost": _upper_weighted, "upper_primal_upscaling": _upper_primal}
# the tightest and fastest pair on smooth images (see docs/wasserstein.md); names="all" runs all 4
DEFAULT_BOUNDS = ("lower_dual_upscaling", "upper_weighted_cost")


def _timed_bounds(mu, nu, p, kappa, names) -> dict:
    out = {}
    for name in names:
        fn = {**LOWER_BOUNDS, **UPPER_BOUNDS}[name]
        t0, c0 = time.perf_counter(), time.process_time()
        out[name] = fn(mu, nu, p, kappa)
        out[name + "_s"] = time.perf_counter() - t0
        out[name + "_cpu_s"] = time.process_time() - c0
    return out


def _check_names(names, default) -> list[str]:
    names = default if names is None else names
    names = [*LOWER_BOUNDS, *UPPER_BOUNDS] if names == "all" else (
        [names] if isinstance(names, str) else list(names))  # (a string was split up)
    if not names:
        raise ValueError("names must name at least one bound")
    unknown = set(names) - set(LOWER_BOUNDS) - set(UPPER_BOUNDS)
    if unknown:
        raise ValueError(f"unknown bound names {sorted(unknown)}; "
                         f"choose from {[*LOWER_BOUNDS, *UPPER_BOUNDS]}")
    return names


def _bound_rows(a, b, p, kappa, names, exact):
    """Validated pairs -> (list of per-pair dicts, batched flag, device)."""
    a, b, batched, p = as_image_pair(a, b, p)
    rows = []
    for i in range(a.shape[0]):
        row = _timed_bounds(a[i], b[i], p, kappa, names)
        row["lower"] = max([0.0] + [row[n] for n in names if n in LOWER_BOUNDS])
        row["upper"] = min((row[n] for n in names if n in UPPER_BOUNDS), default=float("inf"))
        if exact:
            t0, c0 = time.perf_counter(), time.process_time()
            row["exact"] = _exact(a[i], b[i], p)
            row["exact_s"] = time.perf_counter() - t0
            row["exact_cpu_s"] = time.process_time() - c0
        rows.append(row)
    return rows, batched, a.device


def all_bounds(a, b, p: int = 2, kappa: int = 2, names=None, exact: bool = False) -> list[dict]:
    """Every bound (and optionally the exact value) with its wall time, one dict per pair.

    a, b: [H, W] or [B, H, W]; names: list of bound names, default (None) all four.
    Keys: each bound name -> value, name + "_s" -> wall seconds, name + "_cpu_s" -> process
    CPU seconds (robust on a shared machine), "lower" (best lower, at least 0)
    and "upper" (best upper), and "exact"/"exact_s" when exact=True.
    """
    return _bound_rows(a, b, p, kappa, _check_names(names, "all"), exact)[0]


def wasserstein_bounds(a, b, p: int = 2, kappa: int = 2, names=None):
    """(lower, upper) bounds on W_p^p: the best (max) lower and best (min) upper bound.

    a, b: [H, W] -> two floats; [B, H, W] -> two float64 tensors [B].
    names: which bounds to run (>= 1 lower and 1 upper): default DEFAULT_BOUNDS (dual upscaling
    + weighted cost, the tight and fast pair), "all" for all four, or a list of names.
    The lower bound is clamped at 0 (W_p^p >= 0).
    """
    names = _check_names(names, DEFAULT_BOUNDS)
    if not set(names) & set(LOWER_BOUNDS) or not set(names) & set(UPPER_BOUNDS):
        raise ValueError("names must include at least one lower and one upper bound")
    rows, batched, dev = _bound_rows(a, b, p, kappa, names, exact=False)
    lo = [r["lower"] for r in rows]
    hi = [r["upper"] for r in rows]
    if not batched:
        return lo[0], hi[0]
    return (torch.tensor(lo, dtype=torch.float64, device=dev),
            torch.tensor(hi, dtype=torch.float64, device=dev))


def _samples_to_images(x, eps: float, name: str) -> torch.Tensor:
    """[B, C, H, W] in [-1, 1] -> non-negative grayscale [B, H, W] ((x+1)/2 + eps, clamped)."""
    x = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)  # (kept where it is)
    if x.dim() != 4:
        raise ValueError(f"{name} must be [B, C, H, W], got shape {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    gray = x.to(torch.float64).mean(1)
    return ((gray + 1) / 2).clamp(0, 1) + eps


def paired_pixel_w2(samples_a, samples_b, exact_max_side: int = 32, kappa: int = 2,
                    eps: float = 1e-3) -> dict:
    """Per-pair pixel W_2^2 between two sample batches [B, C, H, W] with values in [-1, 1].

    Each sample becomes a grayscale measure (channel mean, (x+1)/2 clamped to [0, 1], + eps,
    mass 1). If H, W <= exact_max_side the exact value is computed, else the kappa bound
    interval. Returns {"method": "exact" | "bounds", "kappa", "w2sq": [B] or None,
    "lower": [B], "upper": [B]} (float64 tensors; lower = upper = w2sq when exact).
    Normalization hides total-intensity differences; report those separately.
    """
    shapes = [tuple(getattr(s, "shape", ())) for s in (samples_a, samples_b)]
    if shapes[0] != shapes[1]:  # (before the channel mean: RGB against gray passed)
        raise ValueError(f"sample batches differ in shape: {shapes[0]} vs {shapes[1]}")
    a = _samples_to_images(samples_a, eps, "samples_a")
    b = _samples_to_images(samples_b, eps, "samples_b")
    if max(a.shape[-2:]) <= exact_max_side:
        v = exact_wasserstein(a, b, p=2)
        return {"method": "exact", "kappa": None, "w2sq": v, "lower": v.clone(),
                "upper": v.clone()}
    lo, hi = wasserstein_bounds(a, b, p=2, kappa=kappa)
    return {"method": "bounds", "kappa": kappa, "w2sq": None, "lower": lo, "upper": hi}
