"""Which backend and kernel each quantized layer call ran: :func:`record_dispatch`.

Auto dispatch picks a backend per call from the device, the call's M (rows of
activations) and the GPU's tuning table, and each backend then picks a kernel. This
module lets a user see those choices::

    with otq_kernels.record_dispatch(model) as log:
        model(x, t)
    print(log.table())        # a row per call: layer, op, weight, M, dtype, bits, backend, kernels
    log.counts()              # {(op, backend, kernels): calls}

It records the calls that run Python: eager calls, and the ``otq::`` op calls of a
``torch.compile``d or exported program (whose layer names are not known there). A CUDA
graph replay runs no Python and records nothing. While no log is open, a layer call pays
a few function calls that find no open log.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

# The open logs, innermost last; each call is recorded in all of them.
_OPEN: list[DispatchLog] = []


@dataclass
class DispatchRecord:
    """One call of ``codebook_linear`` / ``codebook_conv2d``.

    layer: the quantized module's name in the model given to :func:`record_dispatch` (None
    for a call from elsewhere). m: rows of activations (a conv's batch × output pixels).
    kernels: what the backend ran, in order (e.g. ``["dequant_cuda", "F.conv2d"]``).
    model_call: which call of that model (0 for the first in the block) made it (None
    outside the model's forward or without a model).
    """

    layer: str | None
    op: str
    backend: str
    m: int
    dtype: str
    bits: int
    weight_shape: tuple[int, ...]
    device: str
    model_call: int | None = None
    kernels: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"layer": self.layer, "op": self.op, "backend": self.backend, "m": self.m,
                "dtype": self.dtype, "bits": self.bits, "weight_shape": list(self.weight_shape),
                "device": self.device, "model_call": self.model_call,
                "kernels": list(self.kernels)}


def _counts(records) -> dict[tuple[str, str, str], int]:
    keys = Counter((r.op, r.backend, " + ".join(r.kernels)) for r in records)
    return dict(keys.most_common())


@dataclass
class _ThreadState:
    """Where one thread is in the model: what the log's hooks and calls track per thread
    (one stack for all threads crashed a call whose layer hooks were installed or removed
    by another thread between its entry and its exit)."""

    layers: list[str] = field(default_factory=list)  # the quantized modules being called
    model_depth: int = 0  # > 0 inside the model's forward
    model_call: int = 0  # which of the model's calls this thread is inside
    current: DispatchRecord | None = None  # the call whose backend is running


class DispatchLog(list):
    """The :class:`DispatchRecord` of each call, in call order."""

    def __init__(self) -> None:
        super().__init__()
        self.model_calls = 0  # forward calls of the model given to record_dispatch
        self._threads: dict[int, _ThreadState] = {}
        self._lock = threading.Lock()

    def _next_model_call(self) -> int:
        """The index of a model call starting now (threads count apart: one's call
        numbered another's records when it read the shared count at record time)."""
        with self._lock:
            self.model_calls += 1
            return self.model_calls - 1

    def _state(self) -> _ThreadState:
        """The calling thread's state (made at its first use)."""
        return self._threads.setdefault(threading.get_ident(), _ThreadState())

    def counts(self) -> dict[tuple[str, str, str], int]:
        """Calls per (op, backend, kernels joined by " + "), most frequent first."""
        return _counts(self)

    def to_dicts(self) -> list[dict]:
        return [r.to_dict() for r in self]

    def summary(self) -> list[dict]:
        """:meth:`counts` as JSON-ready rows {"op", "backend", "kernels", "calls"}."""
        return [{"op": op, "backend": backend, "kernels": kernels, "calls": n}
                for (op, backend, kernels), n in self.counts().items()]

    def table(self, model_call: int | None = None) -> str:
        """A text table: one row per call (those of the model's call ``model_call`` only,
        if given), then the counts of those rows."""
        records = [r for r in self if model_call is None or r.model_call == model_call]
        head = ("layer", "op", "weight", "M", "dtype", "bits", "backend", "kernels")
        rows = [(r.layer or "-", r.op, "x".join(map(str, r.weight_shape)), str(r.m), r.dtype,
                 str(r.bits), r.backend, " + ".join(r.kernels) or "-") for r in records]
        widths = [max(len(c) for c in col) for col in zip(head, *rows, strict=True)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in (head, *rows)]
        return "\n".join([*lines, "", format_counts(_counts(records))])


def format_counts(counts: dict[tuple[str, str, str], int]) -> str:
    """:meth:`DispatchLog.counts` as lines "calls  op / backend / kernels"."""
    return "\n".join(["calls  op / backend / kernels"] + [
        f"{n:5d}  {op} / {backend} / {kernels or '-'}"
        for (op, backend, kernels), n in counts.items()])


def recording() -> bool:
    """Whether a :func:`record_dispatch` block is open."""
    return bool(_OPEN)


@contextlib.contextmanager
def recorded_call(op: str, backend: str, x: torch.Tensor, weight_shape, bits: int,
                  m: int) -> Iterator[None]:
    """Record an ``op`` call on x with codes of ``weight_shape`` in every open log; the
    kernels that the backend notes inside the block are this call's (the ops run the
    backend inside it; only while :func:`recording`)."""
    logs = list(_OPEN)  # (one snapshot: other threads open and close logs meanwhile)
    states = [log._state() for log in logs]
    outer = [state.current for state in states]  # a call made inside another's backend
    for log, state in zip(logs, states, strict=True):
        layer = state.layers[-1] if state.layers else None
        model_call = state.model_call if state.model_depth else None
        state.current = DispatchRecord(layer, op, backend, int(m), str(x.dtype).removeprefix(
            "torch."), int(bits), tuple(int(s) for s in weight_shape), str(x.device),
            model_call)
        log.append(state.current)
    try:
        yield
    finally:
        for state, current in zip(states, outer, strict=True):
            state.current = current


def note_kernel(name: str, split_k: int = 1) -> None:
    """Add ``name`` (with `` split_k=S`` where a K split S > 1 runs) to the kernels of the
    call being recorded: backends call this where they choose what to launch; a no-op
    outside a recorded call (e.g. the expansion of a backward pass)."""
    if not _OPEN:
        return
    if split_k > 1:
        name = f"{name} split_k={split_k}"
    for log in list(_OPEN):
        current = log._state().current
        if current is not None and name not in current.kernels:
            current.kernels.append(name)


def _layer_hooks(model: nn.Module, log: DispatchLog) -> list:
    """Hooks that keep each thread's layer stack (``log._state().layers``) naming the
    quantized module it is calling, and count the model's calls."""
    from .modules import _QuantModule  # modules imports ops, which imports this module

    def enter(name):
        return lambda module, args: log._state().layers.append(name)

    def leave(module, args, output):  # (a call entered before the hooks were: none pushed)
        layers = log._state().layers
        if layers:
            layers.pop()

    def enter_model(module, args):
        state = log._state()
        if state.model_depth == 0:  # (not a recursive call)
            state.model_call = log._next_model_call()
        state.model_depth += 1

    def leave_model(module, args, output):
        state = log._state()
        state.model_depth = max(state.model_depth - 1, 0)

    handles = [model.register_forward_pre_hook(enter_model),
               model.register_forward_hook(leave_model, always_call=True)]
    for name, module in model.named_modules():
        if isinstance(module, _QuantModule):
            handles.append(module.register_forward_pre_hook(enter(name)))
            handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


@contextlib.contextmanager
def record_dispatch(model: nn.Module | None = None) -> Iterator[DispatchLog]:
    """Record every quantized layer call made inside the block into the :class:`DispatchLog`
    it yields; with ``model``, each record names its layer (the module's name in ``model``)
    and the model's call that made it. Blocks nest: an inner block's calls are recorded in
    the outer log too. The log is process-wide: calls that other threads make meanwhile are
    recorded as well, each under its own thread's layer (the layer hooks track each thread
    apart; a call that was already inside a layer when the block opened gets none)."""
    log = DispatchLog()
    handles = [] if model is None else _layer_hooks(model, log)
    _OPEN.append(log)
    try:
        yield log
    finally:
        _OPEN[:] = [other for other in _OPEN if other is not log]  # (equal logs may differ)
        for handle in handles:
            handle.remove()
