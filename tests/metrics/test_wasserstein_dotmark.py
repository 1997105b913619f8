"""The DOTmark-like generator and the local DOTmark loader."""

import numpy as np
import pytest
import torch

from otq_kernels.metrics import dotmark as D


@pytest.mark.parametrize("kind", D.CLASSES)
def test_generator_shapes_and_values(kind):
    imgs = D.dotmark_images(kind, size=16, n=3, seed=1)
    assert imgs.shape == (3, 16, 16) and imgs.dtype == torch.float64
    assert torch.isfinite(imgs).all() and (imgs >= 0).all()
    assert (imgs.sum(dim=(1, 2)) > 0).all()
    assert not torch.equal(imgs[0], imgs[1])  # independent draws
    torch.testing.assert_close(imgs, D.dotmark_images(kind, size=16, n=3, seed=1))


def test_grf_smoothness_levels_are_ordered():
    def roughness(kind):
        x = D.dotmark_images(kind, 32, 4, seed=0)
        x = (x - x.mean()) / x.std()
        return (x[:, 1:] - x[:, :-1]).abs().mean()

    assert roughness("grf_rough") > roughness("grf_moderate") > roughness("grf_smooth")


def test_shapes_have_empty_regions():
    assert (D.dotmark_images("shapes", 32, 4, seed=2) == 0).any(dim=(1, 2)).all()


def test_pairs_and_bad_kind():
    a, b = D.dotmark_pairs("log_grf", 8, 2, seed=3)
    assert a.shape == b.shape == (2, 8, 8) and not torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown kind"):
        D.dotmark_images("classic_images")


def test_load_dotmark_csv(tmp_path):
    folder = tmp_path / "DOTmark_1.0" / "Data" / "LogGRF"
    folder.mkdir(parents=True)
    ref = np.random.default_rng(0).random((2, 8, 8))
    for i, img in enumerate(ref):
        np.savetxt(folder / f"data8_{1001 + i}.csv", img, delimiter=",")
    np.savetxt(folder / "data16_1001.csv", np.ones((16, 16)), delimiter=",")
    out = D.load_dotmark(tmp_path, "LogGRF", size=8)
    assert out.shape == (2, 8, 8)
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-12)
    assert D.load_dotmark(folder, "LogGRF", size=16).shape == (1, 16, 16)
    with pytest.raises(FileNotFoundError):
        D.load_dotmark(tmp_path, "Shapes", size=8)
    with pytest.raises(FileNotFoundError, match="no size-32"):
        D.load_dotmark(tmp_path, "LogGRF", size=32)
