"""Benchmark the quantization bounds on image W_2^2 against the exact LP.

Rows: one per (size, pair, kappa, bound) with value, relative error vs exact (when known) and
seconds; plus one "interval" row per (size, pair, kappa) for the default pair of bounds
(dual upscaling + weighted cost): gap (upper - lower) relative to exact (or to upper) and the
speed-up over the exact LP, in wall seconds and in process CPU seconds (steadier when the
machine is shared). Writes JSON (--out) and a PNG plot next to it.

    python benchmarks/bench_wasserstein.py                 # full: 32^2, 64^2 (+ exact), 128^2
    python benchmarks/bench_wasserstein.py --smoke         # 16^2 only, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from otq_kernels.metrics import wasserstein as W  # noqa: E402
from otq_kernels.metrics.dotmark import dotmark_pairs  # noqa: E402

# (size, number of pairs, with exact LP)
FULL = [(32, 4, True), (64, 2, True), (128, 1, False)]
SMOKE = [(16, 1, True)]


def _meta() -> dict:
    import ot

    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sha = "unknown (no commit)"
    return {"machine": f"{platform.processor() or platform.machine()}, "
                       f"{os.cpu_count()} CPU cores (shared), {platform.platform()}",
            "device": "cpu", "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "pot": ot.__version__, "git_sha": sha,
            "images": "dotmark.log_grf pairs (exp(3 * GRF)), p = 2, pixel-unit cost"}


def _interval_row(base: dict, r: dict, exact: float | None, ex_t: tuple | None) -> dict:
    lo, hi = r["lower_dual_upscaling"], r["upper_weighted_cost"]
    secs = r["lower_dual_upscaling_s"] + r["upper_weighted_cost_s"]
    cpu = r["lower_dual_upscaling_cpu_s"] + r["upper_weighted_cost_cpu_s"]
    ref = exact if exact is not None else hi
    return {**base, "bound": "interval(dual, weighted)", "lower": lo, "upper": hi,
            "gap_rel": (hi - lo) / ref, "seconds": secs, "cpu_seconds": cpu,
            "speedup_vs_exact": ex_t[0] / secs if ex_t else None,
            "cpu_speedup_vs_exact": ex_t[1] / cpu if ex_t else None,
            "best_lower": r["lower"], "best_upper": r["upper"],
            "best_gap_rel": (r["upper"] - r["lower"]) / ref}


def _rows_for_pair(a, b, size, pair, kappas, with_exact) -> list[dict]:
    rows, exact, ex_t = [], None, None
    if with_exact:
        t0, c0 = time.perf_counter(), time.process_time()
        exact = W.exact_wasserstein(a, b, p=2)
        ex_t = (time.perf_counter() - t0, time.process_time() - c0)
        rows.append({"size": size, "pair": pair, "kappa": None, "bound": "exact",
                     "value": exact, "seconds": ex_t[0], "cpu_seconds": ex_t[1]})
        print(f"{size}^2 pair {pair}: exact {exact:.4f} in {ex_t[0]:.2f} s "
              f"({ex_t[1]:.2f} s CPU)", flush=True)
    for kappa in kappas:
        r = W.all_bounds(a, b, p=2, kappa=kappa, names="all")[0]
        base = {"size": size, "pair": pair, "kappa": kappa, "exact": exact}
        for name in [*W.LOWER_BOUNDS, *W.UPPER_BOUNDS]:
            rel = (r[name] - exact) / exact if exact else None
            rows.append({**base, "bound": name, "value": r[name], "rel_err": rel,
                         "seconds": r[name + "_s"], "cpu_seconds": r[name + "_cpu_s"]})
        rows.append(_interval_row(base, r, exact, ex_t))
        iv = rows[-1]
        print(f"  kappa {kappa}: gap {100 * iv['gap_rel']:.3f}% in {iv['seconds']:.2f} s "
              f"({iv['cpu_seconds']:.2f} s CPU) "
              + " ".join(f"{n}={x['value']:.4f}" for n, x in
                         ((x["bound"], x) for x in rows[-5:-1])), flush=True)
    return rows


def run(plan, kappas) -> list[dict]:
    rows = []
    for size, n_pairs, with_exact in plan:
        a, b = dotmark_pairs("log_grf", size, n_pairs, seed=size)
        for i in range(n_pairs):
            rows += _rows_for_pair(a[i], b[i], size, i, kappas, with_exact)
    return rows


def plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_t) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = sorted({r["size"] for r in rows if r.get("rel_err") is not None})
    names = [*W.LOWER_BOUNDS, *W.UPPER_BOUNDS]
    colours = dict(zip(names, ["tab:blue", "tab:orange", "tab:green", "tab:red"], strict=True))
    for size in sizes:
        for name in names:
            sel = [r for r in rows if r["size"] == size and r["bound"] == name]
            ks = sorted({r["kappa"] for r in sel})
            err = [100 * sum(r["rel_err"] for r in sel if r["kappa"] == k)
                   / sum(1 for r in sel if r["kappa"] == k) for k in ks]
            sec = [sum(r["cpu_seconds"] for r in sel if r["kappa"] == k)
                   / sum(1 for r in sel if r["kappa"] == k) for k in ks]
            style = "-o" if size == sizes[-1] else ":x"
            ax_e.plot(ks, err, style, color=colours[name], label=f"{name} {size}^2")
            ax_t.semilogy(ks, sec, style, color=colours[name], label=f"{name} {size}^2")
        ex = [r["cpu_seconds"] for r in rows if r["size"] == size and r["bound"] == "exact"]
        ax_t.axhline(sum(ex) / len(ex), ls="--", color="k", lw=0.8)
        ax_t.text(2, sum(ex) / len(ex) * 1.1, f"exact {size}^2", fontsize=7)
    ax_e.axhline(0, color="k", lw=0.8)
    ax_e.set(xscale="log", xlabel="kappa", ylabel="bound - exact (% of exact)",
             title="W2^2 bounds, log-GRF pairs (mean)")
    ax_t.set(xscale="log", xlabel="kappa", ylabel="CPU seconds (2-core CPU)", title="time")
    for ax in (ax_e, ax_t):
        ax.set_xticks([2, 4, 8], ["2", "4", "8"])
        ax.minorticks_off()
    ax_e.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default benchmarks/results/cpu/wasserstein.json; "
                         "with --smoke a temporary folder)")
    ap.add_argument("--smoke", action="store_true", help="16x16 only, a few seconds")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from --out's JSON")
    args = ap.parse_args(argv)
    out = args.out
    if out is None:
        out = (Path(tempfile.mkdtemp()) / "wasserstein_smoke.json" if args.smoke
               else ROOT / "benchmarks" / "results" / "cpu" / "wasserstein.json")
    if args.plot_only:
        plot(json.loads(out.read_text())["rows"], out.with_suffix(".png"))
        return
    plan, kappas = (SMOKE, (2, 4)) if args.smoke else (FULL, (2, 4, 8))
    torch.set_num_threads(1)  # the LP is single-threaded too; avoids spin-waits on a busy box
    t0 = time.perf_counter()
    rows = run(plan, kappas)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {**_meta(), "smoke": args.smoke, "total_seconds": time.perf_counter() - t0}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    plot(rows, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
