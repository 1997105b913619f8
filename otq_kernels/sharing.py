"""Tensors a model holds more than once: which views are the same memory, and one
conversion per memory under ``Module._apply`` so that codes two layers share stay shared.

Layers with tied weights share their planes and codebook: each holds its own view of the
same memory. ``nn.Module._apply`` converts a module's buffers one module at a time
(``.to(device)``, ``.half()``, ``.to_empty()``), so each layer would get its own copy and
the codes would be stored, moved and saved twice. :func:`converted` gives every view of
the same memory the same converted tensor while the conversion ``fn`` (one object for a
whole ``model.to(...)`` call) and that memory are both alive, and forgets it after.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch


def memory_key(t: torch.Tensor) -> tuple:
    """Equal for two tensors exactly when they are the same view of the same memory (a
    tensor and its ``detach()``, say); a tensor without memory (meta, empty) is only
    equal to itself."""
    if t.numel() == 0 or t.is_meta:  # (no memory: data_ptr says nothing)
        return ("object", id(t))
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride())


_RESULTS: dict[tuple, tuple] = {}  # (id(fn), memory key) -> (fn ref, storage ref, result)


def converted(fn: Callable, t: torch.Tensor,
              convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``convert(t)``, the conversion of ``t`` under ``fn``; the tensor returned for an
    earlier view of the same memory under the same live ``fn`` if there was one."""
    key = (id(fn), memory_key(t))
    storage = t.untyped_storage() if key[1][0] != "object" else None
    hit = _RESULTS.get(key)
    if hit is not None and hit[0]() is fn and hit[1]() is storage:
        return hit[2]
    out = convert(t)
    if storage is not None:
        _remember(key, fn, storage, out)
    return out


def _remember(key: tuple, fn: Callable, storage, out: torch.Tensor) -> None:
    entry: list = []

    def forget(_ref) -> None:  # fn or the memory is gone: the key may name another's next
        if _RESULTS.get(key) is entry[0]:
            del _RESULTS[key]

    try:
        refs = (weakref.ref(fn, forget), weakref.ref(storage, forget))
    except TypeError:  # (an fn that takes no weak reference: convert each view apart)
        return
    entry.append((*refs, out))
    _RESULTS[key] = entry[0]
