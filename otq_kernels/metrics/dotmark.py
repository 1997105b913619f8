"""DOTmark-like test images for optimal-transport benchmarks, and a loader for real DOTmark.

DOTmark (Schrieber, Schuhmacher & Gottschlich, 2017) cannot be downloaded here, so
`dotmark_images` synthesizes images of similar classes (constructions are ours, not
DOTmark's): white noise, Gaussian random fields (GRF) of three smoothness levels, log-GRF,
logit-GRF, Cauchy-density mixtures and random shapes on an empty background. All are
non-negative float64 tensors; normalize them (the Wasserstein functions do) before use.
`load_dotmark` reads a local copy (`Data/<Class>/data<size>_<id>.csv` or `picture*.png`).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

__all__ = ["CLASSES", "dotmark_images", "dotmark_pairs", "load_dotmark"]

# correlation length of the GRF classes, as a fraction of the image side
_GRF_LENGTH = {"grf_rough": 0.02, "grf_moderate": 0.06, "grf_smooth": 0.15}

CLASSES = ("white_noise", "grf_rough", "grf_moderate", "grf_smooth", "log_grf", "logit_grf",
           "cauchy", "shapes")


def _grf(n: int, size: int, length: float, gen: torch.Generator) -> torch.Tensor:
    """Stationary Gaussian field with Gaussian covariance (periodic), unit variance: [n, s, s]."""
    noise = torch.randn(n, size, size, generator=gen, dtype=torch.float64)
    k = torch.fft.fftfreq(size, dtype=torch.float64) * 2 * math.pi
    k2 = k[:, None] ** 2 + k[None, :] ** 2
    amp = torch.exp(-k2 * (length * size) ** 2 / 4)  # sqrt of the Gaussian power spectrum
    field = torch.fft.ifft2(torch.fft.fft2(noise) * amp).real
    field = field - field.mean(dim=(-2, -1), keepdim=True)
    return field / field.std(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def _cauchy(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Mixtures of 3 bivariate Cauchy densities with random centres and scales: [n, s, s]."""
    r = torch.arange(size, dtype=torch.float64)
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.float64)
    for _ in range(3):
        c = torch.rand(n, 2, generator=gen, dtype=torch.float64) * size
        s = (0.03 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)) * size
        d2 = (yy - c[:, 0, None, None]) ** 2 + (xx - c[:, 1, None, None]) ** 2
        out += s[:, None, None] / (d2 + s[:, None, None] ** 2) ** 1.5
    return out


def _shapes(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """2-4 filled ellipses and rectangles of constant intensity on a zero background."""
    r = torch.arange(size, dtype=torch.float64) + 0.5
    yy, xx = torch.meshgrid(r, r, indexing="ij")
    out = torch.zeros(n, size, size, dtype=torch.float64)
    for i in range(n):
        count = int(torch.randint(2, 5, (1,), generator=gen))
        for _ in range(count):
            cy, cx, ry, rx = (torch.rand(4, generator=gen, dtype=torch.float64)
                              * torch.tensor([1.0, 1.0, 0.2, 0.2]) + torch.tensor(
                                  [0.0, 0.0, 0.05, 0.05])) * size
            if bool(torch.rand(1, generator=gen) < 0.5):
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            else:
                mask = ((yy - cy).abs() <= ry) & ((xx - cx).abs() <= rx)
            out[i][mask] = 1.0
        if out[i].sum() == 0:  # a shape fully outside the frame: keep the image non-empty
            out[i, size // 2, size // 2] = 1.0
    return out


def dotmark_images(kind: str, size: int = 32, n: int = 1, seed: int = 0) -> torch.Tensor:
    """n synthetic images of class `kind` (see CLASSES): float64 [n, size, size], >= 0."""
    if kind not in CLASSES:
        raise ValueError(f"unknown kind {kind!r}; choose from {CLASSES}")
    if size < 2 or n < 1:
        raise ValueError(f"need size >= 2 and n >= 1, got size={size}, n={n}")
    gen = torch.Generator().manual_seed(seed)
    if kind == "white_noise":
        return torch.rand(n, size, size, generator=gen, dtype=torch.float64)
    if kind in _GRF_LENGTH:
        f = _grf(n, size, _GRF_LENGTH[kind], gen)
        return f - f.amin(dim=(-2, -1), keepdim=True)
    if kind == "log_grf":
        return torch.exp(3 * _grf(n, size, 0.1, gen))
    if kind == "logit_grf":
        return torch.sigmoid(3 * _grf(n, size, 0.08, gen))
    if kind == "cauchy":
        return _cauchy(n, size, gen)
    return _shapes(n, size, gen)


def dotmark_pairs(kind: str, size: int = 32, n_pairs: int = 1, seed: int = 0):
    """Two independent batches (a, b), each float64 [n_pairs, size, size]."""
    imgs = dotmark_images(kind, size, 2 * n_pairs, seed)
    return imgs[:n_pairs], imgs[n_pairs:]


def _class_dir(root: Path, cls: str) -> Path:
    for cand in (root / cls, root / "Data" / cls, root / "DOTmark_1.0" / "Data" / cls, root):
        if cand.is_dir() and (any(cand.glob("data*_*.csv")) or any(cand.glob("picture*_*.png"))):
            return cand
    raise FileNotFoundError(f"no DOTmark class folder {cls!r} under {root}")


def _read_png(path: Path) -> torch.Tensor:
    from matplotlib.image import imread  # optional dependency, only for PNG files

    img = torch.as_tensor(imread(str(path)), dtype=torch.float64)
    return img[..., :3].mean(-1) if img.dim() == 3 else img


def load_dotmark(root, cls: str, size: int = 32) -> torch.Tensor:
    """Images of one class of a local DOTmark copy: float64 [n, size, size].

    root: the DOTmark folder (DOTmark_1.0, its Data folder, or the class folder itself);
    cls: class folder name, e.g. "LogGRF"; reads data<size>_*.csv, else picture<size>_*.png.
    """
    folder = _class_dir(Path(root), cls)
    csvs = sorted(folder.glob(f"data{size}_*.csv"))
    if csvs:
        import numpy as np

        imgs = [torch.as_tensor(np.loadtxt(f, delimiter=","), dtype=torch.float64) for f in csvs]
    else:
        imgs = [_read_png(f) for f in sorted(folder.glob(f"picture{size}_*.png"))]
    if not imgs:
        raise FileNotFoundError(f"no size-{size} images in {folder}")
    return torch.stack(imgs)
