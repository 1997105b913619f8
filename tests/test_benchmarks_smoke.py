"""The benchmark harness in smoke mode: every bench runs and writes schema-valid JSON.

Runs each ``benchmarks/bench_*.py`` in-process with ``--smoke`` (tiny shapes, wall-clock
timing, unavailable backends recorded as skipped rows) into one temp dir, then the plots.
"""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
SUBJECTS = ["linear", "conv", "fit", "e2e"]


def _load(name: str):
    """Import benchmarks/<name>.py as a module (the scripts import `common` by name)."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"otq_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """Run every bench once in smoke mode; returns the output dir and the exit codes."""
    out = tmp_path_factory.mktemp("bench_smoke")
    threads = torch.get_num_threads()
    codes = {}
    try:
        for subject in SUBJECTS:
            bench = _load(f"bench_{subject}")
            codes[subject] = bench.main(["--smoke", "--quiet", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)  # smoke mode pins 1 thread on CPU
    return out, codes


@pytest.mark.parametrize("subject", SUBJECTS)
def test_smoke_writes_valid_json(subject, smoke_dir):
    out, codes = smoke_dir
    assert codes[subject] == 0
    payload = json.loads((out / f"{subject}.json").read_text())
    assert _load("common").validate(payload) == []
    assert payload["meta"]["smoke"] is True and payload["meta"]["subject"] == subject
    assert all(row["smoke"] is True for row in payload["rows"])
    timed = [row for row in payload["rows"] if not row["skipped"]]
    assert timed, "no path ran at all"
    assert any(row["backend"] in ("fp16", "reference", "torch_sort") for row in timed)


def test_plots_from_smoke_json(smoke_dir, tmp_path):
    out, _ = smoke_dir
    assert _load("plot").main([str(out), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png"))


def test_smoke_refuses_results_tree():
    common = _load("common")
    with pytest.raises(SystemExit):
        common.check_smoke_out(common.RESULTS / "cpu")


def test_helpers():
    common = _load("common")
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert common.crossover({1: True, 4: True, 16: False, 64: True}) == 4
    assert common.crossover({1: False, 4: True}) == 0
    q = common._quantiles_us([1e-6, 2e-6, 3e-6, 4e-6, 5e-6])
    assert q["p50_us"] == pytest.approx(3.0)
    assert q["p20_us"] <= q["p50_us"] <= q["p80_us"]


def test_crossovers_from_rows():
    linear = _load("bench_linear")
    rows = []
    for m, t_triton, t_cuda in ((1, 5.0, 3.0), (4, 6.0, 9.0), (16, 8.0, 20.0), (64, 30.0, 90.0)):
        base = {"M": m, "shape": "8x8", "bits": 4, "granularity": "channel"}
        rows += [{**base, "backend": "dequant", "kernel": "cublas", "p50_us": 10.0},
                 {**base, "backend": "triton", "kernel": "auto", "p50_us": t_triton},
                 {**base, "backend": "cuda", "kernel": "lut_gemv", "p50_us": t_cuda}]
    values, _ = linear.derive_crossovers(rows)
    assert values == {"triton_max_m": 16, "cuda_max_m": 1}
