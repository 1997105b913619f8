"""The ``otq`` command: quantize | sample | eval | info | bench | demo.

    otq quantize -o model_q4.safetensors --bits 4 --method ot     # the bundled demo model
    otq quantize --checkpoint fp.safetensors --config mnist -o q.safetensors \\
        --override 'input_blocks.0.*=8' --override 'out.2=8'
    otq sample --checkpoint model_q4.safetensors --n 64 --steps 20 -o samples.png
    otq eval --bits 2 3 4 8 --methods ot uniform --out-dir eval_out
    otq info model_q4.safetensors
    otq bench linear --smoke
    otq demo

Models: the bundled demo model by default; ``--checkpoint`` takes a float checkpoint
(.safetensors, or .pt/.pth read with weights_only) plus ``--config`` (a UNet config name,
unless the file's metadata has ``config_kwargs``), or a quantized file written by
``otq quantize`` (its metadata knows the architecture).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import json
import os
import shlex
import subprocess
import sys
import threading
import warnings
from pathlib import Path

from .backends import NAMES as BACKEND_NAMES
from .format import check_bits
from .quantizers import METHODS

# fm.FIXED_STEP_METHODS + fm.ADAPTIVE_METHODS, spelled out (a test holds them equal): fm
# brings the UNet and graph code, which `otq --help` and `otq info` need not import.
SOLVERS = ("euler", "midpoint", "heun2", "heun3", "rk4", "dopri5", "dopri8", "bosh3",
           "fehlberg2", "adaptive_heun")
BACKEND_CHOICES = ("auto", *BACKEND_NAMES)


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def seed_value(text: str) -> int:
    """argparse type: an integer ``torch.manual_seed`` takes (-2**63 .. 2**64 - 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not -2**63 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must be between -2**63 and 2**64 - 1, got {value}")
    return value


def bit_width(text: str) -> int:
    """argparse type: a code width that :func:`format.check_bits` accepts (2..8)."""
    value = positive_int(text)
    try:
        check_bits(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


# ----------------------------------------------------------------------------- models
def _file_metadata(path: str) -> dict:
    """safetensors metadata ({} for other files)."""
    from .checkpoint import read_safetensors_metadata, reads_as_safetensors

    if not reads_as_safetensors(path):
        return {}

    return read_safetensors_metadata(path)


def _config_kwargs(name: str | None, meta_kwargs, meta_name=None) -> tuple[str, dict]:
    """(config name, UNet kwargs): --config, else the file's ``config_kwargs``, else the
    file's ``config`` where it names a bundled config (``save_quantized(..., metadata=
    {"config": "digits"})``)."""
    from .models import config_names, unet_config

    if name:
        return name, unet_config(name)
    if meta_kwargs:
        try:
            kwargs = json.loads(meta_kwargs) if isinstance(meta_kwargs, str) else meta_kwargs
        except (json.JSONDecodeError, RecursionError):
            kwargs = None
        if not isinstance(kwargs, dict):
            raise ValueError("the checkpoint's config_kwargs is not a JSON object of UNet "
                             "arguments; pass --config")
        return "from checkpoint metadata", kwargs
    if meta_name in config_names():
        return meta_name, unet_config(meta_name)
    raise ValueError("this checkpoint does not record its architecture; pass --config "
                     "(one of the UNet config names, e.g. mnist, cifar10, digits, tiny)")


def load_model(args, load_float=None) -> tuple:
    """(model, info) from --checkpoint / --config / --random-init; info has config,
    config_kwargs, image_size, source, quantized. load_float(path, meta skeleton) fills
    the skeleton from a float checkpoint (default: load_fm_checkpoint)."""
    from .checkpoint import FORMAT, _json, load_quantized, require_file
    from .models import (
        IMAGE_SIZES,
        UNetModel,
        demo_model_metadata,
        load_demo_model,
        load_fm_checkpoint,
    )

    random_init = getattr(args, "random_init", None)
    ckpt = getattr(args, "checkpoint", None)
    info = {"quantized": False}
    if random_init:
        from .demo import random_model
        from .models import unet_config

        model = random_model(random_init, seed=0)
        info.update(config=random_init, config_kwargs=unet_config(random_init),
                    source=f"random init ({random_init})")
    elif ckpt is None:
        model = load_demo_model()
        meta = demo_model_metadata()
        info.update(config=meta.get("config", "digits"), config_kwargs=meta.get("config_kwargs"),
                    source="bundled demo model")
    else:
        require_file(ckpt)  # (before the architecture: that question comes second)
        meta = _file_metadata(ckpt)
        quantized = meta.get("format") == FORMAT
        recorded = _json(meta, "user", ckpt) if quantized else meta
        if not isinstance(recorded.get("config", ""), str):
            raise ValueError(f"{ckpt}: its metadata 'config' is not a config name")
        name, kwargs = _config_kwargs(args.config, recorded.get("config_kwargs"),
                                      recorded.get("config"))
        skeleton = _skeleton(UNetModel, kwargs)
        if getattr(args, "image_size", None):  # (before the work: quantizing while loading)
            _image_size(skeleton, args.image_size)
        if quantized:
            model = load_quantized(ckpt, skeleton, device=_device(args))
            info.update(quantized=True, image_size=recorded.get("image_size"))
        else:
            model = (load_float or load_fm_checkpoint)(ckpt, skeleton)
        info.update(config=args.config or recorded.get("config", name), config_kwargs=kwargs,
                    source=str(ckpt))
    size = (getattr(args, "image_size", None) or info.get("image_size")
            or IMAGE_SIZES.get(info.get("config"), 16))
    info["image_size"] = _image_size(model, size)
    return model.to(_device(args)).eval(), info


def _image_size(model, size) -> int:
    """``size`` (--image-size, else the checkpoint's): a positive integer the UNet can
    halve down to its lowest level, or ValueError (a file could record any value)."""
    factor = 2 ** (len(getattr(model, "channel_mult", (1,))) - 1)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % factor:
        raise ValueError(f"image size {size!r} (--image-size, or the checkpoint's "
                         f"image_size) must be a positive integer divisible by {factor}, the "
                         "UNet's downsampling")
    return size


def _skeleton(model_class, kwargs: dict):
    """The architecture on the meta device (the checkpoint fills it: no float weights to
    allocate and initialise first), in eval mode."""
    import torch

    try:
        with torch.device("meta"):
            return model_class(**kwargs).eval()
    except TypeError as err:  # (an argument the model does not take)
        raise ValueError(f"the checkpoint's UNet arguments do not fit: {err}; pass --config"
                         ) from None


def _device(args):
    import torch

    from .checkpoint import usable_device

    name = getattr(args, "device", "auto") or "auto"
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available to this torch "
                         f"({torch.__version__})")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA "
                         "device(s) are visible")
    try:
        return usable_device(device)
    except ValueError as err:
        raise ValueError(f"--device {name}: cannot use {err}") from None


def _check_output(path: str, what: str, directory: bool = False) -> Path:
    """``path``, an output file (or ``directory``) the command can create; ValueError
    before any work where it is empty, a directory where a file is wanted (or the
    reverse), under a file, or in a folder it cannot write (where a symlink points)."""
    if not str(path):
        raise ValueError(f"{what}: the path is empty")
    if not directory and str(path).endswith((os.sep, "/")):
        raise ValueError(f"{what} {path}: a file name is wanted, not a directory's")
    path = Path(path)
    real = Path(os.path.realpath(path))  # a symlink, dangling or not, is written through
    for place in (real, *real.parents):
        if place.exists():
            wanted_dir = directory or place != real
            if place.is_dir() != wanted_dir:
                kind = "not a directory" if wanted_dir else "a directory"
                raise ValueError(f"{what} {path}: {place} is {kind}")
            if place == real and not (place.is_dir() or place.is_file()):
                raise ValueError(f"{what} {path}: not a regular file (a device or a pipe, "
                                 "which the write would replace)")
            folder = place if place.is_dir() else place.parent
            if not os.access(folder, os.W_OK | os.X_OK):
                raise ValueError(f"{what} {path}: cannot write in {folder} (read-only or "
                                 "no permission)")
            break
    return path


def _add_model_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--checkpoint", default=None, metavar="PATH",
                   help=f"{what} (default: the bundled digits demo model)")
    p.add_argument("--config", default=None,
                   help="UNet config name for a float checkpoint without config metadata "
                        "(mnist, cifar10, imagenet64, digits, tiny)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="sample resolution (default: from the config / checkpoint)")
    p.add_argument("--random-init", default=None, help=argparse.SUPPRESS)  # tests, dry runs
    _device_arg(p)


def _device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:1, ... (default auto: cuda when available)")


# ----------------------------------------------------------------------------- quantize
def _parse_override(text: str) -> tuple[str, dict]:
    """'PATTERN=BITS[:METHOD[:GRANULARITY]]' -> (pattern, options)."""
    pattern, sep, spec = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"override {text!r} must be PATTERN=BITS[:METHOD]")
    parts = spec.split(":")
    if len(parts) > 3:
        raise argparse.ArgumentTypeError(
            f"override {text!r} must be PATTERN=BITS[:METHOD[:GRANULARITY]]")
    try:
        opts: dict = {"bits": int(parts[0])}
    except ValueError:
        raise argparse.ArgumentTypeError(f"override {text!r}: bits must be an integer") from None
    if len(parts) > 1 and parts[1]:
        opts["method"] = parts[1]
    if len(parts) > 2 and parts[2]:
        opts["granularity"] = parts[2]
    return pattern, opts


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS,
    Windows)."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):
        return None


def release_freed_heap(_layer: str = "") -> None:
    """Return the C heap's free pages to the system. Quantizing a checkpoint layer by
    layer frees each float copy and the fitting's buffers, which glibc keeps resident
    otherwise (docs/usage.md has the measurements)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def cmd_quantize(args) -> int:
    from .checkpoint import save_quantized
    from .nn import format_summary, quantize_model
    from .report import make_parent
    from .streaming import load_and_quantize

    out = _check_output(args.output, "-o")
    reads = Path(args.checkpoint or "")
    if args.checkpoint and out.exists() and reads.exists() and os.path.samefile(out, reads):
        raise ValueError(f"-o {out} is the checkpoint being quantized; write to another file")
    options = dict(bits=args.bits, method=args.method, granularity=args.granularity,
                   include=args.include, exclude=args.exclude, backend=args.backend,
                   overrides=dict(args.override or []), progress=not args.quiet)

    def quantize_while_loading(path, skeleton):  # one float layer in memory at a time
        return load_and_quantize(path, skeleton, device=_device(args),
                                 after_layer=release_freed_heap, **options)

    model, info = load_model(args, load_float=quantize_while_loading)
    if info["quantized"]:
        raise ValueError("the checkpoint is already quantized")
    if getattr(model, "otq_summary", None) is None:  # the demo model or a random init
        quantize_model(model, **options)
    if not model.otq_summary.quantized:
        print(format_summary(model.otq_summary))
        raise ValueError("no layer was quantized (each is excluded, not "
                         "included or of a type kept float); nothing written")
    meta = {"config": info["config"], "config_kwargs": info["config_kwargs"],
            "image_size": info["image_size"], "source": info["source"],
            "command": "otq " + shlex.join(args.argv)}
    make_parent(out)
    save_quantized(model, out, metadata=meta)  # (before printing: `| head` loses nothing)
    print(format_summary(model.otq_summary))
    print(f"wrote {out} ({out.stat().st_size / 1024:.1f} KiB)")
    return 0


# ----------------------------------------------------------------------------- sample
def cmd_sample(args) -> int:
    import torch

    from . import fm
    from .demo import image_shape
    from .dispatch_log import record_dispatch
    from .report import check_grid_path, save_grid

    check_grid_path(_check_output(args.output, "-o"))
    fm.check_solver(args.method, args.dtype)
    import matplotlib  # noqa: F401 - (save_grid's: missing, say so before sampling)

    model, info = load_model(args)
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)  # codebooks stay float32; GroupNorm runs in float32
    x0 = fm.make_noise((args.n, *image_shape(model, info["image_size"])), args.seed,
                       device=_device(args), dtype=dtype)
    if args.cuda_graph and x0.device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device (the model runs on {x0.device})")
    with record_dispatch(model) if args.dispatch else contextlib.nullcontext() as log:
        x = fm.sample(model, x0, steps=args.steps, method=args.method,
                      cuda_graph=args.cuda_graph)
    save_grid(x, args.output, nrow=min(args.nrow, args.n))
    kind = "quantized" if info["quantized"] else "float"
    steps = (f"x {args.steps} steps" if args.method in fm.FIXED_STEP_METHODS else
             "(adaptive: its own steps)")
    print(f"wrote {args.output}: {args.n} samples of the {kind} model ({info['source']}), "
          f"{args.method} {steps}, seed {args.seed}, {args.dtype}")
    if log is not None:
        print_dispatch(log)
    return 0


def print_dispatch(log) -> None:
    """What the quantized layers ran: each layer in the model's first call, then the calls
    over all the recorded ones (a CUDA-graph replay records none)."""
    from .dispatch_log import format_counts

    if not log:
        print("dispatch: no quantized layer call was recorded")
        return
    print(f"\ndispatch, the model's first call:\n{log.table(model_call=0)}")
    print(f"\ndispatch, all {len(log)} layer calls in {log.model_calls} recorded model calls:\n"
          f"{format_counts(log.counts())}")


# ----------------------------------------------------------------------------- eval
def cmd_eval(args) -> int:
    from .demo import evaluate

    _check_output(args.out_dir, "--out-dir", directory=True)
    model, info = load_model(args)
    if info["quantized"]:
        raise ValueError("give the float model; eval quantizes it at every setting")
    evaluate(model, bits=args.bits, methods=args.methods, granularity=args.granularity,
             n=args.n, steps=args.steps, solver=args.solver, seed=args.seed,
             image_size=info["image_size"], n_real=args.n_real, backend=args.backend,
             out_dir=args.out_dir, paper_protocol=not args.no_paper_protocol,
             progress=not args.quiet, meta={"model": info["source"], "config": info["config"]})
    return 0


# ----------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from .file_info import describe_file
    from .report import jsonable

    info = describe_file(args.file, verify=not args.no_verify)
    print(json.dumps(jsonable(info.to_dict()), indent=1) if args.json else info)
    return 0


# ----------------------------------------------------------------------------- bench
def _bench_dir() -> Path | None:
    d = Path(__file__).resolve().parents[1] / "benchmarks"
    return d if d.is_dir() and any(d.glob("bench_*.py")) else None


def cmd_bench(args) -> int:
    d = _bench_dir()
    if d is None:
        raise ValueError("benchmarks/ is not next to this installation (installed from a "
                         "wheel?). Clone the repository and run e.g. `python "
                         "benchmarks/bench_linear.py --smoke` there, or `bash "
                         "benchmarks/run_smoke.sh`.")
    available = sorted(p.stem.removeprefix("bench_") for p in d.glob("bench_*.py"))
    if args.list or not args.subjects:
        print(f"benchmarks in {d}: {', '.join(available)}\n"
              "run: otq bench SUBJECT [SUBJECT ...] [--smoke] [-- extra args for the script]")
        return 0
    unknown = [s for s in args.subjects if s not in available]
    if unknown:
        raise ValueError(f"unknown subject(s) {unknown}; available: {available}")
    extra = (["--smoke"] if args.smoke else []) + list(args.extra)
    for subject in args.subjects:
        cmd = [sys.executable, str(d / f"bench_{subject}.py"), *extra]
        print("+", shlex.join(cmd), flush=True)
        rc = subprocess.call(cmd, cwd=d.parent)
        if rc:
            return rc if rc > 0 else 128 - rc  # (a signal -N: 128 + N, as a shell says)
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args) -> int:
    from .demo import run

    _check_output(args.out_dir, "--out-dir", directory=True)
    run(out_dir=args.out_dir, bits=args.bits, methods=args.methods, n=args.n,
        steps=args.steps, solver=args.solver, seed=args.seed, progress=not args.quiet,
        device=_device(args))
    return 0


# ----------------------------------------------------------------------------- parser
def _quant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--granularity", default="channel", choices=["channel", "tensor"],
                   help="one codebook per output channel (default) or per tensor")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help="forward backend (default auto)")


def _sweep_args(p: argparse.ArgumentParser, steps: int) -> None:
    p.add_argument("--bits", type=bit_width, nargs="+", default=[2, 3, 4, 8],
                   help="bit widths to sweep (default 2 3 4 8)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   metavar="METHOD",
                   help=f"quantizers to sweep (default all: {', '.join(METHODS)})")
    p.add_argument("--n", type=positive_int, default=16, help="samples per setting (default 16)")
    p.add_argument("--steps", type=positive_int, default=steps,
                   help=f"ODE steps of a fixed-step solver (default {steps})")
    p.add_argument("--solver", default="euler", choices=SOLVERS, help="ODE solver (default euler)")
    p.add_argument("--seed", type=seed_value, default=0,
                   help="noise seed (same noise for every model)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 avoids OpenMP "
                        "oversubscription on a busy machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otq", description="Low-bit codebook (OT) quantization of Flow Matching models.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n")[1])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quantize", help="quantize a model to a safetensors file",
                       description="Quantize every Linear/Conv1d/Conv2d and save the packed "
                                   "model (safetensors); prints the per-layer summary.")
    _add_model_args(p, "float checkpoint to quantize")
    p.add_argument("-o", "--output", default="model_quantized.safetensors",
                   help="output file (default model_quantized.safetensors)")
    p.add_argument("--bits", type=bit_width, default=4,
                   help="bits per weight code, 2..8 (default 4)")
    p.add_argument("--method", default="ot", choices=METHODS, help="quantizer (default ot)")
    _quant_args(p)
    p.add_argument("--include", nargs="+", default=None, metavar="PATTERN",
                   help="only layers whose name, or a containing module's, matches one of "
                        "these fnmatch patterns")
    p.add_argument("--exclude", nargs="+", default=None, metavar="PATTERN",
                   help="keep layers matching these fnmatch patterns (or inside a module "
                        "that does) in float")
    p.add_argument("--override", type=_parse_override, action="append",
                   metavar="PAT=BITS[:M[:G]]",
                   help="per-layer bits (and method, granularity), e.g. --override 'out.2=8' "
                        "(repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("sample", help="PNG grid of samples from a float or quantized model",
                       description="Integrate the FM ODE from seeded noise and save a grid.")
    _add_model_args(p, "float or quantized (otq quantize) checkpoint")
    p.add_argument("-o", "--output", default="samples.png",
                   help="image path: .png (default samples.png), .jpg, .jpeg, .pdf or .svg")
    p.add_argument("--n", type=positive_int, default=16, help="number of samples (default 16)")
    p.add_argument("--steps", type=positive_int, default=20,
                   help="ODE steps of a fixed-step solver (default 20)")
    p.add_argument("--method", default="midpoint", choices=SOLVERS,
                   help="ODE solver (default midpoint)")
    p.add_argument("--seed", type=seed_value, default=0, help="noise seed (default 0)")
    p.add_argument("--nrow", type=positive_int, default=8,
                   help="images per grid row (default 8)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype the model runs in (default float32; codebooks stay float32)")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay each velocity call from a CUDA graph (GPU; at small batch an "
                        "eager step is host-bound)")
    p.add_argument("--dispatch", action="store_true",
                   help="print which backend and kernels each quantized layer ran "
                        "(otq_kernels.record_dispatch)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="fidelity over bits x methods -> JSON, table, plots",
                       description="Quantize a float model at every bits x method setting and "
                                   "compare each with the FP model on the same noise: paired "
                                   "PSNR/SSIM and pixel W2 of the samples, the paper's velocity "
                                   "PSNR/SSIM at t=0, the latent-variance probe, FID (only if "
                                   "available offline), bits/weight and bytes.")
    _add_model_args(p, "float checkpoint to evaluate")
    _sweep_args(p, steps=8)
    _quant_args(p)
    p.add_argument("--n-real", type=positive_int, default=64,
                   help="real images for the paper protocol and latent probe (default 64)")
    p.add_argument("--no-paper-protocol", action="store_true",
                   help="skip the t=0 velocity PSNR/SSIM and the latent probe")
    p.add_argument("--out-dir", default="eval_out", help="output directory (default eval_out)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="what a safetensors file holds: layers, bits, sizes",
                       description="Describe a quantized checkpoint (a row per layer: bits, "
                                   "method, bits/weight, SQNR, W2; the model's sizes; the "
                                   "architecture it records) or a float safetensors file "
                                   "(its tensors by dtype), without a model. Every tensor "
                                   "of a quantized file is read and checked (checksums, "
                                   "planes against bits and shape) unless --no-verify.")
    p.add_argument("file", help="a .safetensors file")
    p.add_argument("--json", action="store_true", help="print JSON instead of the report")
    p.add_argument("--no-verify", action="store_true",
                   help="read the header only (no checksum or plane checks)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="run the benchmark scripts of a repository checkout",
                       description="Thin wrapper over benchmarks/bench_<subject>.py; "
                                   "arguments after `--` are passed to the scripts, e.g. "
                                   "otq bench linear --smoke -- --bits 4")
    p.add_argument("subjects", nargs="*", help="e.g. linear conv fit e2e wasserstein")
    p.add_argument("--list", action="store_true", help="list the available subjects")
    p.add_argument("--smoke", action="store_true", help="tiny CPU-friendly run")
    p.set_defaults(extra=[])  # everything after `--` (split off in main) goes to the scripts
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="the demo: bundled model at 2/3/4/8 bits, all methods",
                       description="Quantize the bundled digits FM model with every method at "
                                   "2, 3, 4 and 8 bits, sample the same noise, print the "
                                   "fidelity + size table and write plots and grids.")
    _sweep_args(p, steps=8)
    _device_arg(p)
    p.add_argument("--out-dir", default="demo_out", help="output directory (default demo_out)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    """Entry point of the ``otq`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if argv[:1] == ["bench"] and "--" in argv:  # (elsewhere `--` ends the options, as usual)
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.extra, args.argv = extra, argv + (["--", *extra] if extra else [])
    try:
        with _one_line_warnings(args.command), _torch_threads(getattr(args, "threads", None)):
            status = int(args.func(args) or 0)
        if sys.stdout is not None:  # (None where fd 1 was closed: `>&-`)
            sys.stdout.flush()
        return status
    except BrokenPipeError:  # stdout's reader left (`| head`): it read all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (no exit flush)
        return 141  # (as a tool killed by SIGPIPE)
    except KeyboardInterrupt:  # (a file being written is left as it was: see save_quantized)
        print(f"otq {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ModuleNotFoundError, MemoryError, RuntimeError) as err:
        message = _user_error(err)
        if os.environ.get("OTQ_DEBUG") or message is None:
            raise
        print(f"otq {args.command}: error: {message}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def _torch_threads(count: int | None):
    """torch's CPU thread count ``count`` inside the block (as it was after it: ``main``
    called from Python leaves its caller's setting), if given."""
    if not count:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_WARNINGS = threading.local()  # .command: the otq command this thread runs, if any
_WARNING_USERS = {"count": 0, "python": None}  # commands running; the formatter before
_WARNING_LOCK = threading.Lock()


@contextlib.contextmanager
def _one_line_warnings(command: str):
    """Warnings print as ``otq COMMAND: warning: ...`` while ``command`` runs in this
    thread; Python's format is back when the last command in any thread ends."""
    with _WARNING_LOCK:
        if _WARNING_USERS["count"] == 0:
            _WARNING_USERS["python"], warnings.formatwarning = (warnings.formatwarning,
                                                                _format_warning)
        _WARNING_USERS["count"] += 1
    outer, _WARNINGS.command = getattr(_WARNINGS, "command", None), command
    try:
        yield
    finally:
        _WARNINGS.command = outer
        with _WARNING_LOCK:
            _WARNING_USERS["count"] -= 1
            if _WARNING_USERS["count"] == 0:
                warnings.formatwarning = _WARNING_USERS["python"]


def _format_warning(message, category, filename, lineno, line=None) -> str:
    command = getattr(_WARNINGS, "command", None)
    if command is None:  # (another thread's warning while a command runs)
        return _WARNING_USERS["python"](message, category, filename, lineno, line)
    return f"otq {command}: warning: {message}\n"


def _user_error(err: Exception) -> str | None:
    """The one line for an error of the input or the machine (a bad file, a missing
    optional dependency, memory); None for a bug, which keeps its traceback."""
    if isinstance(err, ModuleNotFoundError):
        return _optional_dependency(err)
    if isinstance(err, MemoryError) or (isinstance(err, RuntimeError) and (
            type(err).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(err))):
        first = str(err).strip().splitlines()[0] if str(err).strip() else "MemoryError"
        return f"out of memory: {first}"
    if isinstance(err, RuntimeError):
        return None
    return str(err)


# An optional dependency's top-level module -> the pyproject extra that installs it.
OPTIONAL_MODULES = {"flow_matching": "fm", "torchdiffeq": "fm", "torchmetrics": "fm",
                    "sklearn": "fm", "skimage": "fm", "matplotlib": "fm", "ot": "fm",
                    "scipy": "fm", "triton": "triton"}


def _optional_dependency(err: ModuleNotFoundError) -> str | None:
    """What to install for a missing optional dependency (None: not one of ours)."""
    module = (err.name or "").partition(".")[0]
    extra = OPTIONAL_MODULES.get(module)
    if extra is None:
        return None
    return (f"this command needs {module!r}, an optional dependency: "
            f"pip install 'otq_kernels[{extra}]' (or the repository's requirements.txt)")


if __name__ == "__main__":
    sys.exit(main())
