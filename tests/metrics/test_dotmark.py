"""load_dotmark on local copies laid out like DOTmark 1.0 (CSV and PNG classes)."""

import numpy as np
import pytest
import torch

from otq_kernels.metrics.dotmark import load_dotmark


def _images(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size)).astype(np.float64)


def test_csv_class_in_every_accepted_root(tmp_path):
    folder = tmp_path / "DOTmark_1.0" / "Data" / "LogGRF"
    folder.mkdir(parents=True)
    imgs = _images(3, 8, seed=0)
    for i, img in enumerate(imgs, start=1):
        np.savetxt(folder / f"data8_{1000 + i}.csv", img, delimiter=",", fmt="%d")
    np.savetxt(folder / "data16_1001.csv", np.ones((16, 16)), delimiter=",", fmt="%d")
    for root in (tmp_path, tmp_path / "DOTmark_1.0", tmp_path / "DOTmark_1.0" / "Data", folder):
        out = load_dotmark(root, "LogGRF", size=8)
        assert out.dtype == torch.float64 and out.shape == (3, 8, 8)
        torch.testing.assert_close(out, torch.as_tensor(imgs), rtol=0, atol=0)


def test_png_class_reads_grey_levels(tmp_path):
    """8-bit grey PNGs (DOTmark's) load exactly, in [0, 1]; RGB(A) ones as the channel mean."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("PIL")
    from matplotlib.image import imsave
    from PIL import Image

    imgs = _images(2, 8, seed=1)
    grey, rgba = tmp_path / "Shapes", tmp_path / "Classic"
    grey.mkdir()
    rgba.mkdir()
    for i, img in enumerate(imgs, start=1):
        Image.fromarray(img.astype(np.uint8), mode="L").save(grey / f"picture8_{1000 + i}.png")
        imsave(rgba / f"picture8_{1000 + i}.png", img, cmap="gray", vmin=0, vmax=255)
    torch.testing.assert_close(load_dotmark(tmp_path, "Shapes", size=8) * 255,
                               torch.as_tensor(imgs), rtol=0, atol=1e-4)  # float32 in imread
    # matplotlib's grey colormap may round a level to its neighbour
    torch.testing.assert_close(load_dotmark(tmp_path, "Classic", size=8) * 255,
                               torch.as_tensor(imgs), rtol=0, atol=1.0 + 1e-4)


def test_missing_class_or_size_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DOTmark class folder 'CauchyDensity'"):
        load_dotmark(tmp_path, "CauchyDensity")
    folder = tmp_path / "WhiteNoise"
    folder.mkdir()
    np.savetxt(folder / "data32_1001.csv", np.ones((32, 32)), delimiter=",")
    with pytest.raises(FileNotFoundError, match="no size-64 images"):
        load_dotmark(tmp_path, "WhiteNoise", size=64)
