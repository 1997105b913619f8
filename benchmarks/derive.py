"""Dispatch tuning derived from benchmark results: crossovers, close calls, tuning JSON.

The benches that time dispatch paths (``bench_linear``, ``bench_conv``) turn their rows into
the tuning table's format (``otq_kernels/tuning/default.json``) with these helpers, either
right after timing or later from committed results JSONs (``--tuning-from``, no GPU
needed). ``digest.py`` shares :func:`geomean` and :data:`MAX_REL_ERR`.

Pure json and math; only reading and writing tuning tables imports otq_kernels' schema
(and so torch). ``python benchmarks/derive.py --tuning-changes PATH``: exit 0
and name the GPU sections where PATH dispatches differently from the shipped table, else
exit 1 (the GPU suite runs the tuned end-to-end step only then); exit 2 where PATH cannot
be read as a tuning table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIPPED_TUNING = REPO / "otq_kernels" / "tuning" / "default.json"

# Largest relative error of a timed path against the fp16 dense result that still counts
# as right (the H200 runs measured at most 3.5e-4); digest.py flags rows above it.
MAX_REL_ERR = 2e-2


def write_tuning(path: str | Path, gpu_name: str, section: str, values: dict,
                 evidence: dict) -> Path:
    """Merge measured crossovers into a tuning table (otq_kernels/tuning/default.json format).

    Starts from ``path`` if it exists, else from the shipped default; sets
    ``gpus[gpu_name][section] = values`` and records the evidence under
    ``gpus[gpu_name]["_measured"][section]``. Other GPUs and sections are kept.
    """
    from otq_kernels.tuning_schema import check_tuning_table

    path = Path(path)
    table = tuning_base(path)
    entry = table.setdefault("gpus", {}).setdefault(gpu_name, {})
    entry[section] = values
    entry.setdefault("_measured", {})[section] = evidence
    check_tuning_table(table, f"the table for {path}")  # (a derivation's own mistake)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=2) + "\n")
    except OSError as err:
        raise SystemExit(f"--write-tuning {path}: cannot write it: {err}") from None
    return path


def tuning_base(path: str | Path) -> dict:
    """The table --write-tuning ``path`` merges into: the tuning table it holds, else (no
    such file) the shipped one; SystemExit naming it when it holds something else (a
    results JSON, say), so a bench checks it before it times anything."""
    from otq_kernels.tuning_schema import parse_tuning_table

    path = Path(path)
    source = path if path.exists() else SHIPPED_TUNING
    try:
        return parse_tuning_table(source.read_text(), str(source))
    except (OSError, ValueError) as err:
        raise SystemExit(f"--write-tuning {path}: it merges into the tuning table there, "
                         f"which cannot be used: {err}") from None


def add_tuning_options(p: argparse.ArgumentParser) -> None:
    """--write-tuning PATH and --tuning-from RESULTS (the benches that derive crossovers)."""
    p.add_argument("--write-tuning", default=None, metavar="PATH",
                   help="merge the measured crossovers into this tuning JSON")
    p.add_argument("--tuning-from", default=None, nargs="+", metavar="RESULTS",
                   help="time nothing: derive the crossovers from these results JSONs' rows "
                        "(one GPU, named by their meta.gpu; e.g. a goal grid and a large-M "
                        "run; a later file's row replaces an earlier one's for the same "
                        "configuration and path) and merge them into --write-tuning")


# How near even (|speedup - 1|) a derived decision's geometric mean may lie before
# --tuning-from names it as a close call: unchanged paths' geometric means moved by about
# 1% between calls on the H200, single rows by 3-4% (NOTES, session 53).
CLOSE_CALL = 0.02


def close_calls(evidence: dict, margin: float = CLOSE_CALL) -> list[str]:
    """"<keys> x<speedup>" for every speedup of ``evidence`` (nested {path: {M: speedup}}
    maps, or one number) within ``margin`` of 1, in the evidence's order."""
    found = []

    def walk(keys: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{keys} {key}".strip(), inner)
        elif (isinstance(value, (int, float)) and not isinstance(value, bool)
              and abs(value - 1) <= margin):
            found.append(f"{keys} x{value:.3f}")

    walk("", evidence)
    return found


def tuning_from(args: argparse.Namespace, section: str, derive_rows) -> int:
    """``--tuning-from``: re-derive ``section`` of the tuning JSON --write-tuning from the
    rows of one or more results JSONs of one GPU (of the bench whose subject matches
    ``section``), without a GPU. derive_rows(rows, widths) -> (values, evidence), widths
    being the bit widths the runs meant to time (their metas' ``bits``); the evidence
    recorded also names the results files and their metas' git shas and dates
    (comma-separated where there are several), and ``gaps``, what the runs left out
    (:func:`run_gaps`, also printed as warnings)."""
    if not args.write_tuning:
        raise SystemExit("--tuning-from needs --write-tuning PATH")
    tuning_base(args.write_tuning)
    rows, metas, sources, gaps = [], [], [], []
    for name in args.tuning_from:
        meta, file_rows = read_gpu_results(name)
        gaps += [f"{name}: {gap}" for gap in run_gaps(meta)]
        if meta.get("subject") != SUBJECTS[section]:
            raise SystemExit(f"{name}: results of bench_{meta.get('subject')}, not of "
                             f"bench_{SUBJECTS[section]} (the {section} section's)")
        if metas and meta["gpu"] != metas[0]["gpu"]:
            raise SystemExit(f"{name}: measured on {meta['gpu']!r}, not on "
                             f"{metas[0]['gpu']!r} like {args.tuning_from[0]}")
        if metas and bool(meta.get("graph")) != bool(metas[0].get("graph")):
            raise SystemExit(f"{name}: {_timing_mode(meta)}, {args.tuning_from[0]} "
                             f"{_timing_mode(metas[0])}: the two do not compare")
        rows += file_rows
        metas.append(meta)
        source = Path(name).resolve()
        sources.append(str(source.relative_to(REPO) if REPO in source.parents else source))
    widths = sorted({b for m in metas for b in m.get("bits") or () if isinstance(b, int)})
    values, evidence = derive_rows(rows, widths)
    if not values:
        raise SystemExit(f"{', '.join(args.tuning_from)}: no fused and dequant rows to "
                         "derive from")
    close = close_calls(evidence)
    evidence = {**evidence, "source": ", ".join(sources),
                **{key: _joined([m.get(key) for m in metas]) for key in ("git_sha", "date")},
                **({"gaps": gaps} if gaps else {})}
    path = write_tuning(args.write_tuning, metas[0]["gpu"], section, values, evidence)
    print(f"{metas[0]['gpu']} {section}: {values} -> {path}")
    for gap in gaps:
        print(f"  warning: {gap}: what it did not time was judged from the rest")
    if close:
        print(f"  close calls (speedup within {CLOSE_CALL:.0%} of even, about the run-to-run "
              f"spread; check before shipping): {'; '.join(close)}")
    return 0


def _timing_mode(meta: dict) -> str:
    return "timed as CUDA-graph replays" if meta.get("graph") else "timed eagerly"


def read_gpu_results(name: str | Path) -> tuple[dict, list[dict]]:
    """(meta, rows) of a GPU run's results JSON; SystemExit naming the file when it cannot
    be read, is not a results JSON or holds a smoke (CPU) run."""
    try:
        payload = json.loads(Path(name).read_text())
        meta, rows = payload["meta"], payload["rows"]
        if not isinstance(meta, dict) or not isinstance(rows, list):
            raise TypeError
    except (OSError, ValueError) as err:
        raise SystemExit(f"{name}: cannot read it: {err}") from None
    except (KeyError, TypeError):
        raise SystemExit(f"{name}: not a results JSON (no meta and rows)") from None
    if meta.get("smoke") or not meta.get("gpu"):
        raise SystemExit(f"{name}: not a GPU run (smoke={meta.get('smoke')}, "
                         f"gpu={meta.get('gpu')!r})")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or (row.get("p50_us") is not None and not (
                CONFIG_KEYS <= set(row) and isinstance(row["M"], int) and (
                    isinstance(row["bits"], int) or row.get("backend") == "fp16"))):
            raise SystemExit(f"{name}: row {i} is not a timed row with "
                             f"{', '.join(sorted(CONFIG_KEYS))}: {row!r}"[:300])
    return meta, rows


def run_gaps(meta: dict) -> list[str]:
    """What a results file's run left out: cut short (meta.complete false), ended by a
    fatal CUDA error, configurations skipped for the budget; [] for a whole run."""
    gaps = []
    if not meta.get("complete", True):
        gaps.append("the run was cut short (meta.complete is false)")
    if meta.get("fatal_error"):
        gaps.append(f"a fatal CUDA error ended it ({meta['fatal_error']})"[:200])
    if meta.get("skipped_configs"):
        gaps.append(f"{len(meta['skipped_configs'])} configurations were not timed (budget)")
    return gaps


def _joined(values: list):
    """The one value of a list, or its distinct values comma-separated."""
    distinct = list(dict.fromkeys(values))
    return distinct[0] if len(distinct) == 1 else ", ".join(map(str, distinct))


def crossover(ms_wins: dict[int, bool]) -> int:
    """Largest M of the grid such that the path wins at every grid M up to it (0 = never)."""
    best = 0
    for m in sorted(ms_wins):
        if not ms_wins[m]:
            break
        best = m
    return best


def band(ms_wins: dict[int, bool], above: int = 0) -> tuple[int, int]:
    """(first, last) grid M of the run of consecutive wins that dispatch reaches: the first
    run ending above ``above`` (M up to it go to a path tried before), else the first run;
    (0, 0) when none wins.

    >>> band({1: True, 16: False, 256: True, 1024: True}, above=16)
    (256, 1024)
    >>> band({1: True, 16: True, 256: False}, above=16)
    (1, 16)
    """
    runs: list[list[int]] = [[]]
    for m in sorted(ms_wins):
        if ms_wins[m]:
            runs[-1].append(m)
        elif runs[-1]:
            runs.append([])
    runs = [run for run in runs if run]
    if not runs:
        return 0, 0
    run = next((run for run in runs if run[-1] > above), runs[0])
    return run[0], run[-1]


def geomean(values: list[float]) -> float | None:
    """Geometric mean of positive values (None when empty)."""
    values = [v for v in values if v and v > 0]
    if not values:
        return None
    return math.exp(sum(math.log(v) for v in values) / len(values))


CONFIG_KEYS = {"M", "shape", "bits", "granularity"}  # what a timed row is a time of


def is_right(row: dict) -> bool:
    """Whether a row's result was right: rel_err, where recorded, at most MAX_REL_ERR; a
    recorded null is a non-finite error (NaN/inf output, written as null), so wrong."""
    if "rel_err" not in row:
        return True
    return row["rel_err"] is not None and row["rel_err"] <= MAX_REL_ERR


def is_time(value) -> bool:
    """Whether a row's p50_us is a time: a finite positive number."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


def failed_paths(rows: list[dict], path_of) -> set[str]:
    """The paths (path_of(row), None for none) with a row that raised or gave a wrong
    result (:func:`is_right`)."""
    return {path_of(r) for r in rows if (r.get("error") or (r.get("p50_us") and not is_right(r)))
            and path_of(r) is not None}


def eager_among_graphs(rows: list[dict]) -> list[dict]:
    """The rows timed eagerly (``"timing": "events"``: their graph capture failed) in a run
    that timed others as CUDA-graph replays: the two do not compare (eager times hold host
    launch time, 1.3-3x the replays' on the H200)."""
    timed = [r for r in rows if is_time(r.get("p50_us"))]
    if not any(r.get("timing") == "graph" for r in timed):
        return []
    return [r for r in timed if r.get("timing") == "events"]


def times_by_config(rows: list[dict], path_of) -> dict[tuple, dict[str, float]]:
    """{(M, shape, bits, granularity): {path: p50 µs}} over the timed rows; path_of(row)
    names the row's path, or None to leave it out. A path that raised or gave a wrong
    result on any configuration (:func:`failed_paths`) is left out everywhere (a
    warning on stderr names it): the tuning flags and crossovers apply to every
    configuration, so a kernel wrong on some must win none."""
    failed = failed_paths(rows, path_of)
    for path in sorted(failed):
        print(f"warning: {path} raised or gave wrong results on some configurations: left "
              "out of every decision", file=sys.stderr)
    eager = eager_among_graphs(rows)
    if eager:
        print(f"warning: {len(eager)} rows timed eagerly (their CUDA-graph capture failed: "
              f"{', '.join(sorted({str(path_of(r)) for r in eager}))}) among graph "
              "replays: left out of every decision", file=sys.stderr)
    eager_ids = {id(r) for r in eager}
    times: dict[tuple, dict[str, float]] = {}
    for r in rows:
        path = path_of(r) if is_time(r.get("p50_us")) else None
        if path is not None and path not in failed and id(r) not in eager_ids:
            key = (r["M"], r["shape"], r["bits"], r["granularity"])
            times.setdefault(key, {})[path] = r["p50_us"]
    return times


def rounded(means: dict[int, float | None]) -> dict[str, float]:
    """{M: geometric-mean speedup} as the evidence records it (Ms without one left out)."""
    return {str(m): round(g, 3) for m, g in means.items() if g}


def speedup_by_m(times: dict[tuple, dict[str, float]], baseline: str,
                 path: str) -> dict[int, float]:
    """{M: geometric mean of t_baseline / t_path} over the configurations where both ran."""
    per_m: dict[int, list[float]] = {}
    for (m, *_), t in times.items():
        if baseline in t and path in t:
            per_m.setdefault(m, []).append(t[baseline] / t[path])
    return {m: geomean(v) for m, v in sorted(per_m.items())}


DISPATCH_SECTIONS = ("linear", "conv2d")
SUBJECTS = {"linear": "linear", "conv2d": "conv"}  # section -> the bench that times it


def tuning_changes(path: str | Path) -> dict[str, list[str]]:
    """{GPU name: [sections]} where the tuning JSON ``path`` (e.g. written by --tuning-from
    from a run's results) dispatches differently from the shipped table: the sections of
    DISPATCH_SECTIONS whose values (evidence aside) differ from what the shipped table
    gives that GPU (its own entry, else the default). OSError or ValueError for a file
    that is not a tuning table."""
    from otq_kernels.tuning_schema import parse_tuning_table

    table = parse_tuning_table(Path(path).read_text(), str(path))
    shipped = json.loads(SHIPPED_TUNING.read_text())
    changes = {}
    for gpu, entry in table.get("gpus", {}).items():
        before = shipped.get("gpus", {}).get(gpu, shipped["default"])
        differ = [s for s in DISPATCH_SECTIONS if entry.get(s, {}) != before.get(s, {})]
        if differ:
            changes[gpu] = differ
    return changes


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tuning-changes"] and len(sys.argv) == 3:
        try:
            found = tuning_changes(sys.argv[2])
        except (OSError, ValueError) as err:
            print(f"tuning changes: cannot read {sys.argv[2]}: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"tuning changes: {found or 'none'}")
        raise SystemExit(0 if found else 1)
    print(__doc__)
    raise SystemExit(2)
