"""Check every call of the extension's functions in otq_kernels/ against their pybind11
signatures: the function exists, the argument count and keyword names fit, a list is
passed where it takes a sequence (and only there), and no variable named like one
parameter is passed as another (shifted arguments).

The CUDA half of the bindings is called only on a GPU, so a wrapper that passes one
argument too few would first fail in a GPU session; tools/check_cuda_sources.sh runs this
on the CUDA build it links. usage: python tools/check_native_calls.py MODULE.so PREFIX
"""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path
from typing import NamedTuple

PACKAGE = Path(__file__).resolve().parents[1] / "otq_kernels"


class Param(NamedTuple):
    name: str
    sequence: bool
    optional: bool


def _split_top_level(text: str) -> list[str]:
    """'a: int, b: dict[str, int]' -> ['a: int', 'b: dict[str, int]']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def signature(doc: str) -> list[Param]:
    """The parameters in the first line of a pybind11 docstring, 'f(a: int, b: Sequence[int]
    = ...) -> None'."""
    first = doc.strip().splitlines()[0]
    inner = first[first.index("(") + 1:first.rindex(") ->")]
    params = []
    for part in _split_top_level(inner):
        name, _, rest = part.partition(":")
        params.append(Param(name.strip(), "Sequence[" in rest or "list[" in rest, "=" in rest))
    return params


def signatures(module, prefix: str) -> dict[str, list[Param]]:
    return {name: signature(getattr(module, name).__doc__ or "")
            for name in dir(module) if name.startswith(prefix)}


def _is_list(node: ast.expr) -> bool:
    return isinstance(node, (ast.List, ast.ListComp))


def _is_scalar(node: ast.expr) -> bool:
    return isinstance(node, (ast.Constant, ast.BinOp, ast.Compare, ast.BoolOp, ast.IfExp))


def call_errors(call: ast.Call, params: list[Param] | None) -> list[str]:
    """What is wrong with one call of a function with ``params`` (None: not bound)."""
    if params is None:
        return ["no such function in the module"]
    if any(isinstance(a, ast.Starred) for a in call.args) or any(
            k.arg is None for k in call.keywords):
        return ["*args/**kwargs cannot be checked"]
    names = [p.name for p in params]
    errors = [f"unknown keyword {k.arg!r}" for k in call.keywords if k.arg not in names]
    given = set(names[:len(call.args)]) | {k.arg for k in call.keywords}
    missing = [p.name for p in params if not p.optional and p.name not in given]
    if len(call.args) > len(params):
        errors.append(f"{len(call.args)} positional arguments, takes {len(params)}")
    if missing:
        errors.append(f"missing {', '.join(missing)}")
    for arg, param in zip(call.args, params, strict=False):
        if param.sequence and _is_scalar(arg) or not param.sequence and _is_list(arg):
            kind = "a sequence" if param.sequence else "a scalar"
            errors.append(f"{param.name} takes {kind}, got {ast.unparse(arg)}")
        elif isinstance(arg, ast.Name) and arg.id in names and arg.id != param.name:
            errors.append(f"{arg.id} passed as {param.name}")  # arguments shifted
    return errors


def check(module, prefix: str, package: Path = PACKAGE) -> tuple[list[str], int]:
    """(errors as 'file:line name: what', number of calls checked) over package/**.py."""
    sigs = signatures(module, prefix)
    errors, calls = [], 0
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr.startswith(prefix)):
                calls += 1
                where = f"{path.relative_to(package.parent)}:{node.lineno} {node.func.attr}"
                errors += [f"{where}: {e}" for e in call_errors(node, sigs.get(node.func.attr))]
    return errors, calls


def load(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    path, prefix = argv
    errors, calls = check(load(path), prefix)
    for e in errors:
        print(f"native-calls: {e}")
    print(f"native-calls: {calls} calls of {prefix}* checked, {len(errors)} problems")
    return 1 if errors or not calls else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
