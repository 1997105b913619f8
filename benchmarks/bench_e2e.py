"""End-to-end Flow Matching sampling step: the mnist UNet, FP16 dense vs quantized.

Random weights of the ``mnist`` config (55.7M parameters; ``demo.random_model``: ADM's
zero-initialised layers get small random weights, so the output depends on every layer;
speed does not depend on the values). For batch 1 / 16 / 64 it times one Euler step
``x + dt·v(x, t)`` (one forward)
back to back, as a sampler runs them (no L2 flush: weights that fit in L2 stay there
between steps, exactly as in sampling), eagerly and as a CUDA-graph replay, and records
the peak GPU memory of a step, the model's bytes and those of the runtime code layouts
cached by then (``runtime_layout_bytes``: the tap-major and fragment-order copies of the
CUDA conv and ``lut_frag``, part of the peak). Variants:

- ``fp16``: the dense model in fp16 (the baseline);
- ``auto``: ``quantize_model(..., backend="auto")``: the fused kernels where dispatch picks
  them;
- ``dequant``: the same quantized model with every layer on ``backend="dequant"`` (expand
  each layer to a transient dense weight, then cuBLAS/cuDNN).

Bits 4 (channel and tensor) and 2 / 3 / 8 (channel). ratio = t_fp16 / t and
peak_ratio = peak / peak_fp16 at the same batch and timing mode. Each variant's velocity
v(x, t) is also checked: ``rel_err_vs_dense`` against the dense model (quantization error
plus kernels) and, for fused variants, ``rel_err_vs_dequant`` against the same codes run
through ``dequant`` (kernel error only: rounding-sized).

``--preset goal`` (GPU suite, issue 6's goal: batch 1, 4-bit per channel): batch 1 only,
variants fp16, 4-bit channel auto / cuda (every layer on the CUDA kernels, convs on the
tensor-core conv) / dequant / triton (every layer on Triton), then 4-bit tensor and 2 / 3
/ 8-bit channel auto. ``full`` (default): ``VARIANTS`` at batches 1/16/64.
``--channels-last`` runs every variant (FP16 too) with channels-last weights and input
(``meta.channels_last``): cuDNN's faster layout here, and the CUDA conv's without a copy.
"""

from __future__ import annotations

import copy
import gc

import common
import torch

from otq_kernels.backends import cuda
from otq_kernels.dispatch_log import record_dispatch
from otq_kernels.format import check_bits
from otq_kernels.models.configs import config_names

# (bits, granularity, backend), in budget order: the issue-6 goal variant first.
VARIANTS = [(None, None, "fp16"), (4, "channel", "auto"), (4, "channel", "dequant"),
            (4, "tensor", "auto"), (2, "channel", "auto"), (3, "channel", "auto"),
            (8, "channel", "auto"), (2, "channel", "dequant"), (3, "channel", "dequant"),
            (8, "channel", "dequant")]
GOAL_VARIANTS = [(None, None, "fp16"), (4, "channel", "auto"), (4, "channel", "cuda"),
                 (4, "channel", "dequant"), (4, "channel", "triton"), (4, "tensor", "auto"),
                 (2, "channel", "auto"), (3, "channel", "auto"), (8, "channel", "auto")]


def parse_variant(text: str) -> tuple:
    """'fp16' -> (None, None, 'fp16'); 'bits:granularity:backend' (backend a backend name or
    auto) -> (bits, granularity, backend)."""
    if text == "fp16":
        return (None, None, "fp16")
    parts = text.split(":")
    if len(parts) != 3:
        raise ValueError("fp16 or bits:granularity:backend")
    bits, gran, backend = check_bits(int(parts[0])), parts[1], parts[2]
    if gran not in common.GRANULARITIES or backend not in (*common.BACKEND_NAMES, "auto"):
        raise ValueError(f"granularity one of {common.GRANULARITIES}, backend one of "
                         f"{common.BACKEND_NAMES} or auto")
    return (bits, gran, backend)


def module_bytes(model: torch.nn.Module) -> int:
    """Bytes of all parameters and buffers (packed planes and codebooks included)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def set_backend(model: torch.nn.Module, backend: str) -> int:
    """Point every quantized layer at ``backend``; returns how many layers changed."""
    count = 0
    for module in model.modules():
        if hasattr(module, "backend") and hasattr(module, "qweight"):
            module.backend = backend
            count += 1
    return count


def build_variant(master, bits, gran, backend, device, dtype):
    """A copy of ``master`` on ``device``: dense, or quantized with ``backend``."""
    model = copy.deepcopy(master).to(device)
    if bits is not None:
        from otq_kernels.nn import quantize_model

        quantize_model(model, bits=bits, method="ot", granularity=gran,
                       backend="auto", progress=False)
        set_backend(model, backend)
    return model.to(dtype).eval()


def step_fn(model, x, t, dt: float):
    """One Euler step closure over static tensors (graph-capturable)."""
    def step():
        with torch.inference_mode():
            return x + dt * model(x, t)
    return step


def release_cublas_workspaces() -> None:
    """Free the cuBLAS workspaces torch keeps per handle and stream (tens of MB on sm_90).

    They are live allocations: one made by an earlier variant or by the GEMM ceiling
    would count in the peak of a model that never calls cuBLAS.
    """
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


def peak_step_bytes(run, step) -> dict:
    """{"peak_bytes": the peak allocated during one warmed-up step (weights, inputs and
    the library workspaces this model itself uses included), "peak_requested_bytes": the
    same peak of the sizes asked for, before the caching allocator rounds them up (the
    rounding follows what the process allocated before: the same FP16 step peaked 5%
    higher in one H200 file than in another)}; None for both off CUDA.

    The warm-up step is not measured: it autotunes the Triton kernels, and Triton's
    ``do_bench`` allocates a 256 MB L2-flush buffer that no later step holds.
    """
    if run.device.type != "cuda":
        return {"peak_bytes": None, "peak_requested_bytes": None}
    run.sync()
    release_cublas_workspaces()
    step()
    run.sync()
    torch.cuda.reset_peak_memory_stats(run.device)
    step()
    run.sync()
    return {"peak_bytes": torch.cuda.max_memory_allocated(run.device),
            "peak_requested_bytes": torch.cuda.memory_stats(run.device).get(
                "requested_bytes.all.peak")}


def velocity(model, x, t) -> tuple[torch.Tensor, list[dict]]:
    """The model's output v(x, t) [B, C, H, W], as fp32 on the CPU, and what its quantized
    layers ran (``DispatchLog.summary()``: calls per op, backend and kernels)."""
    with torch.inference_mode(), record_dispatch() as log:
        return model(x, t).float().cpu(), log.summary()


def bench_variant(run, master, variant, batches, image, dtype, modes, outputs,
                  memory_format=torch.contiguous_format) -> None:
    """Rows for one variant at every batch size and timing mode; its velocity at each
    batch goes to ``outputs[(variant, batch)]``. ``memory_format``: the model's and the
    input's (channels-last: dense 4-D weights and x)."""
    bits, gran, backend = variant
    fields = {"op": "e2e", "backend": backend, "bits": bits, "granularity": gran,
              "shape": run.meta["config"], "dtype": str(dtype).replace("torch.", "")}
    try:
        model = build_variant(master, bits, gran, backend, run.device, dtype)
        model = model.to(memory_format=memory_format)
    except Exception as exc:  # noqa: BLE001
        run.error(exc, **fields, kernel="build")
        return
    nbytes = module_bytes(model)
    summary = getattr(model, "otq_summary", None)
    bpw = getattr(summary, "model_bits_per_weight", None)
    for batch in batches:
        gen = torch.Generator(device=run.device).manual_seed(batch)
        x = torch.randn(batch, *image, device=run.device, dtype=dtype, generator=gen)
        x = x.contiguous(memory_format=memory_format)
        t = torch.full((batch,), 0.5, device=run.device)
        step = step_fn(model, x, t, 0.01)
        try:
            outputs[(variant, batch)], dispatch = velocity(model, x, t)
        except Exception as exc:  # noqa: BLE001
            run.error(exc, **fields, kernel="velocity", M=batch, batch=batch)
            continue
        for mode in modes:
            row = {**fields, "kernel": mode, "M": batch, "batch": batch}
            if run.over_budget((variant, batch, mode)):
                continue
            try:
                peak = peak_step_bytes(run, step)
                graph_errors: list = []
                timing = run.time(step, graph=mode == "graph", flush=False,
                                  gpu_opts={"warmup_ms": 50, "rep_ms": 200, "max_reps": 100,
                                            "graph_errors": graph_errors})
            except Exception as exc:  # noqa: BLE001
                run.error(exc, **row)
                continue
            if mode == "graph" and timing.get("timing") != "graph":
                row["note"] = "CUDA-graph capture failed; eager time reported: " + \
                    "; ".join(graph_errors)
            run.add({**row, **timing, "model_bytes": nbytes, **peak,
                     "runtime_layout_bytes": cuda.runtime_layout_bytes(),
                     "model_bits_per_weight": bpw, "dispatch": dispatch})
    del model
    gc.collect()
    if run.device.type == "cuda":
        torch.cuda.empty_cache()


def fill_memory_ratios(rows: list[dict]) -> None:
    """peak_ratio and model_bytes_ratio against the fp16 row of the same batch and mode."""
    base = {(r["M"], r["kernel"]): r for r in rows if r.get("backend") == "fp16"
            and r.get("p50_us")}
    for r in rows:
        ref = base.get((r.get("M"), r.get("kernel")))
        if not ref or not r.get("p50_us"):
            continue
        for field in ("peak", "peak_requested"):
            if r.get(f"{field}_bytes") and ref.get(f"{field}_bytes"):
                r[f"{field}_ratio"] = r[f"{field}_bytes"] / ref[f"{field}_bytes"]
        r["model_bytes_ratio"] = r["model_bytes"] / ref["model_bytes"]


def fill_output_errors(rows: list[dict], outputs: dict) -> None:
    """rel_err_vs_dense and (fused variants) rel_err_vs_dequant of each timed row."""
    for r in rows:
        if not r.get("p50_us") or r.get("bits") is None:
            continue
        variant, batch = (r["bits"], r["granularity"], r["backend"]), r["M"]
        out = outputs.get((variant, batch))
        if out is None:
            continue
        dense = outputs.get(((None, None, "fp16"), batch))
        dequant = outputs.get(((r["bits"], r["granularity"], "dequant"), batch))
        if dense is not None:
            r["rel_err_vs_dense"] = common.rel_error(out, dense)
        if dequant is not None and r["backend"] != "dequant":
            r["rel_err_vs_dequant"] = common.rel_error(out, dequant)


def main(argv=None) -> int:
    p = common.parser("e2e", __doc__.splitlines()[0])
    p.add_argument("--preset", choices=["goal", "full"], default="full",
                   help="goal: batch 1, GOAL_VARIANTS (issue 6); full: VARIANTS, 1,16,64")
    p.add_argument("--config", default=None, choices=config_names(),
                   help="UNet config (default mnist; tiny in smoke)")
    p.add_argument("--batches", type=common.COUNTS, default=None,
                   help="comma-separated (default 1,16,64)")
    p.add_argument("--variants", type=common.csv_list(parse_variant, None, "variant"),
                   default=None,
                   help="comma-separated bits:granularity:backend or fp16 "
                        "(default: fp16, 4:channel:auto, 4:channel:dequant, ...)")
    p.add_argument("--no-graph", action="store_true", help="eager timing only")
    p.add_argument("--channels-last", action="store_true",
                   help="every variant (FP16 too) with channels-last weights and input")
    common.add_dtype_option(p)
    args = p.parse_args(argv)
    run = common.Run("e2e", args, measure_ceilings=not args.smoke)
    from otq_kernels.demo import random_model
    from otq_kernels.models import IMAGE_SIZES

    config = args.config or ("tiny" if args.smoke else "mnist")
    gpu = run.device.type == "cuda"
    dtype = common.bench_dtype(args, run.device)
    goal = args.preset == "goal"
    batches = args.batches or ([1] if args.smoke or goal else [1, 16, 64])
    variants = args.variants or \
        (VARIANTS[:3] if args.smoke else (GOAL_VARIANTS if goal else VARIANTS))
    modes = ["eager"] if (args.no_graph or not gpu or args.smoke) else ["eager", "graph"]
    master = random_model(config, seed=0)
    outputs: dict = {}
    size = IMAGE_SIZES[config]
    image = (master.in_channels, size, size)
    run.meta.update(config=config, parameters=sum(p.numel() for p in master.parameters()),
                    batches=batches, modes=modes, dtype=str(dtype), l2_flush_bytes=0,
                    variants=[list(v) for v in variants], channels_last=args.channels_last)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    run.finalizers += [lambda rows: common.fill_ratios(rows, ("op", "M", "kernel", "dtype")),
                       fill_memory_ratios, lambda rows: fill_output_errors(rows, outputs)]
    for variant in variants:
        if run.over_budget(variant):
            continue
        try:
            bench_variant(run, master, variant, batches, image, dtype, modes, outputs,
                          memory_format)
        except Exception as exc:  # noqa: BLE001 - one variant must not end the run
            bits, gran, backend = variant
            run.error(exc, op="e2e", backend=backend, bits=bits, granularity=gran,
                      shape=config)
    run.write(complete=True)  # the finalizer fills the ratios
    return 1 if run.meta["fatal_error"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
