"""Codebook conv2d vs FP16 cuDNN on the dense dequantized weight (DESIGN §7).

The mnist UNet's own Conv2d layers (3×3 and 1×1, derived from the model: weight shape,
input resolution, stride, padding) at batch 1 / 8 / 64. Paths:

- ``fp16`` / ``cudnn``: F.conv2d with the dense fp16 weight, NCHW input (the model's
  layout): the ratio's numerator; ``fp16`` / ``cudnn_nhwc``: the same with channels-last
  tensors (``ratio_best`` uses the faster of the two);
- ``dequant``: transient dense weight, then cuDNN (the dequantized baseline);
- ``cuda`` / ``lut_conv``: the CUDA implicit-GEMM conv on tensor cores (csrc/cuda/
  lut_conv.cu: pair look-ups of tap-major codes, channels-last x; fp16/bf16, 2-4 bits)
  on the NCHW input (its channels-last copy included), and ``lut_conv_cl`` on the
  channels-last input (no copy; y channels-last), the layout ``cudnn_nhwc`` is timed on;
- ``triton``: the implicit-GEMM conv (weights never expanded in memory); at 4-bit per
  channel also kernel ``implicit_gemm_nosplit`` (channel blocks not split: the effect of
  the split-K heuristic, measured in the same run);
- on CPU also ``reference`` and ``cpu`` where implemented.

Rows carry M = batch·OH·OW (the GEMM M), N = C_out, K = C_in/groups·KH·KW, the effective
GB/s (packed weights + codebook + input + output), % of copy bandwidth and ratio.
``--write-tuning PATH`` stores the largest M where Triton beats dequant and where the CUDA
kernel beats both (conv2d section); with ``--tuning-from RESULTS.json`` it derives them
from that file's rows (no GPU needed).
``--preset goal`` (GPU suite, issue 6's goal): batch 1 only; ``full`` (default): 1, 8, 64.
``--graph`` times CUDA-graph replays of every path (dense too): at batch 1 these layers
take microseconds, and eager timing would measure the host's launch path instead.
Order: bits, then granularity, then batch, then layers lowest resolution first, so that a
budget cut keeps the 4-bit per-channel rows of every layer.
"""

from __future__ import annotations

import math

import common
import derive
import torch
import torch.nn.functional as F
from digest import conv_kernel_size

DEFAULT_BATCHES = [1, 8, 64]
NOSPLIT = "implicit_gemm_nosplit"
NOSPLIT_VARIANT = (4, "channel")  # the only bits/granularity timed without the split
CHANNELS_LAST = "lut_conv_cl"  # lut_conv timed on channels-last x (no copy)


def conv_layers(args) -> tuple[list[dict], str]:
    """Unique conv configurations of the UNet (or one tiny layer in smoke mode)."""
    if args.smoke:
        return [{"weight_shape": (8, 8, 3, 3), "input_shape": (8, 5, 5), "stride": 1,
                 "padding": 1, "count": 1, "name": "smoke"}], "smoke"
    layers, source = common.unet_layers()
    unique: dict[tuple, dict] = {}
    for layer in layers:
        if layer["kind"] != "Conv2d":
            continue
        key = (layer["weight_shape"], layer["input_shape"], layer["stride"], layer["padding"])
        entry = unique.setdefault(key, {**layer, "count": 0})
        entry["count"] += 1
    if not args.include_1x1:
        unique = {k: v for k, v in unique.items() if k[0][2:] != (1, 1)}
    # lowest resolution first: the layers where fusion should pay (and the budget order);
    # the 1x1 convs after every 3x3 one (issue 6's conv goal is on the 3x3 convs)
    ordered = sorted(unique.values(), key=lambda v: (
        tuple(v["weight_shape"][2:]) == (1, 1), v["input_shape"][1], -v["count"]))
    return ordered, source


def out_hw(h: int, w: int, kernel: tuple[int, int], stride: int, padding: int) -> tuple[int, int]:
    """Output height and width of a dilation-1 conv."""
    return ((h + 2 * padding - kernel[0]) // stride + 1,
            (w + 2 * padding - kernel[1]) // stride + 1)


def candidates(run: common.Run, backends: list[str]) -> list[tuple[str, str, object]]:
    """(backend, kernel, fn | skip reason); fn(x, qt, stride, padding) -> y."""
    from otq_kernels import ops

    out = []
    for name in backends:
        reason = common.backend_unavailable(name, run.device)
        kernel = {"triton": "implicit_gemm", "dequant": "cudnn", "cuda": "lut_conv"}.get(
            name, name)
        fn = (lambda x, qt, s, p, name=name:
              ops.codebook_conv2d(x, qt, None, s, p, 1, 1, backend=name))
        out.append((name, kernel, reason or fn))
        if name == "triton" and not reason:
            out.append((name, NOSPLIT, _triton_without_split))
        if name == "cuda" and not reason:  # fn takes the channels-last x (bench_layer)
            out.append((name, CHANNELS_LAST, fn))
    return out


def _triton_without_split(x, qt, stride, padding):
    from otq_kernels.backends.triton.conv import conv2d_triton

    return conv2d_triton(x, qt, None, stride, padding, split_k=1)


def time_dense(run, layer_key, x, dense, stride, padding, fields, conv_bytes, cache):
    """Time F.conv2d with the dense weight in NCHW and NHWC (once per shape and batch)."""
    if layer_key in cache:
        return
    size = dense.element_size()
    dense_bytes = conv_bytes + dense.numel() * size
    run.add({**fields, "backend": "fp16", "kernel": "cudnn", "bits": None,
             "granularity": None, "bytes": dense_bytes,
             **run.time(lambda: F.conv2d(x, dense, None, stride, padding),
                        graph=run.args.graph)})
    if run.device.type == "cuda":
        x_cl = x.to(memory_format=torch.channels_last)
        w_cl = dense.to(memory_format=torch.channels_last)
        run.add({**fields, "backend": "fp16", "kernel": "cudnn_nhwc", "bits": None,
                 "granularity": None, "bytes": dense_bytes,
                 **run.time(lambda: F.conv2d(x_cl, w_cl, None, stride, padding),
                            graph=run.args.graph)})
    cache[layer_key] = True


def bench_layer(run, layer, batch, bits, gran, paths, dtype, cache) -> None:
    """All paths for one layer, batch, bit width and granularity; errors become rows."""
    w_shape = tuple(layer["weight_shape"])
    c, h, w = layer["input_shape"]
    n, k = w_shape[0], math.prod(w_shape[1:])
    stride, padding = layer["stride"], layer["padding"]
    oh, ow = out_hw(h, w, w_shape[2:], stride, padding)
    shape = f"{n}x{c}x{w_shape[2]}x{w_shape[3]}@{h}x{w}"
    fields = {"op": "conv2d", "M": batch * oh * ow, "N": n, "K": k, "shape": shape,
              "batch": batch, "dtype": str(dtype).replace("torch.", ""),
              "layer_count": layer["count"], "stride": stride, "padding": padding}
    try:
        qt = common.random_qt(n, k, bits, gran, run.device, shape=w_shape)
        dense = qt.dequantize(dtype).contiguous()
        gen = torch.Generator(device=run.device).manual_seed(batch)
        x = torch.randn(batch, c, h, w, device=run.device, dtype=dtype, generator=gen)
        x_cl = x.to(memory_format=torch.channels_last)
        size = dense.element_size()
        act_bytes = (x.numel() + batch * n * oh * ow) * size
        time_dense(run, (shape, batch), x, dense, stride, padding, fields, act_bytes, cache)
        y_ref = F.conv2d(x, dense, None, stride, padding)
    except Exception as exc:  # noqa: BLE001 - record and go on
        run.error(exc, **fields, backend="fp16", kernel="cudnn", bits=bits, granularity=gran)
        return
    qfields = {**fields, "bits": bits, "granularity": gran,
               "bound_ratio": common.bound_ratio(qt), "bits_per_weight": qt.bits_per_weight}
    for backend, kernel, fn in paths:
        if kernel == NOSPLIT and (bits, gran) != NOSPLIT_VARIANT:
            continue
        row = {**qfields, "backend": backend, "kernel": kernel}
        if isinstance(fn, str):
            run.add(common.skipped_row(fn, **row))
            continue
        if run.meta["fatal_error"]:
            break
        xin = x_cl if kernel == CHANNELS_LAST else x
        try:
            err = common.rel_error(fn(xin, qt, stride, padding), y_ref)
            timing = run.time(lambda fn=fn, xin=xin: fn(xin, qt, stride, padding),
                              graph=run.args.graph)
        except Exception as exc:  # noqa: BLE001
            run.error(exc, **row)
            continue
        run.add({**row, **timing, "rel_err": err,
                 "bytes": act_bytes + common.quantized_bytes(qt)})


def best_dense_ratios(rows: list[dict]) -> None:
    """ratio_best = min(fp16 NCHW, fp16 NHWC) / t for every timed row."""
    best: dict[tuple, float] = {}
    for r in rows:
        if r.get("backend") == "fp16" and r.get("p50_us"):
            key = (r["shape"], r["batch"])
            best[key] = min(best.get(key, math.inf), r["p50_us"])
    for r in rows:
        ref = best.get((r.get("shape"), r.get("batch")))
        if r.get("p50_us") and ref:
            r["ratio_best"] = ref / r["p50_us"]


def derive_crossover(rows: list[dict], widths=()) -> tuple[dict, dict]:
    """conv2d.triton_max_m and conv2d.cuda_max_m: the largest measured M (batch·OH·OW) up
    to which Triton beats dequant, and the CUDA kernel the faster of dequant and Triton
    (dispatch tries cuda first), at every measured M.

    Rows are grouped by M; a group wins when the geometric mean of the speedups over its
    layers, bits and granularities exceeds 1. A path without rows gets no entry. Every
    path is judged on the NCHW input (lut_conv with its copy; not lut_conv_cl): the
    layout of the UNet as built. ``kernel_sizes`` lists the kernel sizes ("KHxKW") of the
    layers judged: dispatch runs convs of other sizes (e.g. 1×1 ones, left out unless
    --include-1x1) on dequant, as nothing measured them. Where several sizes were judged,
    ``<path>_max_m_by_kernel`` holds the crossover over one size's layers where it
    differs from the one over all of them (a 1×1 conv is a GEMM of another shape), 0
    where the path has no time on that size's layers. A path that raised or was wrong on
    some configuration counts nowhere (:func:`derive.times_by_config`). ``widths`` is
    not read (conv dispatch has no per-width entries).
    """
    times = derive.times_by_config(rows, lambda r: r["backend"] if r.get("backend") in (
        "dequant", "triton", "cuda") and r.get("kernel") not in (NOSPLIT, CHANNELS_LAST)
        else None)
    for t in times.values():
        if "dequant" in t:
            t["rival"] = min(t["dequant"], t.get("triton", t["dequant"]))
    values, evidence = _crossovers(times)
    judged = {config for config, t in times.items()
              if "dequant" in t and {"triton", "cuda"} & t.keys()}
    sizes = sorted({conv_kernel_size(shape) for _, shape, *_ in judged})
    for size in sizes if len(sizes) > 1 else ():
        own, own_evidence = _crossovers({c: t for c, t in times.items()
                                         if conv_kernel_size(c[1]) == size})
        for name in [name for name in CROSSOVER_NAMES if name in values]:
            if own.get(name, 0) != values[name]:
                values.setdefault(f"{name}_by_kernel", {})[size] = own.get(name, 0)
        for path, means in own_evidence.items():
            evidence.setdefault(f"{path}_by_kernel", {})[size] = means
    if values:
        values["kernel_sizes"] = sizes
    return values, evidence


CROSSOVER_NAMES = ("triton_max_m", "cuda_max_m")  # what _crossovers derives


def _crossovers(times: dict[tuple, dict[str, float]]) -> tuple[dict, dict]:
    """({path}_max_m, evidence {path: {M: geometric-mean speedup}}) for triton (against
    dequant) and cuda (against the faster of the two) over the configurations of
    ``times``."""
    values, evidence = {}, {}
    for path, baseline in (("triton", "dequant"), ("cuda", "rival")):
        means = derive.speedup_by_m(times, baseline, path)
        if means:
            values[f"{path}_max_m"] = derive.crossover(
                {m: (g or 0) > 1.0 for m, g in means.items()})
            evidence[path] = derive.rounded(means)
    return values, evidence


def main(argv=None) -> int:
    p = common.parser("conv", __doc__.splitlines()[0])
    p.add_argument("--preset", choices=["goal", "full"], default="full",
                   help="goal: batch 1 only (issue 6); full: batches 1,8,64")
    p.add_argument("--batches", type=common.COUNTS, default=None,
                   help="comma-separated batch sizes (1,8,64)")
    p.add_argument("--bits", type=common.BIT_WIDTHS, default=None,
                   help="comma-separated bit widths (default 4,2,3,8)")
    p.add_argument("--granularity", type=common.GRANULARITY_LIST, default="channel,tensor")
    p.add_argument("--backends", type=common.BACKEND_LIST, default=None,
                   help="default GPU: cuda,triton,dequant; CPU: reference,cpu,triton,dequant")
    p.add_argument("--include-1x1", action="store_true", help="also the 1×1 convs")
    derive.add_tuning_options(p)
    common.add_dtype_option(p)
    common.add_graph_option(p)
    args = p.parse_args(argv)
    if args.tuning_from:
        return derive.tuning_from(args, "conv2d", derive_crossover)
    if args.write_tuning:  # a table it cannot merge into stops it before any timing
        derive.tuning_base(args.write_tuning)
    run = common.Run("conv", args)
    gpu = run.device.type == "cuda"
    dtype = common.bench_dtype(args, run.device)
    batches = args.batches or ([1] if args.smoke or args.preset == "goal" else DEFAULT_BATCHES)
    bits_list = args.bits or ([3] if args.smoke else [4, 2, 3, 8])
    grans = args.granularity
    backends = args.backends or (["cuda", "triton", "dequant"] if gpu else
                                 ["reference", "cpu", "triton", "dequant"])
    layers, source = conv_layers(args)
    run.meta.update(layers_source=source, batches=batches, bits=bits_list, granularities=grans,
                    backends=backends, dtype=str(dtype), graph=args.graph,
                    layers=[{"weight_shape": v["weight_shape"], "input_shape": v["input_shape"],
                             "count": v["count"]} for v in layers])
    paths = candidates(run, backends)
    cache: dict = {}

    def finalize(rows: list[dict]) -> None:
        common.fill_ratios(rows, ("op", "shape", "batch", "dtype"), baseline_kernel="cudnn")
        best_dense_ratios(rows)
        values, evidence = derive_crossover(rows, bits_list)
        run.meta["crossovers"] = {"values": values, "geomean_speedup_vs_dequant": evidence}

    run.finalizers.append(finalize)
    for bits in bits_list:
        for gran in grans:
            for batch in batches:
                for layer in layers:
                    if run.over_budget((layer["weight_shape"], layer["input_shape"], batch,
                                        bits, gran)):
                        continue
                    bench_layer(run, layer, batch, bits, gran, paths, dtype, cache)
    run.write(complete=True)  # the finalizer fills ratios and the crossover
    values = run.meta.get("crossovers", {}).get("values", {})
    evidence = run.meta.get("crossovers", {}).get("geomean_speedup_vs_dequant", {})
    if args.write_tuning and values and gpu and not args.smoke:
        name = torch.cuda.get_device_name(run.device)
        run.log(f"tuning {values} -> "
                f"{derive.write_tuning(args.write_tuning, name, 'conv2d', values, evidence)}")
    return 1 if run.meta["fatal_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
