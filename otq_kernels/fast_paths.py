"""torch modules whose fused inference paths read a child layer's dense ``.weight``.

A quantized layer has no dense weight, so these paths cannot take it:

* ``nn.MultiheadAttention`` hands ``out_proj.weight`` to ``F.multi_head_attention_forward``
  on every call: its ``out_proj`` stays float (:func:`kept_float_reason`).
* ``nn.TransformerEncoderLayer`` in eval mode (and ``nn.TransformerEncoder`` over it, given
  a padding mask) may take a fused fast path that reads ``linear1.weight`` and
  ``linear2.weight``. Once those are quantized, :func:`bypass_fast_paths` switches that
  path off on the instance, so that the layer runs its ordinary forward: the same math,
  through the quantized layers (the slow path is the one training runs).
"""

from __future__ import annotations

from torch import nn

from .modules import _QuantModule

_ENCODER_LINEARS = ("linear1", "linear2")


def kept_float_reason(parent: nn.Module | None) -> str | None:
    """Why a weighted child of ``parent`` must stay float, or None."""
    if isinstance(parent, nn.MultiheadAttention):
        return "used functionally by MultiheadAttention"
    return None


def _has_quantized_linears(layer: nn.Module) -> bool:
    return isinstance(layer, nn.TransformerEncoderLayer) and any(
        isinstance(getattr(layer, name, None), _QuantModule) for name in _ENCODER_LINEARS)


def bypass_fast_paths(model: nn.Module) -> None:
    """Switch off, in place, the fused fast path of every ``nn.TransformerEncoderLayer`` in
    ``model`` with a quantized ``linear1``/``linear2`` and of every ``nn.TransformerEncoder``
    whose first layer is one (idempotent).

    The attributes set are those torch's fast-path checks read (``activation_relu_or_gelu``,
    ``use_nested_tensor``); they choose a path only, not the math, and a deep copy or a
    pickled model keeps them.
    """
    for module in model.modules():
        if _has_quantized_linears(module):
            module.activation_relu_or_gelu = 0  # the slow path applies module.activation
        if isinstance(module, nn.TransformerEncoder) and len(module.layers) and (
                _has_quantized_linears(module.layers[0])):
            module.use_nested_tensor = False
