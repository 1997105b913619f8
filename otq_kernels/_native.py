"""Lazy loader of the compiled extension ``otq_kernels._C``.

Importing the package never requires the extension; a native op that is missing fails
only when called, with a message that says why and how to build it.
"""

from __future__ import annotations

import functools
import importlib

BUILD_HINT = (
    "build it with `pip install --no-build-isolation -e .` from the repository root "
    "(or `make setup`); set OTQ_FORCE_CUDA=1 to force the CUDA sources"
)


class NativeUnavailable(RuntimeError):
    """The compiled extension (or its CUDA part) is not available."""


# The bindings' version this code calls (csrc/bindings.cpp sets the build's own).
API_VERSION = 2


@functools.lru_cache(maxsize=1)
def _load():
    try:
        module = importlib.import_module("otq_kernels._C")
    except ImportError as err:  # not built, or built against another torch
        return None, f"{type(err).__name__}: {err}"
    return _checked(module)


def _checked(module) -> tuple:
    """(module, None), or (None, why) for a build from other sources than this code's."""
    version = getattr(module, "API_VERSION", None)
    if version != API_VERSION:
        theirs = "unversioned (older)" if version is None else f"version {version}"
        return None, (f"a stale build: its bindings are {theirs}, this code calls version "
                      f"{API_VERSION} (the sources changed since it was built)")
    return module, None


def native(require_cuda: bool = False):
    """The ``_C`` module, or raise NativeUnavailable with a diagnosis."""
    module, error = _load()
    if module is None:
        raise NativeUnavailable(f"otq_kernels._C is not available ({error}); {BUILD_HINT}")
    if require_cuda and not getattr(module, "WITH_CUDA", False):
        raise NativeUnavailable(
            "otq_kernels._C was built without CUDA kernels (no nvcc or CPU-only torch at "
            f"build time); {BUILD_HINT}"
        )
    return module


def unavailable_reason(require_cuda: bool = False) -> str | None:
    """None if the extension (with CUDA if asked) loads, else why not."""
    try:
        native(require_cuda)
    except NativeUnavailable as err:
        return str(err)
    return None
