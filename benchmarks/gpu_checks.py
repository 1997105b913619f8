"""GPU-only checks the suite runs besides pytest: CUDA graphs, torch.compile, sanitizer target.

- ``--checks graph,compile``: quantize a UNet (random weights in its zero-init layers,
  4-bit ot, per channel, backend auto, fp16), then (a) capture one forward in a CUDA graph
  and compare its replay with eager, (b) run ``torch.compile(model)`` and compare with
  eager; an all-zero eager output fails. Results go to ``<out>/checks.json``.
- ``--sanitizer-target``: a short run of the CUDA and Triton kernels on small odd shapes
  (every bit width, both granularities, linear + conv + fit) for ``compute-sanitizer``.

Exit status 0 when every check passed (or was skipped with a reason), 1 otherwise;
``checks.json`` is rewritten after each check, with the traceback tail of a failure. The
sanitizer target exits 2 when Python-level errors occurred (printed as they happen, so that
every kernel still runs; compute-sanitizer's own ``--error-exitcode 1`` marks memory errors).
GPU-suite runs cap Triton autotuning through ``gpu_limits`` (env, via ``common``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common
import torch

from otq_kernels.models.configs import config_names

TOLERANCE = 2e-2  # fp16 graph/compile vs eager: same kernels, so this is loose


def quantized_unet(config: str, device: torch.device):
    """A randomly initialised UNet, quantized at 4 bits per channel, fp16, eval; with
    x [2, C, S, S] fp16 and t [2] fp32. Its zero-initialised layers get random weights
    (``random_model``): otherwise the output is exactly 0 and a check compares nothing."""
    from otq_kernels.demo import random_model
    from otq_kernels.models import IMAGE_SIZES
    from otq_kernels.nn import quantize_model

    model = random_model(config, seed=0).to(device)
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
        errors: list = []
        graph = common.capture_graph(lambda: out.__setitem__("y", model(x, t)), errors)
        if graph is None:
            return {"ok": False, "detail": "CUDA-graph capture of the quantized model failed: "
                    + "; ".join(errors)}
        graph.replay()
        torch.cuda.synchronize()
        return compare(out["y"], ref)


def check_compile(model, x, t) -> dict:
    """torch.compile the quantized model; its output must match eager."""
    with torch.inference_mode():
        ref = model(x, t)
        compiled = torch.compile(model)
        out = compiled(x, t)
        torch.cuda.synchronize()
    return compare(out, ref)


def compare(y: torch.Tensor, ref: torch.Tensor) -> dict:
    """ok when y is within TOLERANCE of ref and ref is not all zeros (nothing to compare)."""
    err = common.rel_error(y, ref)
    nonzero = bool(ref.any())
    result = {"ok": nonzero and err < TOLERANCE, "rel_err": err}
    if not nonzero:
        result["detail"] = "the eager output is all zeros: the comparison shows nothing"
    return result


def sanitizer_target(device: torch.device, bits_list: list[int]) -> int:
    """Exercise every GPU kernel family once on small odd shapes; returns the number of
    Python-level errors (printed, not raised, so that every kernel still runs)."""
    from otq_kernels import ops

    for bits in bits_list:
        for gran in ("tensor", "channel"):
            qt = common.random_qt(37, 97, bits, gran, device, seed=bits)
            for m in (1, 3, 17):
                x = torch.randn(m, 97, device=device, dtype=torch.float16)
                for backend in ("cuda", "triton", "dequant"):
                    if common.backend_unavailable(backend, device) is None:
                        _try(ops.codebook_linear, x, qt, None, backend=backend)
                if common.backend_unavailable("cuda", device) is None:
                    from otq_kernels.backends import cuda

                    if bits <= 4:
                        _try(cuda.linear, x, qt, None, tensor_cores=True)
                    if cuda.fragment_supports(x.dtype, bits, gran == "channel"):
                        _try(cuda.linear, x, qt, None, tensor_cores=True, fragment=True)
            cq = common.random_qt(12, 8 * 9, bits, gran, device, shape=(12, 8, 3, 3))
            xc = torch.randn(2, 8, 7, 9, device=device, dtype=torch.float16)
            _try(ops.codebook_conv2d, xc, cq, None, 1, 1, backend="triton")
            if bits <= 4 and common.backend_unavailable("cuda", device) is None:
                _try(ops.codebook_conv2d, xc, cq, None, 1, 1, backend="cuda")
        rows = torch.randn(33, 129, device=device)
        for backend in ("cuda", "triton"):
            if common.backend_unavailable(backend, device) is None:
                _try(ops.fit_rows, rows, bits, "ot", "rank", backend)
        print(f"sanitizer target: bits {bits} done, {_ERRORS[0]} Python errors so far",
              flush=True)
    torch.cuda.synchronize()
    print(f"sanitizer target done: {_ERRORS[0]} Python-level errors")
    return _ERRORS[0]


_ERRORS = [0]


def _try(fn, *args, **kwargs) -> None:
    """Call fn; print (not raise) Python-level errors so the sanitizer sees every kernel."""
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001
        _ERRORS[0] += 1
        name = getattr(fn, "__name__", str(fn))
        print(f"error in {name} {kwargs}:", common.error_text(err, lines=6), flush=True)


CHECKS = {"graph": check_graph, "compile": check_compile}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".", help="directory for checks.json")
    p.add_argument("--config", default="mnist", choices=config_names(),
                   help="UNet config for graph/compile")
    p.add_argument("--checks", type=common.csv_list(str, tuple(CHECKS), "check"),
                   default="graph,compile")
    p.add_argument("--sanitizer-target", action="store_true")
    p.add_argument("--bits", type=common.BIT_WIDTHS, default="2,3,4,5,6,7,8",
                   help="bit widths the sanitizer target runs (default 2-8)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA device; nothing to check")
        return 0
    device = torch.device("cuda")
    if args.sanitizer_target:
        return 2 if sanitizer_target(device, args.bits) else 0
    names = args.checks
    results: dict = {}
    meta = {**common.base_meta("checks", device, False), "autotune_limit": common.AUTOTUNE_LIMIT}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def write() -> None:  # after every check: a later hang or kill keeps the earlier ones
        payload = {"meta": meta, "config": args.config, "checks": results}
        (out / "checks.json").write_text(json.dumps(payload, indent=1, default=str) + "\n")

    begin = time.perf_counter()
    try:
        model, x, t = quantized_unet(args.config, device)
    except Exception as err:  # noqa: BLE001
        for name in names:
            results[name] = {"ok": False, "detail": "building the quantized model failed: "
                             + common.error_text(err)}
        write()
        print(common.error_text(err), flush=True)
        return 1
    meta["setup_s"] = round(time.perf_counter() - begin, 2)
    for name in names:
        begin = time.perf_counter()
        try:
            results[name] = CHECKS[name](model, x, t)
        except Exception as err:  # noqa: BLE001
            results[name] = {"ok": False, "detail": common.error_text(err)}
        results[name]["seconds"] = round(time.perf_counter() - begin, 2)
        print(f"{name}: {results[name]}", flush=True)
        write()
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
