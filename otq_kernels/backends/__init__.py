"""Backends: each module implements some of the kernel functions below.

Interface (a backend defines the ones it supports):
- ``unavailable(device) -> str | None``: why it cannot run on ``device`` (None = it can).
- ``linear(x [M, K], qt, bias [N] | None) -> [M, N]`` in x.dtype.
- ``conv2d(x [B, C, H, W], qt, bias, stride, padding, dilation, groups) -> [B, N, OH, OW]``
  (ops makes it dense in ``conv_output_format(x)``); optionally
  ``conv2d_supports(dtype, bits, groups) -> bool`` where it takes only some (auto
  dispatch then passes the others on to the next backend).
- ``fit_rows(rows [R, n] float, bits, assign) -> (codes int [R, n], centroids f32 [R, 2**b])``
  for the "ot" method.
- ``pack(codes [N, K], bits) -> planes``; ``unpack(planes, bits, k) -> codes int64 [N, k]``.
"""

from __future__ import annotations

import importlib
import sys

import torch

from ..format import integer_value

NAMES = ("reference", "dequant", "triton", "cuda", "cpu")
_MODULES = {name: f"{__name__}.{name}" for name in NAMES}


def get(name: str):
    """The backend module called ``name`` (imported on first use; later calls, one per
    layer call, only look it up: import_module costs microseconds)."""
    module_name = _MODULES.get(name) if isinstance(name, str) else None
    if module_name is None:
        raise _unknown(name)
    module = sys.modules.get(module_name)
    return module if module is not None else importlib.import_module(module_name)


def check_name(name) -> str:
    """``name`` if it is "auto" or a backend's name, else the ValueError :func:`get` gives."""
    if name != "auto" and not (isinstance(name, str) and name in _MODULES):
        raise _unknown(name)
    return name


def _unknown(name) -> ValueError:
    return ValueError(f"unknown backend {name!r}; choose one of {NAMES} or 'auto'")


def cannot_run(name: str, device) -> str | None:
    """Why backend ``name`` cannot run on ``device`` ("backend 'cuda' cannot run on cpu:
    ..."), or None where it can."""
    reason = get(name).unavailable(torch.device(device))
    return f"backend {name!r} cannot run on {device}: {reason}" if reason else None


def function(name: str, op: str):
    """Backend ``name``'s implementation of ``op`` or a clear NotImplementedError."""
    impl = getattr(get(name), op, None)
    if impl is None:
        raise NotImplementedError(f"backend {name!r} does not implement {op!r}")
    return impl


def conv_output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a conv2d output: channels-last when x [B, C, H, W] is (and is
    not also NCHW-contiguous, as when C = 1 or H = W = 1), like torch's convolutions, so a
    channels-last network stays channels-last; contiguous NCHW otherwise."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def checked_split_k(split_k) -> int | None:
    """A kernel's forced split-K count as an int >= 1, or None (the backend's heuristic);
    ValueError for anything else (-1 made a grid with no program: the output came back
    uninitialised)."""
    if split_k is None:
        return None
    value = integer_value(split_k)
    if value is None or value < 1:
        raise ValueError(f"split_k must be a positive int, got {split_k!r}")
    return value


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, without the call where t already has it (a no-op ``to`` costs as
    much as a small kernel's arithmetic: ~1.7 µs on the CPU)."""
    return t if t.dtype == dtype else t.to(dtype)
