"""Latent-variance probe: PCA of a UNet's bottleneck activations.

The paper probes ``middle_block`` outputs at t = 0 on real images (PCA(20) fitted per
model) and reports the mean / std of the per-component variance and the number of
"collapsed" components (variance < 1e-4). Here any set of times can be probed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..fm import evaluating
from ..format import integer_value

COLLAPSE_THRESHOLD = 1e-4


def pca_variances(features: torch.Tensor, n_components: int = 20) -> torch.Tensor:
    """Variances (descending, unbiased, like sklearn's ``explained_variance_``) of the top
    principal components of ``features`` [N, D] -> [min(n_components, N, D)].

    Exact SVD when min(N, D) <= 2048, else randomized ``torch.pca_lowrank``.
    """
    if not (integer_value(n_components) or 0) >= 1:
        raise ValueError(f"n_components must be an integer >= 1, got {n_components!r}")
    x = features.double()
    x = x - x.mean(dim=0, keepdim=True)
    n, d = x.shape
    k = min(n_components, n, d)
    if min(n, d) <= 2048:
        s = torch.linalg.svdvals(x)
    else:
        _, s, _ = torch.pca_lowrank(x, q=min(k + 10, n, d), center=False, niter=6)
    return (s[:k] ** 2 / max(n - 1, 1)).float()


@torch.no_grad()
def bottleneck_features(
    model: nn.Module,
    images: torch.Tensor,
    t: float,
    module: nn.Module | None = None,
    label: torch.Tensor | None = None,
    batch_size: int = 256,
) -> torch.Tensor:
    """Flattened output of ``module`` (default ``model.middle_block``) captured by a forward
    hook while running ``model(images, t)`` in eval mode (the model's modes left as they
    were): images [N, C, H, W] -> [N, D]."""
    module = module if module is not None else model.middle_block
    captured: list[torch.Tensor] = []
    handle = module.register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().float().flatten(1).cpu())
    )
    try:
        with evaluating(model):
            for i in range(0, len(images), batch_size):
                x = images[i : i + batch_size]
                extra = {} if label is None else {"label": label[i : i + batch_size]}
                model(x, torch.full((x.shape[0],), float(t), device=x.device), extra)
    finally:
        handle.remove()
    return torch.cat(captured)


def latent_variance_probe(
    model: nn.Module,
    images: torch.Tensor,
    ts: Sequence[float] = (0.0, 0.25, 0.5, 0.75, 1.0),
    n_components: int = 20,
    module: nn.Module | None = None,
    label: torch.Tensor | None = None,
    batch_size: int = 256,
) -> dict[float, dict]:
    """For each t in ``ts``: PCA of the bottleneck activations of ``images`` [N, C, H, W]
    (the paper uses real images in [0, 1] at t = 0).

    Returns ``{t: {"variances": Tensor [k], "mean": float, "std": float,
    "collapsed": int (variance < 1e-4), "dim": D, "n": N}}``.
    """
    out = {}
    for t in ts:
        feats = bottleneck_features(model, images, t, module, label, batch_size)
        out[float(t)] = variance_stats(feats, n_components)
    return out


def variance_stats(features: torch.Tensor, n_components: int = 20) -> dict:
    """PCA variance summary of bottleneck features [N, D]: ``{"variances": Tensor [k],
    "mean", "std", "collapsed" (variance < 1e-4), "dim": D, "n": N}``."""
    var = pca_variances(features, n_components)
    return {
        "variances": var,
        "mean": var.mean().item(),
        "std": var.std(unbiased=False).item() if len(var) > 1 else 0.0,
        "collapsed": int((var < COLLAPSE_THRESHOLD).sum()),
        "dim": features.shape[1],
        "n": features.shape[0],
    }
