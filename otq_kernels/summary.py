"""What quantization did to a model: a row per weighted layer (bits, bits/weight, SQNR,
W2, or why it stayed float) and the model's bytes before and after.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from .format import integer_value
from .modules import _QuantModule, quant_class_for
from .sharing import memory_key


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


def _own_parameters(module: nn.Module) -> list[nn.Parameter]:
    """A layer's parameters, those its parametrizations (weight_norm, ...) hold included."""
    params = list(module.parameters(recurse=False))
    if parametrize.is_parametrized(module):
        params += list(module.parametrizations.parameters())
    return params


def _float_weighted(module: nn.Module) -> bool:
    """A module that owns a ≥2-D floating-point parameter, or computes its weight from
    parametrized ones (a 'weighted layer'; the parametrization itself is not one)."""
    if isinstance(module, parametrize.ParametrizationList):
        return False
    return any(p.dim() >= 2 and p.is_floating_point() for p in _own_parameters(module))


def _layer_row(name: str, module: nn.Module, reason: str | None) -> LayerSummary:
    if isinstance(module, _QuantModule):
        s = module.stats
        return LayerSummary(name, type(module).__name__, list(module.weight_shape), "quantized",
                            module.bits, module.method, module.granularity,
                            module.bits_per_weight, s.get("sqnr_db"), s.get("w2"), s.get("mse"),
                            module.nbytes)
    params = _own_parameters(module)
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        weight = next(p for p in params if p.dim() >= 2)
    return LayerSummary(name, type(module).__name__, list(weight.shape),
                        f"kept float ({reason})",
                        nbytes=sum(p.numel() * p.element_size() for p in params))


def _totals(model: nn.Module) -> tuple[int, int, int, int]:
    """(params, fp32 bytes, fp16 bytes, stored bytes) of the model before/after quantization;
    a tensor several modules hold (tied weights) counts once, as it is stored."""
    params = fp32 = fp16 = after = 0
    seen: set = set()
    for module in model.modules():
        quant = isinstance(module, _QuantModule)
        if quant and module.codes_key() not in seen:  # (tied layers share codes)
            seen.add(module.codes_key())
            numel = math.prod(module.weight_shape)
            params, fp32, fp16 = params + numel, fp32 + 4 * numel, fp16 + 2 * numel
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        codes = {id(t) for t in (module._planes() + [module.codebook])} if quant else set()
        for t in tensors:  # (a code tensor by its memory: layers may share a codebook only)
            key = memory_key(t) if id(t) in codes else id(t)
            if key in seen:
                continue
            seen.add(key)
            size = t.numel() * t.element_size()
            after += size
            if id(t) in codes:
                continue
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
    reasons = kept_float_reasons(model)
    rows = [_layer_row(name, m, reasons.get(name)) for name, m in model.named_modules()
            if isinstance(m, _QuantModule) or _float_weighted(m)]
    params, fp32, fp16, after = _totals(model)
    return QuantizationSummary(rows, params, fp32, fp16, after)


def kept_float_reasons(model: nn.Module) -> dict[str, str]:
    """{name: why it is float} of each weighted layer of the model's current tree that is
    not quantized: the reason :func:`quantize_model` recorded, else "unsupported type" or
    "not selected" (a layer added or swapped back since)."""
    recorded = getattr(model, "_otq_reasons", {})
    return {name: recorded.get(name) or ("unsupported type" if quant_class_for(m) is None
                                         else "not selected")
            for name, m in model.named_modules()
            if not isinstance(m, _QuantModule) and _float_weighted(m)}


def _fmt(v, spec: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, spec)


def _human(nbytes: int) -> str:
    return f"{nbytes / 1024:.1f} KiB" if nbytes < 1024**2 else f"{nbytes / 1024**2:.2f} MiB"


# The widest layer-name column of the printed table; longer names keep their end.
NAME_WIDTH_MAX = 64


def _fit_name(name: str, width: int) -> str:
    """``name`` if it fits ``width``, else "..." and its last ``width - 3`` characters
    (ASCII: the table is printed to consoles of any encoding)."""
    return name if len(name) <= width else "..." + name[-(width - 3):]


def format_summary(summary: QuantizationSummary, max_rows: int | None = None) -> str:
    """A printable table: one line per layer (the first ``max_rows``, an integer >= 0, if
    given), then totals (sizes before and after)."""
    if max_rows is not None and (integer_value(max_rows) is None or max_rows < 0):
        raise ValueError(f"max_rows must be None or an integer >= 0, got {max_rows!r}")
    rows = summary.layers if max_rows is None else summary.layers[:max_rows]
    width = min(max((len(r.name) for r in rows), default=0), NAME_WIDTH_MAX)
    width = max(width, len("layer"))
    types = max([12, *(len(r.type) for r in rows)])  # (MultiheadAttention: 18)
    head = (f"{'layer':<{width}} {'type':<{types}} {'shape':<18} {'bits':>4} {'method':<9} "
            f"{'bits/w':>7} {'SQNR dB':>8} {'W2':>9}  note")
    lines = [head, "-" * len(head)]
    for r in rows:
        note = "" if r.status == "quantized" else r.status
        lines.append(
            f"{_fit_name(r.name, width):<{width}} {r.type:<{types}} "
            f"{'x'.join(map(str, r.shape)):<18} "
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
