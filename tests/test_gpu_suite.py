"""benchmarks/gpu_suite.sh dry-run on a CPU machine: plan and step selection, the
no-GPU guard, the deadline, and what the device tool would bring back from $OUT.

The GPU sessions are rare and short; these catch a broken suite before one is spent on it.
On a GPU machine the suite itself is what runs, so this module is for CPU machines only.
"""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="a dry run for CPU machines; on a GPU run the suite")

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.sh"


def _suite(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, Path]:
    """Run the suite as the device tool would ($OUT set); returns (process, $OUT)."""
    out = tmp_path / "out"
    out.mkdir()
    full_env = {**os.environ, "OUT": str(out), "OTQ_SUITE_SCRATCH": str(tmp_path / "work"),
                "PYTHON": sys.executable, **env}
    proc = subprocess.run(["bash", str(SUITE)], env=full_env, capture_output=True, text=True,
                          timeout=300)
    return proc, out


def test_help_and_bad_arguments_run_nothing(tmp_path):
    """--help prints the header; an option it does not know, or a second folder, is
    refused before anything runs (an option once became OUTDIR, and the CPU steps ran)."""
    def run(*args):
        return subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)

    shown = run("--help")
    assert shown.returncode == 0 and "usage: bash benchmarks/gpu_suite.sh [OUTDIR]" in shown.stdout
    for args, why in [(["--dry-run"], "unknown option --dry-run"),
                      (["a", "b"], "one OUTDIR at most, got 2")]:
        refused = run(*args)
        assert refused.returncode == 2 and why in refused.stderr
        assert refused.stdout == "" and list(tmp_path.iterdir()) == []


def test_no_gpu_marks_gpu_steps_failed_and_exports_results(tmp_path):
    proc, out = _suite(tmp_path, OTQ_SUITE_STEPS="env tests_cuda goal_linear",
                       OTQ_SUITE_DEADLINE_S="200")
    summary = (out / "summary.txt").read_text()
    assert "WARNING torch sees no CUDA device" in summary, proc.stdout + proc.stderr
    assert "env: ok" in summary
    for step in ("tests_cuda", "goal_linear"):
        assert f"{step}: FAILED (not run: torch sees no CUDA device)" in summary
    assert "gpu_suite: done" in summary
    committed = SUITE.parents[1] / "benchmarks" / "results" / "cpu"  # this slug's results
    assert f"==== digest of {tmp_path / 'work' / 'cpu'} (times against {committed})" in summary
    with tarfile.open(out / "suite.tar.gz") as tar:
        names = tar.getnames()
    assert "cpu/summary.txt" in names and "cpu/logs/env.log" in names
    assert "cpu/logs/tests_cuda.log" not in names  # guarded steps do not run at all


def test_torch_import_failure_is_named_in_the_summary(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "torch.py").write_text("raise ImportError('libcudart.so.13: cannot open')\n")
    proc, out = _suite(tmp_path, OTQ_SUITE_STEPS="tests_cuda", OTQ_SUITE_DEADLINE_S="200",
                       PYTHONPATH=str(broken))
    summary = (out / "summary.txt").read_text()
    reason = "torch failed: ImportError: libcudart.so.13: cannot open"
    assert f"WARNING {reason} (slug=unknown)" in summary, proc.stdout + proc.stderr
    assert f"tests_cuda: FAILED (not run: {reason})" in summary


def test_steps_past_the_deadline_are_skipped(tmp_path):
    proc, out = _suite(tmp_path, OTQ_SUITE_STEPS="env", OTQ_SUITE_DEADLINE_S="30")
    summary = (out / "summary.txt").read_text()
    assert "env: SKIPPED (suite deadline" in summary, proc.stdout + proc.stderr
    assert "env: ok" not in summary


def test_unknown_plan_is_refused(tmp_path):
    proc, out = _suite(tmp_path, OTQ_SUITE_PLAN="5")
    assert proc.returncode == 2
    assert "OTQ_SUITE_PLAN must be 1, 2, 3 or 4" in proc.stderr
    assert not any(out.iterdir())


def test_no_gpu_still_runs_the_plots_of_the_benches(tmp_path):
    proc, out = _suite(tmp_path, OTQ_SUITE_STEPS="bench_e2e", OTQ_SUITE_DEADLINE_S="200")
    summary = (out / "summary.txt").read_text()
    assert "bench_e2e: FAILED (not run: torch sees no CUDA device)" in summary, proc.stderr
    assert "plot_more: ok" in summary


def _python_seeing_a_gpu(tmp_path: Path, name: str) -> str:
    """An interpreter for the suite whose GPU probe (a script on stdin that asks for the
    device name) sees a GPU called ``name``; anything else runs on this Python."""
    fake = tmp_path / "python_seeing_a_gpu"
    fake.write_text(f"""#!/bin/bash
if [ "$#" -eq 1 ] && [ "$1" = "-" ]; then
  src=$(cat)
  if grep -q get_device_name <<<"$src"; then echo {name}; exit 0; fi
  exec {sys.executable} - <<<"$src"
fi
exec {sys.executable} "$@"
""")
    fake.chmod(0o755)
    return str(fake)


def test_a_failed_build_ends_the_gpu_steps(tmp_path):
    """Without the extension every GPU step would time or test the rest only (eight
    minutes of device time): they are marked not run, and the suite ends early."""
    proc, out = _suite(tmp_path, OTQ_SUITE_STEPS="build goal_linear tests_kernels",
                       OTQ_SUITE_DEADLINE_S="200",
                       PYTHON=_python_seeing_a_gpu(tmp_path, "nvidia-h100"))
    summary = (out / "summary.txt").read_text()
    assert "build: FAILED rc=1" in summary, proc.stdout + proc.stderr
    assert "CUDA build of torch" in summary  # (this torch is a CPU build)
    for step in ("goal_linear", "tests_kernels"):
        assert f"{step}: FAILED (not run: the build failed (logs/build.log))" in summary


def test_the_tuned_e2e_step_fails_where_a_derivation_fails(tmp_path):
    """goal_e2e_tuned said ok when --tuning-from failed (no results, or results it could
    not read); with the committed H200 graph replays it derives the shipped linear entry,
    changes nothing and is ok."""
    python = _python_seeing_a_gpu(tmp_path, "nvidia-h200")
    work = tmp_path / "work"

    def tuned_step() -> str:
        proc = subprocess.run(["bash", str(SUITE), str(work)], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHON": python,
                                                "OTQ_SUITE_STEPS": "goal_e2e_tuned",
                                                "OTQ_SUITE_DEADLINE_S": "200"})
        return next((line for line in proc.stdout.splitlines()
                     if line.startswith("goal_e2e_tuned: ")), proc.stdout + proc.stderr)

    assert tuned_step().startswith("goal_e2e_tuned: FAILED rc=1")  # no results at all
    committed = SUITE.parent / "results" / "nvidia-h200" / "goal_graph" / "linear.json"
    if not committed.exists():
        pytest.skip(f"{committed} not in this checkout")
    (work / "goal_graph").mkdir(parents=True)
    (work / "goal_graph" / "linear.json").write_bytes(committed.read_bytes())
    assert tuned_step().startswith("goal_e2e_tuned: ok")
    (work / "goal_graph" / "conv.json").write_text("{}")
    assert tuned_step().startswith("goal_e2e_tuned: FAILED rc=1")


def test_the_test_files_and_the_test_filter_the_suite_names_exist():
    """A renamed test file or test would make a pytest step collect nothing, or all."""
    text = SUITE.read_text()
    repo = SUITE.parents[1]
    files = set(re.findall(r"tests/[\w/]+\.py", text))
    assert len(files) >= 8 and [f for f in files if not (repo / f).is_file()] == []
    left_out = re.search(r"OTQ_SUITE_TEST_FILTER:-not (\w+)", text).group(1)
    fit_tests = (repo / "tests" / "backends" / "test_triton_fit.py").read_text()
    assert f"def test_{left_out}(" in fit_tests
