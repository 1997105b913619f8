"""torch modules whose fused inference paths read a child layer's dense ``.weight``.

A quantized layer has no dense weight, so these paths cannot take it:

* ``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward``
  on every call: its ``out_proj`` stays float (:func:`kept_float_reason`).
* ``nn.TransformerEncoderLayer`` in eval mode (and ``nn.TransformerEncoder`` over it, given
  a padding mask) may take a fused fast path that reads ``linear1.weight`` and
  ``linear2.weight``. While those are quantized, :func:`sync_fast_paths` switches that
  path off on the instance, so that the layer runs its ordinary forward: the same math,
  through the quantized layers (the slow path is the one training runs).
"""

from __future__ import annotations

from torch import nn

from .modules import _QuantModule

# The attribute torch's fast-path checks read on each module type, and its "off" value.
_SWITCHES = {nn.TransformerEncoderLayer: ("activation_relu_or_gelu", 0),
             nn.TransformerEncoder: ("use_nested_tensor", False)}
_SAVED = "_otq_fast_path"  # where the switched-off value is kept, to restore it


def kept_float_reason(parent: nn.Module | None) -> str | None:
    """Why a weighted child of ``parent`` must stay float, or None."""
    if isinstance(parent, nn.MultiheadAttention):
        return "used functionally by MultiheadAttention"
    return None


def _reads_quantized_weights(module: nn.Module) -> bool:
    """Whether ``module``'s fast path would read the weight of a quantized layer."""
    if isinstance(module, nn.TransformerEncoder):  # its nested tensor reaches every layer
        return any(_reads_quantized_weights(layer) for layer in module.layers)
    return any(isinstance(getattr(module, name, None), _QuantModule)
               for name in ("linear1", "linear2"))


def sync_fast_paths(model: nn.Module) -> None:
    """Switch off, in place, the fused fast path of every ``nn.TransformerEncoderLayer`` in
    ``model`` with a quantized ``linear1``/``linear2`` and of every ``nn.TransformerEncoder``
    with such a layer; switch it back on where those layers are float again
    (idempotent).

    The attributes set are those torch's fast-path checks read (``activation_relu_or_gelu``,
    ``use_nested_tensor``): they choose a path only, not the math. A deep copy or a pickled
    model keeps them.
    """
    for module in model.modules():
        switch = next((s for t, s in _SWITCHES.items() if isinstance(module, t)), None)
        if switch is None:
            continue
        attr, off = switch
        saved = module.__dict__.get(_SAVED)
        quantized = _reads_quantized_weights(module)
        if quantized and saved is None:
            setattr(module, _SAVED, getattr(module, attr))
            setattr(module, attr, off)
        elif not quantized and saved is not None:
            setattr(module, attr, saved)
            delattr(module, _SAVED)
