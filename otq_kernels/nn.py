"""Quantized layers and whole-model quantization (the ``otq.nn`` namespace).

``quantize_model`` swaps every nn.Linear / nn.Conv1d / nn.Conv2d of a model in place for
the layers of :mod:`otq_kernels.modules` and attaches a
:class:`~otq_kernels.summary.QuantizationSummary` as ``model.otq_summary``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import warnings
from collections.abc import Callable

from torch import nn

from . import backends
from .fast_paths import kept_float_reason, sync_fast_paths
from .modules import (
    QUANT_TYPES,
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    _QuantModule,
    bare_module,
    check_bias,
    containing_names,
    dense_dtype,
    float_tensor,
    module_aliases,
    quant_class_for,
    replace_module,
)
from .quantizers import check_options, check_weight
from .skeleton import check_shaped
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
    "dequantize_model",
    "format_summary",
    "quantization_summary",
    "quantize_model",
]

OVERRIDE_KEYS = ("bits", "method", "granularity", "backend")


# ----------------------------------------------------------------------------- model
def _matches(name: str, patterns) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _scopes(names: list[str]) -> list[str]:
    """Each name and the names of the modules containing it ("a.b.c": "a", "a.b", "a.b.c")."""
    return [scope for name in names for scope in (*containing_names(name), name)]


def _matches_any(names: list[str], patterns) -> bool:
    """Whether a pattern matches one of a layer's ``names`` or a module containing it."""
    return any(_matches(scope, patterns) for scope in _scopes(names))


def _layer_options(names: list[str], base: dict, overrides: dict | None) -> dict:
    """base options updated by every override whose pattern matches one of the layer's
    ``names`` (in order)."""
    opts = dict(base)
    for pattern, values in (overrides or {}).items():
        if _matches_any(names, [pattern]):
            opts.update(values)
    return opts


def _check_overrides(overrides) -> None:
    """ValueError unless ``overrides`` is None or {fnmatch pattern: {key: value}} with keys
    from OVERRIDE_KEYS."""
    if overrides is None:
        return
    if not isinstance(overrides, dict):
        raise ValueError(f"overrides must be a dict {{pattern: {{'bits': 8, ...}}}}, got "
                         f"{type(overrides).__name__}")
    for pattern, values in overrides.items():
        if not isinstance(pattern, str) or not isinstance(values, dict):
            raise ValueError(f"override {pattern!r}: {values!r} must be a dict of options "
                             f"({', '.join(OVERRIDE_KEYS)}) under an fnmatch pattern")
        bad = set(values) - set(OVERRIDE_KEYS)
        if bad:
            raise ValueError(f"override {pattern!r}: unknown keys {sorted(bad)}; "
                             f"allowed: {OVERRIDE_KEYS}")


def _plan(model: nn.Module, include, exclude,
          aliases: dict[int, list[str]]) -> tuple[list[str], dict[str, str]]:
    """Names of the layers to quantize, and the reason every other weighted layer stays float.

    A shared layer (several names) is included if one of its names is, excluded if one is.
    A subclass of nn.Linear/Conv that overrides ``forward`` (a LoRA layer, say) stays float:
    the quantized layer would drop what its forward adds.
    """
    chosen, chosen_set, reasons = [], set(), {}
    parents = dict(model.named_modules())
    for name, module in model.named_modules():
        if isinstance(module, _QuantModule) or not _float_weighted(module):
            continue
        if not chosen_set.isdisjoint(containing_names(name)):
            continue  # inside a layer that is replaced whole
        names = aliases[id(module)]
        parent = parents.get(name.rpartition(".")[0]) if name else None
        quant_class = quant_class_for(module)
        functional = kept_float_reason(parent)
        if quant_class is None:
            reasons[name] = "unsupported type"
        elif type(module).forward is not quant_class.FLOAT_TYPE.forward:
            reasons[name] = f"{type(module).__name__} overrides forward"
        elif not name:
            reasons[name] = "root module cannot be replaced in place"
        elif functional:
            reasons[name] = functional
        elif include is not None and not _matches_any(names, include):
            reasons[name] = "not included"
        elif exclude and _matches_any(names, exclude):
            reasons[name] = "excluded"
        else:
            chosen.append(name)
            chosen_set.add(name)
    return chosen, reasons


def _tie_groups(model: nn.Module, aliases: dict[int, list[str]], chosen: list[str],
                reasons: dict[str, str]) -> dict[str, str]:
    """Tied weights (one parameter held by several layers): {name: first name} for each
    chosen layer after the first of its group, which will share the first's codes. A chosen
    layer whose weight is also held elsewhere than as a chosen layer's weight (an LM head
    tied to its embedding, a tied layer excluded) moves from ``chosen`` to ``reasons``:
    quantizing it would untie them and store the weight twice. So does a chosen layer
    whose bias another module holds too (the quantized layer's bias is its own)."""
    holders: dict[int, list[str]] = {}
    for module in {id(m): m for m in model.modules()}.values():
        prefix = aliases[id(module)][0]
        for key, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), []).append(f"{prefix}.{key}".lstrip("."))
    for name in list(chosen):
        bias = model.get_submodule(name)._parameters.get("bias")
        others = [h for h in holders.get(id(bias), []) if h != f"{name}.bias"]
        if bias is not None and others:
            chosen.remove(name)
            reasons[name] = f"bias shared with {', '.join(others)}, which quantizing would untie"
    weights = {f"{name}.weight": name for name in chosen}
    ties = {}
    for name in list(chosen):
        weight = model.get_submodule(name)._parameters.get("weight")
        group = holders.get(id(weight), []) if weight is not None else []
        float_holders = [holder for holder in group if holder not in weights]
        if float_holders:
            chosen.remove(name)
            reasons[name] = f"weight tied to {', '.join(float_holders)}, which stays float"
        elif len(group) > 1 and weights[group[0]] != name:
            ties[name] = weights[group[0]]
    return ties


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


@dataclasses.dataclass
class QuantizationPlan:
    """What :func:`quantize_model` does to a model, decided before anything changes.

    layers: (name, options) of each layer to quantize, in ``named_modules`` order;
    aliases: each of those names -> every name of that layer (a shared layer has several);
    reasons: every other weighted layer's name -> why it stays float;
    ties: a layer whose weight an earlier one of ``layers`` holds too (tied weights) ->
    that layer's name, whose codes it shares.
    """

    layers: list[tuple[str, dict]]
    aliases: dict[str, list[str]]
    reasons: dict[str, str]
    ties: dict[str, str] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _naming_layer(name: str):
    """Re-raise a ValueError from inside the block with the layer's name in front."""
    try:
        yield
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None


def plan_quantization(model: nn.Module, bits: int = 4, method: str = "ot",
                      granularity: str = "channel", include=None, exclude=None,
                      backend: str = "auto", overrides: dict | None = None
                      ) -> QuantizationPlan:
    """The layers of ``model`` (a bare module) that :func:`quantize_model` with these
    arguments replaces, with their options: every option and each layer's backend checked
    (a bad one raises ValueError naming the layer), patterns that match nothing warned
    about. Only module types and shapes are read, so ``model`` may be on the meta device."""
    bits = check_options(bits, method, granularity, "rank")
    backends.check_name(backend)
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    _check_overrides(overrides)
    check_shaped(model, "quantizing")
    aliases = module_aliases(model)
    names, reasons = _plan(model, include, exclude, aliases)
    ties = _tie_groups(model, aliases, names, reasons)
    layer_names = {name: aliases[id(model.get_submodule(name))] for name in names}
    every_name = [n for names_of_one in aliases.values() for n in names_of_one]
    _warn_unmatched(include, every_name, "include")
    if include and not names and all(_matches_any(every_name, [p]) for p in include):
        warnings.warn("quantize_model: the include patterns select no layer it quantizes "
                      "(what they match is kept float or already quantized: see the "
                      "summary's reasons)", stacklevel=2)
    _warn_unmatched(exclude, every_name, "exclude")
    _warn_unmatched(overrides, _scopes([n for name in names for n in layer_names[name]]),
                    "override")
    base = dict(bits=bits, method=method, granularity=granularity, backend=backend)
    layers = [(name, _layer_options(layer_names[name], base, overrides)) for name in names]
    options = dict(layers)
    for name, opts in layers:
        with _naming_layer(name):
            if name in ties and opts != options[ties[name]]:
                raise ValueError(f"its weight is tied to {ties[name]!r}'s, which is given "
                                 f"other options ({options[ties[name]]} and {opts}): tied "
                                 "layers share one set of codes")
            module = model.get_submodule(name)
            layer_bits = check_options(opts["bits"], opts["method"], opts["granularity"], "rank")
            cls = quant_class_for(module)
            cls.check_backend(opts["backend"], layer_bits, cls._layout(module))
    return QuantizationPlan(layers, layer_names, reasons, ties)


def finish_quantization(wrapper: nn.Module, model: nn.Module, reasons: dict) -> nn.Module:
    """After the layers are swapped (:func:`quantize_layers` has set torch's fast paths):
    the summary attached to ``model`` and its ``wrapper``; returns ``wrapper``."""
    model._otq_reasons = {**getattr(model, "_otq_reasons", {}), **reasons}
    model.otq_summary = wrapper.otq_summary = quantization_summary(model)
    return wrapper


def quantize_model(model: nn.Module, bits: int = 4, method: str = "ot",
                   granularity: str = "channel", include=None, exclude=None,
                   backend: str = "auto", overrides: dict | None = None,
                   progress: bool = True) -> nn.Module:
    """Replace nn.Linear / nn.Conv1d / nn.Conv2d layers by Quant* layers, in place.

    include / exclude: fnmatch patterns on module names (``named_modules``); a pattern
    matches a layer when it matches the layer's name or the name of a module containing it
    ("time_embed" covers "time_embed.0"); a layer is quantized if some include pattern
    matches it (all layers when None) and no exclude pattern does. overrides:
    ``{pattern: {"bits": 8, "method": ..., "granularity": ..., "backend": ...}}`` applied in
    order to the layers they match (e.g. first/last conv at 8 bits).
    Other weighted layers (ConvTranspose, Embedding, ...) stay float. Returns ``model``
    with ``model.otq_summary`` (a :class:`QuantizationSummary`) attached. A
    ``torch.compile`` or (Distributed)DataParallel wrapper is seen through: names have no
    ``_orig_mod.`` / ``module.`` prefix.

    Every chosen layer's options and weight (finite, not on the meta device) are checked
    before the model is touched: a bad one raises ValueError naming the layer. A pattern
    (include, exclude, override) that matches nothing warns: it is likely a typo. A layer
    registered under several names is one shared layer: the patterns match any of its
    names, it is listed under its first (``named_modules`` order) and replaced under all.
    Layers that tie one weight share one set of codes (fitted once; they must get the same
    options); a layer whose weight is tied to one that stays float (an embedding) stays
    float too.
    To fill a meta skeleton from a float checkpoint while quantizing it, one layer in
    memory at a time, see :func:`otq_kernels.load_and_quantize`.
    """
    wrapper, model = model, bare_module(model, "quantize_model", swaps=True)
    plan = plan_quantization(model, bits, method, granularity, include, exclude, backend,
                             overrides)
    quantize_layers(model, plan, model.get_submodule, progress)
    return finish_quantization(wrapper, model, plan.reasons)


def quantize_layers(model: nn.Module, plan: QuantizationPlan,
                    float_layer: Callable[[str], nn.Module], progress: bool = True,
                    after_layer: Callable[[str], None] | None = None) -> None:
    """Check every weight of ``plan``, then fit each layer and swap it in, in turn.

    float_layer(name): the float layer to quantize, the model's own or a copy filled from a
    file (asked twice per layer, once per pass, and never kept past its step, so a copy
    lives one layer at a time). The weights are all checked before the model is touched;
    fit_codebook checks each again, where fitting every layer before swapping any would
    hold them all next to the float model. after_layer(name), if given, is called once
    each layer is swapped in.
    """
    from tqdm.auto import tqdm

    for name, _ in plan.layers:
        with _naming_layer(name):
            _check_tensors(float_layer(name))  # (held by no name here: one layer alive)
    try:
        for name, opts in tqdm(plan.layers, desc="quantize", unit="layer",
                               disable=not progress):
            layer = float_layer(name)
            if name in plan.ties:
                layer = _sharing_codes(layer, model.get_submodule(plan.ties[name]), opts)
            else:
                layer = _quantized(name, layer, opts)
            replace_module(model, plan.aliases[name], layer)
            if after_layer is not None:
                after_layer(name)
    finally:  # (interrupted part way: torch's fused paths must not meet a swapped layer)
        sync_fast_paths(model)


def _check_tensors(layer: nn.Module) -> None:
    """ValueError naming what is wrong with a float layer's weight or bias."""
    weight = float_tensor(layer)
    check_weight(weight)
    check_bias(float_tensor(layer, "bias"), weight.shape[0])


def _sharing_codes(layer: nn.Module, tied: _QuantModule, opts: dict) -> nn.Module:
    """The quantized layer of float ``layer`` whose weight is tied to the one ``tied`` was
    fitted from: ``tied``'s planes and codebook (the same tensors), ``layer``'s bias."""
    quant = quant_class_for(layer).replacing(layer, tied.qweight, float_tensor(layer, "bias"),
                                             opts["backend"])
    quant.stats = dict(tied.stats)
    return quant


def _quantized(name: str, layer: nn.Module, opts: dict) -> nn.Module:
    with _naming_layer(name):
        return quant_class_for(layer).from_float(layer, **opts, share_hooks=True)


def dequantize_model(model: nn.Module, dtype=None) -> nn.Module:
    """Replace every Quant* layer of ``model`` by the float layer of its dequantized weight
    (:meth:`~otq_kernels.modules._QuantModule.to_float`), in place: the dense model of the
    same codebook weights, for tools and runtimes that need dense weights.

    dtype: the weights' dtype; default each layer's bias dtype, else that of the model's
    first floating-point parameter (float32 if none). Shared layers stay shared, layers
    sharing codes (tied weights) get one float weight again, torch's
    transformer fast paths come back on (:mod:`.fast_paths`) and wrappers are seen
    through (:func:`~otq_kernels.modules.bare_module`). Returns ``model`` without its
    ``otq_summary``.
    """
    wrapper, model = model, bare_module(model, "dequantize_model", swaps=True)
    if isinstance(model, _QuantModule):  # (it cannot replace itself in place)
        raise ValueError(f"dequantize_model: the model is itself a {type(model).__name__}; "
                         "its .to_float() is the float layer")
    weights: dict[tuple, nn.Parameter] = {}  # codes -> the float weight made of them
    swaps = []  # (names, float layer): all made before any is swapped in
    for names in module_aliases(model).values():
        layer = model.get_submodule(names[0])
        if isinstance(layer, _QuantModule) and names[0]:
            dense = layer.to_float(dtype or dense_dtype(layer, model), share_hooks=True)
            dense.weight = weights.setdefault(layer.codes_key(), dense.weight)
            swaps.append((names, dense))
    for names, dense in swaps:
        replace_module(model, names, dense)
    sync_fast_paths(model)
    for obj in (wrapper, model):
        for attr in ("otq_summary", "_otq_reasons"):
            obj.__dict__.pop(attr, None)
    return wrapper
