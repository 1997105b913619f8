"""FLOP formulas of the codebook ops for torch's ``FlopCounterMode``.

The counter knows aten's ops only: without these, a quantized model's linears and convs
count zero FLOPs. They count what ``F.linear``/``F.conv2d`` on the dequantized weight
count (2 per multiply-add; the bias and the codebook look-ups are not counted). The
backward runs torch's own ops on the dense weight, which the counter knows already.

``torch.utils.flop_counter`` imports Triton (~0.2 s), so importing ``otq_kernels`` does
not import it: the formulas are registered at the first codebook op a dispatch mode sees
once that module is loaded (:func:`teach_flop_counter`).
"""

from __future__ import annotations

import math
import sys
import threading

import torch


def linear_flops(x_shape, planes, codebook, bits, n, k, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``otq::codebook_linear`` on x [M, K] (shapes in place of tensors)."""
    return 2 * x_shape[0] * n * k


def conv2d_flops(x_shape, planes, codebook, bits, weight_shape, *args, out_shape=None,
                 **kwargs) -> int:
    """FLOPs of ``otq::codebook_conv2d`` with output [B, N, OH, OW] and weight
    [N, C/groups, KH, KW] (as torch counts a conv)."""
    return 2 * math.prod(out_shape) * math.prod(weight_shape[1:])


def _formulas() -> dict:
    return {torch.ops.otq.codebook_linear: linear_flops,
            torch.ops.otq.codebook_conv2d: conv2d_flops}


_REGISTERING = threading.Lock()


def teach_flop_counter(mode) -> None:
    """Register the formulas with torch's flop counter, if that module is loaded, and add
    them to ``mode`` (the active dispatch mode) if it is a counter made before they were
    registered (a counter copies the registry when it is made)."""
    counter_module = sys.modules.get("torch.utils.flop_counter")
    if counter_module is None:
        return
    registry = counter_module.flop_registry
    with _REGISTERING:  # (two threads' first counters: torch refuses a second registration)
        for op, formula in _formulas().items():
            if op not in registry:
                counter_module.register_flop_formula(op)(formula)
    # (newer torch pushes an inner mode whose .counter holds the copy; older, the counter)
    own = getattr(getattr(mode, "counter", mode), "flop_registry", None)
    if isinstance(own, dict):
        for op in _formulas():
            own.setdefault(op, registry[op])
