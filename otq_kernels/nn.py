"""Quantized layers and whole-model quantization (the ``otq.nn`` namespace).

``quantize_model`` swaps every nn.Linear / nn.Conv1d / nn.Conv2d of a model in place for
the layers of :mod:`otq_kernels.modules` and attaches a
:class:`~otq_kernels.summary.QuantizationSummary` as ``model.otq_summary``.
"""

from __future__ import annotations

import fnmatch
import warnings

from torch import nn

from . import backends
from .modules import (
    QUANT_TYPES,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    _QuantModule,
    module_aliases,
    quant_class_for,
    replace_module,
)
from .quantizers import check_options, check_weight
from .summary import (
    LayerSummary,
    QuantizationSummary,
    _float_weighted,
    format_summary,
    quantization_summary,
)

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
    if not isinstance(value, (list, tuple, set, frozenset)) or not all(
            isinstance(p, str) for p in value):
        raise ValueError(f"{what} must be an fnmatch pattern or a list of them (strings), "
                         f"got {value!r}")
    return list(value)


def _warn_unmatched(patterns, names: list[str], what: str) -> None:
    """A warning for each pattern that matches none of ``names`` (a typo, most likely)."""
    for pattern in patterns or ():
        if not any(_matches(name, [pattern]) for name in names):
            warnings.warn(f"quantize_model: {what} pattern {pattern!r} matches no "
                          f"{'layer that is quantized' if what == 'override' else 'module'}",
                          stacklevel=3)


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

    Every chosen layer's options and weight (finite, not on the meta device) are checked
    before the model is touched: a bad one raises ValueError naming the layer. A pattern
    (include, exclude, override) that matches nothing warns: it is likely a typo. A layer
    registered under several names is one shared layer, selected by its first name
    (``named_modules`` order) and replaced under all of them.
    """
    from tqdm.auto import tqdm

    check_options(bits, method, granularity, "rank")
    backends.check_name(backend)
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    names, reasons = _plan(model, include, exclude)
    modules = [name for name, _ in model.named_modules()]
    _warn_unmatched(include, modules, "include")
    _warn_unmatched(exclude, modules, "exclude")
    _warn_unmatched(overrides, names, "override")
    base = dict(bits=bits, method=method, granularity=granularity, backend=backend)
    plans = [(name, _layer_options(name, base, overrides)) for name in names]
    # Every layer's options and weight before the model is touched. fit_codebook checks the
    # weight again: one more read of it, where fitting all layers before swapping any
    # would hold every fitted layer next to the float model at once.
    for name, opts in plans:
        try:
            check_options(opts["bits"], opts["method"], opts["granularity"], "rank")
            backends.check_name(opts["backend"])
            check_weight(model.get_submodule(name).weight)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
    aliases = module_aliases(model)
    for name, opts in tqdm(plans, desc="quantize", unit="layer", disable=not progress):
        module = model.get_submodule(name)
        try:
            quant = quant_class_for(module).from_float(module, **opts)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None
        replace_module(model, aliases[id(module)], quant)
    model._otq_reasons = {**getattr(model, "_otq_reasons", {}), **reasons}
    model.otq_summary = quantization_summary(model)
    return model

