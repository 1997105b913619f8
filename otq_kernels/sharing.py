"""Tensors a model holds more than once: which views are the same memory, and one
conversion per memory under ``Module._apply`` so that codes two layers share stay shared.

Layers with tied weights hold the same plane and codebook tensors. ``nn.Module._apply``
converts a module's buffers one module at a time (``.to(device)``, ``.half()``,
``.to_empty()``), so each layer would get its own copy and the codes would be stored,
moved and saved twice. :func:`converted` gives every view of the same memory (the same
tensor, for one without memory: meta, empty) the same converted tensor while the
conversion ``fn`` (one object for a whole ``model.to(...)`` call) and that memory are both
alive and the memory has not been written to, and forgets it after. (A conversion
function that outlives one call, a module-level one passed to ``_apply`` twice, shares
its results across those calls while the memory lives: models that shared codes before
still share the converted ones.)
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


_RESULTS: dict[tuple, tuple] = {}  # (id(fn), memory key) -> (fn ref, owner ref, version, out)


def converted(fn: Callable, t: torch.Tensor,
              convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``convert(t)``, the conversion of ``t`` under ``fn``; the tensor returned for an
    earlier view of the same memory (of ``t`` itself, for a tensor without memory) under
    the same live ``fn``, if that memory has not been written to since."""
    key = (id(fn), memory_key(t))
    owner = t if key[1][0] == "object" else t.untyped_storage()  # (the memory lives as long)
    version = _version(t)
    hit = _RESULTS.get(key)
    if hit is not None and hit[0]() is fn and hit[1]() is owner and hit[2] == version:
        return hit[3]
    out = convert(t)
    if version is not None and not _holds(out, owner):  # (t itself, or a view, needs none)
        _remember(key, fn, owner, version, out)
    return out


def _holds(out: torch.Tensor, owner) -> bool:
    """Whether ``out`` is ``owner`` or lies in its memory (remembering it would keep that
    memory alive for as long as ``fn`` lives)."""
    return out is owner or (isinstance(owner, torch.UntypedStorage) and not out.is_meta
                            and out.untyped_storage() is owner)


def _version(t: torch.Tensor) -> int | None:
    """The in-place version counter ``t`` shares with its views (None for an inference
    tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _remember(key: tuple, fn: Callable, owner, version: int, out: torch.Tensor) -> None:
    entry: list = []

    def forget(_ref) -> None:  # fn or the memory is gone: the key may name another's next
        if _RESULTS.get(key) is entry[0]:
            del _RESULTS[key]

    try:
        refs = (weakref.ref(fn, forget), weakref.ref(owner, forget))
    except TypeError:  # (an fn that takes no weak reference: convert each view apart)
        return
    entry.append((*refs, version, out))
    _RESULTS[key] = entry[0]
