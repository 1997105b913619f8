"""Keep GPU runs inside a short device budget: cap Triton autotuning, stop pytest on time.

Triton autotunes every kernel once per new key (M, N, K, bit widths ...): it compiles each
config left after the kernel's own pruning (~0.5-2 s each) and times it with
``triton.testing.do_bench`` (25 ms warm-up + 100 ms reps per config). Over the benchmark
grid and the test suite that is many minutes, so GPU-suite runs cap it through env vars
(nothing changes when they are unset, e.g. on CPU/CI or in normal use of the package):

- ``OTQ_AUTOTUNE_MAX_CONFIGS=N``: keep the first N configs left after the kernel's own
  ``early_config_prune``; whenever one config is left, it is not timed at all (triton 3.9
  skips that itself, 3.6 would still run ``do_bench`` on it);
- ``OTQ_AUTOTUNE_REP_MS=R``: time each config for about R ms (warm-up R/4 ms);
- ``OTQ_PYTEST_DEADLINE=<unix time>`` (pytest plugin only): tests not started by then are
  not run; pytest stops as if interrupted, still printing its summary and writing
  ``--junitxml``.

Used by ``benchmarks/common.py`` and ``benchmarks/gpu_checks.py`` (:func:`apply_from_env`)
and by ``benchmarks/gpu_suite.sh`` as a pytest plugin
(``PYTHONPATH=benchmarks pytest -p gpu_limits ...``).
"""

from __future__ import annotations

import os
import time

try:  # the pytest hooks below need it; the benchmarks import this module without pytest
    import pytest

    _first = pytest.hookimpl(tryfirst=True)
except ImportError:  # pragma: no cover
    def _first(fn):
        return fn

_APPLIED: dict | None = None


def _env_int(name: str) -> int | None:
    return _env_number(name, int)


def _env_float(name: str) -> float | None:
    return _env_number(name, float)


def _env_number(name: str, kind: type):
    """The environment variable ``name`` as a ``kind`` (None when unset or empty);
    ValueError naming it when it is not one."""
    value = os.environ.get(name, "").strip()
    try:
        return kind(value) if value else None
    except ValueError:
        raise ValueError(f"{name}={value!r} is not {'an integer' if kind is int else 'a number'}"
                         ) from None


def apply(max_configs: int | None = None, rep_ms: float | None = None,
          require_cuda: bool = True) -> dict:
    """Patch triton's Autotuner class (once per process); returns what was applied.

    Safe to call before or after the kernel modules are imported (the class is patched,
    not the instances); a no-op without triton, under ``TRITON_INTERPRET=1`` or (unless
    ``require_cuda=False``, for tests) without a CUDA device.
    """
    global _APPLIED
    if _APPLIED is not None:
        return _APPLIED
    applied: dict = {"max_configs": None, "rep_ms": None}
    if (max_configs is None and rep_ms is None) or os.environ.get("TRITON_INTERPRET") == "1":
        _APPLIED = applied
        return applied
    try:  # CPU runs set TRITON_INTERPRET later: importing triton now would break them
        import torch

        if require_cuda and not torch.cuda.is_available():
            applied["note"] = "no CUDA device: not applied"
            _APPLIED = applied
            return applied
    except ImportError:
        pass
    try:
        import triton.runtime.autotuner as autotuner
    except Exception as err:  # noqa: BLE001 - no triton: nothing to limit
        applied["note"] = f"triton not importable: {type(err).__name__}"
        _APPLIED = applied
        return applied
    tuner = autotuner.Autotuner
    import triton.testing

    original = tuner.prune_configs
    limit = max_configs if max_configs is not None and max_configs >= 1 else None

    def prune_configs(self, *args, **kwargs):
        configs = list(original(self, *args, **kwargs))[:limit]
        self._otq_single = len(configs) == 1  # read by do_bench below
        return configs

    def bench(kernel_call, quantiles=None, **_):
        return triton.testing.do_bench(kernel_call, warmup=max(rep_ms / 4, 1.0), rep=rep_ms,
                                       quantiles=quantiles)

    def skip(kernel_call, quantiles=None, **_):  # one config: nothing to compare
        return [0.0] * len(quantiles) if quantiles else 0.0

    def do_bench(self):
        own = getattr(self, "_do_bench", None)  # a kernel's own benchmarker wins
        if own is not None:
            return own
        if getattr(self, "_otq_single", False):
            return skip  # triton 3.6 would still time a lone config (3.9 does not)
        if rep_ms is not None and rep_ms > 0:
            return bench
        return driver_bench()

    def driver_bench():
        from triton.runtime.driver import driver

        return driver.active.get_benchmarker()

    tuner.prune_configs = prune_configs
    tuner.do_bench = property(do_bench)
    applied["max_configs"] = limit
    applied["rep_ms"] = rep_ms if rep_ms is not None and rep_ms > 0 else None
    _APPLIED = applied
    return applied


def apply_from_env() -> dict:
    """:func:`apply` with OTQ_AUTOTUNE_MAX_CONFIGS / OTQ_AUTOTUNE_REP_MS."""
    return apply(_env_int("OTQ_AUTOTUNE_MAX_CONFIGS"), _env_float("OTQ_AUTOTUNE_REP_MS"))


# ----------------------------------------------------------------------------- pytest plugin
def pytest_configure(config):  # noqa: ARG001 - pytest hook signature
    apply_from_env()


@_first  # before pytest's own runner
def pytest_runtest_protocol(item, nextitem):  # noqa: ARG001
    """Past OTQ_PYTEST_DEADLINE: run no further test and stop the session cleanly."""
    deadline = _env_float("OTQ_PYTEST_DEADLINE")
    if deadline and time.time() > deadline:
        item.session.shouldstop = (f"OTQ_PYTEST_DEADLINE reached; not run from "
                                   f"{item.nodeid} on")
        return True  # handled: the item is not run
    return None


def pytest_report_header(config):  # noqa: ARG001
    applied = _APPLIED or {}
    deadline = _env_float("OTQ_PYTEST_DEADLINE")
    left = f", {deadline - time.time():.0f} s to the deadline" if deadline else ""
    return (f"gpu_limits: autotune max_configs={applied.get('max_configs')} "
            f"rep_ms={applied.get('rep_ms')}{left}")
