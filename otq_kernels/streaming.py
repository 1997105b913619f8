"""Quantize while loading: fill a model from a float checkpoint one layer at a time.

:func:`load_and_quantize` gives what ``quantize_model(load_fm_checkpoint(path, model))``
gives, bit for bit, without holding the float model: each layer it quantizes is read from
the file, fitted on ``device`` and replaced before the next is read, so the peak is the
quantized model plus one layer's step (bitsandbytes' and transformers' quantize-on-load;
read, check, fit and stats of a 2048² layer at 4 bits peaked on CPU at 7-11x the
layer's fp32 size with ot per channel, more with the other methods and per tensor); a
meta skeleton's tensors kept float (biases and layers not quantized, norms, embeddings)
take the tensors read for them.
A ``.safetensors`` file is read tensor by tensor (with file reads, not a mapping of the
file, whose pages would stay in the process's resident memory); a ``.pt``/``.pth`` file or
a state dict is already whole in memory (only the skeleton's float copy is saved there).
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .checkpoint import FORMAT, StoredTensor, load_device, open_safetensors, reads_as_safetensors
from .models.checkpoint import checkpoint_state, read_float_checkpoint
from .modules import HOOK_ATTRIBUTES, bare_module
from .nn import finish_quantization, plan_quantization, quantize_layers
from .skeleton import check_loadable, materialize

__all__ = ["load_and_quantize"]


@contextlib.contextmanager
def _float_tensors(source):
    """{name: tensor or StoredTensor} of a float checkpoint: a ``.safetensors`` path is
    opened for reading on demand (for the duration of the block), anything else is read
    whole (:func:`~otq_kernels.models.checkpoint.read_float_checkpoint`)."""
    if isinstance(source, Mapping) or not reads_as_safetensors(source):
        yield read_float_checkpoint(source)
        return
    with open_safetensors(source) as (data_start, header, metadata, file):
        if metadata.get("format") == FORMAT:
            raise ValueError(f"{os.fspath(source)} is already quantized: load it with "
                             "otq.load_quantized")
        yield {key: StoredTensor(file, data_start, key, entry) for key, entry in header.items()}


def _kept_by_copies(model: nn.Module, layer: nn.Module) -> dict:
    """The ``copy.deepcopy`` memo that makes a copy of ``layer`` share, not copy: the rest
    of ``model`` (a hook may be a bound method of it), the layer's hook dicts (their
    handles must still remove the hooks from the quantized layer, which takes them) and
    its plain tensor attributes (the legacy weight norm's computed ``weight``, which
    cannot be deep-copied; the copy computes its own)."""
    inside = list(layer.modules())
    inside_ids = {id(m) for m in inside}
    memo = {id(m): m for m in model.modules() if id(m) not in inside_ids}
    for m in inside:
        shared = [getattr(m, attr) for attr in HOOK_ATTRIBUTES]
        shared += [v for v in vars(m).values() if isinstance(v, torch.Tensor)]
        memo.update({id(obj): obj for obj in shared})
    return memo


def _float_layer(model: nn.Module, name: str, state: dict, device) -> nn.Module:
    """A float copy of ``model``'s layer ``name`` on ``device`` with its tensors from
    ``state`` (the model's own module is left as it is: on the meta device, a skeleton's)."""
    module = model.get_submodule(name)
    layer = copy.deepcopy(module, _kept_by_copies(model, module)).to_empty(device=device)
    prefix = f"{name}."
    layer.load_state_dict({key[len(prefix):]: value.to(device)
                           for key, value in state.items() if key.startswith(prefix)})
    return layer


def load_and_quantize(source, model: nn.Module, bits: int = 4, method: str = "ot",
                      granularity: str = "channel", include=None, exclude=None,
                      backend: str = "auto", overrides: dict | None = None,
                      device=None, use_ema: bool = True, progress: bool = True,
                      after_layer: Callable[[str], None] | None = None) -> nn.Module:
    """Fill ``model`` from the float checkpoint ``source`` while quantizing it, in place.

    source: a ``.safetensors`` path (read one tensor at a time), a ``.pt``/``.pth`` path or
    a state dict (plain, EMA layout, or saved from a DDP / compiled model: as
    :func:`~otq_kernels.models.load_fm_checkpoint` takes them). model: the architecture,
    best built under ``torch.device("meta")`` (no float weights allocated); a real model
    works too and is overwritten. The quantization options are :func:`quantize_model`'s.
    device: where the layers are fitted and the model ends up (default: the model's
    device, CPU for a meta skeleton). after_layer(name), if given, is called after each
    layer is quantized and swapped in (to report progress or release memory: ``otq
    quantize`` returns the C heap's free pages to the system there). Returns ``model``
    with ``otq_summary``.

    The file is checked against the model (names, shapes) and every option and every
    chosen layer's weight (finite) before the model is touched: a bad one raises
    ValueError naming the key or the layer. Each weight is read twice (once to check it),
    never more than one layer's at a time.
    """
    if after_layer is not None and not callable(after_layer):
        raise ValueError(f"after_layer must be None or a function of the layer's name, got "
                         f"{after_layer!r}")
    wrapper, model = model, bare_module(model, "load_and_quantize", swaps=True)
    plan = plan_quantization(model, bits, method, granularity, include, exclude, backend,
                             overrides)
    what = "load_and_quantize" if isinstance(source, Mapping) else os.fspath(source)
    device = load_device(model, device, what)
    replaced = tuple(alias for name, _ in plan.layers for alias in plan.aliases[name])
    with _float_tensors(source) as raw:
        state = checkpoint_state(raw, model, use_ema)
        check_loadable(model, "load_and_quantize", skip=replaced)
        quantize_layers(model, plan, lambda name: _float_layer(model, name, state, device),
                        progress, after_layer)
        rest = {key: value.to(device) for key, value in state.items()
                if not key.startswith(tuple(f"{alias}." for alias in replaced))}
        materialize(model, device, adopt=None if isinstance(source, Mapping) else rest)
        model.load_state_dict(rest, strict=False)
    model.to(device)
    return finish_quantization(wrapper, model, plan.reasons)
