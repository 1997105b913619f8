"""Fidelity metrics (PSNR/SSIM, paper protocol, FID availability) and the latent probe."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("torchmetrics")

from otq_kernels.metrics import fidelity, latent  # noqa: E402
from otq_kernels.models import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 1):
    torch.manual_seed(0)
    model = build_model("tiny")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.mark.parametrize("call, match", [
    (lambda a: fidelity.velocity_psnr_ssim(a, a.repeat(1, 3, 1, 1)), "of one shape"),
    (lambda a: fidelity.velocity_psnr_ssim(a[0, 0], a[0, 0]), "of one shape"),
    (lambda a: fidelity.velocity_psnr_ssim(a[:0], a[:0]), "non-empty"),
    (lambda a: fidelity.paired_psnr_ssim(a, a, data_range=-2.0), "data_range must be positive"),
    (lambda a: fidelity.paired_psnr_ssim(a, a, data_range=0.0), "data_range must be positive"),
    (lambda a: fidelity.paired_psnr_ssim(a[..., :5, :], a[..., :5, :]), "at least 6x6"),
    (lambda a: fidelity.paired_psnr_ssim(a[:0], a[:0]), "non-empty"),
    (lambda a: latent.pca_variances(a.flatten(1), n_components=0), "n_components must be"),
], ids=["velocity-shapes", "velocity-2d", "velocity-empty", "negative-range", "zero-range",
        "five-pixels", "empty", "no-components"])
def test_bad_input_is_refused_not_scored(call, match):
    """Input that gave a score of nothing (psnr inf for different shapes broadcast, or a
    clamp to an empty range) or a crash inside torchmetrics: a ValueError."""
    with pytest.raises(ValueError, match=match):
        call(torch.rand(2, 1, 16, 16) * 2 - 1)


def test_probes_leave_the_models_modes():
    fp, q = _model().train(), _model(seed=2).train()
    fp.out.eval()
    modes = {name: m.training for name, m in fp.named_modules()}
    images = torch.rand(2, 1, 16, 16)
    fidelity.paper_velocity_psnr_ssim(fp, q, images)
    latent.latent_variance_probe(fp, images, ts=(0.0,), n_components=2)
    assert {name: m.training for name, m in fp.named_modules()} == modes and q.training


def test_paired_psnr_ssim():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(4, 1, 16, 16, generator=g) * 2 - 1
    same = fidelity.paired_psnr_ssim(a, a.clone())
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    small = fidelity.paired_psnr_ssim(a, a + 0.01 * torch.randn(a.shape, generator=g))
    big = fidelity.paired_psnr_ssim(a, a + 0.2 * torch.randn(a.shape, generator=g))
    assert math.inf > small["psnr"] > big["psnr"] > 0
    assert 1.0 > small["ssim"] > big["ssim"]
    # PSNR with data_range 2: 10·log10(4 / mse)
    assert small["psnr"] == pytest.approx(10 * math.log10(4 / small["mse"]), rel=1e-4)
    with pytest.raises(ValueError):
        fidelity.paired_psnr_ssim(a, a[:2])


def test_box_ssim_identity_and_noise():
    x = torch.rand(2, 1, 16, 16)
    assert fidelity.box_ssim(x, x) == pytest.approx(1.0, abs=1e-6)
    assert fidelity.box_ssim(x, x + 0.3 * torch.randn_like(x)) < 0.9


def test_paper_velocity_psnr_ssim():
    fp, images = _model(1), torch.rand(4, 1, 16, 16)
    same = fidelity.paper_velocity_psnr_ssim(fp, _model(1), images)
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0, abs=1e-6)
    q = _model(1)
    with torch.no_grad():
        for p in q.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    res = fidelity.paper_velocity_psnr_ssim(fp, q, images)
    v = fp(images, torch.zeros(4))
    rmse = torch.sqrt(torch.mean((v - q(images, torch.zeros(4))) ** 2)).item()
    assert res["psnr"] == pytest.approx(20 * math.log10(1 / rmse), rel=1e-4)
    assert 0 < res["ssim"] < 1


def test_fid_unavailable_is_reported(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    res = fidelity.fid(x, x)
    assert res["fid"] is None and res["fid_unavailable"]


def test_fid_with_a_local_feature_network():
    """The FID path end to end (torchmetrics' Fréchet distance) on a small fixed network:
    0 for identical sets (up to the matrix square root's rounding: 1.2e-6 with
    torchmetrics 1.0, the floor pyproject declares), growing with the distribution shift."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(),
                              torch.nn.Linear(12, 6)).double()
    feature = torch.nn.Sequential(_ToDouble(), net)
    g = torch.Generator().manual_seed(3)
    real = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    other = torch.rand(64, 1, 16, 16, generator=g) * 2 - 1
    same = fidelity.fid(real, real, batch_size=20, feature=feature)
    near = fidelity.fid(real, other, feature=feature)["fid"]
    far = fidelity.fid(real, (other * 0.5 + 0.4), feature=feature)["fid"]
    assert same["n_real"] == same["n_fake"] == 64
    assert abs(same["fid"]) < 1e-5 and 0 < near < far


class _ToDouble(torch.nn.Module):
    def forward(self, x):
        return x.double()


def test_latent_probe_shapes():
    model, images = _model(), torch.rand(24, 1, 16, 16)
    res = latent.latent_variance_probe(model, images, ts=(0.0, 0.5), n_components=5)
    assert set(res) == {0.0, 0.5}
    r = res[0.0]
    assert r["variances"].shape == (5,) and r["dim"] == 64 * 8 * 8 and r["n"] == 24
    assert torch.all(r["variances"][:-1] >= r["variances"][1:])
    assert 0 <= r["collapsed"] <= 5 and r["mean"] > 0


def test_pca_variances_match_covariance_eigenvalues():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g) * torch.tensor([3.0, 2, 1, 0.5, 0.1, 0.0])
    var = latent.pca_variances(x, 6)
    eig = torch.linalg.eigvalsh(torch.cov(x.T.double())).flip(0).float()
    torch.testing.assert_close(var, eig, rtol=1e-4, atol=1e-6)
    assert int((var < latent.COLLAPSE_THRESHOLD).sum()) == 1


def test_pca_variances_of_wide_features_take_the_randomized_branch(monkeypatch):
    """Above 2048 in both dimensions the variances come from ``torch.pca_lowrank``; on
    features of rank 5 they equal the exact ones (from the small factor) and the rest
    vanish."""
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    a = torch.randn(2050, 5, generator=g, dtype=torch.float64) * scales
    b = torch.randn(5, 2060, generator=g, dtype=torch.float64)
    calls = []
    lowrank = torch.pca_lowrank
    monkeypatch.setattr(torch, "pca_lowrank", lambda *a, **k: calls.append(k) or lowrank(*a, **k))
    var = latent.pca_variances((a @ b).float(), 8)
    assert len(calls) == 1 and calls[0]["q"] == 18 and calls[0]["center"] is False
    r = torch.linalg.qr(a - a.mean(0)).R  # centred features = Q R b, so their spectrum is R b's
    exact = (torch.linalg.svdvals(r @ b) ** 2 / (2050 - 1)).float()
    assert var.shape == (8,)
    torch.testing.assert_close(var[:5], exact, rtol=1e-4, atol=0)
    assert var[5:].max() < 1e-6 * exact[0]


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_variance_stats_summarise_the_pca_variances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 4, generator=g) * torch.tensor([2.0, 1.0, 0.5, 1e-4])
    stats = latent.variance_stats(x, n_components=4)
    var = stats["variances"]
    assert stats["mean"] == pytest.approx(var.mean().item())
    assert stats["std"] == pytest.approx(var.std(unbiased=False).item())  # (numpy's ddof=0)
    assert stats["collapsed"] == 1 and stats["dim"] == 4 and stats["n"] == 50


def test_fid_needs_a_nonempty_inception_weights_file(monkeypatch, tmp_path):
    """With torch-fidelity importable, FID runs only on a non-empty weights file."""
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch_fidelity", types.ModuleType("torch_fidelity"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    assert "Inception weights not found" in fidelity.fid_unavailable_reason()
    path = fidelity.inception_weights_path()
    path.parent.mkdir(parents=True)
    path.touch()  # (what an interrupted download leaves)
    assert "Inception weights not found" in fidelity.fid_unavailable_reason()
    path.write_bytes(b"weights")
    assert fidelity.fid_unavailable_reason() is None


def test_box_ssim_is_the_papers_formula():
    """11x11 box window with zero padding, C1 = 0.01^2, C2 = 0.03^2, mean over pixels."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 1, 12, 12, generator=g)
    y = (x + 0.1 * torch.randn(2, 1, 12, 12, generator=g)).clamp(0, 1)
    kernel = torch.full((1, 1, 11, 11), 1 / 121)
    pool = lambda z: torch.nn.functional.conv2d(z, kernel, padding=5)  # noqa: E731
    mx, my = pool(x), pool(y)
    vx, vy, cxy = pool(x * x) - mx**2, pool(y * y) - my**2, pool(x * y) - mx * my
    c1, c2 = 1e-4, 9e-4
    ssim = ((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    assert fidelity.box_ssim(x, y) == pytest.approx(ssim.mean().item(), rel=1e-5)


def test_fid_sees_clamped_unit_rgb_images():
    x = torch.tensor([-3.0, -1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 1, 5)
    rgb = fidelity._to_unit_rgb(x)
    assert rgb.shape == (1, 3, 1, 5)
    torch.testing.assert_close(rgb[0, :, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]).repeat(3, 1))


def test_paper_scores_feed_time_and_label_to_both_models():
    nets = []
    for seed in (1, 2):
        torch.manual_seed(0)
        net = build_model("tiny", num_classes=3)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        nets.append(net.eval())
    images, label, t = torch.rand(2, 1, 16, 16), torch.tensor([0, 2]), torch.full((2,), 0.5)
    got = fidelity.paper_velocity_psnr_ssim(*nets, images, t=0.5, label=label)
    with torch.no_grad():
        want = fidelity.velocity_psnr_ssim(*(net(images, t, {"label": label}) for net in nets))
    assert got == pytest.approx(want)
