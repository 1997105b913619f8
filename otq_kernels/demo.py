"""The demo and the evaluation engine behind ``otq eval`` / ``otq demo``.

:func:`evaluate` quantizes one float FM model at every (bits, method) setting, samples
the *same* noise with the FP model and each quantized one, and scores each setting:

* end-to-end paired fidelity of the samples: PSNR / SSIM (torchmetrics) and the exact
  per-pair pixel W2 (``metrics.wasserstein.paired_pixel_w2``, κ-bounds above 32 px);
* the paper's protocol: PSNR / SSIM of the velocities at t = 0 on real images in [0, 1]
  (``metrics.fidelity.paper_velocity_psnr_ssim``), and the latent-variance probe
  (PCA(20) of the bottleneck at t = 0, ``metrics.latent``);
* FID only when torch-fidelity and the Inception weights are on disk (else "unavailable"
  with the reason, never a number);
* size: bits per weight of the quantized layers (codebooks included) and model bytes.

Through :mod:`otq_kernels.report` it writes ``results.json``, ``table.txt``, plots
(fidelity vs bits per method, PSNR vs model size) and sample grids into ``out_dir``.
:func:`run` is ``otq demo``: the bundled digits model at 2, 3, 4, 8 bits with all five
methods.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from . import backends, fm
from .format import integer_value
from .nn import quantize_model
from .quantizers import METHODS
from .report import format_table, write_outputs
from .summary import quantization_summary

DEMO_BITS = (2, 3, 4, 8)
DEFAULT_OUT = "demo_out"


# ----------------------------------------------------------------------------- models
def random_model(config: str = "tiny", seed: int = 0) -> nn.Module:
    """A randomly initialised UNet of ``config`` whose zero-initialised layers get small
    random weights (so its outputs depend on every layer). For tests and dry runs."""
    from .models import build_model

    torch.manual_seed(seed)
    model = build_model(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not bool(p.any()):
                p.normal_(0.0, 0.02)
    return model


def image_shape(model: nn.Module, size: int) -> tuple[int, int, int]:
    """(C, H, W) of the model's samples."""
    return (int(getattr(model, "in_channels", 1)), size, size)


def real_images(shape: tuple[int, int, int], n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """n real images [n, C, H, W] in [0, 1] for the paper protocol, and their description.

    Bundled data only: scikit-learn digits for 1 channel, scikit-image patches otherwise
    (gray repeated to C channels).
    """
    from .data import load_digits, load_image_patches

    c, h, w = shape
    if h != w or not (integer_value(n) or 0) >= 1:
        raise ValueError(f"need square images and n >= 1, got shape {tuple(shape)}, n {n!r}")
    if c == 1:
        x = load_digits(size=h)
        idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
        return (x[idx] + 1) / 2, f"sklearn digits upscaled to {h}x{h} ({min(n, len(x))} images)"
    x = load_image_patches(size=h, n=n, seed=seed)
    return ((x + 1) / 2).repeat(1, c, 1, 1), f"scikit-image gray patches x{c} channels ({n})"


def _device(model: nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.empty(0)).device


def _check_backend_runs(name: str, device: torch.device) -> None:
    """ValueError, before any sampling, where backend ``name`` cannot run on ``device``."""
    problem = None if name == "auto" else backends.cannot_run(name, device)
    if problem:
        raise ValueError(problem)


# ----------------------------------------------------------------------------- scoring
def size_stats(model: nn.Module) -> dict:
    """Model size: bytes as stored, fp32/fp16 sizes, bits/weight (quantized layers only,
    codebooks included) and overall."""
    s = quantization_summary(model)
    q = s.quantized
    numel = sum(math.prod(r.shape) for r in q)
    return {
        "model_bytes": s.bytes_after, "fp32_bytes": s.bytes_fp32, "fp16_bytes": s.bytes_fp16,
        "quantized_layers": len(q), "kept_float_layers": len(s.kept_float),
        "layer_bits_per_weight": 8.0 * sum(r.nbytes for r in q) / numel if numel else 32.0,
        "model_bits_per_weight": s.model_bits_per_weight,
        "mean_sqnr_db": _mean([r.sqnr_db for r in q if r.sqnr_db is not None
                               and math.isfinite(r.sqnr_db)]),
    }


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


@torch.no_grad()
def velocity_and_latent(model: nn.Module, images: torch.Tensor, t: float = 0.0):
    """One forward at time t on ``images`` [B, C, H, W] in [0, 1]: (velocity [B, C, H, W],
    latent-variance probe dict) — the probe is PCA(20) of the bottleneck (``middle_block``)
    activations captured by a hook during the same forward."""
    from .metrics.latent import variance_stats

    captured = []
    block = getattr(model, "middle_block", None)
    handle = None if block is None else block.register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().float().flatten(1).cpu()))
    try:
        v = model(images, torch.full((images.shape[0],), float(t), device=images.device)).float()
    finally:
        if handle is not None:
            handle.remove()
    if not captured:
        return v, None
    stats = variance_stats(captured[0])
    stats.pop("variances")
    return v, stats


def score(fp: dict, q_samples, model_q, real01, fid_reason) -> dict:
    """Every metric of one setting. fp: {"samples" [B, C, H, W] in [-1, 1], "velocity"
    (FP velocity at t=0 on real01) or None}; real01: real images in [0, 1] or None."""
    from .metrics import fidelity
    from .metrics.wasserstein import paired_pixel_w2

    out = {"samples": fidelity.paired_psnr_ssim(fp["samples"], q_samples)}
    finite = bool(torch.isfinite(q_samples).all())
    if finite:
        w2 = paired_pixel_w2(fp["samples"], q_samples)
        w = w2["upper"].clamp_min(0).sqrt()
        out["pixel_w2"] = {"method": w2["method"], "kappa": w2["kappa"],
                           "mean": float(w.mean()), "max": float(w.max()),
                           "w2sq": w2["upper"].tolist(), "lower_w2sq": w2["lower"].tolist()}
    else:  # (a diverged setting is a row of its own, not the end of the sweep)
        out["pixel_w2"] = {"method": "not computed: the samples hold NaN or Inf",
                           "kappa": None, "mean": math.nan, "max": math.nan}
        fid_reason = fid_reason or "the samples hold NaN or Inf"
    if real01 is not None:
        v_q, latent = velocity_and_latent(model_q, real01)
        out["paper_velocity_t0"] = fidelity.velocity_psnr_ssim(fp["velocity"], v_q)
        if latent is not None:
            out["latent_t0"] = latent
    out["fid"] = ({"fid": None, "fid_unavailable": fid_reason} if fid_reason
                  else fidelity.fid(real01 * 2 - 1, q_samples))
    return out


# ----------------------------------------------------------------------------- engine
def _copy_sharing_tensors(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are ``model``'s own: quantizing
    it swaps its layers and reads their weights, so no float weight is copied."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return copy.deepcopy(model, {id(t): t for t in tensors})


def _sample(model, x0, steps, solver):
    t = time.perf_counter()
    with torch.inference_mode():
        x = fm.sample(model, x0, steps=steps, method=solver)
    return x, time.perf_counter() - t


@fm.leaves_modes
def evaluate(model: nn.Module, bits=DEMO_BITS, methods=METHODS, granularity: str = "channel",
             n: int = 16, steps: int = 8, solver: str = "euler", seed: int = 0,
             image_size: int = 16, n_real: int = 64, backend: str = "auto",
             out_dir: str | os.PathLike | None = None, paper_protocol: bool = True,
             progress: bool = True, log=print, meta: dict | None = None) -> dict:
    """Quantize ``model`` (float, left untouched, its modes too: it runs in eval mode) at
    every bits × methods setting and score each against the FP model on the same noise x0
    [n, C, S, S] (S = image_size, at least 6: the SSIM window).

    Returns ``{"meta", "fp", "rows": [...]}``; with ``out_dir`` also writes results.json,
    table.txt, plots and sample grids there.
    """
    from tqdm.auto import tqdm

    from .metrics import fidelity

    started = time.perf_counter()
    device = _device(model)
    _check_backend_runs(backend, device)
    shape = image_shape(model, image_size)
    fidelity.check_ssim_size(shape[1:])
    x0 = fm.make_noise((n, *shape), seed, device=device)
    real01, real_desc = real_images(shape, n_real, seed) if paper_protocol else (None, None)
    real01 = real01.to(device) if real01 is not None else None
    fid_reason = fidelity.fid_unavailable_reason()
    if fid_reason is None and real01 is None:
        fid_reason = "no real images (paper protocol off)"
    fp_samples, fp_time = _sample(model, x0, steps, solver)
    fp = {"size": size_stats(model), "sample_seconds": fp_time}
    ref = {"samples": fp_samples, "velocity": None}
    if real01 is not None:
        ref["velocity"], latent = velocity_and_latent(model, real01)
        if latent is not None:
            fp["latent_t0"] = latent
    fp["fid"] = ({"fid": None, "fid_unavailable": fid_reason} if fid_reason
                 else fidelity.fid(real01 * 2 - 1, fp_samples))
    settings = [(b, m) for b in bits for m in methods]
    rows, samples = [], {"fp": fp_samples}
    bar = tqdm(settings, desc="eval", unit="setting", disable=not progress)
    for b, m in bar:
        bar.set_postfix_str(f"{b} bits {m}")
        t = time.perf_counter()
        q = quantize_model(_copy_sharing_tensors(model), bits=b, method=m,
                           granularity=granularity, backend=backend, progress=False)
        q_time = time.perf_counter() - t
        q_samples, s_time = _sample(q, x0, steps, solver)
        row = {"bits": b, "method": m, "granularity": granularity, "size": size_stats(q),
               "quantize_seconds": q_time, "sample_seconds": s_time}
        row.update(score(ref, q_samples, q, real01, fid_reason))
        rows.append(row)
        samples[f"b{b}_{m}"] = q_samples
        del q
    result = {
        "meta": {**(meta or {}), "n": n, "steps": steps, "solver": solver, "seed": seed,
                 "image_shape": list(shape), "granularity": granularity, "backend": backend,
                 "bits": list(bits), "methods": list(methods), "real_images": real_desc,
                 "fid": "available" if fid_reason is None else f"unavailable: {fid_reason}",
                 "torch": torch.__version__, "threads": torch.get_num_threads(),
                 "machine": platform.machine(), "wall_seconds": time.perf_counter() - started},
        "fp": fp,
        "rows": rows,
    }
    table = format_table(result)
    wrote = None
    if out_dir is not None:  # (first: a reader of the log that leaves, `| head`, loses nothing)
        wrote = write_outputs(result, samples, table, Path(out_dir))
    log(table)
    if wrote:
        log(wrote)
    return result


# ----------------------------------------------------------------------------- demo
def run(out_dir: str | os.PathLike = DEFAULT_OUT, bits=DEMO_BITS, methods=METHODS,
        n: int = 16, steps: int = 8, solver: str = "euler", seed: int = 0,
        model: nn.Module | None = None, progress: bool = True, log=print,
        device=None) -> dict:
    """``otq demo``: the bundled digits FM model at 2/3/4/8 bits with every method.

    Prints the fidelity + size table and writes plots and sample grids to ``out_dir``.
    ``model`` replaces the bundled one (e.g. a random tiny UNet in tests); ``device``
    (default: the model's, CPU for the bundled one) is where it runs.
    """
    started = time.perf_counter()
    with _denormals_flushed():
        result = _run(out_dir, bits, methods, n, steps, solver, seed, model, progress, log,
                      device)
    log(f"demo finished in {time.perf_counter() - started:.1f} s")
    return result


@contextlib.contextmanager
def _denormals_flushed():
    """Denormals flushed to zero (the demo's sampling speed), then the caller's mode back
    (torch has no getter: a product that is denormal tells)."""
    flushing = float(torch.tensor(2.0 ** -1000, dtype=torch.float64) * 2.0 ** -60) == 0.0
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(flushing)


def _run(out_dir, bits, methods, n, steps, solver, seed, model, progress, log,
         device) -> dict:
    if model is None:
        from .models import load_demo_model

        model, name = load_demo_model(), "bundled demo model (fm_digits.safetensors)"
    else:
        name = type(model).__name__
    if device is not None:
        model = model.to(device)
    log(f"otq demo: {name}, bits {list(bits)}, methods {list(methods)}, {n} samples, "
        f"{solver} x {steps} steps, {torch.get_num_threads()} threads")
    result = evaluate(model, bits=bits, methods=methods, n=n, steps=steps, solver=solver,
                      seed=seed, image_size=16, out_dir=out_dir, progress=progress, log=log,
                      meta={"model": name})
    return result
