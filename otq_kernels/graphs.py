"""Replay a model call from CUDA graphs: one launch per call instead of one per kernel.

At small batch an eager step of a quantized model is host-bound: the host enqueues its
kernels more slowly than the GPU runs them (the mnist UNet at batch 1, 4-bit per channel,
on an H200: 38.1 ms eager against 4.10 ms replayed from a CUDA graph,
``benchmarks/results/nvidia-h200/goal/e2e.json``). :class:`CudaGraphed` captures a call
once per input signature and replays it afterwards; ``otq_kernels.fm.sample(...,
cuda_graph=True)`` uses it for the velocity model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .format import integer_value

_INFERENCE_ONLY = ("CudaGraphed is for inference: a replay records no autograd graph "
                   "(call it under torch.no_grad() or torch.inference_mode())")


class CudaGraphed(nn.Module):
    """``fn(*args, **kwargs)`` (tensors, or Python scalars that stay fixed) replayed from
    CUDA graphs, for inference.

    The first call with a new signature (each tensor argument's shape, dtype and device,
    each scalar's value) warms ``fn`` up with ``warmup`` eager calls on a side stream
    (Triton autotuning, the cuda backend's runtime code layouts, cuDNN plans), then
    captures one call on static copies of the arguments. Every call copies its tensors into
    those copies, replays the graph and returns a clone of the output tensor (the caller
    may keep it: the next replay overwrites the graph's own).

    A graph replays what it captured: changes that ``fn`` would notice on the host (a
    layer's backend, a weight replaced by another tensor) need a new ``CudaGraphed``; an
    in-place change of a quantized weight reaches the graph once an eager call has run
    (README, "What is stored").
    """

    def __init__(self, fn: Callable[..., torch.Tensor], warmup: int = 2):
        super().__init__()
        if (integer_value(warmup) or 0) < 1:
            raise ValueError(f"warmup must be an integer >= 1 (a call before capture), got "
                             f"{warmup!r}")
        self.fn, self.warmup = fn, warmup
        self._graphs: dict[tuple, tuple] = {}

    def forward(self, *args, **kwargs) -> torch.Tensor:
        """``fn``'s arguments -> ``fn``'s output, as a tensor of its own (shape and dtype as
        ``fn`` returns them)."""
        tensors = [*args, *kwargs.values()]
        if torch.is_grad_enabled() and any(
                isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
            raise RuntimeError(_INFERENCE_ONLY)
        key = (tuple(_signature(a) for a in args),
               tuple((name, _signature(v)) for name, v in sorted(kwargs.items())))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args, kwargs)
        static_args, static_kwargs, output, replay = entry
        for static, given in zip([*static_args, *static_kwargs.values()],
                                 [*args, *(kwargs[k] for k in static_kwargs)], strict=True):
            if isinstance(static, torch.Tensor):
                static.copy_(given)
        replay()
        return output.clone()

    @property
    def graphs(self) -> int:
        """How many signatures have been captured."""
        return len(self._graphs)

    def _capture(self, args: tuple, kwargs: dict) -> tuple:
        """(static args, static kwargs, the graph's output, replay()) for this signature."""
        static_args = [_static_copy(a) for a in args]
        static_kwargs = {name: _static_copy(v) for name, v in kwargs.items()}
        device = _cuda_device([*static_args, *static_kwargs.values()])
        output, graph = capture_cuda_graph(lambda: self.fn(*static_args, **static_kwargs),
                                           device, self.warmup)
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"CudaGraphed needs fn to return one tensor, got {type(output)}")
        if output.requires_grad:
            raise RuntimeError(_INFERENCE_ONLY)
        return static_args, static_kwargs, output, graph.replay


def capture_cuda_graph(call: Callable[[], object], device: torch.device,
                       warmup: int = 1) -> tuple[object, torch.cuda.CUDAGraph]:
    """Warm ``call`` up ``warmup`` times on a side stream of ``device`` (as torch advises
    before a capture), then capture one call in a CUDA graph -> (its output, the graph).

    ``device`` is made the current device throughout: the capture's stream is the current
    device's, and the kernels must launch on it (on a machine with several GPUs, a model
    on cuda:1 would otherwise launch outside the capture).
    """
    with torch.cuda.device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                call()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = call()
    return output, graph


def _signature(value) -> tuple:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, (bool, int, float, str, type(None))):
        return ("scalar", type(value).__name__, value)
    raise TypeError(f"CudaGraphed takes tensors and Python scalars, got {type(value).__name__}")


def _static_copy(value):
    return value.detach().clone() if isinstance(value, torch.Tensor) else value


def _cuda_device(values: list) -> torch.device:
    """The one CUDA device of the tensor arguments (ValueError otherwise)."""
    devices = {v.device for v in values if isinstance(v, torch.Tensor)}
    if len(devices) != 1 or next(iter(devices)).type != "cuda":
        raise ValueError("CudaGraphed needs its tensor arguments on one CUDA device, got "
                         f"{sorted(map(str, devices)) or 'no tensors'}")
    return next(iter(devices))
