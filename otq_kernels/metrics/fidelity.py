"""Fidelity of a quantized FM model against its full-precision twin.

* :func:`paired_psnr_ssim` — end-to-end: samples integrated from the *same* noise by
  both models, compared pixelwise (torchmetrics PSNR / Gaussian SSIM).
* :func:`paper_velocity_psnr_ssim` — the LowBit-HighFid protocol: one forward pass at
  t = 0 on real images in [0, 1], PSNR = 20·log10(1/RMSE) over the batch, SSIM with an
  11×11 box window (zero padding), C1 = 0.01², C2 = 0.03².
* :func:`fid` — torchmetrics FID, only when torch-fidelity and the Inception weights are
  already on disk (nothing is downloaded); otherwise ``{"fid": None, "fid_unavailable": why}``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..fm import evaluating

INCEPTION_WEIGHTS = "pt_inception-2015-12-05-6726825d.pth"


def paired_psnr_ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, clamp: bool = True
) -> dict[str, float]:
    """PSNR (dB) and SSIM between paired images a, b [B, C, H, W], B >= 1, H and W >= 6
    (the SSIM window's reflect padding), e.g. FP vs quantized samples from the same x0.
    Defaults suit [-1, 1] images; ``clamp`` clamps to [-1, 1] when ``data_range`` is 2,
    else to [0, data_range].

    PSNR uses the MSE over the whole batch (``inf`` when identical); SSIM is the mean of
    torchmetrics' Gaussian (11×11, σ 1.5) SSIM. Also returns ``mse`` and ``max_abs``.
    """
    from torchmetrics.functional.image import (
        peak_signal_noise_ratio,
        structural_similarity_index_measure,
    )

    _check_pair(a, b)
    check_ssim_size(a.shape[-2:])
    if not data_range > 0:
        raise ValueError(f"data_range must be positive, got {data_range}")
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    if clamp:
        lo, hi = (-1.0, 1.0) if data_range == 2.0 else (0.0, data_range)
        a, b = a.clamp(lo, hi), b.clamp(lo, hi)
    mse = torch.mean((a - b) ** 2).item()
    psnr = math.inf if mse == 0 else float(peak_signal_noise_ratio(a, b, data_range=data_range))
    ssim = float(structural_similarity_index_measure(a, b, data_range=data_range))
    return {"psnr": psnr, "ssim": ssim, "mse": mse, "max_abs": (a - b).abs().max().item()}


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4 or a.shape[0] == 0:
        raise ValueError("need two non-empty [B, C, H, W] tensors of one shape, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")


def check_ssim_size(hw) -> None:
    """ValueError unless images of size ``hw`` (H, W) fit :func:`paired_psnr_ssim`'s
    Gaussian SSIM (11×11 window, reflect padding of 5: at least 6×6)."""
    if min(hw) < 6:
        raise ValueError(f"SSIM needs images of at least 6x6 pixels, got {tuple(hw)}")


def box_ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11) -> float:
    """SSIM with a ``window``×``window`` box filter (avg-pool, stride 1, zero padding),
    C1 = 0.01², C2 = 0.03², averaged over all pixels, channels and images.
    x, y: [B, C, H, W]."""
    pool = lambda z: F.avg_pool2d(z, window, stride=1, padding=window // 2)
    c1, c2 = 0.01**2, 0.03**2
    mx, my = pool(x), pool(y)
    sxx = pool(x * x) - mx**2
    syy = pool(y * y) - my**2
    sxy = pool(x * y) - mx * my
    num = (2 * mx * my + c1) * (2 * sxy + c2)
    den = (mx**2 + my**2 + c1) * (sxx + syy + c2)
    return (num / den).mean().item()


@torch.no_grad()
def paper_velocity_psnr_ssim(
    model_fp: nn.Module,
    model_q: nn.Module,
    images: torch.Tensor,
    t: float = 0.0,
    label: torch.Tensor | None = None,
) -> dict[str, float]:
    """The paper's PSNR/SSIM: velocities of both models at time ``t`` on real ``images``
    [B, C, H, W] in [0, 1] (one forward each in eval mode, the models' modes left as they
    were, no ODE). PSNR = 20·log10(1/RMSE) over the batch (peak 1 is nominal: velocities
    are unbounded); SSIM via :func:`box_ssim`."""
    extra = {} if label is None else {"label": label}
    tt = torch.full((images.shape[0],), float(t), device=images.device)
    with evaluating(model_fp), evaluating(model_q):
        return velocity_psnr_ssim(model_fp(images, tt, extra), model_q(images, tt, extra))


def velocity_psnr_ssim(v_fp: torch.Tensor, v_q: torch.Tensor) -> dict[str, float]:
    """The paper's scores of two velocity batches [B, C, H, W] of one shape: PSNR =
    20·log10(1/RMSE) over the batch, SSIM with the 11×11 box window."""
    _check_pair(v_fp, v_q)
    v_fp, v_q = v_fp.float(), v_q.float()
    rmse = torch.sqrt(torch.mean((v_fp - v_q) ** 2)).item()
    psnr = math.inf if rmse == 0 else 20 * math.log10(1.0 / rmse)
    return {"psnr": psnr, "ssim": box_ssim(v_fp, v_q), "rmse": rmse}


def inception_weights_path() -> Path:
    """Where torch-fidelity caches the FID Inception weights (torch hub checkpoints dir)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS


def fid_unavailable_reason() -> str | None:
    """None when FID can run offline, else why not."""
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        return "torch-fidelity is not installed (pip install torch-fidelity)"
    path = inception_weights_path()
    if not path.is_file() or os.path.getsize(path) == 0:
        return f"Inception weights not found at {path}; FID never downloads them"
    return None


def _to_unit_rgb(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [B, C, H, W] -> float [0, 1] RGB [B, 3, H, W] (gray repeated)."""
    x = ((x.float().clamp(-1, 1) + 1) / 2).cpu()
    return x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x


@torch.no_grad()
def fid(real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256,
        feature: torch.nn.Module | None = None) -> dict:
    """FID between image sets real, fake [N, C, H, W] in [-1, 1] (2048-d Inception pool
    features, ``normalize=True``). Returns ``{"fid": float}`` or ``{"fid": None,
    "fid_unavailable": reason}``; never downloads, never invents a number.

    feature: a local feature network instead of Inception (float [B, 3, H, W] in [0, 1]
    -> [B, d]); the score is then "FID in that network's features", not comparable with
    published FIDs.
    """
    if feature is None:
        reason = fid_unavailable_reason()
        if reason is not None:
            return {"fid": None, "fid_unavailable": reason}
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=2048 if feature is None else feature,
                                      normalize=True)
    for batch, is_real in ((real, True), (fake, False)):
        for chunk in batch.split(batch_size):
            metric.update(_to_unit_rgb(chunk), real=is_real)
    return {"fid": float(metric.compute()), "n_real": len(real), "n_fake": len(fake)}
