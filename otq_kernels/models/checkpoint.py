"""Load flow_matching-example checkpoints (plain and EMA layouts) without pickle.

Accepted inputs:

* a state dict already loaded by the caller (``{name: tensor}``);
* the examples' checkpoint dict ``{"model": state_dict, ...}`` (optimizer etc. ignored);
* a path to a ``.safetensors`` file, or to a ``.pt``/``.pth`` file read with
  ``torch.load(weights_only=True)`` (never full unpickling). The only class allowed
  beyond torch's weights-only set is ``argparse.Namespace``: the examples' training
  script stores its command-line ``args`` in every ``checkpoint.pth``.

The examples wrap the network in an EMA module whose state dict holds the raw weights
under ``model.<name>``, the EMA copies as ``shadow_params.<i>`` (``i`` indexing the
trainable parameters in ``model.parameters()`` order) and an integer ``num_updates``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping

import torch
from torch import nn

from ..modules import WRAPPER_PREFIXES, bare_module, names_by_identity
from ..skeleton import check_loadable, materialize

_SHADOW = re.compile(r"^shadow_params\.(\d+)$")


def _read_file(path: str | os.PathLike) -> dict:
    from ..checkpoint import read_safetensors, reads_as_safetensors, require_file

    path = require_file(path)
    if reads_as_safetensors(path):
        return read_safetensors(path)[1]
    if not path.endswith((".pt", ".pth", ".ckpt", ".bin")):
        raise ValueError(f"unsupported checkpoint format {path!r} (use .safetensors, .pt or "
                         ".pth)")
    try:
        return _torch_load(path)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - torch raises its own types (UnpicklingError)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a weights-only torch checkpoint (other objects "
                         f"refused): {type(err).__name__}: {first}") from None


def _torch_load(path: str) -> dict:
    """Weights-only ``torch.load`` that also accepts the examples' ``args`` Namespace."""
    ser = torch.serialization
    if hasattr(ser, "safe_globals"):  # torch >= 2.5: scoped allow-list
        with ser.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    ser.add_safe_globals([argparse.Namespace])  # torch 2.4
    return torch.load(path, map_location="cpu", weights_only=True)


def _unwrap(obj: Mapping, source) -> dict[str, torch.Tensor]:
    """Return the flat tensor dict: ``obj["model"]`` when present, else ``obj``."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    inner = obj.get("model")
    state = inner if isinstance(inner, Mapping) else obj
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def strip_wrapper_prefixes(state: Mapping[str, torch.Tensor],
                           own_names) -> dict[str, torch.Tensor]:
    """``state`` with the wrapper prefixes (:data:`otq_kernels.modules.WRAPPER_PREFIXES`)
    taken off its names, each only where every name carries it and either none of
    ``own_names`` (the model's) does or more names fit the model without it (a model with
    a child called ``module``): the state dict of a DDP or compiled model loads into the
    bare one (``module._orig_mod.`` too)."""
    own, state = set(own_names), dict(state)
    while prefix := _strippable_prefix(state, own):
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _strippable_prefix(state: dict, own: set) -> str | None:
    """The first wrapper prefix that comes off ``state``'s names (see above), or None."""
    for prefix in WRAPPER_PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            inner = {k[len(prefix):] for k in state}
            if (not any(k.startswith(prefix) for k in own)
                    or len(own.intersection(inner)) > len(own.intersection(state))):
                return prefix
    return None


def extract_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, use_ema: bool = True
) -> dict[str, torch.Tensor]:
    """Map a plain or EMA-layout state dict onto ``model``'s key names.

    With EMA keys present and ``use_ema`` the shadow weights replace the raw ones.
    """
    own_prefixed = any(k.startswith("model.") for k in model.state_dict())
    if own_prefixed or not any(k.startswith("model.") for k in state):
        return dict(state)
    out = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
    found = [(int(m.group(1)), v) for k, v in state.items() if (m := _SHADOW.match(k))]
    shadows = dict(found)
    if len(shadows) != len(found) or sorted(shadows) != list(range(len(shadows))):
        raise ValueError(f"EMA checkpoint's shadow_params are not numbered 0..{len(found) - 1} "
                         "once each")
    if use_ema and shadows:
        params = [p for p in model.parameters() if p.requires_grad]
        if len(params) != len(shadows):
            raise ValueError(
                f"EMA checkpoint has {len(shadows)} shadow params, model has {len(params)} "
                "trainable parameters: different architecture"
            )
        names = names_by_identity(model.named_parameters(remove_duplicate=False))
        for i, p in enumerate(params):
            out.update(dict.fromkeys(names[id(p)], shadows[i]))  # every name of a shared one
    return out


def _fill_shared(state: dict, model: nn.Module) -> dict:
    """``state`` with one value for each tensor the model holds under several names (a
    shared layer, tied weights): a name the file lacks takes its partner's value (files
    written by safetensors' ``save_model`` keep one name of each); ValueError where the
    file stores different values under two of them (the model can hold only one)."""
    own = model.state_dict(keep_vars=True).items()
    for names in names_by_identity(own).values():
        present = [n for n in names if n in state]
        for name in present[1:]:
            if not _same_values(state[present[0]], state[name]):
                raise ValueError(f"checkpoint holds different values for {present[0]!r} and "
                                 f"{name!r}, which are one tensor in the model")
        if present:
            state.update({n: state[present[0]] for n in names if n not in state})
    return state


def _same_values(a, b) -> bool:
    """Whether two checkpoint values (tensors, or entries read on demand with ``.to``)
    hold the same dtype, shape and bytes (a NaN equals itself)."""
    if a is b:
        return True
    a, b = (t.to(torch.device("cpu")).reshape(-1).contiguous() for t in (a, b))
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.view(torch.uint8), b.view(torch.uint8))


def checkpoint_state(raw: Mapping, model: nn.Module, use_ema: bool = True) -> dict:
    """``raw`` ({name: tensor}, flat; the values need only a ``.shape``) under ``model``'s
    names: wrapper prefixes dropped, an EMA layout's weights picked
    (:func:`extract_state_dict`). ValueError naming missing / unexpected / mis-shaped keys
    when the checkpoint belongs to another architecture."""
    own = model.state_dict()
    state = extract_state_dict(strip_wrapper_prefixes(raw, own), model, use_ema)
    state = _fill_shared(state, model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        codes = any(k.endswith((".codebook", ".plane0")) for k in unexpected)
        raise ValueError(
            "checkpoint does not match the model architecture: "
            f"missing keys {_head(missing)}; unexpected keys {_head(unexpected)}; "
            f"shape mismatches {_head(shapes)}"
            + ("; it holds quantized layers' codes, not float weights (an otq_kernels "
               "checkpoint loads with otq.load_quantized)" if codes else "")
        )
    return state


def read_float_checkpoint(path_or_state: str | os.PathLike | Mapping) -> dict:
    """The flat {name: tensor} of a state dict, an examples' checkpoint dict or a file."""
    if isinstance(path_or_state, Mapping):
        return _unwrap(path_or_state, "the state dict")
    return _unwrap(_read_file(path_or_state), os.fspath(path_or_state))


def load_fm_checkpoint(
    path_or_state: str | os.PathLike | Mapping,
    model: nn.Module,
    use_ema: bool = True,
) -> nn.Module:
    """Load weights into ``model`` (in place, returned); strict on names and shapes.

    A state dict saved from a ``DistributedDataParallel``/``DataParallel`` or
    ``torch.compile`` wrapper loads as it is (its ``module.``/``_orig_mod.`` prefixes are
    dropped), and a compiled ``model`` is seen through.

    ``model`` may be built under ``torch.device("meta")`` (no random init, no second
    copy): from a file, its tensors take the tensors read for them where dtype and shape
    agree (a state dict passed in is copied, as torch's load does)
    (:mod:`otq_kernels.skeleton`). Raises ValueError naming missing / unexpected /
    mis-shaped keys when the checkpoint belongs to another architecture.
    """
    wrapper, model = model, bare_module(model, "load_fm_checkpoint")
    state = checkpoint_state(read_float_checkpoint(path_or_state), model, use_ema)
    check_loadable(model, "load_fm_checkpoint")
    read = not isinstance(path_or_state, Mapping)  # (a caller's own tensors stay theirs)
    materialize(model, next(iter(state.values())).device if state else torch.device("cpu"),
                adopt=state if read else None)
    model.load_state_dict(state, strict=True)
    return wrapper


def _head(items: list[str], n: int = 8) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return f"{items[:n]}{more}"
