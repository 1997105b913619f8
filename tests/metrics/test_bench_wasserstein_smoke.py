"""benchmarks/bench_wasserstein.py --smoke: the harness runs and its rows are sane."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ot")

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_wasserstein.py"


def test_smoke_run_writes_consistent_rows(tmp_path):
    out = tmp_path / "wasserstein.json"
    subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    exact = {r["pair"]: r["value"] for r in rows if r["bound"] == "exact"}
    bounds = [r for r in rows if r["bound"] != "exact"]
    assert exact and bounds
    for r in bounds:
        if r["bound"].startswith("lower"):
            assert r["value"] <= exact[r["pair"]] * (1 + 1e-9)
        elif r["bound"].startswith("upper"):
            assert r["value"] >= exact[r["pair"]] * (1 - 1e-9)
