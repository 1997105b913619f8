"""Codebook linear kernels vs FP16 cuBLAS on the dense dequantized weight (DESIGN §7).

For every (N, K) shape — the mnist UNet's Linear / Conv1d / 1×1-Conv2d shapes (derived
from the model) and the large goal shapes 4096², 8192², 14336×4096 — every bit width,
both granularities and M ∈ {1, 4, 16, 64, 256, 1024, 4096}, it times:

- ``fp16``: F.linear with the dense fp16 weight (cuBLAS), the ratio's numerator;
- ``dequant``: expand to a transient dense weight, then cuBLAS (the dequantized baseline);
  with ``--expand`` also the expansion kernels alone (op ``dequantize``, M 0): Triton's
  on both of its grids (programs walking K tiles, one tile per program) and the CUDA one
  (``expand_native``);
- ``triton`` (kernel ``auto`` = what dispatch runs, plus each forced kernel gemv /
  splitk / splitk_fm / gemm / gemm_strided where its M range makes sense);
- ``cuda``: the hand-written LUT GEMV (``lut_gemv``, small M) and its tensor-core kernel
  (``lut_mma``, fp16/bf16 and 2-4 bits) on the canonical planes and on fragment-order
  codes (``lut_frag``; ``lut_frag32``: the same in blocks of 32 weight rows), each forced
  (the backend picks between them by the GPU's tuning entry: ``cuda_tensor_cores``,
  ``cuda_gemv_max_m``, ``cuda_mma_fragment``, ``cuda_frag_32_rows_min_m``);
- on CPU also ``reference`` and the C++ ``cpu`` backend.

Rows: p20/p50/p80 µs, effective GB/s (packed planes + codebook + x + y bytes), % of the
measured copy bandwidth, ratio = t_fp16 / t, the memory-bound cap 16 / (bits per weight)
and the fraction of it reached, and the relative error vs the fp16 dense result.

``--write-tuning PATH`` turns the measured crossovers into the dispatch table's format;
with ``--tuning-from RESULTS.json`` it derives them from that file's rows instead of
timing anything (no GPU needed), e.g. after changing :func:`derive_crossovers`.

``--preset goal`` (the GPU suite's first benchmark) runs only issue 6's goal grid: the two
goal shapes, M ∈ {1, 16, 256, 1024}, bits 4/2/3/8, both granularities, Triton ``auto``
(and ``gemm_strided`` at M > 64: the GEMM on unpermuted x, and both ``splitk`` and
``splitk_fm`` at M <= 64: splitk on strided and on field-major x, to measure the
field-major copy's worth both ways whichever layout the GPU's tuning picks), CUDA and
dequant; ``--preset unet`` the UNet shapes and 4096² on the whole grid (what the
dispatch crossovers of the UNet depend on); ``--preset full`` (default) everything above.
Explicit options override the preset's values.
"""

from __future__ import annotations

import common
import derive
import torch
import torch.nn.functional as F

from otq_kernels.backends import cuda as cuda_backend

GOAL_SHAPES = [("goal", 8192, 8192), ("goal", 14336, 4096), ("large", 4096, 4096)]
DEFAULT_MS = [1, 4, 16, 64, 256, 1024, 4096]
GOAL_MS = [1, 16, 256, 1024]
# Forced Triton kernels and the largest M each is timed at (None = every M).
TRITON_KERNELS = {"gemv": 16, "splitk": 256, "splitk_fm": 64, "gemm": None,
                  "gemm_strided": None, "gemm_tile": None}
GEMM_MIN_M = 65  # the GEMM kernels are timed from here (smaller M is splitk's)
SPLITK_MIN_M = 9  # dispatch runs splitk (or splitk_fm) from here up to GEMM_MIN_M - 1
# The goal preset: dispatch's pick, and each M range's kernel on both x layouts (splitk
# only where dispatch may run it: its M = 256 row would be one more autotune per group).
GOAL_KERNELS = ["auto", "splitk", "splitk_fm", "gemm_strided"]
GOAL_MAX_M = {"splitk": GEMM_MIN_M - 1}
# The CUDA LUT GEMV runs M in chunks of 8 rows (one weight pass each): pointless beyond this.
CUDA_MAX_M = 64
MMA_MAX_BITS = 4  # wider codes run on tensor cores only through lut_frag (8 bits)
MMA_MAX_M = 16  # x rows per tensor-core launch: larger M runs launches of 16 rows
FUSED = ("triton", "cuda")
# Kernels that run only some (dtype, bits): other combinations become skipped rows.
# kernel -> (why a configuration is skipped, whether it runs (dtype, bits, granularity)),
# by the cuda backend's own rules.
LIMITED = {"lut_mma": ("fp16/bf16 activations and bits <= 4 only",
                       lambda dtype, bits, gran: cuda_backend.tensor_cores_support(dtype, bits)),
           "lut_frag": ("fp16/bf16 activations and bits <= 4, or 8 bits per tensor, only",
                        lambda dtype, bits, gran: cuda_backend.fragment_supports(
                            dtype, bits, gran == "channel")),
           "lut_frag32": ("fp16/bf16 activations and 2, 3, 4 or 8 bits per tensor or 2-3 "
                          "bits per channel only",
                          lambda dtype, bits, gran: cuda_backend.fragment_supports(
                              dtype, bits, gran == "channel")
                          and cuda_backend.wide_blocks_support(bits, gran == "channel"))}
# The CUDA kernels by name: cuda.linear's keyword arguments that force each.
CUDA_KERNELS = {"lut_gemv": {"tensor_cores": False, "fragment": False},
                "lut_mma": {"tensor_cores": True, "fragment": False},
                "lut_frag": {"tensor_cores": True, "fragment": True, "block_rows": 16},
                "lut_frag32": {"tensor_cores": True, "fragment": True, "block_rows": 32}}


def unet_shapes(config: str = "mnist") -> tuple[list[tuple[str, int, int]], str]:
    """Unique (N, K) of the UNet's Linear, Conv1d and 1×1 Conv2d layers."""
    layers, source = common.unet_layers(config)
    seen: dict[tuple[int, int], str] = {}
    for layer in layers:
        w = layer["weight_shape"]
        pointwise = layer["kind"] == "Linear" or all(s == 1 for s in w[2:])
        if pointwise:
            seen.setdefault((w[0], int(torch.tensor(w[1:]).prod())), layer["kind"])
    return [(f"unet-{kind}", n, k) for (n, k), kind in seen.items()], source


def shape_nk(text: str) -> tuple[int, int]:
    """'8192x4096' -> (8192, 4096)."""
    n, k = (common.positive_int(v) for v in text.lower().split("x"))
    return n, k


def shape_list(args) -> tuple[list[tuple[str, int, int]], str]:
    """Shapes to run: --shapes NxK,..., or goal + UNet shapes (goal first: budget order)."""
    if args.shapes:
        return [("custom", n, k) for n, k in args.shapes], "--shapes"
    if args.smoke:
        return [("smoke", 40, 72)], "smoke"
    if args.preset == "goal":
        return GOAL_SHAPES[:2], "issue-6 goal shapes"
    unet, source = unet_shapes()
    if args.preset == "unet":
        return unet + GOAL_SHAPES[2:], source
    return GOAL_SHAPES + unet, source


def triton_forced(kernel: str):
    """Callable (x, qt) -> y running one Triton kernel, or raises ImportError."""
    from otq_kernels.backends.triton.matmul import linear_triton

    return lambda x, qt: linear_triton(x, qt, None, kernel=kernel)


def cuda_kernel(kernel: str, split_k: int | None = None):
    """Callable (x, qt) -> y running one CUDA kernel of :data:`CUDA_KERNELS` (lut_gemv.cu,
    lut_mma.cu, lut_frag.cu), with ``split_k`` (None = the backend's heuristic)."""
    forced = CUDA_KERNELS[kernel]
    return lambda x, qt: cuda_backend.linear(x, qt, None, split_k=split_k, **forced)


def backend_fn(name: str):
    """Callable (x, qt) -> y through the public op with backend ``name``."""
    from otq_kernels import ops

    return lambda x, qt: ops.codebook_linear(x, qt, None, backend=name)


def candidates(run: common.Run, backends: list[str], kernels: list[str] | None = None,
               max_ms: dict[str, int] | None = None
               ) -> list[tuple[str, str, object, int | None]]:
    """(backend, kernel, fn | skip reason, max M) for every path to time.

    kernels: the Triton kernels to time ("auto" = dispatch's pick; default all).
    max_ms: per-kernel M caps replacing TRITON_KERNELS' (the goal preset's GOAL_MAX_M).
    """
    kernels = kernels or ["auto", *TRITON_KERNELS]
    caps = {**TRITON_KERNELS, **(max_ms or {})}
    out = []
    for name in backends:
        reason = common.backend_unavailable(name, run.device)
        if name == "triton":
            if "auto" in kernels:
                out.append(("triton", "auto", reason or backend_fn("triton"), None))
            for kernel, max_m in caps.items():
                if kernel not in kernels:
                    continue
                try:
                    fn = reason or triton_forced(kernel)
                except Exception as err:  # noqa: BLE001
                    fn = common.describe_error(err)
                out.append(("triton", kernel, fn, max_m))
        elif name == "cuda":
            max_m = CUDA_MAX_M if run.device.type == "cuda" else None
            out += [("cuda", kernel, reason or cuda_kernel(kernel), max_m)
                    for kernel in CUDA_KERNELS]
        else:
            kernel = {"dequant": "cublas", "cpu": "lut"}.get(name, "torch")
            out.append((name, kernel, reason or backend_fn(name), None))
    return out


def linear_bytes(m: int, n: int, k: int, weight_bytes: int, act_size: int) -> int:
    """Minimal bytes moved: weights once, x read, y written."""
    return weight_bytes + (m * k + m * n) * act_size


def time_fp16(run, m, n, k, dense, dtype, cache) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """Time (once per run and (M, N, K)) F.linear with the dense weight; returns row, x, y."""
    gen = torch.Generator(device=run.device).manual_seed(m)
    x = torch.randn(m, k, device=run.device, dtype=dtype, generator=gen)
    y_ref = F.linear(x, dense)
    key = (m, n, k)
    if key not in cache:
        timing = run.time(lambda: F.linear(x, dense), graph=run.args.graph)
        size = torch.tensor([], dtype=dtype).element_size()
        cache[key] = run.add({"op": "linear", "backend": "fp16",
                              "kernel": "cublas" if run.device.type == "cuda" else "torch",
                              "M": m, "N": n, "K": k, "shape": f"{n}x{k}",
                              "dtype": str(dtype).replace("torch.", ""),
                              "bytes": linear_bytes(m, n, k, n * k * size, size), **timing})
    return cache[key], x, y_ref


def bench_group(run, tag, n, k, bits, gran, ms, paths, dtype, fp16_cache) -> None:
    """All M and paths for one (shape, bits, granularity); errors become rows."""
    base = {"op": "linear", "bits": bits, "granularity": gran, "N": n, "K": k,
            "shape": f"{n}x{k}", "source": tag, "dtype": str(dtype).replace("torch.", "")}
    try:
        qt = common.random_qt(n, k, bits, gran, run.device)
        dense = qt.dequantize(dtype).reshape(n, k).contiguous()
    except Exception as exc:  # noqa: BLE001 - record and go on
        run.error(exc, **base, backend="setup", kernel="random_qt")
        return
    size = dense.element_size()
    wbytes = common.quantized_bytes(qt)
    base.update(bound_ratio=common.bound_ratio(qt), bits_per_weight=qt.bits_per_weight)
    if run.args.expand:
        time_expansion(run, base, qt, dense)
    for m in ms:
        if run.over_budget((tag, n, k, bits, gran, m)):
            continue
        try:
            _, x, y_ref = time_fp16(run, m, n, k, dense, dtype, fp16_cache)
        except Exception as exc:  # noqa: BLE001
            run.error(exc, **base, backend="fp16", kernel="cublas", M=m)
            continue
        for backend, kernel, fn, max_m in paths:
            fields = {**base, "backend": backend, "kernel": kernel, "M": m}
            if (max_m is not None and m > max_m) or (kernel.startswith("gemm") and m < GEMM_MIN_M):
                continue
            limited = LIMITED.get(kernel)
            if limited and not limited[1](dtype, bits, gran):
                fn = limited[0]
            if isinstance(fn, str):
                run.add(common.skipped_row(fn, **fields))
                continue
            if run.meta["fatal_error"]:
                break
            try:
                err = common.rel_error(fn(x, qt), y_ref)
                timing = run.time(lambda fn=fn, x=x, qt=qt: fn(x, qt), graph=run.args.graph)
            except Exception as exc:  # noqa: BLE001 - record and go on
                run.error(exc, **fields)
                continue
            run.add({**fields, **timing, "rel_err": err,
                     "bytes": linear_bytes(m, n, k, wbytes, size)})
    del qt, dense
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def time_expansion(run, base: dict, qt, dense: torch.Tensor) -> None:
    """Rows (op "dequantize", M 0) of the dequant path's own kernels: qt expanded to a
    dense [N, K] weight in dense.dtype, no GEMM: Triton's on both grids, programs walking
    several K tiles (kernel "expand_walk") and one K tile per program ("expand_1tile"), and
    the extension's CUDA kernel ("expand_native", which the path takes for layers of up to
    ``dequant_native_max_numel`` weights; a skipped row without it); bytes = codes read +
    dense weight written, rel_err against ``dense`` (qt.dequantize's: 0 is bit-exact)."""
    from otq_kernels.backends.triton.dequant import dequantize_triton

    dtype = dense.dtype
    nbytes = common.quantized_bytes(qt) + dense.numel() * dense.element_size()
    kernels = [("triton", "expand_walk", lambda: dequantize_triton(qt, dtype, True)),
               ("triton", "expand_1tile", lambda: dequantize_triton(qt, dtype, False)),
               ("cuda", "expand_native", lambda: cuda_backend.dequantize(qt, dtype))]
    for backend, kernel, expand in kernels:
        fields = {**base, "op": "dequantize", "backend": backend, "kernel": kernel, "M": 0}
        reason = cuda_backend.unavailable(run.device) if backend == "cuda" else None
        if reason:
            run.add(common.skipped_row(reason, **fields))
            continue
        try:
            err = common.rel_error(expand(), dense)
            timing = run.time(expand, graph=run.args.graph)
        except Exception as exc:  # noqa: BLE001 - record and go on
            run.error(exc, **fields)
            continue
        run.add({**fields, **timing, "rel_err": err, "bytes": nbytes})


# (backend, kernel) of the rows derive_crossovers reads -> its name for the path
CROSSOVER_PATHS = {("dequant", "cublas"): "dequant", ("triton", "auto"): "triton",
                   ("triton", "gemm"): "gemm", ("triton", "gemm_tile"): "gemm_tile",
                   ("cuda", "lut_gemv"): "lut_gemv", ("cuda", "lut_mma"): "lut_mma",
                   ("cuda", "lut_frag"): "lut_frag", ("cuda", "lut_frag32"): "lut_frag32"}


def derive_crossovers(rows: list[dict], widths=()) -> tuple[dict, dict]:
    """Dispatch thresholds (the tuning table's "linear" section) from measured rows;
    ``widths``: the bit widths the run meant to time (a width without a cuda time
    then gets cuda_max_m_by_bits 0, not the other widths' crossover). A path that raised
    or was wrong on some configuration counts nowhere (:func:`derive.times_by_config`).

    Every "wins at M" below is a geometric mean > 1 of per-configuration speedups over the
    shapes, bits and granularities timed at that grid M; a crossover is the largest grid M
    up to which every grid M wins (0 = none).

    triton_min_m, triton_max_m: the first and last grid M of the run of consecutive grid
    M where Triton beats dequant that dispatch reaches (the first run ending above
    cuda_max_m, since the cuda backend is tried first); triton_min_m only where the run
    starts above the smallest grid M (M between runs go to dequant). The grid is every M
    where dequant ran; Triton's time is the kernel ``auto`` (dispatch's pick), or at M > 64
    the GEMM that triton_gemm_tile picks where both forced GEMMs ran.
    triton_gemm_tile: whether ``gemm_tile`` beat ``gemm`` (geometric mean over M of the
    per-M geometric means) over the configurations where both ran.
    cuda_gemv_max_m: the LUT GEMV against the tensor-core kernel (lut_mma), over the
    configurations where both ran (lut_mma runs fp16/bf16 x and 2-4 bits only).
    cuda_gemv_max_m_by_bits: {bits: the same crossover over that bit width's
    configurations}, for the bit widths where it differs from cuda_gemv_max_m (absent
    when none does).
    cuda_tensor_cores: whether lut_mma wins against the LUT GEMV at some grid M above
    the crossover of some bit width. The cuda backend takes lut_mma where M > the
    crossover of x's bit width, it runs and this is true.
    cuda_frag_32_rows_min_m: the smallest grid M from which lut_frag32 (32-row blocks) beat
    lut_frag at every larger grid M up to 16 where both ran (absent when it loses at the
    largest; M above 16 runs launches of 16 rows, as M = 16 does, and is not judged
    again); from there on "lut_frag" below means lut_frag32's times where it ran (the
    codes it takes), as dispatch would run it.
    cuda_mma_fragment: whether lut_frag (fragment-order codes) beat lut_mma over the
    configurations where both ran (geometric mean over M of the per-M geometric means);
    where it did, "lut_mma" above and below means lut_frag's times (the tensor-core kernel
    the backend then runs).
    cuda_max_m: the cuda backend as it dispatches under those values (per
    configuration the tensor-core time where it would run, else the LUT GEMV time) against
    the faster of dequant and Triton (dispatch tries cuda first, so it must beat both).
    cuda_max_m_by_bits: {bits: the same crossover over that bit width's configurations},
    for the widths where it differs from cuda_max_m (e.g. 8 bits, whose LUT GEMV loses to
    dequant at M = 16 where the 2-4-bit tensor-core kernel wins).
    triton_splitk_field_major: whether splitk_fm beat splitk (geometric mean over M of
    the per-M geometric means), over the M where dispatch runs splitk.
    dequant_walk_k: whether the dequant path's expansion ran faster with programs walking
    K tiles than with one tile per program (``--expand`` rows; geometric mean over the
    configurations). It governs that kernel for every op (linear and conv).

    The Triton band is judged against cuda_max_m, not the per-width cuda_max_m_by_bits,
    and applies to every bit width and granularity, whichever the rows measured (the GPU
    suite's large-M step times 4-bit per channel only).

    Evidence: {path: {M: geometric-mean speedup}} for triton (vs dequant), cuda (vs the
    rival; cuda_by_bits: {bits: ...} for the widths listed), cuda_tensor_cores (lut_mma
    vs the LUT GEMV), cuda_frag_32_rows (lut_frag32 vs lut_frag), cuda_mma_fragment
    (lut_frag vs lut_mma), triton_gemm_tile
    (gemm_tile vs gemm), triton_splitk_field_major and dequant_walk_k (one number).
    """
    times = derive.times_by_config(rows, lambda r: CROSSOVER_PATHS.get(
        (r.get("backend"), r.get("kernel"))))
    values, evidence = {}, {}
    steps = (block_rows_choice, fragment_choice, cuda_kernel_choice, gemm_kernel_choice,
             lambda t: cuda_crossovers(t, values, widths),  # each reads the values so far
             lambda t: triton_band(t, values.get("cuda_max_m", 0)))
    for step in steps:
        chosen, chosen_evidence = step(times)
        values.update(chosen)
        evidence.update(chosen_evidence)
    walk = expansion_speedup(rows)
    if walk:
        values["dequant_walk_k"] = walk > 1.0
        evidence["dequant_walk_k"] = round(walk, 3)
    speedups = splitk_field_major_speedups(rows)
    if speedups:
        values["triton_splitk_field_major"] = derive.geomean(list(speedups.values())) > 1.0
        evidence["triton_splitk_field_major"] = derive.rounded(speedups)
    return values, evidence


def cuda_crossovers(times: dict[tuple, dict[str, float]], choice: dict,
                    widths=()) -> tuple[dict, dict]:
    """cuda_max_m and cuda_max_m_by_bits with their evidence (see derive_crossovers), the
    cuda backend's times being those of the kernel it runs under ``choice`` (the tuning
    values chosen so far); 0 for each of ``widths`` the cuda backend has no time at."""
    for (m, _, bits, _), t in times.items():
        if "dequant" in t:  # cuda must beat the faster of dequant and triton
            t["rival"] = min(t["dequant"], t.get("triton", t["dequant"]))
        kernel = "lut_mma" if use_mma(choice, m, bits) and "lut_mma" in t else "lut_gemv"
        if kernel in t:
            t["cuda"] = t[kernel]
    crossover, means = _wins_up_to(times, "rival", "cuda")
    if not means:
        return {}, {}
    values, evidence = {"cuda_max_m": crossover}, {"cuda": derive.rounded(means)}
    for bits in sorted({key[2] for key in times}):
        crossover, means = _wins_up_to({key: t for key, t in times.items() if key[2] == bits},
                                       "rival", "cuda")
        if means and crossover != values["cuda_max_m"]:
            values.setdefault("cuda_max_m_by_bits", {})[str(bits)] = crossover
            evidence.setdefault("cuda_by_bits", {})[str(bits)] = derive.rounded(means)
    timed = {key[2] for key, t in times.items() if "cuda" in t and "rival" in t}
    for bits in sorted(set(widths) - timed) if values["cuda_max_m"] else ():
        values.setdefault("cuda_max_m_by_bits", {})[str(bits)] = 0
    return values, evidence


def _wins_up_to(times: dict[tuple, dict[str, float]], baseline: str,
                path: str) -> tuple[int, dict[int, float]]:
    """(the largest grid M up to which ``path`` wins at every grid M, {M: its geometric-mean
    speedup over ``baseline``}) over the configurations where both ran."""
    means = derive.speedup_by_m(times, baseline, path)
    return derive.crossover({m: (g or 0) > 1.0 for m, g in means.items()}), means


def triton_band(times: dict[tuple, dict[str, float]], cuda_max_m: int) -> tuple[dict, dict]:
    """triton_max_m (and triton_min_m) with its evidence (see derive_crossovers) from
    {(M, shape, bits, granularity): {"triton": µs, "dequant": µs, ...}}; ({}, {}) when no
    config has both."""
    means = derive.speedup_by_m(times, "dequant", "triton")
    if not means:
        return {}, {}
    grid = sorted({key[0] for key, t in times.items() if "dequant" in t})
    first, last = derive.band({m: (means.get(m) or 0) > 1.0 for m in grid}, cuda_max_m)
    values = {"triton_max_m": last}
    if first > grid[0]:
        values["triton_min_m"] = first
    return values, {"triton": derive.rounded(means)}


def variant_choice(times: dict[tuple, dict[str, float]], flag: str, default: str,
                   variant: str, path: str) -> tuple[dict, dict]:
    """{flag: whether ``variant`` beat ``default``} (geometric mean over M of the per-M
    geometric means over the configurations where both ran) and its evidence; ({}, {})
    when none has both. The winner's times then stand for ``path`` in ``times`` (the
    kernel that dispatch under that flag runs)."""
    speedups = derive.speedup_by_m(times, default, variant)  # the variant's, per M
    means = [g for g in speedups.values() if g]
    if not means:
        return {}, {}
    wins = derive.geomean(means) > 1.0
    for t in times.values():
        if (variant if wins else default) in t:
            t[path] = t[variant if wins else default]
    return {flag: wins}, {flag: derive.rounded(speedups)}


def block_rows_choice(times: dict[tuple, dict[str, float]]) -> tuple[dict, dict]:
    """cuda_frag_32_rows_min_m and its evidence (see derive_crossovers) from {(M, shape,
    bits, granularity): {"lut_frag": µs, "lut_frag32": µs, ...}}, ({}, {}) when no config
    has both; from that M on, lut_frag32's times stand for lut_frag's where it ran."""
    speedups = derive.speedup_by_m(times, "lut_frag", "lut_frag32")  # lut_frag32's, per M
    if not speedups:
        return {}, {}
    evidence = {"cuda_frag_32_rows": derive.rounded(speedups)}
    from_m = None
    judged = [m for m in speedups if m <= MMA_MAX_M]
    for m in sorted(judged, reverse=True):  # the run of wins that reaches the largest M
        if (speedups[m] or 0) <= 1.0:
            break
        from_m = m
    if from_m is None:
        return {}, evidence
    for (m, *_), t in times.items():
        if m >= from_m and "lut_frag32" in t:
            t["lut_frag"] = t["lut_frag32"]
    return {"cuda_frag_32_rows_min_m": from_m}, evidence


def fragment_choice(times: dict[tuple, dict[str, float]]) -> tuple[dict, dict]:
    """cuda_mma_fragment and its evidence (see derive_crossovers) from {(M, shape, bits,
    granularity): {"lut_mma": µs, "lut_frag": µs, ...}}, ({}, {}) when no config has both.
    Where lut_frag wins, its times replace lut_mma's in ``times``; where lut_mma did not
    run (8-bit codes, per tensor) they stand for the tensor-core kernel either way."""
    choice = variant_choice(times, "cuda_mma_fragment", "lut_mma", "lut_frag", "lut_mma")
    for t in times.values():  # 8-bit codes: lut_frag is their only tensor-core kernel
        if "lut_frag" in t and "lut_mma" not in t:
            t["lut_mma"] = t["lut_frag"]
    return choice


def gemm_kernel_choice(times: dict[tuple, dict[str, float]]) -> tuple[dict, dict]:
    """triton_gemm_tile and its evidence (see derive_crossovers) from {(M, shape, bits,
    granularity): {"gemm": µs, "gemm_tile": µs, ...}}, ({}, {}) when no config has both;
    the winner's times stand for Triton's ("triton") where it ran."""
    return variant_choice(times, "triton_gemm_tile", "gemm", "gemm_tile", "triton")


def cuda_kernel_choice(times: dict[tuple, dict[str, float]]) -> tuple[dict, dict]:
    """cuda_gemv_max_m, cuda_gemv_max_m_by_bits and cuda_tensor_cores (see
    derive_crossovers) from {(M, shape, bits, granularity): {"lut_gemv": µs, "lut_mma": µs,
    ...}}; ({}, {}) when no config has both."""
    speedups = derive.speedup_by_m(times, "lut_gemv", "lut_mma")  # lut_mma's, per M
    if not speedups:
        return {}, {}
    gemv_max_m = _gemv_crossover(speedups)
    values = {"cuda_gemv_max_m": gemv_max_m}
    evidence = {"cuda_tensor_cores": derive.rounded(speedups)}
    mma_wins = False
    both = {key[2] for key, t in times.items() if "lut_gemv" in t and "lut_mma" in t}
    for bits in sorted(both):
        of_bits = derive.speedup_by_m({key: t for key, t in times.items() if key[2] == bits},
                                      "lut_gemv", "lut_mma")
        crossover = _gemv_crossover(of_bits)
        mma_wins |= any((g or 0) > 1.0 for m, g in of_bits.items() if m > crossover)
        if crossover != gemv_max_m or bits > MMA_MAX_BITS:  # 8 bits: always their own
            values.setdefault("cuda_gemv_max_m_by_bits", {})[str(bits)] = crossover
            by_bits = evidence.setdefault("cuda_tensor_cores_by_bits", {})
            by_bits[str(bits)] = derive.rounded(of_bits)
    values["cuda_tensor_cores"] = mma_wins
    return values, evidence


def _gemv_crossover(mma_speedups: dict[int, float]) -> int:
    """Largest grid M up to which the LUT GEMV wins at every grid M (lut_mma's speedup < 1)."""
    return derive.crossover({m: (g or 1.0) < 1.0 for m, g in mma_speedups.items()})


def use_mma(values: dict, m: int, bits: int | None = None) -> bool:
    """Whether the cuda backend would take its tensor-core kernel at M for ``bits`` (where
    one runs) under ``values`` (otq_kernels.backends.cuda.use_tensor_cores' rule: 8-bit
    codes only with their own cuda_gemv_max_m_by_bits entry)."""
    gemv_max_m = values.get("cuda_gemv_max_m_by_bits", {}).get(str(bits))
    if gemv_max_m is None:
        if bits is not None and bits > MMA_MAX_BITS:
            return False
        gemv_max_m = values.get("cuda_gemv_max_m", 0)
    return bool(values.get("cuda_tensor_cores")) and m > gemv_max_m


def kernel_speedups(rows: list[dict], backend: str, baseline: str,
                    kernel: str) -> dict[int, float]:
    """{M: geomean of t_baseline / t_kernel} over the rows where both kernels of
    ``backend`` ran."""
    times = derive.times_by_config(
        rows, lambda r: r["kernel"] if r.get("backend") == backend else None)
    return derive.speedup_by_m(times, baseline, kernel)


def expansion_speedup(rows: list[dict]) -> float | None:
    """Geometric mean over the configurations of t_expand_1tile / t_expand_walk (the
    ``--expand`` rows; None without them)."""
    times = derive.times_by_config(
        rows, lambda r: r["kernel"] if r.get("op") == "dequantize" else None)
    return derive.speedup_by_m(times, "expand_1tile", "expand_walk").get(0)


def splitk_field_major_speedups(rows: list[dict]) -> dict[int, float]:
    """{M: geomean of t_splitk / t_splitk_fm} at the M where dispatch runs splitk."""
    speedups = kernel_speedups(rows, "triton", "splitk", "splitk_fm")
    return {m: g for m, g in speedups.items() if SPLITK_MIN_M <= m < GEMM_MIN_M}


def main(argv=None) -> int:
    p = common.parser("linear", __doc__.splitlines()[0])
    p.add_argument("--preset", choices=["goal", "unet", "full"], default="full",
                   help="goal: issue 6's goal grid only (see the module doc); unet: the UNet "
                        "shapes and 4096x4096 on the full grid (crossovers); full: all")
    p.add_argument("--ms", type=common.COUNTS, default=None, help="comma-separated M values")
    p.add_argument("--bits", type=common.BIT_WIDTHS, default=None,
                   help="comma-separated bit widths (default 4,2,3,8)")
    p.add_argument("--granularity", type=common.GRANULARITY_LIST, default="channel,tensor",
                   help="comma-separated (default channel,tensor)")
    p.add_argument("--expand", action="store_true",
                   help="also time the dequant path's expansion kernels alone per (shape, "
                        "bits, granularity): Triton's on both grids (dequant_walk_k) and "
                        "the CUDA one")
    p.add_argument("--kernels", default=None,
                   type=common.csv_list(str, ("auto", *TRITON_KERNELS), "Triton kernel"),
                   help=f"Triton kernels to time: auto,{','.join(TRITON_KERNELS)} "
                        f"(default all; goal: {','.join(GOAL_KERNELS)})")
    p.add_argument("--shapes", type=common.csv_list(shape_nk, None, "shape NxK"), default=None,
                   help="comma-separated NxK (default: goal + UNet)")
    p.add_argument("--backends", type=common.BACKEND_LIST, default=None,
                   help="comma-separated (default GPU: triton,cuda,dequant; CPU: "
                        "reference,cpu,triton,dequant)")
    common.add_dtype_option(p)
    common.add_graph_option(p)
    derive.add_tuning_options(p)
    args = p.parse_args(argv)
    if args.tuning_from:
        return derive.tuning_from(args, "linear", derive_crossovers)
    if args.write_tuning:  # a table it cannot merge into stops it before any timing
        derive.tuning_base(args.write_tuning)
    run = common.Run("linear", args)
    gpu = run.device.type == "cuda"
    dtype = common.bench_dtype(args, run.device)
    goal = args.preset == "goal"
    ms = args.ms or ([3] if args.smoke else (GOAL_MS if goal else DEFAULT_MS))
    bits_list = args.bits or ([3] if args.smoke else [4, 2, 3, 8])
    grans = args.granularity
    kernels = args.kernels or (GOAL_KERNELS if goal else None)
    backends = args.backends or (["triton", "cuda", "dequant"] if gpu else
                                 ["reference", "cpu", "triton", "dequant"])
    shapes, source = shape_list(args)
    run.meta.update(shapes_source=source, ms=ms, bits=bits_list, granularities=grans,
                    backends=backends, kernels=kernels, dtype=str(dtype), graph=args.graph)
    paths = candidates(run, backends, kernels, GOAL_MAX_M if goal else None)
    fp16_cache: dict = {}

    def finalize(rows: list[dict]) -> None:
        common.fill_ratios(rows, ("op", "M", "N", "K", "dtype"))
        common.fill_ratios(rows, ("op", "M", "N", "K", "dtype", "bits", "granularity"),
                           baseline="dequant", field="ratio_vs_dequant")
        values, evidence = derive_crossovers(rows, bits_list)
        run.meta["crossovers"] = {"values": values, "geomean_speedup_vs_rival": evidence}

    run.finalizers.append(finalize)
    # bits, then granularity, then shape: a budget cut keeps every shape at the first bit
    # widths, and shapes of one (bits, granularity) share Triton's compiled kernels
    for bits in bits_list:
        for gran in grans:
            for tag, n, k in shapes:
                if run.over_budget((tag, n, k, bits, gran)):
                    continue
                try:
                    bench_group(run, tag, n, k, bits, gran, ms, paths, dtype, fp16_cache)
                except Exception as exc:  # noqa: BLE001 - one group must not end the run
                    run.error(exc, op="linear", backend="group", bits=bits, granularity=gran,
                              N=n, K=k, shape=f"{n}x{k}")
    run.write(complete=True)  # the finalizer fills ratios and crossovers
    values = run.meta.get("crossovers", {}).get("values", {})
    evidence = run.meta.get("crossovers", {}).get("geomean_speedup_vs_rival", {})
    if args.write_tuning and values and gpu and not args.smoke:
        name = torch.cuda.get_device_name(run.device)
        path = derive.write_tuning(args.write_tuning, name, "linear", values, evidence)
        run.log(f"tuning {values} -> {path}")
    elif args.write_tuning:
        run.log("--write-tuning ignored: needs a non-smoke GPU run with fused and dequant rows")
    return 1 if run.meta["fatal_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
