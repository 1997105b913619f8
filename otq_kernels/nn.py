"""Quantized layers and whole-model quantization.

``QuantLinear``, ``QuantConv1d`` and ``QuantConv2d`` hold a weight in the canonical packed
format (DESIGN §2): bit planes as int32 buffers ``plane0, plane1, ...`` and the float32
``codebook`` buffer, so ``.to(device)``, ``state_dict()`` and ``load_state_dict()`` work as
for any module. The bias stays a float parameter. Forward passes go through
:func:`otq_kernels.ops.codebook_linear` / :func:`~otq_kernels.ops.codebook_conv2d` with the
module's ``backend`` ("auto" = the fastest available, the reference path on CPU without the
extension). Activations keep their dtype (fp32 on CPU, fp16/bf16 on GPU); the codebook
buffer stays float32 even after ``model.half()``.

``quantize_model`` swaps every nn.Linear / nn.Conv1d / nn.Conv2d of a model in place and
attaches a :class:`QuantizationSummary` as ``model.otq_summary``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import ops
from .format import QuantizedTensor, plane_widths
from .metrics.weights import weight_error
from .quantizers import check_options, fit_codebook

__all__ = [
    "QUANT_TYPES",
    "LayerSummary",
    "QuantConv1d",
    "QuantConv2d",
    "QuantLinear",
    "QuantizationSummary",
    "format_summary",
    "quantization_summary",
    "quantize_model",
]

OVERRIDE_KEYS = ("bits", "method", "granularity", "backend")


# ----------------------------------------------------------------------------- base
class _QuantModule(nn.Module):
    """Shared storage: planes/codebook buffers, float bias, cached QuantizedTensor views."""

    FLOAT_TYPE: type[nn.Module] = nn.Module

    def _init_storage(self, qt: QuantizedTensor, bias: torch.Tensor | None, backend: str):
        self.bits, self.granularity, self.method = qt.bits, qt.granularity, qt.method
        self.weight_shape = tuple(qt.shape)
        self.backend = backend
        self.stats: dict = {}
        self.num_planes = len(qt.planes)
        for i, plane in enumerate(qt.planes):
            self.register_buffer(f"plane{i}", plane.detach().to(torch.int32).contiguous())
        self.register_buffer("codebook", qt.codebook.detach().to(torch.float32).contiguous())
        if bias is None:
            self.register_parameter("bias", None)
        else:
            device = qt.codebook.device
            self.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
        self._cache: dict = {}

    # -- storage views ---------------------------------------------------------------
    def _planes(self) -> list[torch.Tensor]:
        return [getattr(self, f"plane{i}") for i in range(self.num_planes)]

    def _cached(self, key: str, shape: tuple[int, ...]) -> QuantizedTensor:
        """QuantizedTensor over the current buffers with ``shape`` (rebuilt when they change)."""
        tensors = (*self._planes(), self.codebook)
        hit = self._cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors, strict=True)):
            return hit[1]
        qt = QuantizedTensor(list(tensors[:-1]), tensors[-1], self.bits, shape,
                             self.granularity, self.method)
        self._cache[key] = (tensors, qt)
        return qt

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor of the float layer's weight shape."""
        return self._cached("canonical", self.weight_shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense float weight of the original shape (e.g. [N, C/g, KH, KW])."""
        return self.qweight.dequantize(dtype)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, codebooks and row padding included (bias excluded)."""
        return self.qweight.bits_per_weight

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (planes + fp32 codebook)."""
        return self.qweight.nbytes

    # -- torch plumbing --------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """Keep the codebook float32 under .half()/.bfloat16()/.to(dtype)."""
        out = super()._apply(fn, recurse)
        if self.codebook.dtype != torch.float32:
            self._buffers["codebook"] = self.codebook.float()
        self._cache.clear()
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._cache.clear()

    def _storage_repr(self) -> str:
        return (f"bits={self.bits}, method={self.method!r}, granularity={self.granularity!r}, "
                f"bits_per_weight={self.bits_per_weight:.3f}, backend={self.backend!r}")

    @staticmethod
    def _fit(weight: torch.Tensor, bits, method, granularity, module) -> QuantizedTensor:
        try:
            check_options(bits, method, granularity, "rank")
        except ValueError as err:
            raise ValueError(f"{type(module).__name__}: {err}") from None
        return fit_codebook(weight.detach().float(), bits, method, granularity)

    def _set_stats(self, weight: torch.Tensor) -> None:
        self.stats = weight_error(weight.detach().float(), self.dequantize())


def _check_type(module: nn.Module, cls: type[nn.Module]) -> None:
    if not isinstance(module, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(module).__name__}")


# ----------------------------------------------------------------------------- linear
class QuantLinear(_QuantModule):
    """Linear layer with a codebook weight [out_features, in_features].

    forward: x [..., in_features] -> [..., out_features] (x.dtype).
    """

    FLOAT_TYPE = nn.Linear

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 backend: str = "auto"):
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {list(qt.shape)}")
        self.out_features, self.in_features = qt.shape
        self._init_storage(qt, bias, backend)

    @classmethod
    def from_float(cls, module: nn.Linear, bits: int = 4, method: str = "ot",
                   granularity: str = "channel", backend: str = "auto") -> QuantLinear:
        """Quantize an nn.Linear (its weight is fitted once; the module is left untouched)."""
        _check_type(module, nn.Linear)
        qt = cls._fit(module.weight, bits, method, granularity, module)
        layer = cls(qt, module.bias, backend)
        layer._set_stats(module.weight)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        return ops.codebook_linear(x, self.qweight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._storage_repr()}")


# ----------------------------------------------------------------------------- conv
def _tuple(v, n: int) -> tuple[int, ...]:
    return tuple(int(a) for a in v) if isinstance(v, (tuple, list)) else (int(v),) * n


def _resolve_padding(padding, padding_mode: str, kernel, dilation):
    """(pre_pad for F.pad or None, F.pad mode, conv padding per dim).

    Handles int/tuple padding, "valid", "same" (asymmetric when the kernel extent is even)
    and non-zero padding modes, like nn.Conv*d does.
    """
    dims = len(kernel)
    if padding == "valid":
        pairs = [(0, 0)] * dims
    elif padding == "same":
        pairs = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in _tuple(padding, dims)]
    symmetric = all(a == b for a, b in pairs)
    if padding_mode == "zeros" and symmetric:
        return None, "constant", tuple(a for a, _ in pairs)
    pre = tuple(v for pair in reversed(pairs) for v in pair)  # F.pad: last dim first
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return pre, mode, (0,) * dims


class _QuantConv(_QuantModule):
    """Common conv state: geometry copied from the float conv."""

    def _init_conv(self, module_cfg: dict) -> None:
        self.in_channels = module_cfg["in_channels"]
        self.out_channels = module_cfg["out_channels"]
        self.kernel_size = module_cfg["kernel_size"]
        self.stride = module_cfg["stride"]
        self.padding = module_cfg["padding"]
        self.dilation = module_cfg["dilation"]
        self.groups = module_cfg["groups"]
        self.padding_mode = module_cfg["padding_mode"]
        self._pre_pad, self._pad_mode, self._conv_padding = _resolve_padding(
            self.padding, self.padding_mode, self.kernel_size, self.dilation)

    @staticmethod
    def _conv_cfg(module) -> dict:
        return {k: getattr(module, k) for k in ("in_channels", "out_channels", "kernel_size",
                                                "stride", "padding", "dilation", "groups",
                                                "padding_mode")}

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._pre_pad is None else F.pad(x, self._pre_pad, mode=self._pad_mode)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in (0, (0,), (0, 0)):
            s += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}, {self._storage_repr()}"

    @classmethod
    def from_float(cls, module, bits: int = 4, method: str = "ot",
                   granularity: str = "channel", backend: str = "auto"):
        """Quantize a float conv (its weight is fitted once; the module is left untouched)."""
        _check_type(module, cls.FLOAT_TYPE)
        qt = cls._fit(module.weight, bits, method, granularity, module)
        layer = cls(qt, module.bias, backend, **cls._conv_cfg(module))
        layer._set_stats(module.weight)
        return layer


class QuantConv2d(_QuantConv):
    """Conv2d with a codebook weight [out, in/groups, KH, KW].

    forward: x [B, C_in, H, W] -> [B, C_out, OH, OW] (x.dtype).
    """

    FLOAT_TYPE = nn.Conv2d

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 backend: str = "auto", stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", in_channels: int | None = None,
                 out_channels: int | None = None, kernel_size=None):
        super().__init__()
        if len(qt.shape) != 4:
            raise ValueError(f"QuantConv2d needs a 4-D weight, got shape {list(qt.shape)}")
        n, c, kh, kw = qt.shape
        self._init_conv(dict(
            in_channels=in_channels or c * groups, out_channels=out_channels or n,
            kernel_size=(kh, kw), stride=_tuple(stride, 2),
            padding=padding if isinstance(padding, str) else _tuple(padding, 2),
            dilation=_tuple(dilation, 2), groups=int(groups), padding_mode=padding_mode))
        self._init_storage(qt, bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, N, OH, OW]."""
        return ops.codebook_conv2d(self._pad(x), self.qweight, self.bias, self.stride,
                                   self._conv_padding, self.dilation, self.groups, self.backend)


class QuantConv1d(_QuantConv):
    """Conv1d with a codebook weight [out, in/groups, k].

    forward: x [B, C_in, L] -> [B, C_out, L_out] (x.dtype). Pointwise convs (k = 1,
    stride 1, no padding, groups 1) run as a linear layer on x^T [B, L, C]; the rest as
    a 1×k conv2d on x.unsqueeze(2) [B, C, 1, L].
    """

    FLOAT_TYPE = nn.Conv1d

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 backend: str = "auto", stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", in_channels: int | None = None,
                 out_channels: int | None = None, kernel_size=None):
        super().__init__()
        if len(qt.shape) != 3:
            raise ValueError(f"QuantConv1d needs a 3-D weight, got shape {list(qt.shape)}")
        n, c, k = qt.shape
        self._init_conv(dict(
            in_channels=in_channels or c * groups, out_channels=out_channels or n,
            kernel_size=(k,), stride=_tuple(stride, 1),
            padding=padding if isinstance(padding, str) else _tuple(padding, 1),
            dilation=_tuple(dilation, 1), groups=int(groups), padding_mode=padding_mode))
        self._init_storage(qt, bias, backend)

    @property
    def pointwise(self) -> bool:
        """True when the conv is a plain linear map over channels."""
        return (self.kernel_size == (1,) and self.stride == (1,) and self.groups == 1
                and self._pre_pad is None and self._conv_padding == (0,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, L] -> [B, N, L_out]."""
        if x.dim() != 3:
            raise ValueError(f"QuantConv1d expects x [B, C, L], got shape {list(x.shape)}")
        n, c, k = self.weight_shape
        if self.pointwise:
            y = ops.codebook_linear(x.transpose(1, 2), self._cached("linear", (n, c)),
                                    self.bias, self.backend)
            return y.transpose(1, 2)
        y = ops.codebook_conv2d(self._pad(x).unsqueeze(2), self._cached("conv2d", (n, c, 1, k)),
                                self.bias, (1, self.stride[0]), (0, self._conv_padding[0]),
                                (1, self.dilation[0]), self.groups, self.backend)
        return y.squeeze(2)


QUANT_TYPES: dict[type[nn.Module], type[_QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
}


def quant_class_for(module: nn.Module) -> type[_QuantModule] | None:
    """The Quant* class that replaces ``module`` (None if its type is unsupported)."""
    for float_type, quant_type in QUANT_TYPES.items():
        if isinstance(module, float_type):
            return quant_type
    return None


# ----------------------------------------------------------------------------- summary
@dataclass
class LayerSummary:
    """One weighted layer. ``status`` is "quantized" or "kept float (<reason>)"."""

    name: str
    type: str
    shape: list[int]
    status: str
    bits: int | None = None
    method: str | None = None
    granularity: str | None = None
    bits_per_weight: float | None = None
    sqnr_db: float | None = None
    w2: float | None = None
    mse: float | None = None
    nbytes: int = 0


@dataclass
class QuantizationSummary:
    """Per-layer rows plus model totals (bytes; ``bytes_after`` = as stored: packed
    quantized weights + every other tensor at its own dtype)."""

    layers: list[LayerSummary] = field(default_factory=list)
    params: int = 0
    bytes_fp32: int = 0
    bytes_fp16: int = 0
    bytes_after: int = 0

    @property
    def quantized(self) -> list[LayerSummary]:
        return [r for r in self.layers if r.status == "quantized"]

    @property
    def kept_float(self) -> list[LayerSummary]:
        return [r for r in self.layers if r.status != "quantized"]

    @property
    def model_bits_per_weight(self) -> float:
        """Stored bits per model parameter (everything included)."""
        return 8.0 * self.bytes_after / max(self.params, 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_bits_per_weight"] = self.model_bits_per_weight
        return d

    def __str__(self) -> str:
        return format_summary(self)


def _float_weighted(module: nn.Module) -> bool:
    """A module that owns a ≥2-D floating-point parameter (a 'weighted layer')."""
    return any(p.dim() >= 2 and p.is_floating_point()
               for p in module.parameters(recurse=False))


def _layer_row(name: str, module: nn.Module, reason: str | None) -> LayerSummary:
    if isinstance(module, _QuantModule):
        s = module.stats
        return LayerSummary(name, type(module).__name__, list(module.weight_shape), "quantized",
                            module.bits, module.method, module.granularity,
                            module.bits_per_weight, s.get("sqnr_db"), s.get("w2"), s.get("mse"),
                            module.nbytes)
    weight = next(p for p in module.parameters(recurse=False) if p.dim() >= 2)
    return LayerSummary(name, type(module).__name__, list(weight.shape),
                        f"kept float ({reason or 'not selected'})",
                        nbytes=sum(p.numel() * p.element_size()
                                   for p in module.parameters(recurse=False)))


def _totals(model: nn.Module) -> tuple[int, int, int, int]:
    """(params, fp32 bytes, fp16 bytes, stored bytes) of the model before/after quantization."""
    params = fp32 = fp16 = after = 0
    for module in model.modules():
        quant = isinstance(module, _QuantModule)
        if quant:
            numel = math.prod(module.weight_shape)
            params, fp32, fp16, after = (params + numel, fp32 + 4 * numel, fp16 + 2 * numel,
                                         after + module.nbytes)
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        skip = {id(t) for t in (module._planes() + [module.codebook])} if quant else set()
        for t in tensors:
            if id(t) in skip:
                continue
            size = t.numel() * t.element_size()
            after += size
            if t.is_floating_point():
                params += t.numel() if isinstance(t, nn.Parameter) else 0
                fp32, fp16 = fp32 + 4 * t.numel(), fp16 + 2 * t.numel()
            else:
                fp32, fp16 = fp32 + size, fp16 + size
    return params, fp32, fp16, after


def quantization_summary(model: nn.Module) -> QuantizationSummary:
    """Summary of the model's current state: a row per weighted layer, and totals.

    Reasons recorded by :func:`quantize_model` (excluded, unsupported type, ...) are kept.
    """
    reasons = getattr(model, "_otq_reasons", {})
    rows = [
        _layer_row(name, m, reasons.get(name, "unsupported type"
                                        if quant_class_for(m) is None else None))
        for name, m in model.named_modules()
        if isinstance(m, _QuantModule) or _float_weighted(m)
    ]
    params, fp32, fp16, after = _totals(model)
    return QuantizationSummary(rows, params, fp32, fp16, after)


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _human(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f} KB" if nbytes < 1024**2 else f"{nbytes / 1024**2:.2f} MB"


def format_summary(summary: QuantizationSummary, max_rows: int | None = None) -> str:
    """A printable table: one line per layer, then totals (sizes before and after)."""
    head = (f"{'layer':<36} {'type':<12} {'shape':<18} {'bits':>4} {'method':<9} "
            f"{'bits/w':>7} {'SQNR dB':>8} {'W2':>9}  note")
    lines = [head, "-" * len(head)]
    rows = summary.layers if max_rows is None else summary.layers[:max_rows]
    for r in rows:
        note = "" if r.status == "quantized" else r.status
        lines.append(
            f"{r.name[-36:]:<36} {r.type:<12} {'x'.join(map(str, r.shape)):<18} "
            f"{_fmt(r.bits, 'd'):>4} {r.method or '-':<9} {_fmt(r.bits_per_weight, '.3f'):>7} "
            f"{_fmt(r.sqnr_db, '.2f'):>8} {_fmt(r.w2, '.2e'):>9}  {note}")
    if max_rows is not None and len(summary.layers) > max_rows:
        lines.append(f"... {len(summary.layers) - max_rows} more layers")
    q, kept = summary.quantized, summary.kept_float
    lines.append("-" * len(head))
    lines.append(f"quantized layers: {len(q)}; kept float: {len(kept)}; "
                 f"parameters: {summary.params:,}")
    lines.append(f"model size: {_human(summary.bytes_fp32)} fp32, {_human(summary.bytes_fp16)} "
                 f"fp16 -> {_human(summary.bytes_after)} quantized "
                 f"({summary.model_bits_per_weight:.3f} bits/weight overall, codebooks, "
                 f"biases and float layers included)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- model
def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _layer_options(name: str, base: dict, overrides: dict | None) -> dict:
    """base options updated by every override whose pattern matches ``name`` (in order)."""
    opts = dict(base)
    for pattern, values in (overrides or {}).items():
        bad = set(values) - set(OVERRIDE_KEYS)
        if bad:
            raise ValueError(f"override {pattern!r}: unknown keys {sorted(bad)}; "
                             f"allowed: {OVERRIDE_KEYS}")
        if fnmatch.fnmatchcase(name, pattern):
            opts.update(values)
    return opts


def _plan(model: nn.Module, include, exclude) -> tuple[list[str], dict[str, str]]:
    """Names of the layers to quantize, and the reason every other weighted layer stays float."""
    chosen, reasons = [], {}
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, _QuantModule) or not _float_weighted(module):
            continue
        parent = parents.get(name.rpartition(".")[0]) if name else None
        if quant_class_for(module) is None:
            reasons[name] = "unsupported type"
        elif not name:
            reasons[name] = "root module cannot be replaced in place"
        elif isinstance(parent, nn.MultiheadAttention):
            reasons[name] = "used functionally by MultiheadAttention"
        elif include is not None and not _matches(name, include):
            reasons[name] = "not included"
        elif exclude and _matches(name, exclude):
            reasons[name] = "excluded"
        else:
            chosen.append(name)
    return chosen, reasons


def _as_patterns(value, what: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if not all(isinstance(p, str) for p in value):
        raise ValueError(f"{what} must be a list of fnmatch patterns (strings)")
    return list(value)


def quantize_model(model: nn.Module, bits: int = 4, method: str = "ot",
                   granularity: str = "channel", include=None, exclude=None,
                   backend: str = "auto", overrides: dict | None = None,
                   progress: bool = True) -> nn.Module:
    """Replace nn.Linear / nn.Conv1d / nn.Conv2d layers by Quant* layers, in place.

    include / exclude: fnmatch patterns on module names (``named_modules``); a layer is
    quantized if it matches some include pattern (all layers when None) and no exclude
    pattern. overrides: ``{pattern: {"bits": 8, "method": ..., "granularity": ...,
    "backend": ...}}`` applied in order to matching layers (e.g. first/last conv at 8 bits).
    Other weighted layers (ConvTranspose, Embedding, ...) stay float. Returns ``model``
    with ``model.otq_summary`` (a :class:`QuantizationSummary`) attached.
    """
    from tqdm.auto import tqdm

    check_options(bits, method, granularity, "rank")
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    names, reasons = _plan(model, include, exclude)
    base = dict(bits=bits, method=method, granularity=granularity, backend=backend)
    plans = [(name, _layer_options(name, base, overrides)) for name in names]
    for name, opts in tqdm(plans, desc="quantize", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        try:
            quant = quant_class_for(module).from_float(module, **opts)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, quant)
    model._otq_reasons = {**getattr(model, "_otq_reasons", {}), **reasons}
    model.otq_summary = quantization_summary(model)
    return model


def plane_count(bits: int) -> int:
    """Number of bit planes stored for ``bits``."""
    return len(plane_widths(bits))
