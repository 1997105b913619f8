"""GPU-only checks the suite runs besides pytest: CUDA graphs, torch.compile, sanitizer target.

- ``--checks graph,compile``: quantize a UNet (4-bit ot, per channel, backend auto), then
  (a) capture one forward in a CUDA graph and compare its replay with eager, (b) run
  ``torch.compile(model)`` and compare with eager. Results go to ``<out>/checks.json``.
- ``--sanitizer-target``: a short run of the CUDA and Triton kernels on small odd shapes
  (every bit width, both granularities, linear + conv + fit) for ``compute-sanitizer``.

Exit status 0 when every check passed (or was skipped with a reason), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import torch

TOLERANCE = 2e-2  # fp16 graph/compile vs eager: same kernels, so this is loose


def quantized_unet(config: str, device: torch.device):
    """A randomly initialised UNet, quantized at 4 bits per channel, fp16, eval."""
    from otq_kernels.models import IMAGE_SIZES, build_model
    from otq_kernels.nn import quantize_model

    torch.manual_seed(0)
    model = build_model(config).to(device)
    quantize_model(model, bits=4, method="ot", granularity="channel", progress=False)
    model = model.half().eval()
    size = IMAGE_SIZES[config]
    x = torch.randn(2, model.in_channels, size, size, device=device, dtype=torch.float16)
    t = torch.full((2,), 0.3, device=device)
    return model, x, t


def check_graph(model, x, t) -> dict:
    """Capture a forward in a CUDA graph; its replay must match eager."""
    with torch.inference_mode():
        ref = model(x, t).clone()
        out: dict = {}
        graph = common.capture_graph(lambda: out.__setitem__("y", model(x, t)))
        if graph is None:
            return {"ok": False, "detail": "CUDA-graph capture of the quantized model failed"}
        graph.replay()
        torch.cuda.synchronize()
        err = common.rel_error(out["y"], ref)
    return {"ok": err < TOLERANCE, "rel_err": err}


def check_compile(model, x, t) -> dict:
    """torch.compile the quantized model; its output must match eager."""
    with torch.inference_mode():
        ref = model(x, t)
        compiled = torch.compile(model)
        out = compiled(x, t)
        torch.cuda.synchronize()
    err = common.rel_error(out, ref)
    return {"ok": err < TOLERANCE, "rel_err": err}


def sanitizer_target(device: torch.device) -> None:
    """Exercise every GPU kernel family once on small odd shapes."""
    from otq_kernels import ops

    for bits in range(2, 9):
        for gran in ("tensor", "channel"):
            qt = common.random_qt(37, 97, bits, gran, device, seed=bits)
            for m in (1, 3, 17):
                x = torch.randn(m, 97, device=device, dtype=torch.float16)
                for backend in ("cuda", "triton", "dequant"):
                    if common.backend_unavailable(backend, device) is None:
                        _try(ops.codebook_linear, x, qt, None, backend=backend)
            cq = common.random_qt(12, 8 * 9, bits, gran, device, shape=(12, 8, 3, 3))
            xc = torch.randn(2, 8, 7, 9, device=device, dtype=torch.float16)
            _try(ops.codebook_conv2d, xc, cq, None, 1, 1, backend="triton")
        rows = torch.randn(33, 129, device=device)
        for backend in ("cuda", "triton"):
            if common.backend_unavailable(backend, device) is None:
                _try(ops.fit_rows, rows, bits, "ot", "rank", backend)
    torch.cuda.synchronize()
    print("sanitizer target done")


def _try(fn, *args, **kwargs) -> None:
    """Call fn; print (not raise) Python-level errors so the sanitizer sees every kernel."""
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        print("error:", common.describe_error(err))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="directory for checks.json")
    p.add_argument("--config", default="mnist", help="UNet config for graph/compile")
    p.add_argument("--checks", default="graph,compile")
    p.add_argument("--sanitizer-target", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device; nothing to check")
        return 0
    device = torch.device("cuda")
    if args.sanitizer_target:
        sanitizer_target(device)
        return 0
    results = {}
    model, x, t = quantized_unet(args.config, device)
    for name in common.csv_strs(args.checks):
        begin = time.perf_counter()
        try:
            results[name] = {"graph": check_graph, "compile": check_compile}[name](model, x, t)
        except Exception as err:  # noqa: BLE001
            results[name] = {"ok": False, "detail": common.describe_error(err)}
        results[name]["seconds"] = round(time.perf_counter() - begin, 2)
        print(f"{name}: {results[name]}", flush=True)
    payload = {"meta": common.base_meta("checks", device, False), "config": args.config,
               "checks": results}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "checks.json").write_text(json.dumps(payload, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
