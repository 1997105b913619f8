"""A compact digest of a GPU-suite results folder: ``python benchmarks/digest.py DIR``.

Reads whatever of ``DIR/{goal/,goal_tuned/,goal_graph/,goal_channels_last/,goal_large_m/,}`` +
``{linear,conv,e2e,fit}.json`` and ``DIR/checks.json`` exists and prints a few lines per
subject (the device tool returns only the end of stdout, so the suite prints this last and
appends it to summary.txt):

- linear: per (shape, bits, granularity) the best fused ratio t_fp16 / t at each M, with
  the path, % of copy bandwidth and the dequant ratio; per bit width lut_frag's speedup
  over lut_mma, and lut_frag32's over lut_frag, at each M (geometric mean over shapes
  and granularities); the dequant
  path's expansion kernels alone where timed (``--expand``): Triton's on both grids and
  the CUDA one;
- conv: per (bits, granularity, batch, kernel size) the geometric mean over layers of the CUDA (on
  NCHW x, and ``cuda_cl`` on channels-last x), Triton and dequant ratios (vs the faster
  dense cuDNN layout), plus every layer at 4 bits/channel;
- e2e: per variant and batch, step time, ratio and peak-memory ratio (and the MB of
  runtime code layouts cached, where any), eager and graph,
  and the velocity's error vs the dense model / vs dequant; and what the quantized
  layers ran (calls per op, backend and kernels, from ``record_dispatch``);
- fit: ms per whole-model pass per backend (ot); checks: ok or not;
- splitk, splitk_mma: per kernel and M, how often each forced split-K was fastest and how
  much slower the heuristic's split was at worst;
- e2e_profile: per variant the kernels and time per step by category, and memory kept
  after a step and at peak, with the largest kept block's call site;
- with ``--against OLD_DIR`` (an earlier run's folder, e.g. the committed
  ``benchmarks/results/<gpu>/``): under each file that OLD_DIR also holds, per (op, backend,
  kernel) the geometric mean and range of t_new / t_old over the rows both timed, so
  that a kernel's change reads against how far the unchanged paths (fp16, dequant)
  moved between the runs.

Pure json, no torch; never raises (a broken file is reported and skipped).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from derive import geomean, is_right

FUSED = ("triton", "cuda")
# The fields that name what a row timed (the rest are measurements)
ROW_IDENTITY = ("op", "backend", "kernel", "bits", "granularity", "M", "shape", "dtype",
                "batch", "timing", "split_k")


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except Exception as err:  # noqa: BLE001
        print(f"digest: cannot read {path}: {type(err).__name__}: {err}")
        return None


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def header(name: str, payload: dict) -> None:
    meta = payload.get("meta", {})
    rows = payload.get("rows", [])
    errors = [r for r in rows if r.get("error")]
    flags = []
    if not meta.get("complete", True):
        flags.append("INCOMPLETE (killed or still running)")
    if meta.get("interrupted"):
        flags.append(f"interrupted: {meta['interrupted']}")
    if meta.get("fatal_error"):
        flags.append(f"FATAL: {meta['fatal_error']}")
    if meta.get("skipped_configs"):
        flags.append(f"{len(meta['skipped_configs'])} configs not started (budget)")
    gemm = (meta.get("gemm") or {}).get("tflops")
    print(f"== {name}: {len(rows)} rows, {len(errors)} errors, {meta.get('wall_s')} s, "
          f"gpu {meta.get('gpu')}, copy {fmt(meta.get('copy_gbps'), '.0f')} GB/s, "
          f"gemm {fmt(gemm, '.0f')} TFLOP/s, autotune {meta.get('autotune_limit')}"
          + (f", git {meta.get('git_sha')} {str(meta.get('date') or '')[:16]}"
             if meta.get("git_sha") else "")
          + ("".join(f"; {f}" for f in flags)))
    seen = set()
    for r in errors:
        text = r.get("skipped", "")
        if text not in seen and len(seen) < 4:
            seen.add(text)
            print(f"   error ({r.get('backend')}/{r.get('kernel')} b{r.get('bits')} "
                  f"{r.get('shape')} M={r.get('M')}): {text[:220]}")


def linear(payload: dict) -> None:
    rows = [r for r in payload.get("rows", []) if r.get("p50_us")]
    expansion([r for r in rows if r.get("op") == "dequantize"])
    rows = [r for r in rows if r.get("op") != "dequantize"]
    fp16 = {(r["shape"], r["M"]): r for r in rows if r["backend"] == "fp16"}
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in rows:
        if r["backend"] != "fp16":
            key = (r["shape"], r["bits"], r["granularity"])
            groups.setdefault(key, {}).setdefault(r["M"], []).append(r)
    for (shape, bits, gran), per_m in groups.items():
        parts = []
        for m in sorted(per_m):
            dense = fp16.get((shape, m))
            base = dense["p50_us"] if dense else None
            fused = [r for r in per_m[m] if r["backend"] in FUSED]
            deq = [r for r in per_m[m] if r["backend"] == "dequant"]
            best = min(fused, key=lambda r: r["p50_us"]) if fused else None
            text = f"M{m}"
            if best and base:
                pct = f"{best['pct_copy_bw']:.0f}%" if best.get("pct_copy_bw") else "?"
                text += (f" x{base / best['p50_us']:.2f} {best['backend'][0]}/"
                         f"{best['kernel']} {best['p50_us']:.1f}us {pct}")
                if not is_right(best):
                    text += f" ERR{fmt(best['rel_err'], '.1e').replace('-', 'nan/inf')}"
                if best.get("timing") != dense.get("timing"):
                    text += f" ({best.get('timing')} against fp16's {dense.get('timing')})"
            if deq and base:
                text += f" dq x{base / deq[0]['p50_us']:.2f}"
            parts.append(text)
        print(f"   {shape} b{bits} {gran[:2]}: " + " | ".join(parts))
    kernel_pair(rows, "lut_mma", "lut_frag")
    kernel_pair(rows, "lut_frag", "lut_frag32")


def expansion(rows: list[dict]) -> None:
    """The dequant path's expansion kernels alone: Triton's on both grids and the CUDA
    one, each with its time and % of the copy bandwidth."""
    by_config: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r.get("p50_us") is None:
            continue
        by_config.setdefault((r["shape"], r["bits"], r["granularity"]), {})[r["kernel"]] = r
    for (shape, bits, gran), kernels in by_config.items():
        parts = [f"{kernel} {r['p50_us']:.1f}us"
                 + (f" {r['pct_copy_bw']:.0f}%" if r.get("pct_copy_bw") else "")
                 for kernel, r in sorted(kernels.items())]
        print(f"   dequantize {shape} b{bits} {gran[:2]}: " + " | ".join(parts))


def kernel_pair(rows: list[dict], old: str, new: str) -> None:
    """Per bit width: the geometric mean over shapes and granularities of t_old / t_new at
    each M where both CUDA kernels ran (e.g. lut_frag against lut_mma)."""
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("backend") == "cuda" and r.get("kernel") in (old, new):
            key = (r["bits"], r["M"], r["shape"], r["granularity"])
            times.setdefault(key, {})[r["kernel"]] = r["p50_us"]
    ratios: dict[int, dict[int, list[float]]] = {}
    for (bits, m, *_), t in times.items():
        if old in t and new in t:
            ratios.setdefault(bits, {}).setdefault(m, []).append(t[old] / t[new])
    for bits, per_m in sorted(ratios.items()):
        parts = [f"M{m} x{fmt(geomean(v))}" for m, v in sorted(per_m.items())]
        print(f"   {new} vs {old} b{bits}: " + " | ".join(parts))


def conv_kernel_size(shape: str) -> str:
    """"KHxKW" of a conv row's shape "NxCxKHxKW@HxW"."""
    return "x".join(shape.split("@")[0].split("x")[2:])


def conv(payload: dict) -> None:
    rows = [r for r in payload.get("rows", []) if r.get("p50_us")]
    groups: dict[tuple, dict[str, list[float]]] = {}
    paths = ("cuda", "cuda_cl", "triton", "dequant")
    for r in rows:
        path = "cuda_cl" if r.get("kernel") == "lut_conv_cl" else r["backend"]
        if (path in paths and r.get("ratio_best")
                and r.get("kernel") != "implicit_gemm_nosplit"):
            key = (r["bits"], r["granularity"], r["batch"], conv_kernel_size(r["shape"]))
            groups.setdefault(key, {}).setdefault(path, []).append(r["ratio_best"])
    for (bits, gran, batch, kernel), ratios in groups.items():
        means = ", ".join(f"{p} x{fmt(geomean(ratios[p]))}" for p in paths if p in ratios)
        print(f"   b{bits} {gran[:2]} batch {batch} {kernel}: geomean over "
              f"{max(len(v) for v in ratios.values())} layers: {means} (vs best dense layout)")
    for r in rows:
        if (r["backend"] in ("cuda", "triton") and r["bits"] == 4
                and r["granularity"] == "channel" and r.get("kernel") != "implicit_gemm_nosplit"):
            print(f"     {r['backend']}/{r['kernel']} 4b ch batch {r['batch']} {r['shape']} "
                  f"(x{r.get('layer_count')}): {r['p50_us']:.1f}us x{fmt(r.get('ratio_best'))} "
                  f"err {fmt(r.get('rel_err'), '.1e')}")


def e2e(payload: dict) -> None:
    dispatched = set()
    for r in payload.get("rows", []):
        if not r.get("p50_us"):
            continue
        variant = "fp16" if r["backend"] == "fp16" else \
            f"{r['bits']}b {r['granularity'][:2]} {r['backend']}"
        if r.get("dispatch") and (variant, r["M"]) not in dispatched:
            dispatched.add((variant, r["M"]))
            print(f"   {variant:<16} batch {r['M']:<3} ran: " + "; ".join(
                f"{d['calls']} {d['op']} {d['backend']} ({d['kernels']})" for d in r["dispatch"]))
        layouts = r.get("runtime_layout_bytes")
        print(f"   {variant:<16} batch {r['M']:<3} {r['kernel']:<5} {r['p50_us'] / 1e3:8.3f} ms "
              f"x{fmt(r.get('ratio'))} peak x{fmt(r.get('peak_ratio'))} "
              f"bytes x{fmt(r.get('model_bytes_ratio'))} "
              + (f"layouts {layouts / 1e6:.1f} MB " if layouts else "")
              + f"err {fmt(r.get('rel_err_vs_dense'), '.1e')}/"
              f"{fmt(r.get('rel_err_vs_dequant'), '.1e')}"
              + (f" ({r['note'][:80]})" if r.get("note") else ""))


def e2e_profile(payload: dict) -> None:
    """Per variant: kernels and µs per step by category, then memory: kept after a step
    and peak (MB), with the largest kept block's size and innermost call site."""
    for r in payload.get("rows", []):
        if r.get("p50_us") is not None:
            print(f"   {r['backend']:<16} {r['kernel']:<10} {r.get('kernels_per_step')} "
                  f"kernels {r['p50_us']:9.1f} µs")
    kept_sites = payload.get("meta", {}).get("kept_allocations", {})
    for label, mem in payload.get("meta", {}).get("memory", {}).items():
        if "error" in mem:
            print(f"   {label:<16} memory: error {str(mem['error'])[:120]}")
            continue
        sites = kept_sites.get(label)
        top = (f"; largest kept {sites[0]['bytes'] / 1e6:.1f} MB at "
               f"{(sites[0]['frames'] or ['?'])[0]}" if isinstance(sites, list) and sites
               else "")
        print(f"   {label:<16} memory: kept {fmt(mem.get('kept_after_step', 0) / 1e6, '.1f')} "
              f"MB, peak {fmt(mem.get('peak', 0) / 1e6, '.1f')} MB{top}")


def fit(payload: dict) -> None:
    for r in payload.get("rows", []):
        if r.get("p50_us") and r.get("method") == "ot":
            print(f"   ot b{r['bits']} {r['granularity'][:2]} {r['backend']:<10} "
                  f"{fmt(r.get('total_model_ms'), '.1f')} ms/model "
                  f"{fmt((r.get('weights_per_s') or 0) / 1e6, '.0f')} M weights/s "
                  f"x{fmt(r.get('ratio'))} vs torch.sort")


def splitk(payload: dict) -> None:
    times: dict[tuple, dict[int, float]] = {}  # (kernel, M, shape, bits, gran) -> {split: µs}
    picked: dict[tuple, int] = {}  # the heuristic's split
    for r in payload.get("rows", []):
        if r.get("backend") == "cuda" and r.get("p50_us"):
            key = (r["kernel"], r["M"], r["shape"], r["bits"], r["granularity"])
            times.setdefault(key, {})[r["split_k"]] = r["p50_us"]
            picked[key] = r.get("heuristic_split_k")

    def excess(key: tuple) -> float:  # the heuristic's time over the fastest split's, - 1
        return times[key].get(picked[key], math.inf) / min(times[key].values()) - 1

    for kernel, m in sorted({key[:2] for key in times}):
        keys = [key for key in times if key[:2] == (kernel, m)]
        fastest = [min(times[key], key=times[key].get) for key in keys]
        wins = {split: fastest.count(split) for split in sorted(set(fastest))}
        worst = max(keys, key=excess)
        print(f"   {kernel} M{m}: fastest split (cells) {wins}; heuristic at worst "
              f"{100 * excess(worst):+.0f}% ({worst[2]} b{worst[3]} {worst[4][:2]}, "
              f"split {picked[worst]})")


def checks(payload: dict) -> None:
    for name, result in payload.get("checks", {}).items():
        detail = result.get("detail", "")
        print(f"   {name}: {'ok' if result.get('ok') else 'FAILED'} "
              f"rel_err {fmt(result.get('rel_err'), '.1e')} {result.get('seconds')} s "
              f"{detail.splitlines()[-1][:200] if detail else ''}")


def row_times(payload: dict) -> dict[tuple, float]:
    """{the row's ROW_IDENTITY values: its median µs} over the timed rows."""
    return {tuple(r.get(f) for f in ROW_IDENTITY): r["p50_us"]
            for r in payload.get("rows", []) if r.get("p50_us")}


def against(payload: dict, old: dict) -> None:
    """One line: per (op, backend, kernel) the geometric mean and range of t_new / t_old
    over the rows that both results files timed."""
    before = row_times(old)
    ratios: dict[tuple, list[float]] = {}
    for key, us in row_times(payload).items():
        if key in before:
            ratios.setdefault(key[:3], []).append(us / before[key])
    meta = old.get("meta", {})
    parts = [f"{op}:{backend}/{kernel} n{len(v)} x{fmt(geomean(v), '.3f')} "
             f"[{min(v):.3f}, {max(v):.3f}]" for (op, backend, kernel), v in sorted(
                 ratios.items(), key=lambda item: tuple(map(str, item[0])))]
    gpu = "" if meta.get("gpu") == payload.get("meta", {}).get("gpu") else f", {meta.get('gpu')}"
    print(f"   t / t at {meta.get('git_sha')} ({meta.get('date', '?')[:10]}{gpu}): "
          + ("; ".join(parts) if parts else "no rows in common"))


def digest_file(path: Path, title: str, summarize, old_path: Path | None = None) -> None:
    """The header and ``summarize(payload)`` of one results file, where it exists, then
    its times against the file at ``old_path`` where that exists; an error is printed,
    never raised (a digest must never fail the suite)."""
    payload = load(path)
    if payload is None:
        return
    try:
        header(title, payload)
        summarize(payload)
        old = load(old_path) if old_path else None
        if old is not None:
            against(payload, old)
    except Exception as err:  # noqa: BLE001
        print(f"digest: {title}: {type(err).__name__}: {err}")


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    old_root = None
    if "--against" in args:
        at = args.index("--against")
        old_root = Path(args[at + 1]) if at + 1 < len(args) else None
        del args[at:at + 2]
    root = Path(args[0] if args else ".")
    print(f"==== digest of {root}" + (f" (times against {old_root})" if old_root else ""))

    def file(name: str, title: str, fn) -> None:
        digest_file(root / name, title, fn, old_root / name if old_root else None)

    for sub in ("goal", "goal_tuned", "goal_graph", "goal_channels_last", "goal_large_m", "."):
        for subject, fn in (("linear", linear), ("conv", conv), ("e2e", e2e), ("fit", fit)):
            file(f"{sub}/{subject}.json", f"{sub}/{subject}".lstrip("./"), fn)
    for subject in ("splitk", "splitk_mma"):
        file(f"{subject}.json", subject, splitk)
    file("e2e_profile.json", "e2e_profile", e2e_profile)
    payload = load(root / "checks.json")
    if payload:
        print("== checks")
        try:
            checks(payload)
        except Exception as err:  # noqa: BLE001
            print(f"digest: checks: {type(err).__name__}: {err}")
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
