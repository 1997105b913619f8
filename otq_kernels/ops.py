"""torch.library ops and backend dispatch (DESIGN §4).

Ops: ``otq::codebook_linear``, ``otq::codebook_conv2d``, ``otq::fit_codebook``,
``otq::pack``, ``otq::unpack``, ``otq::dequantize`` (the backward's dense weight); each
has a fake implementation so torch.compile and CUDA graphs can trace them. The Python
wrappers below validate inputs, pick a backend (argument, else env ``OTQ_BACKEND``, else
auto) and call the op.

``codebook_linear`` and ``codebook_conv2d`` are differentiable in x and bias (the
quantized weight is frozen): the backward expands the weight to a transient dense tensor
in the gradient's dtype and runs torch's matmul / conv-input gradient on it, as
bitsandbytes does for its 4-bit layers. That is what Flow Matching likelihoods
(divergence by autograd) and input-gradient guidance need.
"""

import functools
import os
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Optional

import torch
import torch.autograd.forward_ad as _forward_ad
from torch._C._functorch import get_dynamic_layer_stack_depth as _functorch_depth
from torch.utils._python_dispatch import _get_current_dispatch_mode as _current_dispatch_mode
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack as _dispatch_mode_stack

from . import backends, dispatch_log
from .backends import _device
from .backends.dequant import dense_weight
from .flops import teach_flop_counter
from .format import QuantizedTensor, check_bits, integer_value, padded_k, plane_widths
from .quantizers import check_options, check_weight, fit_rows_reference
from .tuning_schema import parse_tuning_table

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# float64 runs where torch's own kernels multiply the expanded weight: no fused kernel
# takes it (F.linear on a float64 model does, e.g. for an ODE likelihood in float64)
EXPANDING_BACKENDS = ("dequant", "reference")
FUSED_METHODS = ("ot",)


# ----------------------------------------------------------------------------- dispatch
@functools.cache
def tuning_table(gpu_name: str) -> dict:
    """Crossover table for ``gpu_name`` (the shipped default for GPUs not listed), from
    env ``OTQ_TUNING_FILE`` or else the shipped ``tuning/default.json``.

    Read once per process and GPU name, as dispatch asks on every call (an environment
    read costs ~2 µs); :func:`reload_tuning` makes the next call read it again.
    """
    path = os.environ.get("OTQ_TUNING_FILE")
    source = f"OTQ_TUNING_FILE={path}" if path else "the shipped tuning/default.json"
    try:
        text = Path(path).read_text() if path else (
            resources.files("otq_kernels").joinpath("tuning/default.json").read_text())
    except (OSError, ValueError) as err:  # (ValueError: bytes that are not UTF-8)
        raise ValueError(f"{source}: cannot read it as JSON: {err}") from None
    table = parse_tuning_table(text, source)
    return table.get("gpus", {}).get(gpu_name, table["default"])


def reload_tuning() -> None:
    """Forget the tuning tables read so far and the dispatch plans built from them, so
    that the next call reads ``OTQ_TUNING_FILE`` (set, changed or unset since) again."""
    tuning_table.cache_clear()
    _PLANS.clear()


def _gpu_table(device: torch.device) -> dict:
    return tuning_table(_device.gpu_name(device))


def _tuning_entry(device: torch.device, op: str, name: str, absent):
    """``device``'s tuning table entry op.name (``absent`` off CUDA or when missing)."""
    return _gpu_table(device).get(op, {}).get(name, absent) if device.type == "cuda" else absent


def tuning_flag(device: torch.device, op: str, name: str) -> bool:
    """A true/false entry of ``device``'s tuning table (False off CUDA or when absent)."""
    return bool(_tuning_entry(device, op, name, False))


def tuning_int(device: torch.device, op: str, name: str) -> int:
    """An integer entry of ``device``'s tuning table (0 off CUDA or when absent)."""
    return int(_tuning_entry(device, op, name, 0))


_OP_FUNCTION = {"linear": "linear", "conv2d": "conv2d", "fit": "fit_rows", "pack": "pack",
                "unpack": "unpack"}
UNLIMITED = 2**62
# Largest M for which auto dispatch runs the C++ LUT kernel on CPU; above it the dense
# weight (C++ expansion) and torch's GEMM. On the CI machine's 2-core Xeon (AVX-512;
# benchmarks/results/cpu/cpu_inference.json, session 48) the LUT kernel took 0.48-0.95x
# the expansion's time at M = 16 on 256 x 2304, 1024 x 1024 and 4096 x 4096 (1.05x once,
# 8 bits on 256 x 2304), and 1.0-1.9x at M = 64 (4096 x 4096: 0.64x in another run; this
# shared machine's timings vary up to 2x).
CPU_LUT_MAX_M = 16


def _env(name: str) -> str | None:
    """``os.environ.get(name)``, read from the mapping os.environ writes through to: 0.35 µs
    against 1.2 µs for an unset variable (``_Environ`` raises and catches a KeyError),
    on every quantized layer's call."""
    data, environ = getattr(os.environ, "_data", None), os.environ
    if data is None or not hasattr(environ, "encodekey"):  # (not CPython's _Environ)
        return environ.get(name)
    value = data.get(environ.encodekey(name))
    return None if value is None else environ.decodevalue(value)


def _trace_constant(fn):
    """``torch.compiler.assume_constant_result`` without importing torch._dynamo at import.

    That decorator only sets this attribute (tests/test_ops.py checks it still does);
    calling it would import dynamo, about 1 s of ``import otq_kernels``.
    """
    fn._dynamo_marked_constant = True
    return fn


def _candidates(op: str, device: torch.device, bits: int | None = None,
                kernel: tuple[int, int] | None = None) -> list[tuple[str, int, int]]:
    """(backend, smallest M, largest M it takes) for ``op``, best first; M = row length for
    "fit". ``bits``: the codes' bit width, for a table's ``cuda_max_m_by_bits`` entry.
    ``kernel``: a conv's (KH, KW); a conv2d table that lists ``kernel_sizes`` ("KHxKW",
    those its crossovers were measured on) sends convs of other sizes to dequant, and its
    ``*_by_kernel`` maps hold crossovers of their own for the sizes they list."""
    if device.type != "cuda":
        if op in ("linear", "conv2d"):  # cpu has no conv: dequant takes every conv
            return [("cpu", 0, CPU_LUT_MAX_M), ("dequant", 0, UNLIMITED)]
        return [("cpu", 0, UNLIMITED), ("reference", 0, UNLIMITED)]
    table = _gpu_table(device).get(op, {})
    size = None if kernel is None else "x".join(map(str, kernel))
    if op == "conv2d" and size not in table.get("kernel_sizes", (size,)):
        return [("dequant", 0, UNLIMITED)]
    if op in ("linear", "conv2d"):
        def entry(name, absent):
            return _specific_entry(table, name, {"kernel": size, "bits": bits}, absent)

        return [("cuda", 0, entry("cuda_max_m", -1)),
                ("triton", entry("triton_min_m", 0), entry("triton_max_m", -1)),
                ("dequant", 0, UNLIMITED)]
    if op == "fit":
        return [("triton", 0, table.get("triton_max_n", 4096)), ("cuda", 0, UNLIMITED),
                ("triton", 0, UNLIMITED), ("reference", 0, UNLIMITED)]
    return [("triton", 0, UNLIMITED), ("cuda", 0, UNLIMITED), ("reference", 0, UNLIMITED)]


def _specific_entry(table: dict, name: str, keys: dict, absent):
    """``table[name]`` (``absent`` if missing), unless a ``name_by_<by>`` map lists the
    call's value of ``by`` (the first that does, in the order of ``keys``: by -> value)."""
    for by, value in keys.items():
        specific = table.get(f"{name}_by_{by}", {}).get(str(value))
        if specific is not None:
            return specific
    return table.get(name, absent)


_CONV_TAKES: dict[tuple, bool] = {}


@_trace_constant
def conv_kernel_takes(backend: str, dtype: torch.dtype, bits: int, groups: int = 1) -> bool:
    """Whether ``backend`` has a conv2d kernel (the reference's is not one) that takes x of
    ``dtype``, ``bits``-bit codes and ``groups`` (its ``conv2d_supports``, where it has
    one). Cached: auto dispatch asks on every conv call."""
    key = (backend, dtype, bits, groups)
    takes = _CONV_TAKES.get(key)
    if takes is None:
        module = None if backend == "reference" else backends.get(backend)
        supports = getattr(module, "conv2d_supports", None)
        takes = _CONV_TAKES[key] = module is not None and hasattr(module, "conv2d") and (
            supports is None or supports(dtype, bits, groups)) and (
            dtype != torch.float64 or backend in EXPANDING_BACKENDS)
    return takes


_PLANS: dict[tuple, tuple] = {}
# What availability reads, by device type (the CPU's candidates read none: an unset
# variable costs ~1.8 µs to read, a good part of a small layer's call there). The tuning
# file is read once (reload_tuning clears these plans with it).
_PLAN_ENV = {"cuda": ("TRITON_INTERPRET",)}


@_trace_constant
def _auto_plan(op: str, device: str, bits: int | None = None,
               kernel: tuple[int, int] | None = None) -> tuple:
    """The runnable candidates of ``op`` on ``device`` for ``bits``-bit codes (and a conv's
    ``kernel`` size (KH, KW)) as ((name, min_m, max_m), ...).

    Cached per process (availability and the GPU's tuning entry do not change, short of
    :func:`reload_tuning`), keyed by the environment variables availability reads.
    """
    env = _PLAN_ENV.get(device.partition(":")[0], ())
    key = (op, device, bits, kernel, *(_env(v) for v in env))
    plan = _PLANS.get(key)
    if plan is None:
        plan = _PLANS[key] = _runnable_candidates(op, torch.device(device), bits, kernel)
    return plan


def _runnable_candidates(op: str, dev: torch.device, bits: int | None,
                         kernel: tuple[int, int] | None) -> tuple:
    plan = []
    for name, min_m, max_m in _candidates(op, dev, bits, kernel):
        module = backends.get(name)
        if hasattr(module, _OP_FUNCTION[op]) and module.unavailable(dev) is None:
            plan.append((name, min_m, max_m))
    return tuple(plan) + (("reference", 0, UNLIMITED),)


@_trace_constant
def _explicit_backend(backend: str, device: str, op: str) -> str:
    """``backend``, checked to run on ``device``; for None/"auto", env OTQ_BACKEND's
    (unset or empty: auto), also checked to have ``op`` (a backend without it, as dequant
    has no fit, pack or unpack, leaves those ops to auto), its errors naming the variable."""
    if backend not in (None, "auto"):
        problem = backends.cannot_run(backend, device)
        if problem:
            raise RuntimeError(problem)
        return backend
    name = _env("OTQ_BACKEND") or "auto"
    if name == "auto":
        return name
    try:
        module, problem = backends.get(name), backends.cannot_run(name, device)
    except ValueError as err:
        raise ValueError(f"OTQ_BACKEND={name!r}: {err}") from None
    if problem:
        raise RuntimeError(f"OTQ_BACKEND={name!r}: {problem}")
    if hasattr(module, _OP_FUNCTION[op]):
        return name
    if op in ("linear", "conv2d"):
        raise ValueError(f"OTQ_BACKEND={name!r}: backend {name!r} has no {op} kernel; "
                         "unset it or name a backend that has one")
    return "auto"


def resolve_backend(backend: Optional[str], op: str, device: torch.device, m: int = 1,
                    bits: int | None = None, takes: Callable[[str], bool] | None = None,
                    kernel: tuple[int, int] | None = None) -> str:
    """A concrete backend name for ``op`` on ``device`` with M rows of activations and
    ``bits``-bit codes (None: the tuning's thresholds for every width). ``takes(name)``:
    whether the call's other arguments suit backend ``name``; auto skips those it refuses.
    ``kernel``: a conv's kernel size (KH, KW), for the tuning's ``kernel_sizes``.

    Under torch.compile the availability checks are trace-time constants and the M
    comparison becomes a shape guard. While torch.export traces, auto returns "auto": the
    op then picks the kernel by the M it runs with (the op's own resolve call), so an
    exported program takes every M its dynamic shapes allow (a guard on M would restrict
    them to one kernel's range; strict export does not show M as a SymInt to ask).
    """
    dev = str(device)
    name = _explicit_backend(backend or "auto", dev, op)
    if name != "auto" or torch.compiler.is_exporting():
        return name
    for name, min_m, max_m in _auto_plan(op, dev, bits, kernel):
        if min_m <= m <= max_m and (takes is None or takes(name)):
            return name
    return "reference"


def resolve_linear_backend(backend: Optional[str], device: torch.device, m: int,
                           dtype: torch.dtype, bits: int) -> str:
    """:func:`resolve_backend` for a linear layer on x of ``dtype``: float64 only on the
    expanding backends (auto picks one; a named other one raises ValueError)."""
    if dtype != torch.float64:
        return resolve_backend(backend, "linear", device, m, bits)
    name = resolve_backend(backend, "linear", device, m, bits, EXPANDING_BACKENDS.__contains__)
    if name != "auto":
        _check_float64_backend(name, "codebook_linear")
    return name


def resolve_conv_backend(backend: Optional[str], device: torch.device, m: int,
                         dtype: torch.dtype, bits: int, groups: int,
                         kernel: tuple[int, int]) -> str:
    """:func:`resolve_backend` for a conv of x ``dtype``, ``bits``-bit codes, ``groups`` and
    ``kernel`` size (KH, KW): auto passes over a backend whose conv kernel does not take them
    (``conv2d_supports``), and takes fused kernels only for the kernel sizes the tuning
    measured (``kernel_sizes``). A named backend without a float64 kernel raises ValueError
    for float64 x."""
    name = resolve_backend(backend, "conv2d", device, m, bits,
                           lambda name: conv_kernel_takes(name, dtype, bits, groups), kernel)
    if dtype == torch.float64 and name != "auto":
        _check_float64_backend(name, "codebook_conv2d")
    return name


def _qt(planes, codebook, bits, shape) -> QuantizedTensor:
    n = shape[0] if len(shape) > 1 else 1
    gran = "channel" if codebook.shape[0] == n and n > 1 else "tensor"
    return QuantizedTensor(list(planes), codebook, bits, tuple(shape), gran)


def _run_linear(x, qt: QuantizedTensor, bias, backend: str) -> torch.Tensor:
    impl = backends.function(backend, "linear")
    if dispatch_log.recording():
        with dispatch_log.recorded_call("linear", backend, x, qt.shape, qt.bits, x.shape[0]):
            return impl(x, qt, bias)
    return impl(x, qt, bias)


def _conv2d_on(backend: str, x, qt: QuantizedTensor, bias, stride, padding, dilation,
               groups) -> torch.Tensor:
    """Backend ``backend``'s conv2d of x, recorded where a dispatch log is open."""
    impl = backends.function(backend, "conv2d")
    if not dispatch_log.recording():
        return impl(x, qt, bias, stride, padding, dilation, groups)
    out = conv2d_output_shape(x.shape, qt.shape, stride, padding, dilation)
    with dispatch_log.recorded_call("conv2d", backend, x, qt.shape, qt.bits,
                                    out[0] * out[2] * out[3]):
        return impl(x, qt, bias, stride, padding, dilation, groups)


def _run_conv2d(x, qt: QuantizedTensor, bias, stride, padding, dilation, groups,
                backend: str) -> torch.Tensor:
    y = _conv2d_on(backend, x, qt, bias, stride, padding, dilation, groups)
    return y.contiguous(memory_format=backends.conv_output_format(x))


def _plain_eager_call(x: torch.Tensor, bias: Optional[torch.Tensor] = None) -> bool:
    """Whether a call may run the backend directly instead of through its torch.library op.

    The op costs ~5-10 µs of host dispatch per call (custom-op autograd and dynamo guards);
    it is needed only when something other than plain eager execution sees the call:
    torch.compile/export or torch.jit.trace tracing, a dispatch mode (FakeTensorMode,
    FlopCounterMode), a tensor subclass, or an autograd graph (x or bias requires grad: the
    op's backward). Functorch transforms and forward-mode AD see neither: see
    :func:`_under_torch_transform`. Results are the same either way (tests/test_ops.py).
    """
    needs_grad = x.requires_grad or (bias is not None and bias.requires_grad)
    return (type(x) is torch.Tensor and not torch.compiler.is_compiling()
            and _current_dispatch_mode() is None and _functorch_depth() == 0
            and _forward_ad._current_level < 0 and not torch._C._is_tracing()
            and not (needs_grad and torch.is_grad_enabled()))


def _teach_dispatch_mode() -> None:
    """Before an op call: every active FlopCounterMode learns the ops' FLOPs (:mod:`.flops`),
    nested ones and those under another dispatch mode too."""
    if not torch.compiler.is_compiling():
        for mode in _dispatch_mode_stack():
            teach_flop_counter(mode)


def _under_torch_transform() -> bool:
    """Whether a functorch transform (vmap, grad, jvp, jacrev, ...) or forward-mode AD
    (dual tensors) sees the call. The ops have neither a batching rule nor a forward-AD
    formula (under jvp a custom op's tangent comes back wrong, with no error), so such
    calls run the reference backend's torch ops on the dense weight, which every
    transform sees through. Under torch.compile the functorch query is asked only where
    dynamo folds it to a constant (elsewhere it would break the graph)."""
    if torch.compiler.is_compiling() and not _dynamo_folds_functorch_depth():
        return False
    return _functorch_depth() > 0 or _forward_ad._current_level >= 0


@_trace_constant
def _dynamo_folds_functorch_depth() -> bool:
    """Whether this torch's dynamo folds the functorch layer depth to a constant (newer
    versions do). Asked only while compiling, so dynamo is loaded."""
    folding = sys.modules.get("torch._dynamo.variables.torch")
    return _functorch_depth in getattr(folding, "constant_fold_functions", ())


# ----------------------------------------------------------------------------- ops
@torch.library.custom_op("otq::codebook_linear", mutates_args=())
def _codebook_linear_op(x: torch.Tensor, planes: list[torch.Tensor], codebook: torch.Tensor,
                        bits: int, n: int, k: int, bias: Optional[torch.Tensor],
                        backend: str) -> torch.Tensor:
    if backend == "auto":  # deferred by torch.export: pick by this call's M
        backend = resolve_linear_backend("auto", x.device, x.shape[0], x.dtype, bits)
    return _run_linear(x, _qt(planes, codebook, bits, (n, k)), bias, backend)


@_codebook_linear_op.register_fake
def _(x, planes, codebook, bits, n, k, bias, backend):
    return x.new_empty(x.shape[0], n)


@torch.library.custom_op("otq::codebook_conv2d", mutates_args=())
def _codebook_conv2d_op(x: torch.Tensor, planes: list[torch.Tensor], codebook: torch.Tensor,
                        bits: int, weight_shape: list[int], bias: Optional[torch.Tensor],
                        stride: list[int], padding: list[int], dilation: list[int],
                        groups: int, backend: str) -> torch.Tensor:
    qt = _qt(planes, codebook, bits, weight_shape)
    if backend == "auto":  # deferred by torch.export: pick by this call's M
        out = conv2d_output_shape(x.shape, weight_shape, stride, padding, dilation)
        backend = resolve_conv_backend("auto", x.device, out[0] * out[2] * out[3], x.dtype,
                                       bits, groups, tuple(weight_shape[2:]))
    return _run_conv2d(x, qt, bias, stride, padding, dilation, groups, backend)


@_codebook_conv2d_op.register_fake
def _(x, planes, codebook, bits, weight_shape, bias, stride, padding, dilation, groups, backend):
    shape = conv2d_output_shape(x.shape, weight_shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device,
                       memory_format=backends.conv_output_format(x))


def _fit_rows_with(rows: torch.Tensor, bits: int, method: str, assign: str,
                   backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int64 [R, n], centroids float32 [R, 2**bits]) of rows [R, n] by ``backend``."""
    if method in FUSED_METHODS:  # (the reference backend's fit_rows is the torch "ot" fit)
        codes, centroids = backends.function(backend, "fit_rows")(rows, bits, assign)
    else:
        codes, centroids = fit_rows_reference(rows, bits, method, assign)
    return codes.to(torch.int64), centroids.to(torch.float32)


@torch.library.custom_op("otq::fit_codebook", mutates_args=())
def _fit_codebook_op(rows: torch.Tensor, bits: int, method: str, assign: str,
                     backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _fit_rows_with(rows, bits, method, assign, backend)


@_fit_codebook_op.register_fake
def _(rows, bits, method, assign, backend):
    codes = rows.new_empty(rows.shape, dtype=torch.int64)
    return codes, rows.new_empty(rows.shape[0], 2**bits, dtype=torch.float32)


@torch.library.custom_op("otq::pack", mutates_args=())
def _pack_op(codes: torch.Tensor, bits: int, backend: str) -> list[torch.Tensor]:
    return backends.function(backend, "pack")(codes, bits)


@_pack_op.register_fake
def _(codes, bits, backend):
    n, k = codes.shape
    return [codes.new_empty(n, padded_k(k) * w // 32, dtype=torch.int32)
            for w in plane_widths(bits)]


@torch.library.custom_op("otq::unpack", mutates_args=())
def _unpack_op(planes: list[torch.Tensor], bits: int, k: int, backend: str) -> torch.Tensor:
    return backends.function(backend, "unpack")(list(planes), bits, k)


@_unpack_op.register_fake
def _(planes, bits, k, backend):
    return planes[0].new_empty(planes[0].shape[0], k, dtype=torch.int64)


@torch.library.custom_op("otq::dequantize", mutates_args=())
def _dequantize_op(planes: list[torch.Tensor], codebook: torch.Tensor, bits: int,
                   weight_shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    return dense_weight(_qt(planes, codebook, bits, weight_shape), dtype)


@_dequantize_op.register_fake
def _(planes, codebook, bits, weight_shape, dtype):
    return codebook.new_empty(weight_shape, dtype=dtype)


# ----------------------------------------------------------------------------- autograd
def _save_for_backward(ctx, planes, codebook, bits: int, shape, bias) -> None:
    """The weight (to expand in backward) and the dtype of a bias that wants a gradient."""
    ctx.save_for_backward(*planes, codebook)
    ctx.bits, ctx.weight_shape = bits, tuple(shape)
    ctx.no_plane_grads = [None] * len(planes)  # backward mirrors the list argument
    ctx.bias_dtype = bias.dtype if bias is not None and bias.requires_grad else None


def _saved_weight(ctx, dtype: torch.dtype) -> torch.Tensor:
    """The layer's dense weight (original shape) in ``dtype``; transient. Through the op,
    so that a compiled backward traces its fake instead of launching a kernel on fakes."""
    *planes, codebook = ctx.saved_tensors
    return torch.ops.otq.dequantize(planes, codebook, ctx.bits, list(ctx.weight_shape), dtype)


def _bias_grad(ctx, grad_y: torch.Tensor, dims) -> Optional[torch.Tensor]:
    return grad_y.sum(dims).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None


def _linear_setup_context(ctx, inputs, output) -> None:
    x, planes, codebook, bits, n, k, bias, backend = inputs
    _save_for_backward(ctx, planes, codebook, bits, (n, k), bias)


def _linear_backward(ctx, grad_y):
    """grad_y [M, N] -> grad_x = grad_y @ W [M, K], grad_bias = sum over M [N]."""
    grad_x = grad_y @ _saved_weight(ctx, grad_y.dtype) if ctx.needs_input_grad[0] else None
    return (grad_x, ctx.no_plane_grads, None, None, None, None, _bias_grad(ctx, grad_y, 0),
            None)


def _conv2d_setup_context(ctx, inputs, output) -> None:
    x, planes, codebook, bits, weight_shape, bias, stride, padding, dilation, groups, _ = inputs
    _save_for_backward(ctx, planes, codebook, bits, weight_shape, bias)
    ctx.x_shape, ctx.conv = x.shape, (stride, padding, dilation, groups)


def _conv2d_backward(ctx, grad_y):
    """grad_y [B, N, OH, OW] -> grad_x [B, C, H, W] (transposed conv with W), grad_bias [N]."""
    grad_x = None
    if ctx.needs_input_grad[0]:
        weight = _saved_weight(ctx, grad_y.dtype)
        grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, weight, grad_y, *ctx.conv)
    return (grad_x, ctx.no_plane_grads, None, None, None, _bias_grad(ctx, grad_y, (0, 2, 3)),
            None, None, None, None, None)


_codebook_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
_codebook_conv2d_op.register_autograd(_conv2d_backward, setup_context=_conv2d_setup_context)


# ----------------------------------------------------------------------------- checks
def conv2d_output_shape(x_shape, weight_shape, stride, padding, dilation) -> list[int]:
    """[B, N, OH, OW] of a conv of x [B, C, H, W] with weight [N, C/g, KH, KW]."""
    b, _, h, w = x_shape
    out = [b, weight_shape[0]]
    for size, kernel, s, p, d in zip((h, w), weight_shape[2:], stride, padding, dilation,
                                     strict=True):
        out.append((size + 2 * p - d * (kernel - 1) - 1) // s + 1)
    return out


def _check_activation(x, qt: QuantizedTensor, what: str) -> None:
    if not isinstance(qt, QuantizedTensor):
        raise TypeError(f"{what}: the weight must be a QuantizedTensor (otq.fit_codebook), "
                        f"got {type(qt).__name__}")
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what}: activations must be float16/bfloat16/float32/float64, "
                         f"got {got}")
    if x.device != qt.device:
        raise ValueError(f"{what}: activations on {x.device} but quantized weight on {qt.device}")
    if qt.codebook.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{what}: the codebook requires grad, but quantized weights are "
                         "frozen (gradients reach x and bias only): detach the codebook")


def _check_bias(bias, qt: QuantizedTensor, what: str) -> None:
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"{what}: bias must be a floating-point tensor, got {got}")
    if bias.shape != (qt.n,) or bias.device != qt.device:
        raise ValueError(f"{what}: bias must be [{qt.n}] on {qt.device}, got "
                         f"{tuple(bias.shape)} on {bias.device}")


def _check_float64_backend(name: str, what: str) -> None:
    if name not in EXPANDING_BACKENDS:
        raise ValueError(f"{what}: backend {name!r} has no float64 kernel; float64 "
                         f"activations run on {' or '.join(map(repr, EXPANDING_BACKENDS))} "
                         "(auto picks one)")


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """Autocast's dtype where autocast is on for x's device type, else None (also for a
    float64 x, which autocast never casts)."""
    if torch._C._is_any_autocast_enabled() and x.dtype != torch.float64:  # (0.15 µs: first)
        device_type = x.device.type
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    return None


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a linear or conv of activations ``x`` runs in: autocast's where autocast
    is on for x's device type (``F.linear``/``F.conv*`` are cast so), else x.dtype."""
    return _autocast_dtype(x) or x.dtype


def _autocast(x: torch.Tensor, bias: Optional[torch.Tensor]):
    """(x, bias) cast to autocast's dtype where autocast is on for x's device type (as
    they are elsewhere): the output then has that dtype, as a float layer's would.
    Callers first test ``torch._C._is_any_autocast_enabled()``, a fraction of this call's
    cost."""
    dtype = _autocast_dtype(x)
    if dtype is None:
        return x, bias
    return x.to(dtype), None if bias is None else bias.to(dtype)


def _empty_batch_output(x: torch.Tensor, bias, shape, bias_shape) -> torch.Tensor:
    """The output of an empty batch x: shape ``shape`` with no values, x.dtype.

    Built from x (and bias) rather than allocated, so that backward still reaches them: the
    gradient of x is empty and the bias gradient is zero, as with F.linear / F.conv2d.
    """
    y = x.sum().expand(shape)
    if bias is not None:
        y = y + bias.to(x.dtype).reshape(bias_shape)
    return y.contiguous()


def _pair(value, name: str, minimum: int) -> list[int]:
    """[h, w] of an int or a pair of ints, each ≥ ``minimum``; ValueError naming it else."""
    if type(value) is tuple and len(value) == 2 and type(value[0]) is type(value[1]) is int:
        if min(value) >= minimum:  # (a layer's own tuple: the common case, taken quickly)
            return list(value)
    items = [value, value] if not isinstance(value, (tuple, list)) else list(value)
    pair = [integer_value(item) for item in items]  # (bools refused, as torch refuses them)
    if len(pair) != 2 or None in pair or min(pair) < minimum:
        raise ValueError(f"codebook_conv2d: {name} must be an int ≥ {minimum} or a pair of "
                         f"them, got {value!r}")
    return pair


# ----------------------------------------------------------------------------- public
def codebook_linear(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                    backend: Optional[str] = None) -> torch.Tensor:
    """y = x @ W^T + bias with W the codebook weight. x [..., K] -> [..., N] (x.dtype, or
    autocast's under ``torch.autocast``)."""
    _check_activation(x, qt, "codebook_linear")
    _check_bias(bias, qt, "codebook_linear")
    if torch._C._is_any_autocast_enabled():
        x, bias = _autocast(x, bias)
    n, k, dims = qt.n, qt.k, x.dim()
    if dims == 0 or x.shape[-1] != k:
        raise ValueError(f"codebook_linear: x must be [..., K={k}] for this weight, got "
                         f"{list(x.shape)}")
    x2 = (x if dims == 2 else x.reshape(-1, k)).contiguous()
    m = x2.shape[0]
    if m == 0:
        return _empty_batch_output(x2, bias, (0, n), (n,)).reshape(*x.shape[:-1], n)
    name = resolve_linear_backend(backend, x.device, m, x.dtype, qt.bits)
    if _plain_eager_call(x2, bias):
        y = _run_linear(x2, qt, bias, name)
    elif _under_torch_transform():
        y = _run_linear(x2, qt, bias, "reference")
    else:
        _teach_dispatch_mode()
        y = torch.ops.otq.codebook_linear(x2, qt.planes, qt.codebook, qt.bits, n, k, bias, name)
    return y if dims == 2 else y.reshape(*x.shape[:-1], n)


def codebook_conv2d(x: torch.Tensor, qt: QuantizedTensor, bias: Optional[torch.Tensor] = None,
                    stride=1, padding=0, dilation=1, groups: int = 1,
                    backend: Optional[str] = None) -> torch.Tensor:
    """2-D convolution with the codebook weight [N, C/groups, KH, KW]. x [B, C, H, W]."""
    _check_activation(x, qt, "codebook_conv2d")
    _check_bias(bias, qt, "codebook_conv2d")
    if torch._C._is_any_autocast_enabled():
        x, bias = _autocast(x, bias)
    if len(qt.shape) != 4:
        raise ValueError(f"codebook_conv2d: weight must be 4-D, got shape {list(qt.shape)}")
    given, groups = groups, integer_value(groups)
    if groups is None or groups < 1:
        raise ValueError(f"codebook_conv2d: groups must be an int ≥ 1, got {given!r}")
    if x.dim() != 4 or x.shape[1] != qt.shape[1] * groups:
        raise ValueError(f"codebook_conv2d: x must be [B, {qt.shape[1] * groups}, H, W] "
                         f"(groups={groups}), got {list(x.shape)}")
    if qt.n % groups:
        raise ValueError(f"codebook_conv2d: {qt.n} output channels not divisible by groups")
    stride, padding = _pair(stride, "stride", 1), _pair(padding, "padding", 0)
    dilation = _pair(dilation, "dilation", 1)
    out_shape = conv2d_output_shape(x.shape, qt.shape, stride, padding, dilation)
    if min(out_shape[2:]) <= 0:
        raise ValueError(f"codebook_conv2d: input {list(x.shape)} too small for the kernel")
    if x.shape[0] == 0:
        return _empty_batch_output(x, bias, out_shape, (-1, 1, 1))
    m = out_shape[0] * out_shape[2] * out_shape[3]
    name = resolve_conv_backend(backend, x.device, m, x.dtype, qt.bits, groups,
                                tuple(qt.shape[2:]))
    plain = _plain_eager_call(x, bias)
    if not plain and _under_torch_transform():  # (vmap refuses memory-format queries)
        return _conv2d_on("reference", x, qt, bias, stride, padding, dilation, groups)
    if not x.is_contiguous(memory_format=torch.channels_last):
        x = x.contiguous()  # NCHW or channels_last are both taken as they are
    if plain:
        return _run_conv2d(x, qt, bias, stride, padding, dilation, groups, name)
    _teach_dispatch_mode()
    return torch.ops.otq.codebook_conv2d(x, qt.planes, qt.codebook, qt.bits,
                                         list(qt.shape), bias, stride, padding, dilation,
                                         groups, name)


def fit_rows(rows: torch.Tensor, bits: int, method: str = "ot", assign: str = "rank",
             backend: Optional[str] = None):
    """Fit codebooks per row. rows [R, n] -> (codes int64 [R, n], centroids f32 [R, 2**b]).
    ValueError for rows that are not a non-empty finite float matrix (a NaN row made the
    Triton fit write codes past its row) and for bad options, before any backend runs."""
    bits = check_options(bits, method, "channel", assign)
    check_weight(rows)
    if rows.dim() != 2:
        raise ValueError(f"rows must be a matrix [R, n], got shape {tuple(rows.shape)}")
    return fit_checked_rows(rows, bits, method, assign, backend)


def fit_checked_rows(rows: torch.Tensor, bits: int, method: str, assign: str,
                     backend: Optional[str] = None):
    """:func:`fit_rows` of rows and options already checked (``fit_codebook`` checks its
    weight once, not once more per call)."""
    name = resolve_backend(backend, "fit", rows.device, rows.shape[1])
    if _plain_eager_call(rows):  # (the op's first call imports torch._dynamo: 1 s, 150 MB)
        return _fit_rows_with(rows.contiguous(), bits, method, assign, name)
    return torch.ops.otq.fit_codebook(rows.contiguous(), bits, method, assign, name)


def pack(codes: torch.Tensor, bits: int, backend: Optional[str] = None) -> list[torch.Tensor]:
    """Pack codes [N, K] into bit planes with the chosen backend (canonical format); each
    backend checks the codes' values (``format.check_codes``)."""
    bits = check_bits(bits)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    name = resolve_backend(backend, "pack", codes.device)
    if _plain_eager_call(codes):
        return backends.function(name, "pack")(codes.contiguous(), bits)
    return torch.ops.otq.pack(codes.contiguous(), bits, name)


def unpack(qt: QuantizedTensor, backend: Optional[str] = None,
           rows: Optional[slice] = None) -> torch.Tensor:
    """Codes int64 [N, K] of ``qt`` with the chosen backend; those of ``rows`` only (a
    slice of the N rows, step 1) if given."""
    if not isinstance(qt, QuantizedTensor):
        raise ValueError(f"unpack takes a QuantizedTensor, got {type(qt).__name__}")
    name = resolve_backend(backend, "unpack", qt.device)
    planes = qt.planes if rows is None else [p[rows] for p in qt.planes]
    if _plain_eager_call(planes[0]):
        return backends.function(name, "unpack")(list(planes), qt.bits, qt.k)
    return torch.ops.otq.unpack(planes, qt.bits, qt.k, name)
