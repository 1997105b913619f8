"""Offline data sets: bundled (scikit-learn digits, scikit-image samples) and local files.

Images come back as float32 tensors [N, C, H, W] in [-1, 1] (the FM training range);
use ``(x + 1) / 2`` for [0, 1]. Nothing here downloads: MNIST / CIFAR-10 loaders read
a local path and fail with a clear error when it is missing.
"""

from __future__ import annotations

import gzip
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .format import integer_value


def _resize(x01: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, C, h, w] in [0, 1] to [N, C, size, size], clamped."""
    if x01.shape[-1] == size and x01.shape[-2] == size:
        return x01
    y = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False)
    return y.clamp(0, 1)


def load_digits(size: int = 16, return_labels: bool = False):
    """scikit-learn's 1,797 8×8 digits, bilinearly upscaled: [1797, 1, size, size] in [-1, 1].

    With ``return_labels`` also returns the int64 labels [1797].
    """
    from sklearn.datasets import load_digits as _sk_digits

    d = _sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]
    x = _resize(x, size) * 2 - 1
    y = torch.from_numpy(d.target.astype(np.int64))
    return (x, y) if return_labels else x


SKIMAGE_GRAY = ("camera", "coins", "moon", "text", "page", "brick", "grass", "gravel")


def load_image_patches(
    size: int = 32,
    n: int = 256,
    seed: int = 0,
    names: tuple[str, ...] = SKIMAGE_GRAY,
) -> torch.Tensor:
    """Random grayscale ``size``×``size`` patches of scikit-image sample images.

    Returns [n, 1, size, size] in [-1, 1]; images that are not installed locally are
    skipped (RuntimeError if none is available). ValueError for names that are not a
    tuple or list of names, or a size no image holds.
    """
    from skimage import data as skdata
    from skimage.color import rgb2gray
    from skimage.util import img_as_float32

    if isinstance(names, str) or not all(isinstance(name, str) for name in names):
        raise ValueError(f"names must be a tuple of scikit-image sample names, got {names!r}")
    if (integer_value(size) or 0) < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    images = []
    for name in names:
        try:
            img = img_as_float32(getattr(skdata, name)())
        except Exception:  # noqa: BLE001 - missing optional image (would need a download)
            continue
        images.append(rgb2gray(img) if img.ndim == 3 else img)
    if not images:
        raise RuntimeError("no scikit-image sample image is available offline")
    images = [img for img in images if min(img.shape) >= size]
    if not images:
        raise ValueError(f"size {size} is larger than every available image")
    rng = np.random.default_rng(seed)
    out = np.empty((n, 1, size, size), np.float32)
    for i in range(n):
        img = images[rng.integers(len(images))]
        r = rng.integers(img.shape[0] - size + 1)
        c = rng.integers(img.shape[1] - size + 1)
        out[i, 0] = img[r : r + size, c : c + size]
    return torch.from_numpy(out) * 2 - 1


def _require(path: str | os.PathLike, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(
            f"{what} not found at {p}; this package never downloads data, point it at a local copy"
        )
    return p


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX (MNIST) file of unsigned bytes, gzipped or not; ValueError naming the
    file when its header or length says it is not one."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) >= 4 else 0
    if len(raw) < 4 + 4 * ndim or raw[:3] != b"\x00\x00\x08" or ndim == 0:
        raise ValueError(f"{path}: not an IDX file of unsigned bytes (bad header)")
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    if len(raw) != 4 + 4 * ndim + math.prod(dims):
        raise ValueError(f"{path}: {len(raw) - 4 - 4 * ndim} bytes of data where its header "
                         f"says {dims} (truncated?)")
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(
    path: str | os.PathLike, split: str = "train", size: int = 28, return_labels: bool = False
):
    """MNIST from a local directory of IDX files (``train-images-idx3-ubyte[.gz]`` ...) or
    a ``mnist.npz`` (``x_train``/``y_train``/``x_test``/``y_test``).

    Returns [N, 1, size, size] in [-1, 1] (and int64 labels [N] with ``return_labels``).
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    p = _require(path, "MNIST")
    if p.is_file():
        with np.load(p, allow_pickle=False) as z:
            imgs, labels = z[f"x_{split}"], z[f"y_{split}"]
    else:
        prefix = "train" if split == "train" else "t10k"
        img_f = _find(p, f"{prefix}-images-idx3-ubyte")
        lab_f = _find(p, f"{prefix}-labels-idx1-ubyte")
        imgs, labels = _read_idx(img_f), _read_idx(lab_f)
    if imgs.ndim != 3 or labels.ndim != 1 or len(imgs) != len(labels):
        raise ValueError(f"{p}: {split} images {list(imgs.shape)} and labels "
                         f"{list(labels.shape)} are not N images [N, H, W] and N labels")
    x = _resize(torch.from_numpy(imgs.astype(np.float32) / 255.0)[:, None], size) * 2 - 1
    y = torch.from_numpy(labels.astype(np.int64))
    return (x, y) if return_labels else x


def _find(root: Path, stem: str) -> Path:
    for cand in (stem, stem + ".gz", stem.replace("-idx", ".idx")):
        hits = list(root.rglob(cand))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{stem}[.gz] not found under {root}")


def load_cifar10(path: str | os.PathLike, split: str = "train", return_labels: bool = False):
    """CIFAR-10 from the local *binary* release (``cifar-10-batches-bin``: ``data_batch_*.bin``
    / ``test_batch.bin``; no pickle). Returns [N, 3, 32, 32] in [-1, 1] (+ labels [N])."""
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test'")
    p = _require(path, "CIFAR-10")
    pattern = "data_batch_*.bin" if split == "train" else "test_batch.bin"
    files = sorted(p.rglob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} under {p} (expected the binary CIFAR-10 release)")
    raw = np.concatenate([np.fromfile(f, np.uint8).reshape(-1, 3073) for f in files])
    x = torch.from_numpy(raw[:, 1:].reshape(-1, 3, 32, 32).astype(np.float32) / 127.5 - 1)
    y = torch.from_numpy(raw[:, 0].astype(np.int64))
    return (x, y) if return_labels else x
