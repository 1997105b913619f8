"""Plots from benchmark JSON: ``python benchmarks/plot.py RESULTS_DIR [--out DIR]``.

Reads whichever of linear.json, conv.json, fit.json, e2e.json exist in RESULTS_DIR and
writes PNGs next to them (or into --out):

- ``linear_ratio_<granularity>.png``: t_fp16 / t vs M, one panel per (N, K), one line per
  bit width for the best fused path (min over Triton kernels and CUDA), dashed for dequant;
- ``conv_ratio.png``: CUDA conv, Triton implicit-GEMM and dequant ratios per UNet conv
  layer and batch;
- ``fit_rate.png``: weights/s per backend and method (log scale);
- ``e2e.png``: step-latency ratio and peak-memory ratio vs FP16 per variant and batch.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from derive import is_right

try:  # optional: without matplotlib, main() says so and returns 0 (JSON is the result)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError as _err:  # pragma: no cover - matplotlib is in the dev requirements
    plt = None
    MISSING = f"{type(_err).__name__}: {_err}"

FUSED = ("triton", "cuda")


def load(directory: Path, subject: str) -> dict | None:
    path = directory / f"{subject}.json"
    return json.loads(path.read_text()) if path.exists() else None


def title(payload: dict, text: str) -> str:
    meta = payload["meta"]
    where = meta.get("gpu") or meta.get("cpu") or meta.get("device")
    smoke = " [SMOKE: not a measurement]" if meta.get("smoke") else ""
    return f"{text} — {where}{smoke}"


def timed(rows: list[dict]) -> list[dict]:
    """The rows with a time and a right result (derive.is_right: a fast wrong kernel is
    not plotted)."""
    return [r for r in rows if r.get("p50_us") and not r.get("skipped") and is_right(r)]


def best_fused(rows: list[dict]) -> dict[tuple, float]:
    """(shape, bits, M) -> best ratio over fused paths."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r["backend"] in FUSED and r.get("ratio"):
            key = (r["shape"], r["bits"], r["M"])
            best[key] = max(best.get(key, 0.0), r["ratio"])
    return best


def plot_linear(payload: dict, out: Path) -> list[Path]:
    rows = timed(payload["rows"])
    written = []
    for gran in sorted({r["granularity"] for r in rows if r.get("granularity")}):
        sub = [r for r in rows if r.get("granularity") == gran]
        shapes = list(dict.fromkeys(r["shape"] for r in sub))
        if not shapes:
            continue
        cols = min(3, len(shapes))
        nrows = -(-len(shapes) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.6 * nrows), squeeze=False)
        best = best_fused(sub)
        for ax, shape in zip(axes.flat, shapes, strict=False):
            for bits in sorted({r["bits"] for r in sub if r["shape"] == shape}):
                ms = sorted({m for (s, b, m) in best if s == shape and b == bits})
                line = ax.plot(ms, [best[(shape, bits, m)] for m in ms], marker="o",
                               label=f"{bits}-bit fused")
                deq = sorted((r["M"], r["ratio"]) for r in sub if r["shape"] == shape and
                             r["bits"] == bits and r["backend"] == "dequant" and r.get("ratio"))
                if deq:
                    ax.plot(*zip(*deq, strict=True), ls="--", color=line[0].get_color(),
                            alpha=0.6)
            ax.axhline(1.0, color="grey", lw=0.8)
            ax.set(xscale="log", xlabel="M", ylabel="t_fp16 / t", title=shape)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(shapes):]:
            ax.axis("off")
        fig.suptitle(title(payload, f"codebook linear vs FP16 ({gran}; dashed = dequant)"))
        fig.tight_layout()
        written.append(save(fig, out / f"linear_ratio_{gran}.png"))
    return written


def conv_path(row: dict) -> str:
    """A conv row's series: its backend, or cuda_cl for lut_conv on channels-last x."""
    return "cuda_cl" if row.get("kernel") == "lut_conv_cl" else row["backend"]


def plot_conv(payload: dict, out: Path) -> list[Path]:
    paths = ("cuda", "cuda_cl", "triton", "dequant")
    rows = [r for r in timed(payload["rows"]) if conv_path(r) in paths and r.get("ratio")
            and r.get("kernel") != "implicit_gemm_nosplit"]
    if not rows:
        return []
    bits = 4 if any(r["bits"] == 4 for r in rows) else rows[0]["bits"]
    rows = [r for r in rows if r["bits"] == bits and r["granularity"] == rows[0]["granularity"]]
    labels = list(dict.fromkeys(f"{r['shape']} b{r['batch']}" for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels)), 4))
    present = [b for b in paths if any(conv_path(r) == b for r in rows)]
    width = 0.8 / len(present)
    for i, path in enumerate(present):
        vals = {f"{r['shape']} b{r['batch']}": r["ratio"] for r in rows if conv_path(r) == path}
        ax.bar([j + width * i for j in range(len(labels))], [vals.get(lab, 0) for lab in labels],
               width=width, label=path)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=70,
                  fontsize=7)
    ax.set_ylabel("t_fp16 cuDNN / t")
    ax.legend()
    ax.set_title(title(payload, f"conv2d, {bits}-bit {rows[0]['granularity']}"), fontsize=9)
    fig.tight_layout()
    return [save(fig, out / "conv_ratio.png")]


def plot_fit(payload: dict, out: Path) -> list[Path]:
    rows = [r for r in timed(payload["rows"]) if r.get("weights_per_s")]
    if not rows:
        return []
    labels = [f"{r['backend']}/{r['method']}/{r['granularity']}/b{r['bits']}" for r in rows]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(rows) + 1.5))
    ax.barh(labels, [r["weights_per_s"] for r in rows],
            color=["C3" if r.get("extrapolated") else "C0" for r in rows])
    ax.set(xscale="log", xlabel="weights / s (red: measured on a layer subset)")
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title(payload, "codebook fitting"), fontsize=9)
    fig.tight_layout()
    return [save(fig, out / "fit_rate.png")]


def plot_e2e(payload: dict, out: Path) -> list[Path]:
    rows = [r for r in timed(payload["rows"]) if r.get("kernel") == "eager"]
    if not rows:
        return []
    variants = list(dict.fromkeys(_variant(r) for r in rows))
    batches = sorted({r["M"] for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for key, ax, label in (("ratio", axes[0], "t_fp16 / t (step)"),
                           ("peak_ratio", axes[1], "peak memory / fp16")):
        for i, batch in enumerate(batches):
            vals = {_variant(r): r.get(key) or 0 for r in rows if r["M"] == batch}
            ax.bar([j + i / (len(batches) + 1) for j in range(len(variants))],
                   [vals.get(v, 0) for v in variants], width=1 / (len(batches) + 1),
                   label=f"batch {batch}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(range(len(variants)), variants, rotation=45, fontsize=7)
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(title(payload, "UNet Euler step (eager)"))
    fig.tight_layout()
    return [save(fig, out / "e2e.png")]


def _variant(row: dict) -> str:
    if row["backend"] == "fp16":
        return "fp16"
    return f"{row['bits']}b-{row['granularity']}-{row['backend']}"


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", help="directory holding <subject>.json files")
    p.add_argument("--out", default=None, help="where PNGs go (default: the results dir)")
    args = p.parse_args(argv)
    if plt is None:
        print(f"plot: matplotlib unavailable ({MISSING}); no plots drawn")
        return 0
    src = Path(args.results)
    out = Path(args.out) if args.out else src
    plotters = {"linear": plot_linear, "conv": plot_conv, "fit": plot_fit, "e2e": plot_e2e}
    written = []
    for subject, fn in plotters.items():
        try:
            payload = load(src, subject)
            if payload is None:
                print(f"plot: no {subject}.json in {src}")
                continue
            written += fn(payload, out)
        except Exception as err:  # noqa: BLE001 - one bad plot must not stop the others
            print(f"plot: {subject} failed: {type(err).__name__}: {err}")
    for path in written:
        print(f"plot: wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
