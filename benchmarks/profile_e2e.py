"""Where the GPU time of one mnist-UNet sampling step goes: kernel time by category.

For the FP16 dense model and the 4-bit per-channel quantized one (dispatch ``auto``) at
batch 1, it profiles ``--steps`` eager Euler steps one at a time with torch.profiler (CUDA
activity) and sums each step's kernel time per category of kernel name (``CATEGORIES``:
cuBLAS/CUTLASS GEMMs, cuDNN convs, our CUDA kernels, our Triton kernels, PyTorch's own
kernels, memset/memcpy, the rest). One row per (variant, category): p20/p50/p80 over the
steps of that category's summed kernel time per step, and its kernel count per step. The
question it answers: how much of a batch-1 step the quantized layers can change at all
(issue 6's e2e goal asks for 0.8× the FP16 step time); ``meta.kernels`` lists each
category's most expensive kernel names. ``meta.memory`` breaks each variant's peak memory
down (model, allocated before a step, kept after it, transient): the goal asks for 0.4×
the FP16 peak. ``meta.kept_allocations`` names the Python call sites of the largest
blocks a step leaves allocated (library workspaces among them). ``meta.host`` sets the
host's time to enqueue an eager step against the step's wall time (host-bound when they
are close) and lists the CPU ops with the most self time and the Python functions with
the most own time. Needs a GPU; on CPU it writes one skipped row.
"""

from __future__ import annotations

import cProfile
import importlib
import pkgutil
import pstats
import re
import statistics
import time
from pathlib import Path

import bench_e2e
import common
import torch

VARIANTS = [(None, None, "fp16"), (4, "channel", "auto")]
# (category, pattern on the kernel name), first match wins; our Triton kernels are matched
# by their function names before these.
CATEGORIES = [("otq_cuda", r"lut_gemv|lut_mma|splitk_fixup|otq::cuda"),
              ("copy", r"^Memcpy|^Memset|memcpy|memset"),
              ("conv", r"conv|fprop|cudnn|implicit_convolve|xmma_.*f(wd|prop)"),
              ("gemm", r"gemm|gemv|nvjet|cutlass|cublas"),
              ("torch", r"at::|c10::|native::")]


def triton_kernel_names() -> set[str]:
    """The function names of otq_kernels' Triton kernels (their CUDA kernel names)."""
    from otq_kernels.backends import triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for obj in vars(module).values():
            fn = obj
            while hasattr(fn, "fn") and fn.fn is not fn:  # Autotuner -> JITFunction -> def
                fn = fn.fn
            if fn is not obj and callable(fn) and hasattr(fn, "__name__"):
                names.add(fn.__name__)
    return names


def category_of(name: str, triton_names: set[str]) -> str:
    """The category of one kernel name: ours (Triton, CUDA) first, then ``CATEGORIES``."""
    if any(re.search(rf"\b{re.escape(t)}\b", name) for t in triton_names):
        return "otq_triton"
    return next((c for c, pattern in CATEGORIES if re.search(pattern, name)), "other")


def categorize(kernels: list[tuple[str, float]], triton_names: set[str]) -> dict:
    """{category: (count, total µs)} of (kernel name, µs) pairs."""
    out: dict[str, list] = {}
    for name, us in kernels:
        entry = out.setdefault(category_of(name, triton_names), [0, 0.0])
        entry[0] += 1
        entry[1] += us
    return {c: (n, t) for c, (n, t) in out.items()}


def top_kernel_names(kernels: list[tuple[str, float]], triton_names: set[str],
                     top: int = 6, width: int = 160) -> dict:
    """{category: [(name, count, total µs)]}: each category's `top` kernel names by total
    time (names cut to `width` characters), so that a category's count can be traced to
    the library and op that launch it."""
    by_name: dict[str, list] = {}
    for name, us in kernels:
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
    out: dict[str, list] = {}
    for name, (count, us) in sorted(by_name.items(), key=lambda item: -item[1][1]):
        rows = out.setdefault(category_of(name, triton_names), [])
        if len(rows) < top:
            rows.append((name[:width], count, round(us, 2)))
    return out


def device_kernels(prof) -> list[tuple[str, float]]:
    """(name, µs) of every GPU activity in a finished torch.profiler session."""
    out = []
    for ev in prof.profiler.kineto_results.events():
        if ev.device_type() != torch.autograd.DeviceType.CUDA:
            continue
        ns = ev.duration_ns() if hasattr(ev, "duration_ns") else 1000 * ev.duration_us()
        out.append((ev.name(), ns / 1000))
    return out


def profile_variant(run, master, variant, image, steps: int, names: set[str]) -> None:
    """Rows of one variant: per category, quantiles of its per-step kernel time."""
    bits, gran, backend = variant
    model = bench_e2e.build_variant(master, bits, gran, backend, run.device, torch.float16)
    x = torch.randn(1, *image, device=run.device, dtype=torch.float16)
    t = torch.full((1,), 0.5, device=run.device)
    step = bench_e2e.step_fn(model, x, t, 0.05)
    for _ in range(3):
        step()
    torch.cuda.synchronize(run.device)
    per_step = []
    for _ in range(steps):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize(run.device)
        per_step.append(categorize(device_kernels(prof), names))
    label = "fp16" if bits is None else f"{bits}b-{gran}-{backend}"
    totals = [sum(t for _, t in s.values()) for s in per_step]
    categories = sorted({c for s in per_step for c in s}) + ["all"]
    for category in categories:
        if category == "all":
            samples, counts = totals, [sum(n for n, _ in s.values()) for s in per_step]
        else:
            samples = [s.get(category, (0, 0.0))[1] for s in per_step]
            counts = [s.get(category, (0, 0.0))[0] for s in per_step]
        run.add({"op": "e2e_kernels", "backend": label, "kernel": category, "bits": bits,
                 "granularity": gran, "M": 1, "shape": run.meta["config"], "dtype": "float16",
                 "kernels_per_step": max(counts), **common.quantiles_us(
                     [s * 1e-6 for s in samples])})
    meta_entry(run, "kernels", label, top_kernel_names, device_kernels(prof), names)
    meta_entry(run, "memory", label, memory_breakdown, run, model, step)
    meta_entry(run, "kept_allocations", label, step_allocation_sites, run, step)
    meta_entry(run, "host", label, host_times, run, step, prof)
    del model
    torch.cuda.empty_cache()


def meta_entry(run, key: str, label: str, fn, *args) -> None:
    """run.meta[key][label] = fn(*args), or the error it raised (the rows stand without)."""
    try:
        value = fn(*args)
    except Exception as exc:  # noqa: BLE001
        value = {"error": common.describe_error(exc)}
    run.meta.setdefault(key, {})[label] = value


def host_times(run, step, prof, reps: int = 10, top: int = 12) -> dict:
    """Eager step: the host's time to enqueue it (no sync inside) against its wall time
    (sync), medians in ms, and the CPU ops with the most self time in the last profile."""
    enqueue, wall = [], []
    for _ in range(reps):
        torch.cuda.synchronize(run.device)
        start = time.perf_counter()
        step()
        enqueued = time.perf_counter()
        torch.cuda.synchronize(run.device)
        enqueue.append(1e3 * (enqueued - start))
        wall.append(1e3 * (time.perf_counter() - start))
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {"enqueue_ms": statistics.median(enqueue), "wall_ms": statistics.median(wall),
            "top_cpu_ops": [(e.key, e.count, round(e.self_cpu_time_total, 1))
                            for e in ops[:top]],
            "top_python": python_hot_spots(step, top)}


def python_hot_spots(fn, top: int = 12) -> list[tuple[str, int, float, float]]:
    """One call of fn under cProfile: the functions with the most own time, as
    ("file:line(name)", calls, own µs, cumulative µs). The profiler's CPU ops show aten
    ops and CUDA API calls only; this shows the Python around them."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (cc, calls, tt, ct, callers)}
    rows = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    return [(f"{Path(file).name}:{line}({name})", calls, round(1e6 * own, 1),
             round(1e6 * cumulative, 1))
            for (file, line, name), (_, calls, own, cumulative, _) in rows]


def memory_breakdown(run, model, step) -> dict:
    """Bytes of a warmed-up step: the model's parameters and buffers, all that is allocated
    before a step (with the cuBLAS workspaces freed first), what a step leaves allocated
    beyond that (library workspaces it creates), and its transient peak above that."""
    torch.cuda.synchronize(run.device)
    bench_e2e.release_cublas_workspaces()
    before = torch.cuda.memory_allocated(run.device)
    step()
    torch.cuda.synchronize(run.device)
    kept = torch.cuda.memory_allocated(run.device)
    torch.cuda.reset_peak_memory_stats(run.device)
    step()
    torch.cuda.synchronize(run.device)
    peak = torch.cuda.max_memory_allocated(run.device)
    return {"model_bytes": bench_e2e.module_bytes(model), "allocated_before_step": before,
            "kept_after_step": kept - before, "step_peak_above_kept": peak - kept,
            "peak": peak}


def kept_allocations(snapshot: dict, top: int = 6, depth: int = 4) -> list[dict]:
    """The largest blocks of a ``torch.cuda.memory._snapshot()`` that are still allocated
    and carry an allocation stack (those made while history was recorded), as
    {"bytes", "frames"}: up to `depth` innermost Python frames ("file:line(function)"),
    torch's module-call wrappers left out."""
    blocks = [b for seg in snapshot.get("segments", []) for b in seg.get("blocks", [])
              if b.get("state") == "active_allocated" and b.get("frames")]
    blocks.sort(key=lambda b: b["size"], reverse=True)
    out = []
    for block in blocks[:top]:
        frames = [f"{Path(f['filename']).name}:{f['line']}({f['name']})"
                  for f in block["frames"]
                  if not f["filename"].endswith("torch/nn/modules/module.py")]
        out.append({"bytes": block["size"], "frames": frames[:depth]})
    return out


def step_allocation_sites(run, step) -> list[dict]:
    """Where the allocations that a warmed-up step leaves behind were made: one step with
    the allocator recording Python stacks (cuBLAS workspaces freed first, as in
    `memory_breakdown`), then `kept_allocations` of the allocator's snapshot."""
    torch.cuda.synchronize(run.device)
    bench_e2e.release_cublas_workspaces()
    torch.cuda.memory._record_memory_history(enabled="state", context="state",
                                             stacks="python")
    try:
        step()
        torch.cuda.synchronize(run.device)
        snapshot = torch.cuda.memory._snapshot(run.device)
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return kept_allocations(snapshot)


def main(argv=None) -> int:
    p = common.parser("e2e_profile", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="profiled steps per variant")
    args = p.parse_args(argv)
    run = common.Run("e2e_profile", args, measure_ceilings=False)
    run.meta.update(config="mnist", batch=1, steps=args.steps)
    if run.device.type != "cuda":
        run.add(common.skipped_row("kernel profiles need a GPU", op="e2e_kernels"))
        run.write(complete=True)
        return 0
    from otq_kernels.demo import random_model
    from otq_kernels.models import IMAGE_SIZES

    master = random_model("mnist", seed=0)
    image = (master.in_channels, IMAGE_SIZES["mnist"], IMAGE_SIZES["mnist"])
    names = triton_kernel_names()
    run.meta["triton_kernels"] = sorted(names)
    for variant in VARIANTS:
        try:
            profile_variant(run, master, variant, image, args.steps, names)
        except Exception as exc:  # noqa: BLE001 - one variant must not end the run
            run.error(exc, op="e2e_kernels", backend=variant[2], bits=variant[0],
                      granularity=variant[1])
    run.write(complete=True)
    return 1 if run.meta["fatal_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
