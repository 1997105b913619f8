"""Codebook fitting throughput (weights/s) on the mnist UNet's weight shapes.

Random weights of the real shapes (every Linear / Conv1d / Conv2d weight of the ``mnist``
config, ~55.6M weights, derived from the model) are fitted per method × granularity ×
backend; one timed unit is one pass over all layers (or over a listed subset). Paths:

- ``triton`` / ``cuda`` / ``cpu`` / ``reference``: ``ops.fit_rows`` (codes + centroids,
  no packing) with that backend; the fused backends implement ``ot`` only, every other
  method runs the torch reference (on the device);
- ``torch_sort``: the vectorized torch.sort implementation (baseline (a));
- ``numpy``: the seed code's approach, a numpy loop over rows (sort, split into equal
  chunks, chunk means), on the host (baseline (b)); always on a layer subset;
- ``api``: ``otq.fit_codebook`` with backend auto, packing included.

Rows: p20/p50/p80 µs per pass, weights, weights_per_s, total_model_ms (extrapolated to the
whole model when a subset ran: ``extrapolated``), ratio = rate / rate(torch_sort) and
ratio_vs_numpy = rate / rate(numpy), same method, bits and granularity.
"""

from __future__ import annotations

import math

import common
import numpy as np
import torch

from otq_kernels.quantizers import METHODS

FUSED_OT = ("triton", "cuda", "cpu")
# What --backends names: a fit_rows backend, or the API (fit_codebook), the torch.sort
# path or the numpy seed loop.
FIT_PATHS = (*FUSED_OT, "reference", "torch_sort", "api", "numpy")


def numpy_ot_rows(rows: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The seed's OT quantizer, row by row: sort, equal-mass chunks, chunk means."""
    r, n = rows.shape
    k = min(2**bits, n)
    codes = np.empty((r, n), dtype=np.int64)
    cents = np.empty((r, 2**bits), dtype=np.float32)
    for i in range(r):
        row = rows[i]
        order = np.argsort(row, kind="stable")
        for j, chunk in enumerate(np.array_split(order, k)):
            codes[i, chunk] = j
            cents[i, j] = row[chunk].mean()
        cents[i, k:] = cents[i, k - 1]
    return codes, cents


def model_shapes(args) -> tuple[list[tuple[str, tuple[int, ...]]], str]:
    """(name, weight shape) of every quantizable layer (tiny ones in smoke mode)."""
    if args.smoke:
        return [("smoke.a", (4, 2, 3, 3)), ("smoke.b", (6, 20))], "smoke"
    layers, source = common.unet_layers()
    seen, out = set(), []
    for layer in layers:  # a layer called twice (none in the UNet) counts once
        if layer["name"] not in seen:
            seen.add(layer["name"])
            out.append((layer["name"], tuple(layer["weight_shape"])))
    return out, source


def subset(weights: list[tuple[str, torch.Tensor]], max_weights: int | None):
    """Every j-th layer so that about ``max_weights`` weights remain (all when None)."""
    total = sum(w.numel() for _, w in weights)
    if max_weights is None or total <= max_weights:
        return weights
    step = math.ceil(total / max_weights)
    picked = weights[::step]
    return picked or weights[:1]


def rows_of(w: torch.Tensor, granularity: str) -> torch.Tensor:
    return w.reshape(1, -1) if granularity == "tensor" else w.reshape(w.shape[0], -1)


def path_fn(backend: str, method: str, bits: int):
    """Callable(rows) for one path, or a skip reason."""
    if backend == "numpy":
        if method != "ot":
            return "the numpy seed loop is timed for ot only"
        return lambda rows: numpy_ot_rows(rows, bits)
    if backend == "torch_sort":
        if method != "ot":
            return "torch_sort implements ot only"
        try:
            from otq_kernels.backends.triton.fit import fit_rows_torch_sort
        except Exception as err:  # noqa: BLE001
            return common.describe_error(err)
        return lambda rows: fit_rows_torch_sort(rows, bits)
    if backend == "api":
        import otq_kernels as otq

        return lambda w, gran: otq.fit_codebook(w, bits, method, gran)
    if backend in FUSED_OT and method != "ot":
        return f"backend {backend} implements ot only (other methods use the reference)"
    from otq_kernels import ops

    return lambda rows: ops.fit_rows(rows, bits, method, "rank", backend)


def time_pass(run, fn, inputs, backend) -> dict:
    """Time one pass of ``fn`` over all inputs (GPU events, or host wall clock)."""
    def one_pass():
        for item in inputs:
            fn(*item) if isinstance(item, tuple) else fn(item)

    if backend == "numpy" or run.device.type == "cpu" or run.smoke:
        if run.device.type == "cuda":
            run.sync()
        reps = 2 if run.smoke else 3
        return common.time_cpu(one_pass, reps=reps, warmup=0 if backend == "numpy" else 1,
                               max_s=10.0)
    return common.time_cuda(one_pass, None, False, warmup_ms=0, rep_ms=500, min_reps=3,
                            max_reps=10, est_runs=1)


def bench_path(run, backend, method, bits, gran, weights, max_weights, total_weights) -> None:
    """One row: a (backend, method, bits, granularity) pass over the (sub)model."""
    fields = {"op": "fit", "backend": backend, "method": method, "bits": bits,
              "granularity": gran, "shape": "mnist-unet", "dtype": "float32",
              "kernel": {"api": "fit_codebook", "numpy": "row_loop"}.get(backend, "fit_rows")}
    fn = path_fn(backend, method, bits)
    if isinstance(fn, str):
        run.add(common.skipped_row(fn, **fields))
        return
    reason = None if backend in ("numpy", "torch_sort", "api") else \
        common.backend_unavailable(backend, run.device)
    if reason:
        run.add(common.skipped_row(reason, **fields))
        return
    used = subset(weights, max_weights)
    if backend == "numpy":
        inputs = [rows_of(w, gran).cpu().numpy() for _, w in used]
    elif backend == "api":
        inputs = [(w, gran) for _, w in used]
    else:
        inputs = [rows_of(w, gran) for _, w in used]
    n_weights = sum(w.numel() for _, w in used)
    try:
        timing = time_pass(run, fn, inputs, backend)
    except Exception as exc:  # noqa: BLE001
        run.error(exc, **fields)
        return
    rate = n_weights / (timing["p50_us"] * 1e-6)
    run.add({**fields, **timing, "weights": n_weights, "layers": len(used),
             "layer_shapes": sorted({"x".join(map(str, w.shape)) for _, w in used}),
             "weights_per_s": rate, "total_model_ms": total_weights / rate * 1e3,
             "extrapolated": len(used) < len(weights),
             "bytes": n_weights * 4 * 2})  # read fp32 weights, write codes as ≥ 1 word


def fill_rate_ratios(rows: list[dict]) -> None:
    """ratio = rate / rate(torch_sort) (same thread count), ratio_vs_numpy = rate / rate(numpy).

    Both compare the same method, bits and granularity; numpy is single-threaded.
    """
    for baseline, field, keys in (("torch_sort", "ratio", ("threads",)),
                                  ("numpy", "ratio_vs_numpy", ())):
        def key(r, keys=keys):
            return (r.get("method"), r.get("bits"), r.get("granularity"),
                    *(r.get(k) for k in keys))
        ref = {key(r): r["weights_per_s"] for r in rows
               if r.get("backend") == baseline and r.get("weights_per_s")}
        for r in rows:
            base = ref.get(key(r))
            if base and r.get("weights_per_s"):
                r[field] = r["weights_per_s"] / base


def main(argv=None) -> int:
    p = common.parser("fit", __doc__.splitlines()[0])
    p.add_argument("--bits", type=common.BIT_WIDTHS, default="4",
                   help="comma-separated bit widths (default 4)")
    p.add_argument("--methods", type=common.csv_list(str, METHODS, "method"), default=None,
                   help="comma-separated (default GPU: ot,lloyd,uniform,piecewise,log2; CPU: ot)")
    p.add_argument("--granularity", type=common.GRANULARITY_LIST, default="channel,tensor")
    p.add_argument("--backends", type=common.csv_list(str, FIT_PATHS, "fit path"), default=None,
                   help="default GPU: triton,cuda,torch_sort,reference,api,numpy; "
                        "CPU: cpu,torch_sort,reference,numpy")
    p.add_argument("--max-weights", type=float, default=None,
                   help="time the fused GPU paths on the whole model but the others on "
                        "about this many weights (default GPU 8e6; CPU 2e6)")
    p.add_argument("--numpy-max-weights", type=float, default=None,
                   help="subset size for the numpy loop (default 1e6)")
    p.add_argument("--threads", type=common.COUNTS, default=None,
                   help="CPU only: comma-separated torch thread counts to time the torch/C++ "
                        "paths at (default: 1 and torch's default); numpy runs once")
    args = p.parse_args(argv)
    run = common.Run("fit", args, measure_ceilings=not args.smoke)
    gpu = run.device.type == "cuda"
    methods = args.methods or (["ot", "uniform"] if args.smoke else
                               (list(METHODS) if gpu else ["ot"]))
    backends = args.backends or (
        ["triton", "cuda", "torch_sort", "reference", "api", "numpy"] if gpu else
        (["cpu", "torch_sort", "reference", "triton", "numpy"] if args.smoke else
         ["cpu", "torch_sort", "reference", "numpy"]))
    shapes, source = model_shapes(args)
    gen = torch.Generator(device=run.device).manual_seed(0)
    weights = [(name, 0.02 * torch.randn(shape, device=run.device, generator=gen))
               for name, shape in shapes]
    total = sum(w.numel() for _, w in weights)
    slow_max = None if args.smoke else (args.max_weights or (8e6 if gpu else 2e6))
    numpy_max = None if args.smoke else (args.numpy_max_weights or 1e6)
    run.meta.update(shapes_source=source, model_weights=total, layers=len(weights),
                    methods=methods, backends=backends, subset_weights=slow_max,
                    numpy_subset_weights=numpy_max)
    default_threads = torch.get_num_threads()
    thread_counts = [None] if gpu or args.smoke else \
        (args.threads or sorted({1, default_threads}))
    run.meta["thread_counts"] = thread_counts
    run.finalizers.append(fill_rate_ratios)
    for threads in thread_counts:
        if threads is not None:
            torch.set_num_threads(threads)
        for bits in args.bits:
            for gran in args.granularity:
                for method in methods:
                    for backend in backends:
                        if backend == "numpy" and threads not in (None, thread_counts[0]):
                            continue  # single-threaded: once is enough
                        if run.over_budget((backend, method, bits, gran, threads)):
                            continue
                        fast = gpu and backend in ("triton", "cuda", "torch_sort", "api")
                        limit = numpy_max if backend == "numpy" else \
                            (None if fast else slow_max)
                        try:
                            bench_path(run, backend, method, bits, gran, weights, limit,
                                       total)
                        except Exception as exc:  # noqa: BLE001 - record, go on
                            run.error(exc, op="fit", backend=backend, method=method,
                                      bits=bits, granularity=gran, shape="mnist-unet")
                        if run.rows:
                            run.rows[-1]["threads"] = threads
    torch.set_num_threads(default_threads)
    run.write(complete=True)  # the finalizer fills the ratios
    return 1 if run.meta["fatal_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
