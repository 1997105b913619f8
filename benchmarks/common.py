"""Shared benchmark harness: timing, bandwidth/GEMM ceilings, result rows and JSON output.

Every ``bench_*.py`` script imports this module first (it puts the repository root on
``sys.path`` so the scripts run from a plain checkout) and then:

1. builds its parser with :func:`parser` (``--smoke``, ``--out``, ``--device``,
   ``--budget-s``),
2. opens a :class:`Run` (device, output path, meta, ceilings measured once per run),
3. times callables with :meth:`Run.time` (CUDA events, warm-up, L2 flush between reps,
   optional CUDA-graph replay; wall clock on CPU) and appends rows with :meth:`Run.add`,
4. calls :meth:`Run.write` (``benchmarks/results/<gpu-slug>/<subject>.json`` by default).

``--smoke`` exercises the code path on tiny shapes (CPU: reference / cpu / Triton
interpreter) with wall-clock timing; its rows say ``"smoke": true`` and its JSON never goes
under ``benchmarks/results/`` (default: a temp dir). Nothing here touches the GPU at import.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))
if str(Path(__file__).resolve().parent) not in sys.path:  # gpu_limits when imported by tests
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_limits  # noqa: E402
from derive import DISPATCH_SECTIONS  # noqa: E402

from otq_kernels.backends import NAMES as BACKEND_NAMES  # noqa: E402
from otq_kernels.format import GRANULARITIES, MAX_BITS, MIN_BITS  # noqa: E402
from otq_kernels.graphs import capture_cuda_graph  # noqa: E402

# GPU-suite runs cap Triton autotuning through env vars (see gpu_limits); unset: no change.
AUTOTUNE_LIMIT = gpu_limits.apply_from_env()

L2_FLUSH_BYTES = 256 * 1024 * 1024
ROW_KEYS = ("op", "backend", "kernel", "bits", "granularity", "M", "N", "K", "shape", "dtype",
            "p20_us", "p50_us", "p80_us", "gbps", "pct_copy_bw", "ratio", "smoke", "skipped",
            "error")
# Messages of CUDA errors that poison the context: every later CUDA call fails too.
FATAL_CUDA = ("illegal memory access", "unspecified launch failure", "device-side assert",
              "misaligned address", "illegal instruction", "an illegal", "ECC error",
              "CUDA error: unknown error", "uncorrectable")
META_KEYS = ("subject", "smoke", "device", "gpu", "torch", "triton", "cuda", "git_sha", "date",
             "hostname", "copy_gbps", "gemm")


# ----------------------------------------------------------------------------- CLI
def parser(subject: str, description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every benchmark shares."""
    p = argparse.ArgumentParser(prog=f"bench_{subject}.py", description=description)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes, wall-clock timing, any device: exercises the code path "
                        "only (rows marked smoke; JSON goes to a temp dir)")
    p.add_argument("--out", default=None,
                   help="output directory (default benchmarks/results/<gpu-slug>/, or a temp "
                        "dir with --smoke); the file is <out>/<subject>.json")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop starting new configurations after this many seconds and write "
                        "what was measured (skipped configurations are listed in meta)")
    p.add_argument("--no-flush", action="store_true",
                   help="do not flush L2 between timed reps (default: flush by reading 256 MiB)")
    p.add_argument("--quiet", action="store_true", help="no per-row progress lines")
    return p


def add_graph_option(p: argparse.ArgumentParser) -> None:
    """``--graph``: time CUDA-graph replays (GPU time without the host's launch path)."""
    p.add_argument("--graph", action="store_true",
                   help="time CUDA-graph replays (GPU time without the host's launch path)")


def add_dtype_option(p: argparse.ArgumentParser) -> None:
    """``--dtype`` for benches whose activations (and dense baseline) take one dtype."""
    p.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"],
                   help="activation dtype (default float16 on a GPU, float32 on CPU)")


def bench_dtype(args: argparse.Namespace, device: torch.device) -> torch.dtype:
    """``--dtype``, else float16 on a GPU and float32 on CPU."""
    if args.dtype:
        return getattr(torch, args.dtype)
    return torch.float16 if device.type == "cuda" else torch.float32


def csv_strs(text: str) -> list[str]:
    """'a,b' -> ['a', 'b']."""
    return [v.strip() for v in text.split(",") if v.strip()]


def csv_list(item: Callable[[str], object], allowed=None, what: str = "value"):
    """An argparse ``type``: 'a,b' -> [item('a'), item('b')], each one of ``allowed`` where
    given. A typo then stops the bench at once (exit 2, naming the value and the choices)
    instead of running it with skipped or error rows, or without the path it names."""
    def parse(text: str) -> list:
        values = []
        for raw in csv_strs(text):
            try:
                value = item(raw)
            except ValueError as err:
                raise argparse.ArgumentTypeError(f"{raw!r} is not a {what} ({err})") from None
            if allowed is not None and value not in allowed:
                raise argparse.ArgumentTypeError(
                    f"{raw!r} is not a {what}; choose from {', '.join(map(str, allowed))}")
            values.append(value)
        if not values:
            raise argparse.ArgumentTypeError(f"no {what} in {text!r}")
        return values

    return parse


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


BIT_WIDTHS = csv_list(int, tuple(range(MIN_BITS, MAX_BITS + 1)), "bit width")
COUNTS = csv_list(positive_int, None, "positive integer")
GRANULARITY_LIST = csv_list(str, GRANULARITIES, "granularity")
BACKEND_LIST = csv_list(str, BACKEND_NAMES, "backend")


# ----------------------------------------------------------------------------- environment
def gpu_slug(name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (results folder name)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def git_sha() -> str:
    """Env OTQ_GIT_SHA when set (the GPU machine's copy of the tree may hold no .git, or a
    stale one), else HEAD's sha (+ '-dirty')."""
    if os.environ.get("OTQ_GIT_SHA"):
        return os.environ["OTQ_GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def tree_hash() -> str:
    """16 hex digits of sha256 over the sources that decide the numbers (otq_kernels/ and
    csrc/ code, benchmarks/*.py, setup.py): the same tree gives the same hash here and on a
    machine without .git (compare with `python benchmarks/common.py --tree-hash`)."""
    import hashlib

    digest = hashlib.sha256()
    suffixes = {".py", ".json", ".cpp", ".h", ".cu", ".cuh"}
    files = [p for base in ("otq_kernels", "csrc") for p in (REPO / base).rglob("*")
             if p.is_file() and p.suffix in suffixes and "__pycache__" not in p.parts]
    files += sorted((REPO / "benchmarks").glob("*.py")) + [REPO / "setup.py"]
    for path in sorted(set(files)):
        if path.exists():
            digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def triton_version() -> str | None:
    """Installed triton's version or None."""
    try:
        import triton

        return triton.__version__
    except ImportError:
        return None


def device_info(device: torch.device) -> dict:
    """GPU name, SMs, L2 and memory (CUDA) or the CPU's description."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"gpu": props.name, "sm_count": props.multi_processor_count,
                "l2_bytes": getattr(props, "L2_cache_size", None),
                "memory_bytes": props.total_memory,
                "capability": f"{props.major}.{props.minor}"}
    return {"gpu": None, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "cpu_threads": torch.get_num_threads(),
            "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def base_meta(subject: str, device: torch.device, smoke: bool) -> dict:
    """Versions, machine and provenance for a results file."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"subject": subject, "smoke": smoke, "device": device.type,
            **device_info(device),
            "torch": torch.__version__, "triton": triton_version(), "cuda": torch.version.cuda,
            "cudnn": cudnn, "python": platform.python_version(), "git_sha": git_sha(),
            "tree_hash": tree_hash(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "hostname": socket.gethostname(), "argv": sys.argv[1:],
            "tuning_file": os.environ.get("OTQ_TUNING_FILE"), "tuning": dispatch_tuning(device)}


def dispatch_tuning(device: torch.device) -> dict | None:
    """The dispatch sections of the tuning table that auto dispatch reads on ``device``
    (None off CUDA; {"error": ...} if it cannot be read: the run goes on)."""
    if device.type != "cuda":
        return None
    from otq_kernels import ops

    try:
        table = ops.tuning_table(torch.cuda.get_device_name(device))
    except Exception as exc:  # noqa: BLE001 - e.g. an OTQ_TUNING_FILE that is not there
        return {"error": describe_error(exc)}
    return {s: table.get(s, {}) for s in DISPATCH_SECTIONS}


def resolve_device(name: str | None) -> torch.device:
    """--device, defaulting to cuda when available."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    return device


def default_out_dir(device: torch.device, smoke: bool) -> Path:
    """benchmarks/results/<gpu-slug>/ on GPU, .../cpu/ on CPU, a temp dir for smoke runs."""
    if smoke:
        return Path(tempfile.gettempdir()) / "otq_bench_smoke"
    if device.type == "cuda":
        return RESULTS / gpu_slug(torch.cuda.get_device_name(device))
    return RESULTS / "cpu"


def check_smoke_out(out_dir: Path) -> None:
    """Refuse to write smoke JSON into the committed results tree."""
    resolved = out_dir.resolve()
    if resolved == RESULTS.resolve() or RESULTS.resolve() in resolved.parents:
        raise SystemExit(f"--smoke results must not go under {RESULTS}: pick another --out")


# ----------------------------------------------------------------------------- timing
def quantiles_us(samples_s: list[float]) -> dict:
    """p20/p50/p80 in microseconds of samples in seconds."""
    xs = sorted(samples_s)
    if len(xs) == 1:
        xs = xs * 2
    qs = statistics.quantiles(xs, n=10, method="inclusive")  # deciles
    return {"p20_us": qs[1] * 1e6, "p50_us": statistics.median(xs) * 1e6,
            "p80_us": qs[7] * 1e6, "reps": len(samples_s)}


def time_cpu(fn: Callable[[], object], reps: int = 5, warmup: int = 1,
             max_s: float = 2.0) -> dict:
    """Wall-clock quantiles of ``fn`` on the host (at least 2 reps, stops after ``max_s``)."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    begin = time.perf_counter()
    while len(samples) < reps and (len(samples) < 2 or time.perf_counter() - begin < max_s):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return {**quantiles_us(samples), "timing": "wall"}


def capture_graph(fn: Callable[[], object], errors: list | None = None):
    """A CUDA graph of ``fn`` (already warmed up) or None when capture fails.

    ``errors``, if given, receives the capture's exception text.
    """
    try:
        _, graph = capture_cuda_graph(fn, torch.device("cuda", torch.cuda.current_device()))
        torch.cuda.synchronize()
        return graph
    except Exception as err:  # noqa: BLE001 - any failure means "time it eagerly"
        if errors is not None:
            errors.append(describe_error(err))
        try:
            torch.cuda.synchronize()
        except Exception:  # noqa: BLE001 - a poisoned context: the caller sees it next
            pass
        return None


class L2Flusher:
    """Reads a 256 MiB buffer between timed reps (allocated on first use, not at import).

    Read, not written: a write (Triton's do_bench zeroes its buffer) leaves the L2 full of
    dirty lines, written back to memory inside the next timed interval, which would charge
    a memory-bound kernel (the dense baseline) for up to 60 MB of traffic not its own."""

    def __init__(self, device: torch.device, nbytes: int = L2_FLUSH_BYTES):
        self.buffer = torch.zeros(nbytes // 8, dtype=torch.int64, device=device)
        self.total = torch.zeros((), dtype=torch.int64, device=device)

    def __call__(self) -> None:
        torch.sum(self.buffer, 0, out=self.total)  # (no dtype=: it would copy the buffer)


def time_cuda(fn: Callable[[], object], flusher: L2Flusher | None = None, graph: bool = False,
              warmup_ms: float = 25.0, rep_ms: float = 60.0, min_reps: int = 10,
              max_reps: int = 300, est_runs: int = 5,
              graph_errors: list | None = None) -> dict:
    """do_bench-style quantiles of ``fn`` on the GPU with per-rep CUDA events.

    The flush (if any) runs before each rep outside the events, so it is not timed but it
    also keeps the GPU busy while the host launches ``fn`` (launch latency hidden as in a
    pipelined model). ``graph=True`` replays a CUDA graph of ``fn``; when capture fails the
    eager time is reported with ``"timing": "events"``.
    """
    fn()
    torch.cuda.synchronize()
    call, mode = fn, "events"
    if graph:
        g = capture_graph(fn, graph_errors)
        if g is not None:
            call, mode = g.replay, "graph"
    flush = flusher or (lambda: None)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(est_runs):
        flush()
        call()
    end.record()
    torch.cuda.synchronize()
    est_ms = max(start.elapsed_time(end) / est_runs, 1e-3)
    for _ in range(int(warmup_ms / est_ms)):
        call()
    n = int(min(max(rep_ms / est_ms, min_reps), max_reps))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        flush()
        starts[i].record()
        call()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e-3 for s, e in zip(starts, ends, strict=True)]
    return {**quantiles_us(samples), "timing": mode}


def measure_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    if device.type != "cuda":
        nbytes = min(nbytes, 16 << 20)
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        t = time_cuda(lambda: dst.copy_(src), rep_ms=100, max_reps=50)
    else:
        t = time_cpu(lambda: dst.copy_(src), reps=5)
    return 2 * nbytes / (t["p50_us"] * 1e-6) / 1e9


def measure_fp16_gemm_tflops(device: torch.device, size: int = 8192) -> dict:
    """Dense GEMM rate: fp16 size³ on GPU; fp32 256³ on CPU (a smoke-level sanity number)."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    size = size if device.type == "cuda" else 256
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    b = torch.randn(size, size, device=device, dtype=dtype, generator=gen)
    if device.type == "cuda":
        t = time_cuda(lambda: a @ b, rep_ms=200, max_reps=30)
    else:
        t = time_cpu(lambda: a @ b, reps=5)
    tflops = 2 * size**3 / (t["p50_us"] * 1e-6) / 1e12
    return {"dtype": str(dtype).replace("torch.", ""), "size": size, "tflops": tflops}


# ----------------------------------------------------------------------------- rows
def quantized_bytes(qt) -> int:
    """Stored bytes of a QuantizedTensor: packed planes + fp32 codebook."""
    return sum(p.numel() * p.element_size() for p in qt.planes) + \
        qt.codebook.numel() * qt.codebook.element_size()


def bound_ratio(qt) -> float:
    """Memory-bound cap of the speed-up over fp16 weights: 16 / (true bits per weight)."""
    return 16.0 / (8.0 * quantized_bytes(qt) / max(qt.numel, 1))


def skipped_row(reason: str, **fields) -> dict:
    """A row that records why a backend/configuration was not measured."""
    row = {key: None for key in ROW_KEYS}
    row.update(fields)
    row["skipped"] = reason
    return row


def describe_error(err: BaseException) -> str:
    """One line: the exception type and the first line of its message (≤ 300 chars)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {text}"[:300]


def error_text(err: BaseException, lines: int = 12) -> str:
    """The exception's type and message plus the last frames of its traceback (≤ 3000 chars);
    Triton compile errors put the failing source line in the message, so keep it whole."""
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    tail = "".join(tb).strip().splitlines()[-lines:]
    return "\n".join(tail)[-3000:]


def is_fatal_cuda(err: BaseException) -> bool:
    """True for CUDA errors after which the process's CUDA context is unusable."""
    text = str(err)
    return any(marker in text for marker in FATAL_CUDA)


def error_row(err: BaseException, **fields) -> dict:
    """A row for a configuration that raised: skipped = the one-line error, error = details."""
    row = skipped_row("error: " + describe_error(err), **fields)
    row["error"] = error_text(err)
    return row


def fill_ratios(rows: list[dict], key_fields: tuple[str, ...], baseline: str = "fp16",
                field: str = "ratio", baseline_kernel: str | None = None) -> None:
    """row[field] = p50(baseline row) / p50(row) for rows sharing ``key_fields`` (same run)
    and their ``timing`` (a row timed eagerly after its CUDA-graph capture failed is not
    compared with graph replays); the baseline rows are those of backend ``baseline`` (and
    kernel ``baseline_kernel``, where given).

    With field "ratio" also sets ``frac_of_bound`` = ratio / bound_ratio where known.
    """
    def key(r: dict) -> tuple:
        return (*(r.get(k) for k in key_fields), r.get("timing"))

    base = {key(r): r["p50_us"] for r in rows
            if r.get("backend") == baseline and r.get("p50_us")
            and baseline_kernel in (None, r.get("kernel"))}
    for r in rows:
        ref = base.get(key(r))
        if r.get("p50_us") and ref:
            r[field] = ref / r["p50_us"]
            if field == "ratio" and r.get("bound_ratio"):
                r["frac_of_bound"] = r["ratio"] / r["bound_ratio"]


class Run:
    """One benchmark invocation: device, budget, ceilings, rows and the JSON writer."""

    def __init__(self, subject: str, args: argparse.Namespace, measure_ceilings: bool = True):
        self.subject, self.args = subject, args
        self.smoke = bool(args.smoke)
        self.device = resolve_device(args.device)
        if self.device.type == "cpu":
            # Triton kernels run under the interpreter on CPU (must precede their creation).
            os.environ.setdefault("TRITON_INTERPRET", "1")
            if self.smoke:  # tiny ops: threads only thrash (badly on a loaded CI machine)
                torch.set_num_threads(1)
        out = Path(args.out) if args.out else default_out_dir(self.device, self.smoke)
        if self.smoke:
            check_smoke_out(out)
        self.out_path = out / f"{subject}.json"
        self.started = time.perf_counter()
        self.rows: list[dict] = []
        self.meta = base_meta(subject, self.device, self.smoke)
        self.meta.update(l2_flush_bytes=0 if args.no_flush or self.device.type != "cuda"
                         else L2_FLUSH_BYTES, l2_flush="read", budget_s=args.budget_s,
                         skipped_configs=[],
                         copy_gbps=None, gemm=None, autotune_limit=AUTOTUNE_LIMIT,
                         preset=getattr(args, "preset", None), errors=0, fatal_error=None,
                         complete=False)
        self._flusher = None
        self.copy_gbps = None
        self._written_rows = -1
        self._last_write = time.perf_counter()
        # called before every write (checkpoints and the SIGTERM write too): derived
        # fields such as ratios, so that a cut-short file is as usable as a complete one
        self.finalizers: list[Callable[[list[dict]], object]] = []
        self._install_sigterm()
        if measure_ceilings:
            try:
                self.measure_ceilings()
            except Exception as err:  # noqa: BLE001 - ratios need no ceilings
                self.meta["ceilings_error"] = describe_error(err)
                self.log(f"ceilings failed: {describe_error(err)}")

    def _install_sigterm(self) -> None:
        """On SIGTERM (the suite's per-step timeout), write what was measured, then exit."""
        def handler(signum, _frame):
            self.meta["interrupted"] = f"signal {signum} after {self.elapsed():.0f}s"
            try:
                self.write()
            finally:
                raise SystemExit(128 + signum)

        try:
            self._old_sigterm = signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread (e.g. under a test runner's worker)
            self._old_sigterm = None

    # -- ceilings and timing
    def measure_ceilings(self) -> None:
        """Copy bandwidth and dense GEMM rate, once per run (stored in meta)."""
        self.copy_gbps = measure_copy_bandwidth(self.device)
        self.meta["copy_gbps"] = self.copy_gbps
        self.meta["gemm"] = measure_fp16_gemm_tflops(self.device)
        self.log(f"copy {self.copy_gbps:.0f} GB/s, GEMM {self.meta['gemm']}")

    def flusher(self) -> L2Flusher | None:
        """The shared 256 MB flush buffer (None on CPU or with --no-flush)."""
        if self.device.type != "cuda" or self.args.no_flush:
            return None
        if self._flusher is None:
            self._flusher = L2Flusher(self.device)
        return self._flusher

    def time(self, fn: Callable[[], object], graph: bool = False, flush: bool = True,
             gpu_opts: dict | None = None, cpu_opts: dict | None = None) -> dict:
        """Quantiles of ``fn``: CUDA events on GPU (L2 flushed), wall clock on CPU.

        gpu_opts go to :func:`time_cuda`, cpu_opts to :func:`time_cpu`. In smoke mode
        ``fn`` runs twice, untimed warm-up excluded (the caller's check call warmed it).
        """
        if self.smoke:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                return time_cpu(lambda: (fn(), torch.cuda.synchronize()), reps=2, warmup=0)
            return time_cpu(fn, reps=2, warmup=0)
        if self.device.type == "cuda":
            return time_cuda(fn, self.flusher() if flush else None, graph, **(gpu_opts or {}))
        return time_cpu(fn, **{"reps": 5, **(cpu_opts or {})})

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    # -- budget
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def over_budget(self, config: object = None) -> bool:
        """True (and the configuration noted in meta) once --budget-s is spent or a fatal
        CUDA error poisoned the context. Also checkpoints the JSON every ~20 s, so that a
        run killed from outside still leaves its rows."""
        self.checkpoint()
        budget = self.args.budget_s
        stop = self.meta["fatal_error"] is not None or \
            (budget is not None and self.elapsed() >= budget)
        if not stop:
            return False
        if config is not None:
            self.meta["skipped_configs"].append(str(config))
        return True

    def error(self, err: BaseException, **fields) -> dict:
        """Record a configuration that raised as an error row (and note fatal CUDA errors).

        NotImplementedError (a backend without that op) is a plain skip, not an error.
        """
        if isinstance(err, NotImplementedError):
            return self.add(skipped_row(describe_error(err), **fields))
        self.meta["errors"] += 1
        if self.device.type == "cuda" and is_fatal_cuda(err) and not self.meta["fatal_error"]:
            self.meta["fatal_error"] = describe_error(err)
            self.log(f"fatal CUDA error, remaining configurations skipped: "
                     f"{describe_error(err)}")
        return self.add(error_row(err, **fields))

    def checkpoint(self, every_s: float = 20.0) -> None:
        """Rewrite the JSON if rows were added and ``every_s`` passed since the last write."""
        if self.smoke or len(self.rows) == self._written_rows:
            return
        if time.perf_counter() - self._last_write >= every_s:
            self.write(quiet=True)

    # -- rows
    def add(self, row: dict) -> dict:
        """Complete a row (GB/s, % of copy bandwidth, smoke flag) and keep it."""
        full = {key: None for key in ROW_KEYS}
        full.update(row)
        full["smoke"] = self.smoke
        nbytes = full.get("bytes")
        if nbytes and full.get("p50_us"):
            full["gbps"] = nbytes / (full["p50_us"] * 1e-6) / 1e9
            if self.copy_gbps:
                full["pct_copy_bw"] = 100.0 * full["gbps"] / self.copy_gbps
        self.rows.append(full)
        if not self.args.quiet or full.get("error"):
            self.log(format_row(full))
        if full.get("error"):
            print("    " + full["error"].replace("\n", "\n    "), flush=True)
        return full

    def log(self, text: str) -> None:
        print(f"[{self.subject} {self.elapsed():6.1f}s] {text}", flush=True)

    def write(self, quiet: bool = False, complete: bool = False) -> Path:
        """Write {"meta", "rows"} JSON (atomically); returns its path.

        ``complete=True`` marks the final write (meta.complete); checkpoints leave it False.
        """
        for finalize in self.finalizers:
            try:
                finalize(self.rows)
            except Exception as err:  # noqa: BLE001 - never lose the rows over a ratio
                self.meta["finalize_error"] = describe_error(err)
        self.meta["wall_s"] = round(self.elapsed(), 2)
        self.meta["complete"] = complete
        self.out_path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": self.meta, "rows": [clean(r) for r in self.rows]}
        tmp = self.out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
        os.replace(tmp, self.out_path)
        self._written_rows, self._last_write = len(self.rows), time.perf_counter()
        if complete and self._old_sigterm is not None:  # in-process callers (tests) get
            signal.signal(signal.SIGTERM, self._old_sigterm)  # their own handler back
            self._old_sigterm = None
        if not quiet:
            self.log(f"wrote {len(self.rows)} rows to {self.out_path}")
        return self.out_path


def clean(row: dict) -> dict:
    """JSON-safe row: NaN/inf -> None, floats rounded to 4 significant-ish digits."""
    out = {}
    for key, value in row.items():
        if isinstance(value, float):
            value = None if not math.isfinite(value) else float(f"{value:.5g}")
        out[key] = value
    return out


def format_row(row: dict) -> str:
    """A short progress line for a row."""
    if row.get("skipped"):
        return (f"{row.get('op')} {row.get('backend')}/{row.get('kernel')} "
                f"b{row.get('bits')} {row.get('shape')}: skipped ({row['skipped']})")
    ratio = f" x{row['ratio']:.2f}" if row.get("ratio") else ""
    gbps = f" {row['gbps']:.0f}GB/s" if row.get("gbps") else ""
    if row.get("weights_per_s"):
        gbps = f" {row['weights_per_s'] / 1e6:.1f}M weights/s over {row.get('weights')}"
    return (f"{row.get('op')} {row.get('backend')}/{row.get('kernel')} b{row.get('bits')} "
            f"{row.get('granularity')} M={row.get('M')} {row.get('shape')}: "
            f"{row['p50_us']:.1f}us{gbps}{ratio}")


def validate(payload: dict) -> list[str]:
    """Schema problems of a results payload (empty list = valid)."""
    problems = [f"meta lacks {k}" for k in META_KEYS if k not in payload.get("meta", {})]
    rows = payload.get("rows")
    if not isinstance(rows, list) or not rows:
        return problems + ["no rows"]
    for i, row in enumerate(rows):
        problems += [f"row {i} lacks {k}" for k in ROW_KEYS if k not in row]
        if not row.get("skipped") and row.get("p50_us") is None:
            problems.append(f"row {i} has neither a time nor a skip reason")
    return problems


# ----------------------------------------------------------------------------- models
# The mnist UNet's quantizable layers (derived from otq_kernels.models, config "mnist",
# 28×28 input, batch 1): kind, weight shape, input [C, H, W] or [C, L], stride, padding,
# count. Used when the model code cannot be imported; `unet_layers` derives it live.
MNIST_LAYERS_FALLBACK = [
    ("Linear", (512, 128), (128,), 1, 0, 1),
    ("Linear", (512, 512), (512,), 1, 0, 30),
    ("Conv1d", (768, 256, 1), (256, 196), 1, 0, 9),
    ("Conv1d", (768, 256, 1), (256, 49), 1, 0, 1),
    ("Conv1d", (256, 256, 1), (256, 196), 1, 0, 9),
    ("Conv1d", (256, 256, 1), (256, 49), 1, 0, 1),
    ("Conv2d", (256, 1, 3, 3), (1, 28, 28), 1, 1, 1),
    ("Conv2d", (1, 256, 3, 3), (256, 28, 28), 1, 1, 1),
    ("Conv2d", (256, 256, 3, 3), (256, 28, 28), 1, 1, 13),
    ("Conv2d", (256, 256, 3, 3), (256, 14, 14), 1, 1, 13),
    ("Conv2d", (256, 256, 3, 3), (256, 7, 7), 1, 1, 17),
    ("Conv2d", (256, 512, 3, 3), (512, 28, 28), 1, 1, 5),
    ("Conv2d", (256, 512, 3, 3), (512, 14, 14), 1, 1, 5),
    ("Conv2d", (256, 512, 3, 3), (512, 7, 7), 1, 1, 5),
    ("Conv2d", (256, 512, 1, 1), (512, 28, 28), 1, 0, 5),
    ("Conv2d", (256, 512, 1, 1), (512, 14, 14), 1, 0, 5),
    ("Conv2d", (256, 512, 1, 1), (512, 7, 7), 1, 0, 5),
]


def unet_layers(config: str = "mnist") -> tuple[list[dict], str]:
    """Quantizable layers of a UNet config with their batch-1 input shapes.

    Runs the model on the meta device (no memory, no GPU) with forward hooks; returns
    ([{name, kind, weight_shape, input_shape, stride, padding}], source). Falls back to the
    hard-coded mnist table when the model code is unavailable.
    """
    try:
        from torch import nn

        from otq_kernels.models import IMAGE_SIZES, build_model

        with torch.device("meta"):
            model = build_model(config)
        layers: list[dict] = []

        def hook(name):
            def record(module, inputs, _output):
                layers.append({"name": name, "kind": type(module).__name__,
                               "weight_shape": tuple(module.weight.shape),
                               "input_shape": tuple(inputs[0].shape[1:]),
                               "stride": _first(getattr(module, "stride", 1)),
                               "padding": _first(getattr(module, "padding", 0))})
            return record

        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                module.register_forward_hook(hook(name))
        size = IMAGE_SIZES[config]
        x = torch.empty(1, model.in_channels, size, size, device="meta")
        with torch.no_grad():
            model(x, torch.empty(1, device="meta"))
        return layers, f"otq_kernels.models config {config!r} (meta-device forward)"
    except Exception as err:  # noqa: BLE001 - fall back to the table, say why
        if config != "mnist":
            raise
        layers = []
        for kind, w, inp, stride, pad, count in MNIST_LAYERS_FALLBACK:
            for i in range(count):
                layers.append({"name": f"{kind}{w}#{i}", "kind": kind, "weight_shape": w,
                               "input_shape": inp, "stride": stride, "padding": pad})
        return layers, f"hard-coded mnist table ({describe_error(err)})"


def _first(value) -> int:
    return int(value[0]) if isinstance(value, (tuple, list)) else int(value)


def random_qt(n: int, k: int, bits: int, granularity: str, device: torch.device,
              shape: tuple[int, ...] | None = None, seed: int = 0):
    """A QuantizedTensor of random codes and an ascending random codebook (timing only)."""
    from otq_kernels.format import QuantizedTensor, pack_codes

    gen = torch.Generator(device=device).manual_seed(seed)
    codes = torch.randint(0, 2**bits, (n, k), device=device, generator=gen)
    groups = 1 if granularity == "tensor" else n
    book = torch.randn(groups, 2**bits, device=device, generator=gen).sort(dim=1).values
    return QuantizedTensor(pack_codes(codes, bits), 0.02 * book, bits, shape or (n, k),
                           granularity)


def backend_unavailable(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None = it can)."""
    try:
        from otq_kernels import backends

        return backends.get(name).unavailable(device)
    except Exception as err:  # noqa: BLE001
        return describe_error(err)


def rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """‖y − ref‖ / ‖ref‖ in fp32 (NaN/inf in y, or a shape other than ref's, give inf)."""
    y, ref = y.float(), ref.float()
    if y.shape != ref.shape or not bool(torch.isfinite(y).all()):
        return math.inf
    return float((y - ref).norm() / ref.norm().clamp_min(1e-30))


if __name__ == "__main__":
    # `python benchmarks/common.py --tree-hash`
    if sys.argv[1:] == ["--tree-hash"]:
        print(tree_hash())
    else:
        print(__doc__)
