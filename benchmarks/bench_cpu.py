"""CPU inference speed (a CPU measurement, for CPU users; says nothing about GPU speed).

Rows: the host cost of one call of a small quantized layer against its float layer
(many calls per timed rep, so that the kernels' own work is a small part); one batch-1
UNet step (float32 model, then 4-bit per channel quantized with ``backend`` auto,
cpu+reference as dispatched before session 47, i.e. LUT linear and torch-expanded convs;
the three run in turn within each rep); the LUT linear kernel (also capped by
OTQ_CPU_SIMD to AVX2 and to the portable loops) against the dequant path (C++ expansion
+ torch's GEMM) by M; the expansion alone under each cap. Best of ``--reps`` wall
times. Writes JSON (``--out``).

    python benchmarks/bench_cpu.py --out benchmarks/results/cpu/cpu_inference.json
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch
from common import positive_int

import otq_kernels as otq
from otq_kernels import ops
from otq_kernels.backends import cpu as cpu_backend
from otq_kernels.models.configs import IMAGE_SIZES, config_names, unet_config
from otq_kernels.models.unet import UNetModel


def best_ms(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def best_ms_interleaved(fns: dict, reps: int) -> dict:
    """Best wall time (ms) of each of ``fns``, run in turn within each rep, so that a
    shared machine's slow spells fall on all of them alike."""
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: t * 1e3 for name, t in best.items()}


def unet_rows(config: str, reps: int) -> list[dict]:
    torch.manual_seed(0)
    model = UNetModel(**unet_config(config)).eval()
    size = IMAGE_SIZES[config]
    x, t = torch.randn(1, model.in_channels, size, size), torch.tensor([0.5])
    quant = otq.quantize_model(copy.deepcopy(model), bits=4, granularity="channel",
                               progress=False)
    before = copy.deepcopy(quant)
    for m in before.modules():
        if hasattr(m, "qweight"):
            m.backend = "cpu" if isinstance(m, otq.nn.QuantLinear) else "reference"
    variants = {"float32": model, "4b channel auto": quant,
                "4b channel, linear cpu, convs reference (before)": before}
    with torch.inference_mode():
        times = best_ms_interleaved({name: functools.partial(net, x, t)
                                     for name, net in variants.items()}, reps)
    return [{"op": "unet_step", "config": config, "variant": name, "ms": ms}
            for name, ms in times.items()]


def per_call_us(fn, calls: int, reps: int) -> float:
    """Best over ``reps`` of the mean wall time (µs) of ``calls`` consecutive calls."""
    for _ in range(calls // 10):
        fn()
    best = min(best_ms(lambda: [fn() for _ in range(calls)], 1) for _ in range(reps))
    return best * 1e3 / calls


def call_rows(reps: int, calls: int = 2000) -> list[dict]:
    """Per-call time of a 64 -> 32 Linear ([1, 64]) and an 8 -> 8 3x3 conv ([1, 8, 8, 8]),
    float32 against 4-bit per channel (backend auto), in ``inference_mode``."""
    torch.manual_seed(0)
    cases = {"linear 64->32": (torch.nn.Linear(64, 32), torch.randn(1, 64)),
             "conv3x3 8->8 8x8": (torch.nn.Conv2d(8, 8, 3, padding=1), torch.randn(1, 8, 8, 8))}
    rows = []
    with torch.inference_mode():
        for layer, (module, x) in cases.items():
            quant = otq.nn.quant_class_for(module).from_float(module, bits=4)
            for variant, net in (("float32", module), ("4b channel auto", quant)):
                us = per_call_us(functools.partial(net, x), calls, reps)
                rows.append({"op": "call", "layer": layer, "variant": variant, "us": us})
    return rows


def _capped(cap: str, fn):
    """fn() with env OTQ_CPU_SIMD = cap (the widest SIMD path the CPU kernels may take)."""
    before = os.environ.get("OTQ_CPU_SIMD")
    os.environ["OTQ_CPU_SIMD"] = cap
    try:
        return fn()
    finally:
        if before is None:
            del os.environ["OTQ_CPU_SIMD"]
        else:
            os.environ["OTQ_CPU_SIMD"] = before


def linear_rows(reps: int, shapes, simd_caps=("avx2", "none")) -> list[dict]:
    """LUT kernel (as dispatched, and capped to each of ``simd_caps``) against the
    expansion + GEMM and F.linear on a cached dense weight."""
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
        for bits in (2, 4, 8):
            qt = otq.fit_codebook(w, bits=bits, granularity="channel")
            dense = qt.dequantize()
            for m in (1, 4, 16, 64):
                x = torch.randn(m, k)
                lut = functools.partial(ops.codebook_linear, x, qt, backend="cpu")
                calls = {"cpu": lut,
                         **{f"cpu (OTQ_CPU_SIMD={cap})": functools.partial(_capped, cap, lut)
                            for cap in simd_caps},
                         "dequant": functools.partial(ops.codebook_linear, x, qt,
                                                      backend="dequant"),
                         "F.linear dense fp32 (weight cached)": functools.partial(
                             torch.nn.functional.linear, x, dense)}
                rows += [{"op": "linear", "N": n, "K": k, "bits": bits, "M": m,
                          "backend": name, "ms": best_ms(call, reps)}
                         for name, call in calls.items()]
    return rows


def expand_rows(reps: int, shapes, simd_caps=("avx512", "avx2", "none")) -> list[dict]:
    """The C++ expansion alone (``cpu.dequantize`` to float32, its output allocation
    included: above 32 MiB that is page faults on every call), capped to each SIMD path."""
    rows = []
    for n, k in shapes:
        w = torch.randn(n, k, generator=torch.Generator().manual_seed(n + k))
        for bits in (2, 4, 8):
            qt = otq.fit_codebook(w, bits=bits, granularity="channel")
            expand = functools.partial(cpu_backend.dequantize, qt)
            rows += [{"op": "expand", "N": n, "K": k, "bits": bits,
                      "backend": f"cpu (OTQ_CPU_SIMD={cap})",
                      "ms": best_ms(functools.partial(_capped, cap, expand), reps)}
                     for cap in simd_caps]
    return rows


def meta() -> dict:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo")
                if ln.startswith("model name")), platform.processor())
    return {"date": time.strftime("%Y-%m-%d"), "git_sha": sha, "cpu": cpu,
            "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "loadavg_at_start": os.getloadavg(),
            "simd_path": {"dequantize": cpu_backend.simd_path("dequantize"),
                          "linear M=1 K=4096": cpu_backend.simd_path("linear", 1, 4096)}}


def shape_pair(text: str) -> tuple[int, int]:
    """'256,2304' -> (256, 2304)."""
    n, k = (int(v) for v in text.split(","))
    return n, k


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--reps", type=positive_int, default=5)
    parser.add_argument("--configs", nargs="+", default=["digits", "mnist"],
                        choices=config_names())
    parser.add_argument("--linear-shapes", nargs="*", type=shape_pair,
                        default=[(256, 2304), (1024, 1024), (4096, 4096)], help="N,K ...")
    args = parser.parse_args(argv)
    info = meta()
    rows = call_rows(args.reps)
    rows += [r for c in args.configs for r in unet_rows(c, args.reps)]
    shapes = args.linear_shapes
    rows += linear_rows(args.reps, shapes) + expand_rows(args.reps, shapes)
    with open(args.out, "w") as f:
        json.dump({"meta": info, "rows": rows}, f, indent=1)
    for r in rows:
        print(r)


if __name__ == "__main__":
    main()
