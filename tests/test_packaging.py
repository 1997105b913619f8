"""What a user installing from source meets: setup.py's environment flags, checked before
any compile, and an sdist that holds every native source the build reads."""

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    spec = importlib.util.spec_from_file_location("otq_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # (not __main__: builds nothing)
    return module


@pytest.mark.parametrize("value, archs", [
    ("80;90", ["80", "90"]), ("8.0, 9.0", ["80", "90"]), ("sm_90a", ["90a"]),
    (" 86 89 ", ["86", "89"]), ("10.0;100f;120", ["100", "100f", "120"]),
    ("80;90;", ["80", "90"]), (";80", ["80"]),
])
def test_cuda_archs_takes_the_usual_spellings(setup_py, value, archs):
    assert setup_py.cuda_archs(value) == archs


@pytest.mark.parametrize("value", ["75", "80;sm_70", "compute_90", "8.0+PTX", "9", "080",
                                   "1000"])
def test_cuda_archs_refuses_what_nvcc_or_the_kernels_cannot_take(setup_py, value):
    with pytest.raises(SystemExit, match="OTQ_CUDA_ARCHS=.*not an SM number of 80 or more"):
        setup_py.cuda_archs(value)
    with pytest.raises(SystemExit, match="OTQ_CUDA_ARCHS=' ; ' names no SM number"):
        setup_py.cuda_archs(" ; ")


@pytest.mark.parametrize("value, on", [("1", True), ("yes", True), ("ON", True),
                                       ("0", False), ("off", False), ("", False)])
def test_flags_take_1_or_0(setup_py, monkeypatch, value, on):
    monkeypatch.setenv("OTQ_SKIP_CUDA_BUILD", value)
    assert setup_py._flag("OTQ_SKIP_CUDA_BUILD") is on


@pytest.mark.parametrize("value", ["Y", "2", "maybe"])
def test_a_flag_of_another_value_is_refused(setup_py, monkeypatch, value):
    """(It used to mean 0, silently: OTQ_FORCE_CUDA=Y built without CUDA.)"""
    monkeypatch.setenv("OTQ_FORCE_CUDA", value)
    with pytest.raises(SystemExit, match=f"OTQ_FORCE_CUDA='{value}': use 1 or 0"):
        setup_py._flag("OTQ_FORCE_CUDA")


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_forcing_cuda_with_a_cpu_torch_says_so(setup_py, monkeypatch):
    """(torch's CUDAExtension said 'CUDA_HOME environment variable is not set', even with
    CUDA_HOME set: a CPU torch ignores it.)"""
    monkeypatch.delenv("OTQ_SKIP_CUDA_BUILD", raising=False)
    monkeypatch.setenv("OTQ_FORCE_CUDA", "1")
    with pytest.raises(SystemExit, match="OTQ_FORCE_CUDA=1 needs a CUDA build of torch"):
        setup_py._cuda_wanted()


def test_the_sdist_holds_every_native_source(tmp_path):
    """The sdist of the tracked files holds every csrc header and CUDA source (setup.py
    names only the .cpp files: without MANIFEST.in its build failed on cpu_ops.h) and no
    half of the test suite."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], check=True,
                             capture_output=True, text=True).stdout.split()
    tree = tmp_path / "tree"
    for name in tracked:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tree / name)
    env = {**os.environ, "OTQ_SKIP_NATIVE_BUILD": "1"}
    subprocess.run([sys.executable, "-c", "from setuptools import build_meta as b; "
                    f"print(b.build_sdist({str(tmp_path)!r}))"], cwd=tree, env=env,
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("otq_kernels-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    native = {name for name in tracked if name.startswith("csrc/")}
    assert native and native <= names, sorted(native - names)
    assert {"setup.py", "pyproject.toml", "README.md", "MANIFEST.in"} <= names
    assert "otq_kernels/tuning/default.json" in names
    assert not any(name.startswith("tests/") for name in names)
