"""Bundled and local-path data sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from otq_kernels import data


def test_digits():
    pytest.importorskip("sklearn")
    x, y = data.load_digits(16, return_labels=True)
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1 and y.shape == (1797,)
    assert data.load_digits(28).shape[-1] == 28


def test_image_patches():
    pytest.importorskip("skimage")
    x = data.load_image_patches(size=32, n=8, seed=0)
    assert x.shape == (8, 1, 32, 32) and x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x, data.load_image_patches(size=32, n=8, seed=0))
    for bad, match in [(dict(names="camera"), "names must be a tuple"),
                       (dict(size=0), "size must be an integer >= 1"),
                       (dict(size=5000), "size 5000 is larger than every available image")]:
        with pytest.raises(ValueError, match=match):
            data.load_image_patches(**{"n": 2, **bad})


def test_local_loaders(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        data.load_mnist(tmp_path / "missing")
    imgs = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    np.savez(
        tmp_path / "mnist.npz",
        x_train=imgs,
        y_train=np.arange(5),
        x_test=imgs[:2],
        y_test=np.arange(2),
    )
    x, y = data.load_mnist(tmp_path / "mnist.npz", return_labels=True)
    assert x.shape == (5, 1, 28, 28) and y.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs / 127.5 - 1).float())
    # IDX layout
    (tmp_path / "idx").mkdir()
    header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (5, 28, 28))
    (tmp_path / "idx/t10k-images-idx3-ubyte").write_bytes(header + imgs.tobytes())
    lab = bytes([0, 0, 8, 1]) + (5).to_bytes(4, "big") + bytes(range(5))
    (tmp_path / "idx/t10k-labels-idx1-ubyte").write_bytes(lab)
    x2 = data.load_mnist(tmp_path / "idx", split="test", size=16)
    assert x2.shape == (5, 1, 16, 16)
    for images, labels, match in [
            (header + imgs.tobytes()[:-1], lab, "truncated"),
            (b"", lab, "not an IDX file"), (header + imgs.tobytes(), lab[:-2], "truncated"),
            (header + imgs.tobytes(), lab[:7] + bytes([3]) + bytes(range(3)),
             r"images \[5, 28, 28\] and labels \[3\]")]:
        (tmp_path / "idx/t10k-images-idx3-ubyte").write_bytes(images)
        (tmp_path / "idx/t10k-labels-idx1-ubyte").write_bytes(labels)
        with pytest.raises(ValueError, match=match):
            data.load_mnist(tmp_path / "idx", split="test")
    # CIFAR-10 binary layout
    rec = np.random.default_rng(1).integers(0, 256, (4, 3073), dtype=np.uint8)
    rec[:, 0] = [3, 1, 4, 1]
    rec.tofile(tmp_path / "test_batch.bin")
    x3, y3 = data.load_cifar10(tmp_path, split="test", return_labels=True)
    assert x3.shape == (4, 3, 32, 32) and y3.tolist() == [3, 1, 4, 1]
    with pytest.raises(FileNotFoundError):
        data.load_cifar10(tmp_path, split="train")


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_image_patches_as_large_as_the_image_are_the_image():
    """A patch of an image's full size has one place to go (an off-by-one in the offset
    range refused it)."""
    pytest.importorskip("skimage")
    from skimage import data as skdata
    from skimage.util import img_as_float32

    camera = torch.from_numpy(img_as_float32(skdata.camera()))
    x = data.load_image_patches(size=camera.shape[0], n=1, names=("camera",))
    torch.testing.assert_close(x[0, 0], camera * 2 - 1)


def test_cifar10_bytes_map_to_minus_one_one_channel_first(tmp_path):
    rec = np.zeros((2, 3073), dtype=np.uint8)
    rec[0, 1:] = 255
    rec[1, 1:] = np.arange(3072) % 256
    rec[:, 0] = [7, 2]
    rec.tofile(tmp_path / "test_batch.bin")
    x, y = data.load_cifar10(tmp_path, split="test", return_labels=True)
    assert y.tolist() == [7, 2] and x.dtype == torch.float32 and (x[0] == 1).all()
    expected = torch.from_numpy(rec[1, 1:].reshape(3, 32, 32) / 127.5 - 1).float()
    torch.testing.assert_close(x[1], expected)


def test_non_square_images_are_resized_to_squares(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (3, 28, 20), dtype=np.uint8)
    np.savez(tmp_path / "mnist.npz", x_train=imgs, y_train=np.arange(3), x_test=imgs,
             y_test=np.arange(3))
    assert data.load_mnist(tmp_path / "mnist.npz", size=28).shape == (3, 1, 28, 28)
