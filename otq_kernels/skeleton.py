"""Skeletons on the meta device: load a checkpoint without allocating float weights first.

A model built under ``with torch.device("meta"):`` has shapes and dtypes but no storage
and no random initialisation. :func:`otq_kernels.load_quantized` and
:func:`otq_kernels.models.load_fm_checkpoint` take such a skeleton: the checkpoint fills
every parameter and buffer it saves, and this module gives them storage on the target
device just before (uninitialised: the strict load overwrites every byte). A buffer that
checkpoints do not save (``register_buffer(..., persistent=False)``) has no values to load,
so a skeleton holding one on the meta device is refused, by name, before anything changes.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parameter import UninitializedTensorMixin


def _meta_tensors(model: nn.Module):
    """(module, attribute dict, name, qualified name, tensor) of every meta parameter/buffer."""
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        for store in (module._parameters, module._buffers):
            for name, t in store.items():
                if t is not None and t.is_meta:
                    yield module, store, name, dot + name, t


def check_loadable(model: nn.Module, what: str, skip: tuple[str, ...] = ()) -> None:
    """ValueError naming the meta buffers no checkpoint can fill (non-persistent ones);
    those inside the submodules named in ``skip`` (about to be replaced) do not count."""
    unsaved = [qualified for module, store, name, qualified, _ in _meta_tensors(model)
               if store is module._buffers and name in module._non_persistent_buffers_set
               and not any(qualified.startswith(f"{s}.") for s in skip)]
    if unsaved:
        raise ValueError(f"{what}: the model's buffers {unsaved[:8]} are on the meta device and "
                         "not saved in checkpoints (persistent=False), so loading cannot fill "
                         "them: build the model on a real device, or give them values first")


def check_shaped(model: nn.Module, before: str) -> None:
    """ValueError naming the first parameter of a lazy module not shaped yet."""
    for name, p in model.named_parameters():
        if isinstance(p, UninitializedTensorMixin):
            raise ValueError(f"parameter {name!r} is not initialised yet (a lazy module): run "
                             f"one forward call to shape it before {before}")


def materialize(model: nn.Module, device: torch.device, adopt=None) -> None:
    """Give every meta parameter and buffer uninitialised storage on ``device``, in place.

    adopt: {qualified name: tensor} read for the model (a checkpoint's, never the
    caller's own): a meta tensor of that name takes the tensor itself as its storage where
    dtype, shape and device agree, so the load that follows copies nothing (a float
    checkpoint was held twice: read, then copied in). Parameters stay ``nn.Parameter``
    with their ``requires_grad``; a tensor shared by several modules (tied weights) stays
    shared.
    """
    made: dict[int, torch.Tensor] = {}
    for _, store, name, qualified, t in list(_meta_tensors(model)):
        if id(t) not in made:
            data = _adoptable((adopt or {}).get(qualified), t, device)
            if data is None:
                with torch.inference_mode(False):  # loadable later, also outside it
                    # (not empty_like: on a meta tensor it imports sympy, 0.4 s)
                    data = torch.empty(t.shape, dtype=t.dtype, device=device)
            made[id(t)] = (nn.Parameter(data, requires_grad=t.requires_grad)
                           if isinstance(t, nn.Parameter) else data)
        store[name] = made[id(t)]


def _adoptable(value, meta: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """``value`` (detached) where it can be the storage of ``meta`` on ``device``."""
    if (isinstance(value, torch.Tensor) and type(value) is torch.Tensor
            and value.dtype == meta.dtype and value.shape == meta.shape
            and value.device == torch.device(device) and value.layout == torch.strided
            and not value.is_inference() and not value.requires_grad):
        return value.detach()
    return None
