"""Pixel grids for the image Wasserstein bounds: input checks, coordinates, costs, coarsening.

Images are non-negative measures on an H x W pixel grid with pixel coordinates
(row, col) in pixel units; the ground cost is c(x, y) = ||x - y||^p (Euclidean norm).
Everything here is float64 torch on the input's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = [
    "BlockMeasure",
    "as_image_pair",
    "check_kappa",
    "coarsen",
    "cost_matrix",
    "grid_coords",
    "normalize",
]


def _as_tensor(x, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:
            raise ValueError(f"{name} must be an array or tensor, got {type(x).__name__}") from exc
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must be a real-valued image, got dtype {x.dtype}")
    return x.detach().to(torch.float64)  # (no distance here is differentiable)


def normalize(img: torch.Tensor, name: str = "image") -> torch.Tensor:
    """Check and scale images to mass 1. img: [..., H, W] -> float64 [..., H, W]."""
    if not torch.isfinite(img).all():
        raise ValueError(f"{name} contains NaN or Inf values")
    if (img < 0).any():
        raise ValueError(f"{name} has negative values; images must be non-negative measures")
    peak = img.amax(dim=(-2, -1), keepdim=True)
    if (peak <= 0).any():
        raise ValueError(f"{name} is all zero (mass 0); it cannot be normalized to mass 1")
    img = img / peak  # (first: a sum of finite values near 1e308 overflows to inf)
    return img / img.sum(dim=(-2, -1), keepdim=True)


def check_p(p) -> int:
    """Return p as int; only p = 1 and p = 2 are supported."""
    if isinstance(p, bool) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    return int(p)


def as_image_pair(a, b, p) -> tuple[torch.Tensor, torch.Tensor, bool, int]:
    """Validate an image pair and normalize both to mass 1.

    a, b: [H, W] or [B, H, W] (arrays or tensors, same shape).
    Returns (a, b, batched, p) with a, b float64 [B, H, W] on a's device.
    """
    p = check_p(p)
    a, b = _as_tensor(a, "a"), _as_tensor(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.dim() not in (2, 3):
        raise ValueError(f"images must be [H, W] or [B, H, W], got shape {tuple(a.shape)}")
    if min(a.shape) == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(a.shape)}")
    batched = a.dim() == 3
    if not batched:
        a, b = a[None], b[None]
    b = b.to(a.device)
    return normalize(a, "a"), normalize(b, "b"), batched, p


def check_kappa(kappa, h: int, w: int) -> int:
    """Coarsening factor: an integer 1 <= kappa <= min(H, W)."""
    try:
        whole = not isinstance(kappa, bool) and int(kappa) == kappa and kappa >= 1
    except (TypeError, ValueError, OverflowError):  # (None, inf, nan: not numbers of it)
        whole = False
    if not whole:
        raise ValueError(f"kappa must be a positive integer, got {kappa!r}")
    if kappa > min(h, w):
        raise ValueError(f"kappa={kappa} is larger than the image ({h}x{w})")
    return int(kappa)


def grid_coords(h: int, w: int, device=None) -> torch.Tensor:
    """Pixel coordinates of an h x w grid in row-major order: float64 [h*w, 2]."""
    r = torch.arange(h, dtype=torch.float64, device=device)
    c = torch.arange(w, dtype=torch.float64, device=device)
    return torch.stack(torch.meshgrid(r, c, indexing="ij"), dim=-1).reshape(-1, 2)


def cost_matrix(x: torch.Tensor, y: torch.Tensor, p: int) -> torch.Tensor:
    """c(x_i, y_j) = ||x_i - y_j||^p. x: [n, 2], y: [m, 2] -> [n, m]."""
    sq = (x[:, None, :] - y[None, :, :]).pow(2).sum(-1)
    return sq if p == 2 else sq.sqrt()


@dataclass
class BlockMeasure:
    """One image sum-pooled into kappa x kappa blocks (zero-padded to a multiple of kappa).

    mass:   [n]        block masses (n = nr * nc blocks, row-major)
    weight: [n, k]     pixel masses inside each block (k = kappa^2; padding pixels are 0)
    coords: [n, k, 2]  real pixel coordinates of those pixels (padding extends the grid)
    lo, hi: [n, 2]     bounding box of the block's support (pixels with mass > 0)
    grid:   (nr, nc)   the coarse grid shape
    """

    mass: torch.Tensor
    weight: torch.Tensor
    coords: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    grid: tuple[int, int]
    kappa: int

    def centroid_and_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mass-weighted block centroids [n, 2] and within-block variances [n] (0 if empty)."""
        safe = torch.where(self.mass > 0, self.mass, torch.ones_like(self.mass))
        a = self.weight / safe[:, None]
        m = (a[..., None] * self.coords).sum(1)
        var = (a * (self.coords - m[:, None, :]).pow(2).sum(-1)).sum(1)
        return m, var

    def centres(self) -> torch.Tensor:
        """Geometric block centres (mean of the kappa^2 pixel coordinates): [n, 2]."""
        return self.coords.mean(1)


def coarsen(img: torch.Tensor, kappa: int) -> BlockMeasure:
    """Sum-pool one image [H, W] into kappa x kappa blocks; see BlockMeasure."""
    h, w = img.shape
    nr, nc = -(-h // kappa), -(-w // kappa)
    padded = torch.zeros(nr * kappa, nc * kappa, dtype=img.dtype, device=img.device)
    padded[:h, :w] = img
    weight = padded.reshape(nr, kappa, nc, kappa).permute(0, 2, 1, 3).reshape(nr * nc, -1)
    coords = grid_coords(nr * kappa, nc * kappa, img.device).reshape(nr, kappa, nc, kappa, 2)
    coords = coords.permute(0, 2, 1, 3, 4).reshape(nr * nc, kappa * kappa, 2)
    support = (weight > 0)[..., None]
    big = torch.finfo(torch.float64).max
    lo = torch.where(support, coords, big).amin(1)
    hi = torch.where(support, coords, -big).amax(1)
    empty = ~support.any(1).squeeze(-1)
    lo[empty], hi[empty] = coords[empty].amin(1), coords[empty].amax(1)
    return BlockMeasure(weight.sum(1), weight, coords, lo, hi, (nr, nc), kappa)
