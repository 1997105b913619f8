"""tools/check_native_calls.py: the package's calls of the extension's functions against
their pybind11 signatures (CI runs it on the CUDA build in tools/check_cuda_sources.sh;
here on the CPU build, and on stand-in signatures that it must refuse)."""

import hashlib
import importlib.util
import re
import textwrap
import types
from pathlib import Path

import pytest

from otq_kernels._native import API_VERSION

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "check_native_calls.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("check_native_calls", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_package_calls_the_cpu_build_as_bound(tool):
    from otq_kernels._native import native, unavailable_reason

    if unavailable_reason() is not None:
        pytest.skip(f"extension not built: {unavailable_reason()}")
    errors, calls = tool.check(native(), "cpu_")
    assert errors == [] and calls >= 5


def _fake_module(**docs: str) -> types.SimpleNamespace:
    """A module whose functions have these pybind11-style first docstring lines."""
    functions = {}
    for name, params in docs.items():
        fn = (lambda *a, **k: None)
        fn.__doc__ = f"{name}({params}) -> None\n"
        functions[name] = fn
    return types.SimpleNamespace(**functions)


SIGNATURES = _fake_module(
    cuda_run="x: typing.SupportsInt, planes: collections.abc.Sequence[typing.SupportsInt], "
             "nearest: bool, kernel: typing.SupportsInt = 0",
    cuda_pair="sizes: dict[str, int], n: int")


@pytest.mark.parametrize("call, problem", [
    ("lib.cuda_run(p, [1, 2], True)", None),
    ("lib.cuda_run(p, [q.data_ptr() for q in qs], a == b, kernel=2)", None),
    ("lib.cuda_pair(d, 3)", None),
    ("lib.cuda_run(p, [1, 2])", "missing nearest"),
    ("lib.cuda_run(p, [1, 2], True, 0, 1)", "5 positional arguments, takes 4"),
    ("lib.cuda_run(p, 0, True)", "planes takes a sequence, got 0"),
    ("lib.cuda_run([p], [1], True)", "x takes a scalar, got [p]"),
    ("lib.cuda_run(p, [1], True, kernal=1)", "unknown keyword 'kernal'"),
    ("lib.cuda_run(p, [1], nearest)", None),
    ("lib.cuda_run(p, [1], kernel)", "kernel passed as nearest"),
    ("lib.cuda_runn(p, [1], True)", "no such function in the module"),
    ("lib.cuda_run(*args)", "*args/**kwargs cannot be checked"),
], ids=lambda v: v if isinstance(v, str) else "ok")
def test_a_call_that_does_not_fit_its_signature_is_named(tool, tmp_path, call, problem):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "wrappers.py").write_text(textwrap.dedent(f"""
        def wrapper(lib, p, qs, a, b, d, args, nearest, kernel):
            return {call}
        """))
    errors, calls = tool.check(SIGNATURES, "cuda_", package)
    assert calls == 1
    if problem is None:
        assert errors == []
    else:
        assert len(errors) == 1 and errors[0].startswith("pkg/wrappers.py:3 ")
        assert errors[0].endswith(problem)


def test_the_bindings_version_is_the_one_the_code_calls():
    """csrc/bindings.cpp's API_VERSION equals API_VERSION, and the module body's
    digest is the one recorded for it: a change to the bindings must bump both."""
    source = (ROOT / "csrc" / "bindings.cpp").read_text()
    assert re.search(r'm\.attr\("API_VERSION"\) = (\d+);', source)[1] == str(
        API_VERSION)
    body = source[source.index("PYBIND11_MODULE"):]
    digest = hashlib.sha256(" ".join(body.split()).encode()).hexdigest()[:16]
    assert (API_VERSION, digest) == RECORDED_BINDINGS, (
        f"the bindings changed (digest {digest}): bump API_VERSION in csrc/bindings.cpp and "
        "otq_kernels/_native.py, and record the new version and digest in this test")


RECORDED_BINDINGS = (2, "3f021c62932f1e9f")  # (API_VERSION, digest of the module body)
