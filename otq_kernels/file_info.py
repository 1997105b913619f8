"""What a safetensors file holds, read without a model (``otq info FILE``).

A quantized checkpoint (:func:`~otq_kernels.save_quantized`) gives a row per weighted
layer, as :func:`~otq_kernels.quantize_model`'s summary prints it (bits, method and
granularity, SQNR and W2 from the metadata; bytes and bits/weight from the tensor
header), and the model's sizes; a float file gives its tensors by dtype. Both say which
architecture the file records. With ``verify`` every tensor is read and checked as
:func:`~otq_kernels.load_quantized` checks it before it needs a model: the checksums, the
aliases, each layer's planes and codebook against its bits and shape.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields

import torch

from .checkpoint import (
    CHECKSUMS,
    FORMAT,
    SAFETENSORS_DTYPES,
    _check_entry,
    _check_format,
    _json,
    _layer_tensors,
    is_safetensors_file,
    layer_stats,
    open_safetensors,
    read_aliases,
    read_tensors,
    verify_checkpoint,
)
from .format import plane_widths
from .summary import LayerSummary, QuantizationSummary, _human, format_summary

__all__ = ["FileInfo", "describe_file"]

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl")


@dataclass
class FileInfo:
    """What :func:`describe_file` found. ``tensors``: safetensors dtype name -> [tensors,
    elements, bytes] as stored; ``summary``: the per-layer rows and model totals (quantized
    files only); ``metadata``: the ``user`` metadata of a quantized file, the metadata
    strings of a float one; ``checked``: what was verified."""

    path: str
    file_bytes: int
    quantized: bool
    format_version: int | None
    otq_version: str | None
    architecture: str
    metadata: dict
    tensors: dict
    summary: QuantizationSummary | None
    checked: str

    def to_dict(self) -> dict:
        """The fields as a dict (not asdict: its recursive deep copy overflowed on
        metadata nested a few hundred levels deep, which json.loads takes)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["summary"] = self.summary.to_dict() if self.summary is not None else None
        return d

    def __str__(self) -> str:
        return format_file_info(self)


# ----------------------------------------------------------------------------- header
def _nbytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def _is_float(entry: dict) -> bool:
    return entry["dtype"].startswith("F") or entry["dtype"] == "BF16"


def _by_dtype(header: dict) -> dict:
    """{dtype: [tensors, elements, bytes]}, dtypes in order of bytes (largest first)."""
    groups: dict = {}
    for entry in header.values():
        group = groups.setdefault(entry["dtype"], [0, 0, 0])
        group[0] += 1
        group[1] += math.prod(entry["shape"])
        group[2] += _nbytes(entry)
    return dict(sorted(groups.items(), key=lambda kv: -kv[1][2]))


def _natural_key(name: str) -> list:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    parts = re.split(r"([0-9]+)", name)  # text, number, text, ...
    return [int(part) if i % 2 else part for i, part in enumerate(parts)]


# ----------------------------------------------------------------------------- rows
def _packed_keys(name: str, bits: int) -> list[str]:
    """The file keys of a quantized layer's packed weight: its planes and codebook."""
    return [f"{name}.plane{i}" for i in range(len(plane_widths(bits)))] + [f"{name}.codebook"]


def _quantized_row(name: str, entry: dict, header: dict) -> LayerSummary:
    nbytes = sum(_nbytes(header[key]) for key in _packed_keys(name, entry["bits"]))
    stats = layer_stats(entry)
    return LayerSummary(name, entry["type"], list(entry["shape"]), "quantized", entry["bits"],
                        entry.get("method"), entry["granularity"],
                        8.0 * nbytes / math.prod(entry["shape"]), stats.get("sqnr_db"),
                        stats.get("w2"), stats.get("mse"), nbytes)


def _own_keys(name: str, header: dict) -> list[str]:
    """The keys of the tensors layer ``name`` holds itself (its parametrizations' too)."""
    prefix = f"{name}." if name else ""  # ('' is the root: the keys without a module)
    return sorted((key for key in header if key.startswith(prefix) and (
        "." not in key[len(prefix):] or key[len(prefix):].startswith("parametrizations."))),
        key=_natural_key)


def _kept_row(name: str, reason: str, header: dict) -> LayerSummary:
    """A layer kept float: its weight's shape and its own tensors' bytes (the file does
    not record its type)."""
    own = _own_keys(name, header)
    matrices = [key for key in own if len(header[key]["shape"]) >= 2 and _is_float(header[key])]
    weight = f"{name}.weight" if f"{name}.weight" in matrices else max(
        matrices, key=lambda key: math.prod(header[key]["shape"]), default=None)  # weight norm's v
    shape = list(header[weight]["shape"]) if weight else []
    return LayerSummary(name, "float", shape, f"kept float ({reason})",
                        nbytes=sum(_nbytes(header[key]) for key in own))


def _totals(layers: dict, header: dict) -> tuple[int, int, int, int]:
    """(parameters, fp32 bytes, fp16 bytes, stored bytes), each stored tensor counted once;
    floating-point tensors other than the packed weights count as parameters."""
    packed = {key for name, entry in layers.items() for key in _packed_keys(name, entry["bits"])}
    params = sum(math.prod(entry["shape"]) for entry in layers.values())
    fp32, fp16, after = 4 * params, 2 * params, 0
    for key, entry in header.items():
        size = _nbytes(entry)
        after += size
        if key in packed:
            continue
        if _is_float(entry):
            numel = math.prod(entry["shape"])
            params, fp32, fp16 = params + numel, fp32 + 4 * numel, fp16 + 2 * numel
        else:
            fp32, fp16 = fp32 + size, fp16 + size
    return params, fp32, fp16, after


def _layer_header(name: str, header: dict) -> dict:
    """{key: meta tensor of the stored shape and dtype} of the tensors layer ``name``
    holds directly (planes, codebook, bias)."""
    tensors = {}
    for key in header:
        if key.startswith(f"{name}.") and "." not in key[len(name) + 1:]:
            dtype = SAFETENSORS_DTYPES.get(header[key]["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} has dtype {header[key]['dtype']}, which no "
                                 "quantized layer stores")
            tensors[key] = torch.empty(header[key]["shape"], dtype=dtype, device="meta")
    return tensors


def _check_layers(layers: dict, kept: dict, named: dict, path) -> None:
    """ValueError for a ``layers`` entry, or its planes', codebook's and bias's stored
    shapes and dtypes, that :func:`~otq_kernels.load_quantized` would refuse; for a name
    both quantized and kept float; for a kept layer that holds no tensor."""
    for name, entry in layers.items():
        try:
            _check_entry(name, entry)
            _layer_tensors(name, entry, _layer_header(name, named))
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    for name in kept:
        if name in layers:
            raise ValueError(f"{path}: layer {name!r} is listed both as quantized and as "
                             "kept float: the file is corrupt")
        if not _own_keys(name, named):
            raise ValueError(f"{path}: layer {name!r} is listed as kept float but the file "
                             "holds no tensor of it: the file is corrupt")


def _summary(meta: dict, header: dict, path) -> QuantizationSummary:
    """The per-layer rows (in name order, numbers compared as numbers) and the totals of a
    quantized checkpoint, from its metadata and tensor header (checked: see
    :func:`_check_layers`)."""
    layers, kept = _json(meta, "layers", path), _json(meta, "kept_float", path)
    aliases = read_aliases(meta, header, path)
    named = {**header, **{alias: header[stored] for alias, stored in aliases.items()}}
    _check_layers(layers, kept, named, path)
    rows = [_quantized_row(name, entry, named) for name, entry in layers.items()]
    rows += [_kept_row(name, str(reason), named) for name, reason in kept.items()]
    rows.sort(key=lambda row: _natural_key(row.name))
    return QuantizationSummary(rows, *_totals(layers, header))


# ----------------------------------------------------------------------------- checks
def _verify(path, read: tuple[dict, dict]) -> str:
    """What :func:`~otq_kernels.checkpoint.verify_checkpoint` checked."""
    meta = verify_checkpoint(path, read)
    sums = "checksums match" if CHECKSUMS in meta else "no checksums (an older file)"
    return (f"every tensor read: {sums}; every layer's planes and codebook fit its bits "
            "and shape")


def _architecture(meta: dict) -> str:
    """Which architecture the metadata records, as ``otq sample --checkpoint`` reads it."""
    from .models import config_names

    name = meta.get("config")
    if meta.get("config_kwargs"):
        return f"{f'config {name!r}, ' if name else ''}UNet arguments recorded (config_kwargs)"
    if name in config_names():
        return f"config {name!r} (bundled)"
    missing = f"config {name!r} is not a bundled one" if name else "not recorded"
    return f"{missing}: loading it needs --config"


# ----------------------------------------------------------------------------- entry point
def _refuse_bare_codes(header: dict, path) -> None:
    """ValueError for a file without otq metadata that holds quantized layers' tensors (a
    quantized model's state dict written by safetensors' own save_file/save_model): it is
    no float file, and no checkpoint otq can load (the layers' bits and shapes are not
    recorded)."""
    layers = sorted(name for name in (key.removesuffix(".codebook") for key in header
                                      if key.endswith(".codebook"))
                    if header.get(f"{name}.plane0", {}).get("dtype") == "I32")
    if layers:
        raise ValueError(f"{path}: holds quantized layers' codes ({', '.join(layers[:4])}"
                         f"{', ...' if len(layers) > 4 else ''}) without otq_kernels metadata: "
                         "a quantized state dict written by safetensors' own save_file/"
                         "save_model, which records no layer's bits or shape. Write it with "
                         "otq.save_quantized, or load it into the same quantized model with "
                         "load_state_dict")


def describe_file(path: str | os.PathLike, verify: bool = True) -> FileInfo:
    """What the safetensors file ``path`` holds (see the module docstring).

    verify: also read every tensor of a quantized file and check the checksums, aliases
    and codebook values (a float file has nothing beyond its header to check); the stored
    shapes and dtypes of each layer's planes, codebook and bias are checked either way.
    Raises FileNotFoundError, or ValueError naming what is wrong for a file that is not
    a safetensors file or a quantized checkpoint that is corrupt.
    """
    path = os.fspath(path)
    if path.lower().endswith(PICKLE_SUFFIXES) and os.path.isfile(path) and not (
            is_safetensors_file(path)):
        raise ValueError(f"{path}: otq info reads safetensors files only (this name is a "
                         "pickle's, which otq never unpickles to inspect)")
    with open_safetensors(path) as (data_start, header, meta, file):  # (one open: a file
        # renamed over path meanwhile is not mixed in)
        file_bytes = os.fstat(file.fileno()).st_size
        read = (meta, read_tensors(file, data_start, header)) if (
            verify and meta.get("format") == FORMAT) else None
    base = dict(path=path, file_bytes=file_bytes, tensors=_by_dtype(header))
    if meta.get("format") != FORMAT:
        _refuse_bare_codes(header, path)
        return FileInfo(quantized=False, format_version=None, otq_version=None,
                        architecture=_architecture(meta), metadata=meta, summary=None,
                        checked="header (offsets inside the file, known dtypes)", **base)
    _check_format(meta, path)
    checked = "header and metadata (tensors not read)"
    if verify:  # first: damaged metadata is reported as such
        checked = _verify(path, read)
    summary = _summary(meta, header, path)
    user = _json(meta, "user", path)
    return FileInfo(quantized=True, format_version=int(meta["format_version"]),
                    otq_version=meta.get("otq_version"), architecture=_architecture(user),
                    metadata=user, summary=summary, checked=checked, **base)


# ----------------------------------------------------------------------------- printing
def _dtype_line(tensors: dict) -> str:
    return "; ".join(f"{dtype} {n} ({elements:,} elements, {_human(nbytes)})"
                     for dtype, (n, elements, nbytes) in tensors.items())


def format_file_info(info: FileInfo) -> str:
    """The printable report: what the file is, its architecture and checks, then the
    layer table (quantized) or the parameter count (float)."""
    if info.quantized:
        what = (f"otq_kernels quantized checkpoint, format version {info.format_version}, "
                f"written by otq_kernels {info.otq_version or '(unknown)'}")
    else:
        what = "float safetensors file (not an otq_kernels checkpoint)"
    lines = [f"{info.path}: {what}; {_human(info.file_bytes)}",
             f"architecture: {info.architecture}"]
    others = {k: v for k, v in info.metadata.items() if k not in ("config", "config_kwargs")}
    if others:
        lines.append("metadata: " + ", ".join(f"{k}={v}" for k, v in others.items()))
    lines += [f"checked: {info.checked}", f"tensors: {_dtype_line(info.tensors)}"]
    if info.summary is not None:
        lines += ["", format_summary(info.summary)]
    else:
        params = sum(e for dtype, (_, e, _) in info.tensors.items()
                     if dtype.startswith("F") or dtype == "BF16")
        lines.append(f"floating-point parameters: {params:,}; quantize it with `otq quantize "
                     f"--checkpoint {info.path} -o OUT.safetensors` (--config NAME where "
                     "the architecture is not recorded)")
    return "\n".join(lines)
