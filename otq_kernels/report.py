"""Reporting for ``otq eval`` / ``otq demo``: the fidelity + size table, sample grids,
plots (fidelity vs bits per method, PSNR vs model size, a sample mosaic) and results.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch


def _figure(nrows: int, ncols: int, figsize: tuple[float, float]):
    """(a matplotlib Figure, its axes [nrows, ncols]): made without pyplot, so that the
    caller's backend and figures (a notebook's) are left as they were."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def jsonable(obj):
    """``obj`` (dicts, lists, tensors, numbers) as strict JSON takes it: inf/nan as strings,
    tensors and numpy values as lists and numbers. Done by json itself (no Python
    recursion: metadata as deeply nested as json.loads took prints too)."""
    return json.loads(json.dumps(obj, default=_as_list), parse_constant=NON_FINITE.__getitem__)


NON_FINITE = {"Infinity": "inf", "-Infinity": "-inf", "NaN": "nan"}


def _as_list(obj):
    if hasattr(obj, "tolist"):  # a tensor, a numpy array or scalar
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def _g(v, spec: str, width: int) -> str:
    if v is None:
        return f"{'-':>{width}}"
    if isinstance(v, str) or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'inf' if v in ('inf', math.inf) else str(v):>{width}}"
    return f"{format(v, spec):>{width}}"


def format_table(result: dict) -> str:
    """The fidelity + size table (one line per setting, FP first)."""
    fp = result["fp"]
    head = (f"{'bits':>4} {'method':<9} {'bits/w':>7} {'model KiB':>9} {'PSNR dB':>8} "
            f"{'SSIM':>6} {'pix W2':>7} {'vPSNR@0':>8} {'vSSIM@0':>8} {'lat.var':>8} "
            f"{'FID':>5}")
    lines = [head, "-" * len(head)]
    lat = fp.get("latent_t0", {}).get("mean")
    paper = result["meta"].get("real_images") is not None
    lines.append(f"{'fp32':>4} {'-':<9} {32.0:>7.2f} {fp['size']['fp32_bytes'] / 1024:>9.1f} "
                 f"{'inf':>8} {1.0:>6.3f} {0.0:>7.3f} {'inf' if paper else '-':>8} "
                 f"{_g(1.0 if paper else None, '.3f', 8)} "
                 f"{_g(lat, '.4f', 8)} {_g(fp['fid'].get('fid'), '.1f', 5)}")
    for r in result["rows"]:
        v = r.get("paper_velocity_t0", {})
        lines.append(
            f"{r['bits']:>4} {r['method']:<9} {r['size']['layer_bits_per_weight']:>7.2f} "
            f"{r['size']['model_bytes'] / 1024:>9.1f} {_g(r['samples']['psnr'], '.2f', 8)} "
            f"{r['samples']['ssim']:>6.3f} {r['pixel_w2']['mean']:>7.3f} "
            f"{_g(v.get('psnr'), '.2f', 8)} {_g(v.get('ssim'), '.3f', 8)} "
            f"{_g(r.get('latent_t0', {}).get('mean'), '.4f', 8)} "
            f"{_g(r['fid'].get('fid'), '.1f', 5)}")
    m = result["meta"]
    lines += ["-" * len(head),
              f"{m['n']} samples, {m['solver']} x {m['steps']} steps, seed {m['seed']}, "
              f"{m['granularity']} codebooks. bits/w: quantized layers incl. fp32 codebooks; "
              f"model KiB: everything stored.",
              f"PSNR/SSIM/pix W2 (pixels, {_w2_kind(result['rows'])}, mean): FP vs quantized "
              "samples from the same noise. vPSNR/vSSIM@0: paper protocol (velocity at t=0 on "
              "real images). "
              "lat.var: mean PCA(20) variance of the bottleneck at t=0.",
              f"FID: {m['fid']}"]
    over = sorted({r["bits"] for r in result["rows"]
                   if r["size"]["layer_bits_per_weight"] > 32})
    if over:
        lines.append(f"Note: at {over} bits the {m['granularity']} codebooks (2^b fp32 entries "
                     "per row) cost more than the fp32 weights on this model's short rows; "
                     "use granularity 'tensor' there.")
    return "\n".join(lines)


def grid_image(x: torch.Tensor, nrow: int = 8, pad: int = 1):
    """Samples [B, C, H, W] in [-1, 1] -> a numpy image grid [rows·(H+pad)+pad, ...(, C)]."""
    b, c, h, w = x.shape
    img = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)
    rows = -(-b // nrow)
    grid = torch.ones(rows * (h + pad) + pad, nrow * (w + pad) + pad, c, device="cpu")
    for i in range(b):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + col * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = img[i]
    return (grid[..., 0] if c == 1 else grid).numpy()


GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def check_grid_path(path: str | os.PathLike) -> None:
    """ValueError unless ``path`` names an image file :func:`save_grid` writes."""
    if Path(path).suffix.lower() not in GRID_SUFFIXES:
        raise ValueError(f"{path}: an image grid is written as {', '.join(GRID_SUFFIXES)}; "
                         f"not {Path(path).suffix or 'a name without an extension'}")


def make_parent(path: str | os.PathLike) -> None:
    """Make the folder (and its parents) the file ``path`` is written into: where the
    path goes through a symlink (dangling or not), its target's."""
    Path(os.path.realpath(path)).parent.mkdir(parents=True, exist_ok=True)


def save_grid(x: torch.Tensor, path: str | os.PathLike, nrow: int = 8, scale: int = 4) -> None:
    """Save samples [B, C, H, W] in [-1, 1] as an image grid (nearest-upscaled by
    ``scale``); the format follows the extension (:data:`GRID_SUFFIXES`)."""
    import numpy as np
    from matplotlib.image import imsave

    check_grid_path(path)
    g = grid_image(x, nrow)
    g = np.repeat(np.repeat(g, scale, 0), scale, 1)
    make_parent(path)
    imsave(path, g, cmap="gray" if g.ndim == 2 else None, vmin=0, vmax=1)


def _plot_vs_bits(result: dict, panels: list[tuple[str, callable]], path: Path) -> None:
    rows = result["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = _figure(nrows, ncols, (4.4 * ncols, 3.4 * nrows))
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, get) in zip(axes.flat, panels, strict=False):
        for m in methods:
            pts = [(r["bits"], get(r)) for r in rows if r["method"] == m]
            pts = [(b, v) for b, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.set_xlabel("bits")
        ax.set_title(title)
        ax.set_xticks(sorted({r["bits"] for r in rows}))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_size(result: dict, path: Path) -> None:
    fig, axes = _figure(1, 1, (5, 3.6))
    ax = axes[0][0]
    for m in dict.fromkeys(r["method"] for r in result["rows"]):
        pts = [(r["size"]["model_bytes"] / 1024, r["samples"]["psnr"]) for r in result["rows"]
               if r["method"] == m and math.isfinite(r["samples"]["psnr"])]
        if pts:
            ax.plot(*zip(*sorted(pts), strict=True), marker="o", label=m)
    ax.axvline(result["fp"]["size"]["fp32_bytes"] / 1024, color="k", ls="--", lw=1,
               label="fp32 size")
    ax.axvline(result["fp"]["size"]["fp16_bytes"] / 1024, color="gray", ls=":", lw=1,
               label="fp16 size")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("model size (KiB, log scale)")
    ax.set_ylabel("paired sample PSNR (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _plot_mosaic(result: dict, samples: dict, path: Path, per_cell: int = 16) -> None:
    """FP on top, then one row per method and one column per bit width."""
    bits = list(dict.fromkeys(r["bits"] for r in result["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in result["rows"]))
    nrow = max(1, int(math.sqrt(min(per_cell, len(samples["fp"])))))
    fig, axes = _figure(len(methods) + 1, len(bits),
                        (2.2 * len(bits), 2.2 * (len(methods) + 1)))
    for ax in axes.flat:
        ax.axis("off")
    cmap = "gray" if samples["fp"].shape[1] == 1 else None
    axes[0][0].imshow(grid_image(samples["fp"][:per_cell], nrow), cmap=cmap, vmin=0, vmax=1)
    axes[0][0].set_title("FP (fp32)", fontsize=9)
    for i, m in enumerate(methods, start=1):
        for j, b in enumerate(bits):
            x = samples.get(f"b{b}_{m}")
            if x is not None:
                axes[i][j].imshow(grid_image(x[:per_cell], nrow), cmap=cmap, vmin=0, vmax=1)
                axes[i][j].set_title(f"{m} {b}-bit", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _w2_kind(rows: list) -> str:
    """What the pix W2 column holds: exact values, or upper bounds (larger images)."""
    bounds = {r["pixel_w2"]["kappa"] for r in rows if r["pixel_w2"]["method"] == "bounds"}
    if not bounds:
        return "exact per pair"
    return f"W2 an upper bound per pair: kappa={max(bounds)} interval"


def write_outputs(result: dict, samples: dict, table: str, out: Path) -> str:
    """results.json, table.txt, plots and per-setting sample grids under ``out``; returns
    the line that says so."""
    make_parent(out / "results.json")
    (out / "results.json").write_text(json.dumps(jsonable(result), indent=1))
    (out / "table.txt").write_text(table + "\n")
    for name, x in samples.items():
        save_grid(x, out / "samples" / f"{name}.png", nrow=min(8, len(x)))
    paper = "paper_velocity_t0" in (result["rows"] or [{}])[0]
    panels = [("paired sample PSNR (dB)", lambda r: r["samples"]["psnr"]),
              ("paired sample SSIM", lambda r: r["samples"]["ssim"]),
              ("pixel W2 (px, lower is better)", lambda r: r["pixel_w2"]["mean"])]
    if paper:
        panels += [("velocity PSNR @ t=0 (paper)", lambda r: r["paper_velocity_t0"]["psnr"]),
                   ("velocity SSIM @ t=0 (paper)", lambda r: r["paper_velocity_t0"]["ssim"]),
                   ("latent variance @ t=0", lambda r: r["latent_t0"]["mean"])]
    if result["rows"]:
        _plot_vs_bits(result, panels, out / "fidelity_vs_bits.png")
        _plot_vs_bits(result, panels[:2], out / "psnr_ssim_vs_bits.png")
        _plot_size(result, out / "psnr_vs_size.png")
        _plot_mosaic(result, samples, out / "samples_mosaic.png")
    return (f"wrote {out}/results.json, table.txt, fidelity_vs_bits.png, "
            f"psnr_ssim_vs_bits.png, psnr_vs_size.png, samples_mosaic.png and samples/*.png")
