"""Save and load quantized models as safetensors (never pickle).

File layout (format ``otq_kernels.quantized``, version 1, or 2 where ``aliases`` is set):

* tensors: the quantized model's full ``state_dict()``: for each quantized layer
  ``<layer>.plane<i>`` (int32 bit planes, DESIGN §2), ``<layer>.codebook`` (float32
  [G, 2**bits]) and ``<layer>.bias``; every other parameter and buffer under its own name;
  a tensor the model holds under several names (a shared layer, tied weights) is stored
  once, under its first name, and ``aliases`` (JSON: ``{other name: stored name}``, version
  2) names the others;
* metadata (strings): ``format``, ``format_version``, ``otq_version``, ``layers`` (JSON:
  ``{name: {type, bits, method, granularity, shape, bias, stats}}``), ``kept_float`` (JSON:
  ``{name: reason}``), ``user`` (JSON: whatever the caller passed, e.g. the model config)
  and ``checksums`` (JSON: ``{tensor key: CRC-32, "__metadata__": CRC-32 of the other
  metadata}``, 8 hex digits each; files written before it are read without the check).

:func:`load_quantized` loads into a *float* skeleton of the same architecture (or an
already-quantized one), swapping the listed layers to Quant* modules. Everything is
validated before the model is touched; problems raise ValueError naming the layer or key.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import struct
import tempfile
import zlib
from collections import Counter

import torch
from torch import nn
from torch.nn.utils import parametrize

from .fast_paths import kept_float_reason, sync_fast_paths
from .format import GRANULARITIES, QuantizedTensor, check_bits, is_number, plane_widths
from .modules import (
    QuantConv1d,
    QuantConv2d,
    QuantLinear,
    _QuantModule,
    bare_module,
    computed_tensors,
    containing_names,
    dense_dtype,
    module_aliases,
    replace_module,
)
from .sharing import memory_key
from .skeleton import check_loadable, check_shaped, materialize
from .summary import kept_float_reasons, quantization_summary

__all__ = ["FORMAT", "FORMAT_VERSION", "load_quantized", "read_metadata", "save_quantized"]

FORMAT = "otq_kernels.quantized"
FORMAT_VERSION = 2  # the newest this writes and reads; files without aliases are version 1
ALIASES_VERSION = 2
QUANT_CLASSES = {c.__name__: c for c in (QuantLinear, QuantConv1d, QuantConv2d)}
CHECKSUMS = "checksums"
ALIASES = "aliases"
METADATA_CHECKSUM = "__metadata__"


# ----------------------------------------------------------------------------- checksums
def _crc32(data) -> str:
    return format(zlib.crc32(data), "08x")


def _tensor_crc32(t: torch.Tensor) -> str:
    """CRC-32 of a CPU tensor's bytes (any dtype, any shape)."""
    return _crc32(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def _metadata_crc32(meta: dict) -> str:
    """CRC-32 of the metadata strings other than the checksums themselves."""
    others = {k: v for k, v in meta.items() if k != CHECKSUMS}
    return _crc32(json.dumps(others, sort_keys=True).encode())


def _checksums(meta: dict, tensors: dict) -> str:
    """The ``checksums`` metadata string of a file with these metadata and tensors."""
    sums = {key: _tensor_crc32(t) for key, t in tensors.items()}
    sums[METADATA_CHECKSUM] = _metadata_crc32(meta)
    return json.dumps(sums)


def _verify_checksums(meta: dict, tensors: dict, path) -> None:
    """ValueError naming the first tensor (or the metadata) whose bytes differ from the
    CRC-32 saved with it; files without ``checksums`` (written before them) pass."""
    if CHECKSUMS not in meta:
        return
    sums = _json(meta, CHECKSUMS, path)
    listed = set(sums) - {METADATA_CHECKSUM}
    if listed != set(tensors):
        raise ValueError(f"{path}: the tensors differ from those the checksums list "
                         f"(missing {sorted(listed - set(tensors))[:8]}, unlisted "
                         f"{sorted(set(tensors) - listed)[:8]}): the file is corrupt")
    if sums.get(METADATA_CHECKSUM) != _metadata_crc32(meta):
        raise ValueError(f"{path}: the metadata do not match their checksum: the file is "
                         "corrupt")
    for key, t in tensors.items():
        if sums[key] != _tensor_crc32(t):
            raise ValueError(f"{path}: tensor {key!r} does not match its checksum: the file "
                             "is corrupt")


# ----------------------------------------------------------------------------- save
def _layer_meta(module: _QuantModule) -> dict:
    stats = {k: (None if isinstance(v, float) and math.isinf(v) else v)
             for k, v in module.stats.items()}
    return {"type": type(module).__name__, "bits": module.bits, "method": module.method,
            "granularity": module.granularity, "shape": list(module.weight_shape),
            "bias": module.bias is not None, "stats": stats}


def _check_argument_order(signature: str, model, path) -> None:
    """TypeError for a model passed as the path and a path as the model."""
    if isinstance(path, nn.Module) and isinstance(model, (str, os.PathLike)):
        raise TypeError(f"{signature}: the model and the path are swapped")


def save_quantized(model: nn.Module, path: str | os.PathLike, metadata: dict | None = None):
    """Write ``model`` (after :func:`otq_kernels.quantize_model`) to a safetensors file.

    metadata: optional JSON-serialisable dict stored under ``user`` (e.g. the config
    needed to rebuild the float skeleton). Returns the path.
    """
    from . import __version__

    _check_argument_order("save_quantized(model, path)", model, path)
    model = bare_module(model, "save_quantized")  # the names a bare model has
    layers = {name: _layer_meta(m) for name, m in model.named_modules()
              if isinstance(m, _QuantModule)}
    if not layers:
        raise ValueError("model has no quantized layers; call otq.quantize_model first")
    if "" in layers:
        raise ValueError("the root module itself is quantized; wrap it in nn.Sequential")
    user = _user_json(metadata)
    state = model.state_dict()
    _check_savable(state, model)
    stored, aliases = _stored_names(state)
    tensors = _file_tensors(stored)
    meta = {
        "format": FORMAT,
        "format_version": str(ALIASES_VERSION if aliases else 1),
        "otq_version": __version__,
        "layers": json.dumps(layers),
        "kept_float": json.dumps(kept_float_reasons(model)),
        "user": user,
    }
    if aliases:
        meta[ALIASES] = json.dumps(aliases)
    meta[CHECKSUMS] = _checksums(meta, tensors)
    _write_atomically(tensors, meta, os.fspath(path))
    return path


def _write_atomically(tensors: dict, meta: dict, path: str) -> None:
    """``save_file`` into a hidden file beside ``path`` (through a symlink, beside its
    target), its metadata put in key order, then renamed over it: an interrupted or
    failed write leaves no partial file under ``path`` and keeps what was there, and equal
    models give equal bytes (safetensors writes its metadata in a hash map's order, a new
    one each save). The file gets the mode the umask gives (safetensors makes 0600).
    OSError naming ``path`` when it cannot be written, or names a directory, a device or a
    pipe (a rename would replace it: `-o /dev/null` as root)."""
    target, partial = os.path.realpath(path), None
    try:
        if path.endswith((os.sep, "/")) or os.path.isdir(target):
            raise IsADirectoryError(errno.EISDIR, "it names a directory")
        if os.path.exists(target) and not os.path.isfile(target):
            raise OSError("it is not a regular file (a device or a pipe)")
        fd, partial = tempfile.mkstemp(dir=os.path.dirname(target), prefix=".otq-save-",
                                       suffix=".partial")
        os.close(fd)
        _save_file(tensors, meta, partial)
        _sort_metadata(partial)
        with contextlib.suppress(OSError):  # (a file system without modes keeps its own)
            os.chmod(partial, 0o666 & ~_umask())
        os.replace(partial, target)
        partial = None
    except OSError as err:
        raise OSError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        if partial is not None:
            with contextlib.suppress(OSError):
                os.unlink(partial)


def _umask() -> int:
    """The process's umask, read without setting it (Linux's /proc; else set and put
    back, which leaves a moment another thread's new file would take umask 0)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), \
            open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


def _save_file(tensors: dict, meta: dict, path: str) -> None:
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=meta)
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors wraps I/O errors in its own type
        raise OSError(str(err)) from None


def _sort_metadata(path: str) -> None:
    """Rewrite the safetensors header of ``path`` in place with its metadata keys sorted
    (the same JSON in another order: as long, or shorter and padded with spaces, as the
    format allows)."""
    with open(path, "r+b") as file:
        size = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) <= size:
            file.seek(8)
            file.write(text.ljust(size))


def _user_json(metadata) -> str:
    """The ``user`` metadata string: a JSON object, or ValueError saying what is wrong."""
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        return json.dumps(metadata or {}, allow_nan=False)  # (NaN/Infinity are not JSON)
    except (TypeError, ValueError) as err:
        raise ValueError(f"metadata must hold JSON values only (str, finite numbers, lists, "
                         f"dicts): {err}") from None


def _file_tensors(stored: dict) -> dict:
    """The tensors to write: contiguous CPU ones, copied only where they must be (from
    another device, non-contiguous, or sharing memory with another, which safetensors
    refuses): a model on the CPU is not held twice while it is written."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in stored.items()}
    owners = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    return {k: t.clone() if owners[t.untyped_storage().data_ptr()] > 1 else t
            for k, t in tensors.items()}


def _check_savable(state: dict, model: nn.Module) -> None:
    """ValueError for a quantized layer whose file could not be loaded: one of another
    class (a subclass, or one torch's parametrize made), or whose codes the state dict
    lacks (a buffer made non-persistent, a state-dict hook)."""
    for name, module in model.named_modules():
        if not isinstance(module, _QuantModule):
            continue
        if parametrize.is_parametrized(module):
            names = list(module.parametrizations.keys())
            raise ValueError(f"layer {name!r}: its {names} are parametrized; a file holds "
                             "plain tensors: torch.nn.utils.parametrize."
                             "remove_parametrizations(layer, name) first (its default, "
                             "leave_parametrized=True, keeps the values they compute)")
        computed = computed_tensors(module)
        if computed:
            raise ValueError(f"layer {name!r}: its {computed} are computed by "
                             "a forward pre-hook (pruning); a file holds plain tensors: "
                             "torch.nn.utils.prune.remove(layer, name) first")
        if QUANT_CLASSES.get(type(module).__name__) is not type(module):
            raise ValueError(f"layer {name!r}: a {type(module).__name__}, which "
                             "load_quantized cannot build (it builds "
                             f"{', '.join(QUANT_CLASSES)} layers only)")
        missing = [k for k in module._code_dtypes() if f"{name}.{k}" not in state]
        if missing:
            raise ValueError(f"layer {name!r}: {missing} missing from the model's "
                             "state_dict (a buffer made non-persistent?): the file "
                             "could not be loaded")


def _stored_names(state: dict) -> tuple[dict, dict]:
    """(the tensors to store: {name: tensor}, aliases: {name: stored name}) of a state
    dict: a tensor found under several names (the same view of the same memory) is stored
    under the first only."""
    stored, first_name, aliases = {}, {}, {}
    for name, t in state.items():
        view = memory_key(t)
        if view in first_name:
            aliases[name] = first_name[view]
        else:
            stored[name] = t
            first_name[view] = name
    return stored, aliases


# ----------------------------------------------------------------------------- read
# safetensors' dtype names (little-endian) -> torch's, where this torch has them
# (one element per item; packed ones, F4 say, are read by safetensors: StoredTensor)
SAFETENSORS_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"),
    ("I64", "int64"), ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"),
    ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("BOOL", "bool"),
    ("C64", "complex64"), ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"), ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("F8_E8M0", "float8_e8m0fnu")) if hasattr(torch, attr)}


@contextlib.contextmanager
def open_safetensors(path):
    """(offset of the data, {name: {"dtype", "shape", "data_offsets"}}, metadata strings in
    key order, the open file) of a safetensors file, opened once: a file renamed over
    ``path`` meanwhile (an atomic save) is not mixed in, and the tensors read from it
    (:class:`StoredTensor`) are copies, not the file's pages mapped into the process (a
    file overwritten in place changed a loaded model's weights; a truncated one killed
    it). safetensors checks the header first (offsets inside the file, known dtypes).
    FileNotFoundError, or ValueError for a file that is not one."""
    path = require_file(path)
    with open(path, "rb") as file:
        metadata = _checked_metadata(file, path)
        file.seek(0)
        size = struct.unpack("<Q", file.read(8))[0]
        header = json.loads(file.read(size))
        header.pop("__metadata__", None)
        yield 8 + size, header, metadata, file


def _same_file(file) -> str:
    """A path that opens the file ``file`` has open (/proc/self/fd), else its name."""
    same = f"/proc/self/fd/{file.fileno()}"
    return same if os.path.exists(same) else file.name


def _checked_metadata(file, path: str) -> dict:
    """The metadata strings of the open safetensors ``file``, in key order, after
    safetensors has checked its header (through the same open file where the system
    names one); ValueError for a file that is not one."""
    from safetensors import safe_open

    try:
        with safe_open(_same_file(file), framework="pt", device="cpu") as f:
            return dict(sorted((f.metadata() or {}).items()))
    except Exception as err:  # safetensors raises its own error types (header, truncation)
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                         f"{err}") from None


class StoredTensor:
    """One tensor of an open safetensors file (:func:`open_safetensors`), read when asked
    for with ``to`` into memory of its own (a dtype outside SAFETENSORS_DTYPES through
    safetensors, from the same open file, copied)."""

    def __init__(self, file, data_start: int, key: str, entry: dict):
        self.file, self.key, self.dtype = file, key, SAFETENSORS_DTYPES.get(entry["dtype"])
        self.shape = torch.Size(entry["shape"])
        begin, end = entry["data_offsets"]
        self.offset, self.nbytes = data_start + begin, end - begin
        self._read = None if self.dtype is not None else self._by_safetensors(entry["dtype"])
        if self._read is not None:
            self.dtype, self.shape = self._read.dtype, self._read.shape  # (F4: 2 per byte)
        elif self.nbytes != self.shape.numel() * self.dtype.itemsize:
            raise ValueError(f"{file.name}: tensor {key!r} holds {self.nbytes} bytes, not "
                             f"those of {entry['dtype']} {list(self.shape)} (the file changed "
                             "while it was read?)")

    def _by_safetensors(self, dtype: str) -> torch.Tensor:
        """The tensor read now by safetensors (a packed dtype), copied; ValueError naming
        a dtype it cannot give torch."""
        from safetensors import safe_open

        try:
            with safe_open(_same_file(self.file), framework="pt", device="cpu") as f:
                return f.get_tensor(self.key).clone()
        except Exception as err:  # (safetensors' own error types)
            raise ValueError(f"{self.file.name}: tensor {self.key!r} has dtype {dtype!r}, "
                             f"which this torch cannot hold ({err})") from None

    def to(self, device: torch.device | str) -> torch.Tensor:
        if self._read is not None:
            return self._read.to(device)
        data = torch.empty(self.nbytes, dtype=torch.uint8, device="cpu")
        self.file.seek(self.offset)
        if self.file.readinto(data.numpy()) != self.nbytes:
            raise ValueError(f"{self.file.name}: tensor {self.key!r} is cut short (the file "
                             "changed while it was read?)")
        return data.view(self.dtype).reshape(self.shape).to(device)


def require_file(path) -> str:
    """``path`` as a string: FileNotFoundError where nothing is there, ValueError for a
    directory, a pipe or a device (a read of those would block or never end)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a regular file")
    return path


def reads_as_safetensors(path) -> bool:
    """Whether the readers take ``path`` as a safetensors file: by its name (any case; a
    damaged one then says what is wrong with it) or by its first bytes."""
    return os.fspath(path).lower().endswith(".safetensors") or is_safetensors_file(path)


def is_safetensors_file(path) -> bool:
    """Whether ``path`` is a regular file that starts as a safetensors file does (an 8-byte
    header length within the file, then ``{``), whatever its name: ``Q.SAFETENSORS``, a
    name without a suffix, or a ``.pt`` that ``otq quantize -o`` was given."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as file:
        head = file.read(9)
    return (len(head) == 9 and head[8:] == b"{"
            and struct.unpack("<Q", head[:8])[0] <= os.path.getsize(path) - 8)


def read_safetensors(path) -> tuple[dict, dict]:
    """(metadata strings, tensors) of a safetensors file, read through one open file into
    memory of their own (:func:`open_safetensors`); ValueError if it is not one."""
    with open_safetensors(path) as (data_start, header, metadata, file):
        return metadata, read_tensors(file, data_start, header)


def read_tensors(file, data_start: int, header: dict) -> dict:
    """{name: tensor} of every tensor the header of the open safetensors ``file`` lists,
    in name order, read into memory of their own (:class:`StoredTensor`)."""
    return {key: StoredTensor(file, data_start, key, header[key]).to("cpu")
            for key in sorted(header)}


def read_safetensors_metadata(path) -> dict:
    """The metadata strings of a safetensors file, in key order (its header checked, no
    tensor read); ValueError if it is not one."""
    with open_safetensors(path) as (_, _, metadata, _):
        return metadata


def _json(meta: dict, key: str, path) -> dict:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err})") from None
    except RecursionError:
        raise ValueError(f"{path}: metadata {key!r} is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def _check_format(meta: dict, path) -> None:
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not an otq_kernels quantized checkpoint (metadata 'format' "
                         f"is {meta.get('format')!r}, expected {FORMAT!r})")
    version = meta.get("format_version")
    if version not in [str(v) for v in range(1, FORMAT_VERSION + 1)]:
        raise ValueError(f"{path}: unknown format_version {version!r} (this otq_kernels reads "
                         f"versions 1 to {FORMAT_VERSION}); upgrade otq_kernels")
    if ALIASES in meta and version != str(ALIASES_VERSION):
        raise ValueError(f"{path}: metadata {ALIASES!r} in a version {version} file: the file "
                         "is corrupt")


def read_aliases(meta: dict, stored, path) -> dict[str, str]:
    """The metadata's ``aliases`` ({other name: stored name}), each checked to bind a name
    that is not among ``stored`` (the file's tensor names) to one that is; ValueError
    else."""
    aliases = _json(meta, ALIASES, path)
    for alias, name in aliases.items():
        if not isinstance(name, str) or alias in stored or name not in stored:
            raise ValueError(f"{path}: alias {alias!r} -> {name!r} must name a stored tensor "
                             "under a name that is not stored: the file is corrupt")
    return aliases


def _add_aliases(meta: dict, tensors: dict, path) -> dict:
    """``tensors`` with each name of ``aliases`` bound to the tensor it names (stored once
    in the file under that name); ValueError for an alias that is not one."""
    aliases = read_aliases(meta, tensors, path)
    return {**tensors, **{alias: tensors[name] for alias, name in aliases.items()}}


def _read_checkpoint(path) -> tuple[dict, dict]:
    """(metadata strings, tensors under every name the model holds them) of a quantized
    checkpoint, its format and checksums checked; ValueError else."""
    return _checked_checkpoint(*read_safetensors(path), path)


def _checked_checkpoint(meta: dict, tensors: dict, path) -> tuple[dict, dict]:
    """:func:`_read_checkpoint` of metadata and tensors already read."""
    _check_format(meta, path)
    _verify_checksums(meta, tensors, path)
    return meta, _add_aliases(meta, tensors, path)


def read_metadata(path: str | os.PathLike) -> dict:
    """Parsed metadata of a quantized checkpoint: format, version, layers, kept_float, user."""
    meta, _ = _read_checkpoint(path)
    return {"format": meta["format"], "format_version": int(meta["format_version"]),
            "otq_version": meta.get("otq_version"), "layers": _json(meta, "layers", path),
            "kept_float": _json(meta, "kept_float", path), "user": _json(meta, "user", path)}


# ----------------------------------------------------------------------------- load
def _check_entry(name: str, entry) -> type[_QuantModule]:
    """Validate one ``layers`` entry; returns the Quant* class."""
    if not isinstance(entry, dict):
        raise ValueError(f"layer {name!r}: metadata entry must be an object")
    cls = QUANT_CLASSES.get(entry.get("type")) if isinstance(entry.get("type"), str) else None
    if cls is None:
        raise ValueError(f"layer {name!r}: unknown layer type {entry.get('type')!r}")
    try:
        check_bits(entry.get("bits"))
    except ValueError as err:
        raise ValueError(f"layer {name!r}: {err}") from None
    if entry.get("granularity") not in GRANULARITIES:
        raise ValueError(f"layer {name!r}: bad granularity {entry.get('granularity')!r}")
    if not isinstance(entry.get("method", ""), str):
        raise ValueError(f"layer {name!r}: method {entry.get('method')!r} is not a name")
    shape = entry.get("shape")
    ndim = {QuantLinear: 2, QuantConv1d: 3, QuantConv2d: 4}[cls]
    if (not isinstance(shape, list) or len(shape) != ndim
            or not all(isinstance(s, int) and s > 0 for s in shape)):
        raise ValueError(f"layer {name!r}: shape {shape!r} is not a valid {ndim}-D weight shape")
    stats = entry.get("stats") or {}
    if not isinstance(stats, dict) or not all(v is None or is_number(v) for v in stats.values()):
        raise ValueError(f"layer {name!r}: stats {stats!r} must map names to numbers")
    return cls


def _target(model: nn.Module, name: str, cls: type[_QuantModule], entry: dict) -> nn.Module:
    """The skeleton's module called ``name``, checked for type, weight shape and bias."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"layer {name!r} from the checkpoint is missing in the model") from None
    if isinstance(module, cls):
        shape = list(module.weight_shape)
    elif isinstance(module, cls.FLOAT_TYPE):
        _check_replaceable(model, name, module, cls)
        shape = list(module.weight.shape)
    else:
        raise ValueError(f"layer {name!r}: checkpoint has {entry['type']} but the model has "
                         f"{type(module).__name__} (expected {cls.FLOAT_TYPE.__name__})")
    if shape != entry["shape"]:
        raise ValueError(f"layer {name!r}: weight shape {entry['shape']} in the checkpoint, "
                         f"{shape} in the model")
    if (module.bias is not None) != bool(entry.get("bias")):
        raise ValueError(f"layer {name!r}: bias presence differs between checkpoint and model")
    return module


def _check_replaceable(model: nn.Module, name: str, module: nn.Module, cls) -> None:
    """ValueError for a float layer that quantize_model keeps float (a subclass with its
    own forward, a layer its parent uses functionally): swapped for the file's codes, it
    would drop what that forward adds, or break its parent's first call."""
    parent = model.get_submodule(name.rpartition(".")[0])
    reason = kept_float_reason(parent)
    if type(module).forward is not cls.FLOAT_TYPE.forward:
        reason = f"{type(module).__name__} overrides forward"
    if reason:
        raise ValueError(f"layer {name!r}: the checkpoint holds it quantized, but this model "
                         f"keeps it float ({reason}); the file belongs to another model")


def _tensor(tensors: dict, key: str, dtype: torch.dtype) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"tensor {key!r} is missing from the checkpoint")
    t = tensors[key]
    if t.dtype != dtype:
        raise ValueError(f"tensor {key!r} has dtype {t.dtype}, expected {dtype}")
    return t


def _quantized_tensor(name: str, entry: dict, tensors: dict) -> QuantizedTensor:
    """Rebuild the layer's QuantizedTensor, validating plane/codebook shapes and dtypes."""
    planes = [_tensor(tensors, f"{name}.plane{i}", torch.int32)
              for i in range(len(plane_widths(entry["bits"])))]
    extra = f"{name}.plane{len(planes)}"
    if extra in tensors:
        raise ValueError(f"tensor {extra!r}: too many bit planes for bits={entry['bits']}")
    codebook = _tensor(tensors, f"{name}.codebook", torch.float32)
    if not codebook.is_meta and not bool(torch.isfinite(codebook).all()):
        raise ValueError(f"tensor {name + '.codebook'!r} contains NaN/Inf")
    try:
        return QuantizedTensor(planes, codebook, entry["bits"], tuple(entry["shape"]),
                               entry["granularity"], str(entry.get("method", "unknown")))
    except ValueError as err:
        raise ValueError(f"layer {name!r}: tensors inconsistent with bits={entry['bits']}, "
                         f"shape={entry['shape']}: {err}") from None


def layer_stats(entry: dict) -> dict:
    """A ``layers`` entry's stats as the layer holds them (JSON's null back to inf)."""
    return {k: (math.inf if v is None else v) for k, v in (entry.get("stats") or {}).items()}


def _build(module: nn.Module, cls, qt: QuantizedTensor, bias, entry: dict,
           backend: str | None):
    """The quantized layer of ``qt`` replacing skeleton layer ``module``; its bias takes
    the skeleton's bias dtype where it has one, as torch's load_state_dict copies into
    the model's dtypes (the file's was kept: a float16 skeleton got float32 biases)."""
    theirs = getattr(module, "bias", None)
    if bias is not None and isinstance(theirs, torch.Tensor) and theirs.is_floating_point():
        bias = bias.to(theirs.dtype)
    if backend is None:
        backend = module.backend if isinstance(module, _QuantModule) else "auto"
    layer = cls.replacing(module, qt, bias, backend)
    layer.stats = layer_stats(entry)
    return layer


def _bias(name: str, entry: dict, tensors: dict) -> torch.Tensor | None:
    if not entry.get("bias"):
        return None
    key = f"{name}.bias"
    if key not in tensors:
        raise ValueError(f"tensor {key!r} is missing from the checkpoint")
    bias = tensors[key]
    if not bias.is_floating_point() or list(bias.shape) != entry["shape"][:1]:
        raise ValueError(f"tensor {key!r} must be float {entry['shape'][:1]}, got "
                         f"{bias.dtype} {list(bias.shape)}")
    return bias


def _layer_tensors(name: str, entry: dict, tensors: dict):
    """(QuantizedTensor, bias or None) of a checked ``layers`` entry, the tensors validated
    against its bits and shape (meta tensors: their shapes and dtypes only)."""
    return _quantized_tensor(name, entry, tensors), _bias(name, entry, tensors)


def verify_checkpoint(path: str | os.PathLike, read: tuple[dict, dict] | None = None) -> dict:
    """Read every tensor of a quantized checkpoint and check what :func:`load_quantized`
    checks before it needs a model: format, checksums, aliases, each layer's entry and its
    planes, codebook and bias. ``read``: its (metadata, tensors) already read. Returns the
    metadata strings; ValueError naming the file and what is wrong."""
    meta, tensors = _checked_checkpoint(*read, path) if read else _read_checkpoint(path)
    for name, entry in _json(meta, "layers", path).items():
        try:
            _check_entry(name, entry)
            _layer_tensors(name, entry, tensors)
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
    return meta


def _check_shared_in_file(model: nn.Module, layers: dict, file_aliases: dict, path) -> None:
    """ValueError where the file quantized one module held under two names (a shared
    layer: listed once, its codes aliased) that the model holds as two modules."""
    for alias, stored in file_aliases.items():
        other, _, key = alias.rpartition(".")
        first = stored.rpartition(".")[0]
        if key != "codebook" or first not in layers or other in layers:
            continue
        with contextlib.suppress(AttributeError):
            if model.get_submodule(first) is not model.get_submodule(other):
                raise ValueError(f"{path}: layers {first!r} and {other!r} are one module in "
                                 "the checkpoint (shared), but two in the model; share it in "
                                 "the skeleton too")


def _float_again(model: nn.Module, aliases: dict, swapped: dict, tensors: dict) -> list:
    """(names, float layer) for each of a quantized skeleton's layers that the file holds
    float (a layer ``otq quantize --exclude``d), on the meta device until loaded: in the
    skeleton's dtype (its bias's, else the model's first float parameter's), as
    load_state_dict keeps a model's dtypes, and layers whose file weight is one tensor
    (tied weights) sharing one parameter again."""
    swaps, weights = [], {}  # weights: id(file weight) -> the first float layer's parameter
    for module in {id(m): m for m in model.modules()}.values():
        names = aliases[id(module)]
        weight = tensors.get(f"{names[0]}.weight")
        if not isinstance(module, _QuantModule) or id(module) in swapped or (
                weight is None or not weight.is_floating_point()):
            continue
        layer = module.float_shell(dense_dtype(module, model), torch.device("meta"),
                                   share_hooks=True)
        layer.weight = weights.setdefault(id(weight), layer.weight)
        swaps.append((names, layer))
    return swaps


def _expected_state(model: nn.Module, swaps: list) -> dict:
    """The model's state dict as it will be after the swaps (without touching the model);
    swaps: (names of one module, its replacement)."""
    replaced = {name: layer for names, layer in swaps for name in names}
    own = {k: v for k, v in model.state_dict().items()
           if replaced.keys().isdisjoint(containing_names(k))}
    for name, layer in replaced.items():
        own.update({f"{name}.{k}": v for k, v in layer.state_dict().items()})
    return own


def _check_rest(own: dict, tensors: dict, path) -> None:
    """Key sets equal; every tensor's shape equal and dtype kind compatible."""
    missing, unexpected = sorted(set(own) - set(tensors)), sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model: missing keys "
                         f"{missing[:8]}, unexpected keys {unexpected[:8]}")
    for key, value in own.items():
        t = tensors[key]
        if tuple(t.shape) != tuple(value.shape):
            raise ValueError(f"tensor {key!r} has shape {list(t.shape)}, the model expects "
                             f"{list(value.shape)}")
        if t.is_floating_point() != value.is_floating_point() or t.dtype == torch.bool:
            raise ValueError(f"tensor {key!r} has dtype {t.dtype}, the model expects "
                             f"{value.dtype}")


def usable_device(device) -> torch.device:
    """``torch.device(device)`` where this torch and machine can hold values; else a
    one-line ValueError ("device 'mps': ..." or "the meta device (it holds no values)")."""
    try:
        device = torch.device(device)
        torch.empty(0, device=device)  # a GPU the build or machine lacks fails here
    except (RuntimeError, AssertionError) as err:  # (torch's two kinds for these)
        first = (str(err).strip() or type(err).__name__).splitlines()[0]
        raise ValueError(f"device {str(device)!r}: {first.split('. ')[0]}") from None
    if device.type == "meta":
        raise ValueError("the meta device (it holds no values)")
    return device


def load_device(model: nn.Module, device, path) -> torch.device:
    """``device``, else the model's (CPU for a skeleton on the meta device); ValueError
    for one that cannot hold the weights, before the model is touched."""
    if device is not None:
        try:
            return usable_device(device)
        except ValueError as err:
            raise ValueError(f"{path}: cannot load onto {err}") from None
    for t in list(model.parameters()) + list(model.buffers()):
        return torch.device("cpu") if t.is_meta else t.device
    return torch.device("cpu")


def load_quantized(path: str | os.PathLike, model: nn.Module, backend: str | None = None,
                   device=None) -> nn.Module:
    """Load a :func:`save_quantized` file into ``model`` (a float skeleton), in place.

    The layers listed in the file are swapped for Quant* modules (using ``backend``;
    default: a quantized skeleton layer's own, else "auto"), then every tensor is loaded
    strictly. ``device``: where to put the weights (default: the
    model's, CPU for a skeleton on the meta device; the model is moved there). A skeleton
    built under ``torch.device("meta")`` allocates no float weights (:mod:`.skeleton`).
    Returns ``model`` with ``model.otq_summary``; a ``torch.compile`` or
    (Distributed)DataParallel wrapper is seen through, on saving too, so files are named
    like the bare model.

    Raises ValueError naming the layer or key for a corrupt/truncated file (a tensor or
    the metadata whose CRC-32 differs from the one saved with them included), an unknown
    format version, tensors whose shapes/dtypes disagree with the metadata, or a model of
    another architecture; the model is only modified once everything has been validated.
    """
    _check_argument_order("load_quantized(path, model)", model, path)
    wrapper, model = model, bare_module(model, "load_quantized", swaps=True)
    check_shaped(model, "loading")
    meta, tensors = _read_checkpoint(path)
    layers = _json(meta, "layers", path)
    device = load_device(model, device, path)
    aliases = module_aliases(model)
    swaps, swapped = [], {}  # swapped: id(module) -> the file's name for it
    for name, entry in layers.items():
        cls = _check_entry(name, entry)
        if not name:
            raise ValueError(f"{path}: layer name '' (the root module) cannot be swapped")
        module = _target(model, name, cls, entry)
        names = aliases[id(module)]
        first = swapped.setdefault(id(module), name)
        if first != name:
            raise ValueError(f"{path}: layers {names} are one module in the model (shared), "
                             f"but the checkpoint quantized {first!r} and {name!r} apart")
        qt, bias = _layer_tensors(name, entry, tensors)
        try:
            swaps.append((names, _build(module, cls, qt, bias, entry, backend)))
        except ValueError as err:  # (e.g. a backend without a kernel for this layer)
            raise ValueError(f"{path}: layer {name!r}: {err}") from None
    _check_shared_in_file(model, layers, _json(meta, ALIASES, path), path)
    swaps += _float_again(model, aliases, swapped, tensors)
    _check_rest(_expected_state(model, swaps), tensors, path)
    check_loadable(model, os.fspath(path), skip=tuple(n for names, _ in swaps for n in names))
    for names, layer in swaps:  # everything validated: now mutate the model
        replace_module(model, names, layer)
    sync_fast_paths(model)
    materialize(model, device, adopt=tensors)  # (the tensors read: no second copy)
    model.to(device)
    model.load_state_dict(tensors, strict=True)  # copies across devices, one tensor at a time
    model._otq_reasons = _json(meta, "kept_float", path)
    model.otq_summary = wrapper.otq_summary = quantization_summary(model)
    return wrapper
