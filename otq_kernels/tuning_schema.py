"""What a dispatch tuning table (``tuning/default.json``, ``OTQ_TUNING_FILE``) may hold.

A table is ``{"default": ENTRY, "gpus": {gpu name: ENTRY}}``; an ENTRY maps sections
(``linear``, ``conv2d``, ``fit``) to ``{key: value}``. Keys starting with ``_`` (``_about``,
``_measured`` evidence) are notes, never read by dispatch. :func:`check_tuning_table`
refuses a value of the wrong kind with a ValueError naming it and warns of a key that
dispatch does not read (a typo would otherwise change nothing, silently).
"""

from __future__ import annotations

import json
import re
import warnings

from .format import MAX_BITS, MIN_BITS

# value kinds: "int", "bool", "int_by_bits" / "int_by_kernel" ({bits or "KHxKW": int}),
# "kernel_sizes" (["KHxKW", ...])
_CROSSOVERS = ("cuda_max_m", "triton_min_m", "triton_max_m")
SCHEMA: dict[str, dict[str, str]] = {
    "linear": {
        **{name: "int" for name in _CROSSOVERS},
        **{f"{name}_by_bits": "int_by_bits" for name in _CROSSOVERS},
        "cuda_gemv_max_m": "int", "cuda_gemv_max_m_by_bits": "int_by_bits",
        "cuda_tensor_cores": "bool", "cuda_mma_fragment": "bool",
        "cuda_frag_32_rows_min_m": "int", "triton_splitk_field_major": "bool",
        "triton_gemm_tile": "bool", "dequant_walk_k": "bool",
        "dequant_native_max_numel": "int",
    },
    "conv2d": {
        **{name: "int" for name in _CROSSOVERS},
        **{f"{name}_by_bits": "int_by_bits" for name in _CROSSOVERS},
        **{f"{name}_by_kernel": "int_by_kernel" for name in _CROSSOVERS},
        "kernel_sizes": "kernel_sizes",
    },
    "fit": {"triton_max_n": "int"},
}
_KERNEL_SIZE = re.compile(r"[1-9][0-9]*x[1-9][0-9]*")
_BIT_WIDTHS = [str(bits) for bits in range(MIN_BITS, MAX_BITS + 1)]  # as dispatch asks


def parse_tuning_table(text: str, source: str) -> dict:
    """The checked table (:func:`check_tuning_table`) that JSON ``text`` holds; ValueError
    naming ``source`` for text that is not JSON, nests too deeply or repeats a key (JSON
    parsers keep the last silently)."""
    def refuse_repeats(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"{source}: key {repeated[0]!r} appears twice in one object")
        return dict(pairs)

    try:
        table = json.loads(text, object_pairs_hook=refuse_repeats)
    except json.JSONDecodeError as err:
        raise ValueError(f"{source}: cannot read it as JSON: {err}") from None
    except RecursionError:
        raise ValueError(f"{source}: cannot read it as JSON: nested too deeply") from None
    except ValueError as err:  # (an integer of more digits than Python converts, say)
        if str(err).startswith(f"{source}:"):  # (a repeated key, said above)
            raise
        raise ValueError(f"{source}: cannot read it as JSON: {err}") from None
    check_tuning_table(table, source)
    return table


def check_tuning_table(table, source: str) -> None:
    """ValueError naming ``source`` and the entry, section and key of the first value of
    the wrong kind; a UserWarning for each top-level key, section or key that dispatch
    does not read."""
    if not isinstance(table, dict) or not isinstance(table.get("default"), dict):
        raise ValueError(f"{source}: a tuning table is a JSON object with a 'default' entry")
    gpus = table.get("gpus", {})
    if not isinstance(gpus, dict):
        raise ValueError(f"{source}: 'gpus' must map GPU names to entries")
    for key in table:
        if key not in ("default", "gpus") and not key.startswith("_"):
            warnings.warn(f"{source}: {key!r} is not read by dispatch (it reads 'default' "
                          "and 'gpus')", stacklevel=3)
    gpu_entries = [(name, entry) for name, entry in gpus.items() if not name.startswith("_")]
    for name, entry in [("default", table["default"]), *gpu_entries]:
        _check_entry(entry, f"{source}: entry {name!r}")


def _check_entry(entry, where: str) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{where} must be a JSON object of sections")
    for section, values in entry.items():
        if section.startswith("_"):
            continue
        if section not in SCHEMA:
            warnings.warn(f"{where}: section {section!r} is not read by dispatch "
                          f"(known: {sorted(SCHEMA)})", stacklevel=4)
            continue
        if not isinstance(values, dict):
            raise ValueError(f"{where}: section {section!r} must be a JSON object")
        for key, value in values.items():
            kind = SCHEMA[section].get(key)
            if kind is None:
                if not key.startswith("_"):
                    warnings.warn(f"{where}: {section}.{key} is not read by dispatch (a "
                                  "typo?)", stacklevel=4)
            elif not _is_kind(value, kind):
                raise ValueError(f"{where}: {section}.{key} must be {_DESCRIBE[kind]}, got "
                                 f"{value!r}")


def _is_int(value) -> bool:
    """A count, size or M threshold: a non-negative integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_kind(value, kind: str) -> bool:
    if kind == "int":
        return _is_int(value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "kernel_sizes":
        return isinstance(value, list) and all(
            isinstance(s, str) and _KERNEL_SIZE.fullmatch(s) for s in value)
    if not isinstance(value, dict) or not all(_is_int(v) for v in value.values()):
        return False
    if kind == "int_by_bits":
        return all(k in _BIT_WIDTHS for k in value)
    return all(_KERNEL_SIZE.fullmatch(k) for k in value)


_DESCRIBE = {
    "int": "an integer >= 0",
    "bool": "true or false",
    "kernel_sizes": 'a list of kernel sizes like "3x3"',
    "int_by_bits": f'a map of bit widths ("{MIN_BITS}".."{MAX_BITS}") to integers >= 0',
    "int_by_kernel": 'a map of kernel sizes ("3x3", ...) to integers >= 0',
}
