"""Every ``module.name`` that the package, the benchmarks and python/ read from one of our
own modules exists.

Code that only a GPU runs (the CUDA branches of the backends, the benches' graph, expansion
and profiling paths, gpu_checks) is otherwise first executed in a rare, short GPU session,
where a name renamed everywhere but there would cost a step. ruff catches undefined
names, not missing attributes of imported modules.
"""

import ast
import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCANNED = [*sorted((ROOT / "otq_kernels").rglob("*.py")), *sorted(BENCH.glob("*.py")),
           *sorted((ROOT / "python").glob("*.py"))]
OWN = ("otq_kernels", *(p.stem for p in BENCH.glob("*.py")))


def _module_name(path: Path) -> str:
    """The dotted name ``path`` is imported as (benchmarks/ is on sys.path as a root)."""
    parts = path.relative_to(BENCH if path.parent == BENCH else ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _own_module_aliases(tree: ast.Module, path: Path) -> dict[str, str]:
    """Local name -> dotted name of each of our own modules the file imports."""
    here = _module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in OWN:
                    aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else \
                        a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            if base.split(".")[0] not in OWN:
                continue
            for a in node.names:
                if _is_module(f"{base}.{a.name}"):
                    aliases[a.asname or a.name] = f"{base}.{a.name}"
    return aliases


def _missing_attributes(path: Path, source: str | None = None) -> tuple[list[str], int]:
    """('file:line alias.name (...)' for each attribute of our own modules that is missing,
    how many such attributes the file reads); ``source``: its text (default: read it)."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    aliases = _own_module_aliases(tree, path)
    missing, checked = [], 0
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in aliases):
            continue
        checked += 1
        module = importlib.import_module(aliases[node.value.id])
        if not hasattr(module, node.attr) and not _is_module(f"{module.__name__}.{node.attr}"):
            missing.append(f"{path.relative_to(ROOT)}:{node.lineno} "
                           f"{node.value.id}.{node.attr} ({module.__name__} has no {node.attr})")
    return missing, checked


@pytest.fixture(scope="module", autouse=True)
def _bench_on_path():
    sys.path.insert(0, str(BENCH))
    yield
    sys.path.remove(str(BENCH))


def test_attributes_of_our_modules_exist():
    results = [_missing_attributes(path) for path in SCANNED]
    assert [m for missing, _ in results for m in missing] == []
    assert len(SCANNED) >= 50 and sum(checked for _, checked in results) >= 200


def test_a_missing_attribute_is_named():
    source = ("import common\nfrom otq_kernels.backends import cuda\nfrom . import ops\n\n"
              "common.parser\ncuda.no_such_kernel\ncommon.no_such_helper\nops.nope\n")
    bench, checked = _missing_attributes(BENCH / "bench_probe.py", source)
    package, _ = _missing_attributes(ROOT / "otq_kernels" / "probe.py", source)
    assert [m.split(" ")[1] for m in bench] == ["cuda.no_such_kernel", "common.no_such_helper"]
    assert checked == 3  # ops: not a module seen from benchmarks/
    assert [m.split(" ")[1] for m in package][-1] == "ops.nope"
