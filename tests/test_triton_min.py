"""The oldest triton we support is the one `make triton-min-check` tests against.

`make test` compiles every Triton kernel and runs the Triton tests a second time against
``TRITON_MIN`` (the Makefile), installed beside the venv's newest triton. These tests keep
that version equal to pyproject's lower bound and, when the check runs them, make sure the
triton it imported is that version (not the venv's own, which a wrong path would give).
"""
import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _makefile_min() -> str:
    found = re.search(r"^TRITON_MIN \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert found, "the Makefile sets no TRITON_MIN"
    return found.group(1)


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def test_the_checked_triton_is_the_oldest_pyproject_allows():
    bound = re.search(r'"triton>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert bound, "pyproject names no triton lower bound"
    oldest = _release(bound.group(1))
    assert _release(_makefile_min())[:len(oldest)] == oldest


@pytest.mark.skipif(not os.environ.get("OTQ_EXPECT_TRITON"),
                    reason="only under make triton-min-check")
def test_the_check_imports_the_oldest_triton():
    import triton

    assert triton.__version__ == os.environ["OTQ_EXPECT_TRITON"] == _makefile_min()
