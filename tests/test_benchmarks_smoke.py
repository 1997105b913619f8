"""The benchmark harness in smoke mode: every bench runs and writes schema-valid JSON.

Runs each ``benchmarks/bench_*.py`` in-process with ``--smoke`` (tiny shapes, wall-clock
timing, unavailable backends recorded as skipped rows) into one temp dir, then the plots.
"""

import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from otq_kernels.tuning_schema import check_tuning_table

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


def _run_smoke(subject: str, out, *options: str) -> int:
    """Run bench_<subject> in smoke mode into ``out``; returns its exit code."""
    threads = torch.get_num_threads()
    try:
        return _load(f"bench_{subject}").main(["--smoke", "--quiet", "--out", str(out),
                                               *options])
    finally:
        torch.set_num_threads(threads)  # smoke mode pins 1 thread on CPU


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    """Run every bench once in smoke mode; returns the output dir and the exit codes."""
    out = tmp_path_factory.mktemp("bench_smoke")
    return out, {subject: _run_smoke(subject, out) for subject in SUBJECTS}


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
    derive = _load("derive")
    assert [row for row in payload["rows"] if row.get("error") or not derive.is_right(row)] == []
    assert any(row["backend"] in ("fp16", "reference", "torch_sort") for row in timed)


def test_the_l2_flush_reads_its_buffer_and_writes_nothing_to_it():
    """A written flush leaves the L2 dirty: the write-back lands in the next timed rep.
    A sum into the flusher's own scalar: no copy of the buffer (a sum asked for another
    dtype converts the whole buffer first), nothing allocated."""
    from torch.profiler import ProfilerActivity, profile

    flusher = _load("common").L2Flusher(torch.device("cpu"), nbytes=1 << 12)
    flusher.buffer.fill_(3)
    version = flusher.buffer._version
    with profile(activities=[ProfilerActivity.CPU]) as ran:
        flusher()
    called = {event.name for event in ran.events()}
    assert "aten::sum" in called
    assert not called & {"aten::to", "aten::_to_copy", "aten::copy_", "aten::empty_strided"}
    assert flusher.buffer._version == version and int(flusher.total) == 3 * 512


def test_plots_from_smoke_json(smoke_dir, tmp_path):
    out, _ = smoke_dir
    assert _load("plot").main([str(out), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png"))


def test_a_results_file_that_is_not_json_stops_only_its_plot(smoke_dir, tmp_path, capsys):
    out, _ = smoke_dir
    folder = tmp_path / "results"
    folder.mkdir()
    for subject in ("linear", "conv"):
        (folder / f"{subject}.json").write_text((out / f"{subject}.json").read_text())
    (folder / "linear.json").write_text("{not json")
    assert _load("plot").main([str(folder), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "plot: linear failed: JSONDecodeError" in printed
    assert [p.name for p in tmp_path.glob("*.png")] and "plot: wrote" in printed


def test_conv_plot_keeps_both_cuda_input_layouts(tmp_path):
    """lut_conv on NCHW and on channels-last x are two series (the second once overwrote
    the first's bars under "cuda")."""
    plot = _load("plot")
    base = {"bits": 4, "granularity": "channel", "shape": "s", "batch": 1, "p50_us": 5.0,
            "skipped": False}
    rows = [{**base, "backend": "cuda", "kernel": "lut_conv", "ratio": 1.0},
            {**base, "backend": "cuda", "kernel": "lut_conv_cl", "ratio": 2.0},
            {**base, "backend": "dequant", "kernel": "cudnn", "ratio": 0.5}]
    assert [plot.conv_path(r) for r in rows] == ["cuda", "cuda_cl", "dequant"]
    files = plot.plot_conv({"meta": {"gpu": "x"}, "rows": rows}, tmp_path)
    assert [f.name for f in files] == ["conv_ratio.png"] and files[0].stat().st_size > 0


def test_plots_leave_out_wrong_results():
    """A fast kernel with a wrong result (rel_err above derive.MAX_REL_ERR, or a
    non-finite one) is not plotted: it inflated the README's best fused ratio."""
    plot = _load("plot")
    base = {"backend": "cuda", "shape": "s", "bits": 4, "M": 1, "p50_us": 1.0}
    rows = [{**base, "kernel": "lut_gemv", "ratio": 2.0, "rel_err": 1e-4},
            {**base, "kernel": "lut_frag", "ratio": 9.0, "rel_err": 0.5},
            {**base, "kernel": "lut_mma", "ratio": 8.0, "rel_err": None}]
    assert plot.best_fused(plot.timed(rows)) == {("s", 4, 1): 2.0}


def test_derive_takes_only_finite_positive_times():
    """A NaN or zero p50 (a hand-made or broken file) is no time: it won every
    comparison it entered."""
    linear = _load("bench_linear")
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0},
                       16: {"dequant": 100.0, "lut_gemv": 200.0}})
    for bad in (float("nan"), 0.0, float("inf")):
        broken = _cuda_rows({16: {"dequant": bad, "lut_gemv": 50.0}}, bits=3) + rows
        assert linear.derive_crossovers(broken)[0] == {"cuda_max_m": 1}


def test_digest_header_names_the_run(tmp_path, capsys):
    """Each file's header names its git sha and date (files of an earlier run, left in a
    folder a later run was extracted into, showed no sign of it)."""
    meta = {"gpu": "G", "git_sha": "abc1234", "date": "2026-12-04T17:40:42+00:00"}
    (tmp_path / "linear.json").write_text(json.dumps({"meta": meta, "rows": []}))
    assert _load("digest").main([str(tmp_path)]) == 0
    assert "git abc1234 2026-12-04T17:40" in capsys.readouterr().out


def test_smoke_refuses_results_tree():
    common = _load("common")
    with pytest.raises(SystemExit):
        common.check_smoke_out(common.RESULTS / "cpu")


def test_helpers():
    common = _load("common")
    assert common.gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    derive = _load("derive")
    assert derive.crossover({1: True, 4: True, 16: False, 64: True}) == 4
    assert derive.crossover({1: False, 4: True}) == 0
    q = common.quantiles_us([1e-6, 2e-6, 3e-6, 4e-6, 5e-6])
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


def test_tensor_core_choice_from_rows():
    linear = _load("bench_linear")
    rows = []
    for m, t_gemv, t_mma in ((1, 10.0, 5.0), (16, 40.0, 10.0)):
        base = {"M": m, "shape": "8x8", "bits": 4, "granularity": "channel", "backend": "cuda"}
        rows += [{**base, "kernel": "lut_gemv", "p50_us": t_gemv},
                 {**base, "kernel": "lut_mma", "p50_us": t_mma}]
    values, evidence = linear.derive_crossovers(rows)
    assert values["cuda_tensor_cores"] is True
    assert evidence["cuda_tensor_cores"] == {"1": 2.0, "16": 4.0}
    slower = [{**r, "p50_us": 100.0} if r["kernel"] == "lut_mma" else r for r in rows]
    assert linear.derive_crossovers(slower)[0]["cuda_tensor_cores"] is False


def _cuda_rows(times: dict, bits: int = 4) -> list[dict]:
    """Rows of one (shape, bits, granularity): {M: {path: p50 µs}}, paths dequant,
    triton (auto), gemm, gemm_tile, lut_gemv, lut_mma, lut_frag and lut_frag32."""
    kernels = {"dequant": ("dequant", "cublas"), "triton": ("triton", "auto"),
               "gemm": ("triton", "gemm"), "gemm_tile": ("triton", "gemm_tile"),
               "lut_gemv": ("cuda", "lut_gemv"), "lut_mma": ("cuda", "lut_mma"),
               "lut_frag": ("cuda", "lut_frag"), "lut_frag32": ("cuda", "lut_frag32")}
    return [{"M": m, "shape": "8x8", "bits": bits, "granularity": "channel",
             "backend": kernels[path][0], "kernel": kernels[path][1], "p50_us": t}
            for m, paths in times.items() for path, t in paths.items()]


def test_cuda_kernel_choice_is_consistent():
    """The H200 case: the LUT GEMV wins at M=1 and lut_mma at M=16, where only lut_mma
    beats the rival. Judging cuda_max_m with LUT GEMV times (the old derivation) gave 1
    and tensor cores at every M; the cuda backend as dispatched wins up to 16."""
    linear = _load("bench_linear")
    rows = _cuda_rows({1: {"dequant": 100.0, "triton": 120.0, "lut_gemv": 30.0,
                           "lut_mma": 50.0},
                       16: {"dequant": 100.0, "triton": 150.0, "lut_gemv": 160.0,
                            "lut_mma": 80.0},
                       64: {"dequant": 100.0, "triton": 300.0, "lut_gemv": 500.0,
                            "lut_mma": 200.0}})
    values, evidence = linear.derive_crossovers(rows)
    assert values == {"triton_max_m": 0, "cuda_max_m": 16, "cuda_gemv_max_m": 1,
                      "cuda_tensor_cores": True}
    assert evidence["cuda_tensor_cores"] == {"1": 0.6, "16": 2.0, "64": 2.5}
    assert evidence["cuda"] == {"1": 3.333, "16": 1.25, "64": 0.5}
    assert [linear.use_mma(values, m) for m in (1, 2, 16)] == [False, True, True]


def test_cuda_kernel_choice_when_mma_never_wins():
    """lut_mma slower at every M: no tensor cores, cuda_max_m judged on LUT GEMV times."""
    linear = _load("bench_linear")
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 50.0},
                       16: {"dequant": 100.0, "lut_gemv": 90.0, "lut_mma": 95.0},
                       64: {"dequant": 100.0, "lut_gemv": 300.0, "lut_mma": 400.0}})
    values, _ = linear.derive_crossovers(rows)
    assert values == {"cuda_max_m": 16, "cuda_gemv_max_m": 64,
                      "cuda_tensor_cores": False}
    assert not any(linear.use_mma(values, m) for m in (1, 16, 64, 1024))


def test_cuda_kernel_choice_per_bit_width():
    """lut_mma wins at M = 1 over all configurations but not at 4 bits: the crossover is 0
    with 4 bits listed at 1, and cuda_max_m is judged on the kernel each width runs."""
    linear = _load("bench_linear")
    rows = (_cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 10.0},
                        16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 40.0}}, bits=2)
            + _cuda_rows({1: {"dequant": 20.0, "lut_gemv": 30.0, "lut_mma": 40.0},
                          16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 50.0}}))
    values, evidence = linear.derive_crossovers(rows)
    assert values == {"cuda_max_m": 16, "cuda_gemv_max_m": 0,
                      "cuda_gemv_max_m_by_bits": {"4": 1}, "cuda_tensor_cores": True,
                      "cuda_max_m_by_bits": {"4": 0}}  # 4 bits at M = 1: 30 µs vs 20
    assert evidence["cuda_by_bits"] == {"4": {"1": 0.667, "16": 2.0}}
    assert evidence["cuda_tensor_cores"] == {"1": 1.5, "16": 3.578}
    assert evidence["cuda_tensor_cores_by_bits"] == {"4": {"1": 0.75, "16": 3.2}}
    # 4 bits at M = 1 on the GEMV (20 / 30 µs; lut_mma's 40 µs would give sqrt(5))
    assert evidence["cuda"] == {"1": 2.582, "16": 2.236}
    assert [linear.use_mma(values, 1, b) for b in (2, 3, 4)] == [True, True, False]
    assert linear.use_mma(values, 2, 4)


def test_cuda_max_m_counts_configs_without_mma():
    """8-bit configurations have no lut_mma rows: they count with LUT GEMV times in
    cuda_max_m (and not at all in the kernel choice). 4 bits win up to 16 on their own:
    cuda_max_m_by_bits lists them (8 bits share the overall crossover, 1)."""
    linear = _load("bench_linear")
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 50.0},
                       16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 25.0}})
    eight = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0},
                        16: {"dequant": 100.0, "lut_gemv": 500.0}}, bits=8)
    values, evidence = linear.derive_crossovers(rows + eight)
    assert evidence["cuda_tensor_cores"] == {"1": 0.6, "16": 6.4}
    assert evidence["cuda"] == {"1": 3.333, "16": 0.894}  # geomean of 4 and 0.2 at M=16
    assert values == {"cuda_max_m": 1, "cuda_gemv_max_m": 1,
                      "cuda_tensor_cores": True, "cuda_max_m_by_bits": {"4": 16}}
    assert evidence["cuda_by_bits"] == {"4": {"1": 3.333, "16": 4.0}}
    assert linear.derive_crossovers(rows)[0]["cuda_max_m"] == 16


def test_fragment_layout_choice():
    """lut_frag faster than lut_mma overall (geomean of 2.0 and 0.8 > 1): the tuning picks
    the fragment layout and judges the GEMV crossover and cuda_max_m on lut_frag's times
    (at M = 16 its 50 µs beat the GEMV's 160 and the rival's 100); slower, it is off and
    nothing else changes."""
    linear = _load("bench_linear")
    times = {1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 50.0, "lut_frag": 25.0},
             16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 40.0, "lut_frag": 50.0}}
    values, evidence = linear.derive_crossovers(_cuda_rows(times))
    assert values == {"cuda_max_m": 16, "cuda_gemv_max_m": 0, "cuda_tensor_cores": True,
                      "cuda_mma_fragment": True}
    assert evidence["cuda_mma_fragment"] == {"1": 2.0, "16": 0.8}
    assert evidence["cuda_tensor_cores"] == {"1": 1.2, "16": 3.2}
    eight = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_frag": 10.0},
                        16: {"dequant": 100.0, "lut_gemv": 500.0, "lut_frag": 20.0}}, bits=8)
    values, _ = linear.derive_crossovers(_cuda_rows(times) + eight)
    # 8 bits (per tensor): lut_frag is their tensor-core kernel, listed on its own (it wins
    # from M = 1) and judged on its 10 / 20 µs in cuda_max_m
    assert values["cuda_gemv_max_m_by_bits"] == {"8": 0} and values["cuda_max_m"] == 16
    assert linear.use_mma(values, 1, 8)
    unlisted = {**values, "cuda_gemv_max_m_by_bits": {}}
    assert not linear.use_mma(unlisted, 16, 8)  # 8 bits never without their own entry
    times[1]["lut_frag"] = 100.0
    values, evidence = linear.derive_crossovers(_cuda_rows(times))
    assert values == {"cuda_max_m": 16, "cuda_gemv_max_m": 1, "cuda_tensor_cores": True,
                      "cuda_mma_fragment": False}
    assert evidence["cuda_tensor_cores"] == {"1": 0.6, "16": 4.0}


def test_frag_32_row_blocks_choice():
    """lut_frag32 loses at M = 1 and wins from M = 8 on: 32-row blocks from M = 8, and
    lut_frag's times there are lut_frag32's (so lut_frag beats lut_mma at M = 16 only
    through them); a win at M = 1 alone, below a loss, sets nothing; configurations
    without lut_frag32 rows (per-channel 4 bits) keep lut_frag's own times."""
    linear = _load("bench_linear")
    times = {1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 50.0, "lut_frag": 25.0,
                 "lut_frag32": 40.0},
             8: {"dequant": 100.0, "lut_gemv": 80.0, "lut_mma": 45.0, "lut_frag": 45.0,
                 "lut_frag32": 30.0},
             16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 40.0, "lut_frag": 50.0,
                  "lut_frag32": 20.0},
             32: {"lut_frag": 50.0, "lut_frag32": 60.0}}  # launches of 16: not judged
    values, evidence = linear.derive_crossovers(_cuda_rows(times, bits=2))
    assert values["cuda_frag_32_rows_min_m"] == 8
    assert evidence["cuda_frag_32_rows"] == {"1": 0.625, "8": 1.5, "16": 2.5, "32": 0.833}
    # lut_frag against lut_mma on lut_frag32's times from M = 8: 2.0, 1.5, 2.0
    assert evidence["cuda_mma_fragment"] == {"1": 2.0, "8": 1.5, "16": 2.0}
    assert values["cuda_mma_fragment"] is True
    times[8]["lut_frag32"] = 50.0
    values, evidence = linear.derive_crossovers(_cuda_rows(times, bits=2))
    assert values["cuda_frag_32_rows_min_m"] == 16
    times[16]["lut_frag32"] = 60.0
    times[1]["lut_frag32"] = 20.0
    values, evidence = linear.derive_crossovers(_cuda_rows(times, bits=2))
    assert "cuda_frag_32_rows_min_m" not in values
    assert evidence["cuda_frag_32_rows"] == {"1": 1.25, "8": 0.9, "16": 0.833, "32": 0.833}
    assert evidence["cuda_mma_fragment"] == {"1": 2.0, "8": 1.0, "16": 0.8}
    without_frag32 = {16: {"lut_mma": 40.0, "lut_frag": 50.0}}  # 4 bits per channel
    times[16]["lut_frag32"] = 20.0
    times[8]["lut_frag32"] = 30.0
    rows = _cuda_rows(times, bits=2) + _cuda_rows(without_frag32)
    _, evidence = linear.derive_crossovers(rows)
    assert evidence["cuda_mma_fragment"]["16"] == 1.265  # geomean of 2.0 and 0.8


def test_large_m_triton_band():
    """The shipped case with a fused GEMM that wins at M = 256 and 1024 only (forced rows,
    no auto ones there): gemm_tile beats gemm, so its times are Triton's; the band starts at
    256 and M = 17-255 stay with dequant."""
    linear = _load("bench_linear")
    times = {1: {"dequant": 100.0, "triton": 150.0, "lut_gemv": 30.0, "lut_mma": 50.0},
             16: {"dequant": 100.0, "triton": 150.0, "lut_gemv": 160.0, "lut_mma": 40.0},
             256: {"dequant": 100.0, "gemm": 400.0, "gemm_tile": 80.0},
             1024: {"dequant": 300.0, "gemm": 900.0, "gemm_tile": 250.0}}
    values, evidence = linear.derive_crossovers(_cuda_rows(times))
    assert values == {"cuda_max_m": 16, "cuda_gemv_max_m": 1, "cuda_tensor_cores": True,
                      "triton_gemm_tile": True, "triton_min_m": 256, "triton_max_m": 1024}
    assert evidence["triton_gemm_tile"] == {"256": 5.0, "1024": 3.6}
    assert evidence["triton"] == {"1": 0.667, "16": 0.667, "256": 1.25, "1024": 1.2}
    rows = _cuda_rows(times)
    for r in rows:  # gemm_tile wrong at 256: it wins nothing, whatever its times
        if r["kernel"] == "gemm_tile" and r["M"] == 256:
            r["rel_err"] = 0.5
    values, evidence = linear.derive_crossovers(rows)
    assert "triton_gemm_tile" not in values and "triton_gemm_tile" not in evidence
    assert values["triton_max_m"] == 0 and "triton_min_m" not in values
    times[1024]["gemm_tile"] = 400.0  # loses at 1024: the band is M = 256 alone
    assert linear.derive_crossovers(_cuda_rows(times))[0]["triton_max_m"] == 256
    for t in (times[256], times[1024]):
        t["gemm_tile"] = 1000.0  # gemm_tile slower than gemm: gemm's times, which lose
    values, _ = linear.derive_crossovers(_cuda_rows(times))
    assert values["triton_gemm_tile"] is False and values["triton_max_m"] == 0
    assert "triton_min_m" not in values


def _write_results(path: Path, rows: list[dict], **meta) -> Path:
    meta = {"subject": "linear", "gpu": "GPU X", "smoke": False, "git_sha": "abc123",
            "date": "2026-01-02", **meta}
    path.write_text(json.dumps({"meta": meta, "rows": rows}))
    return path


def test_tuning_from_results_json(tmp_path):
    """--tuning-from re-derives an entry from a results file: no timing, no GPU."""
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 50.0},
                       16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 80.0}})
    results = _write_results(tmp_path / "linear.json", rows)
    table = tmp_path / "tuning.json"
    argv = ["--tuning-from", str(results), "--write-tuning", str(table)]
    assert _load("bench_linear").main(argv) == 0
    conv_rows = [{"M": 49, "shape": "8x8x3x3@7x7", "bits": 4, "granularity": "channel",
                  "backend": b, "kernel": k, "p50_us": t}
                 for b, k, t in (("dequant", "cudnn", 10.0), ("triton", "implicit_gemm", 5.0))]
    conv = _write_results(tmp_path / "conv.json", conv_rows, subject="conv")
    with pytest.raises(SystemExit, match="results of bench_linear, not of bench_conv"):
        _load("bench_conv").main(["--tuning-from", str(results), "--write-tuning", str(table)])
    assert _load("bench_conv").main(["--tuning-from", str(conv), "--write-tuning",
                                     str(table)]) == 0
    written = json.loads(table.read_text())
    entry = written["gpus"]["GPU X"]
    assert entry["linear"] == {"cuda_max_m": 16, "cuda_gemv_max_m": 1,
                               "cuda_tensor_cores": True}
    assert entry["conv2d"] == {"triton_max_m": 49, "kernel_sizes": ["3x3"]}
    assert entry["_measured"]["linear"]["source"] == str(results)
    assert entry["_measured"]["linear"]["git_sha"] == "abc123"
    assert entry["_measured"]["conv2d"]["triton"] == {"49": 2.0}
    assert written["default"] == json.loads(
        (BENCH.parent / "otq_kernels" / "tuning" / "default.json").read_text())["default"]
    large = _write_results(tmp_path / "large.json", _cuda_rows(
        {256: {"dequant": 100.0, "gemm": 400.0, "gemm_tile": 80.0}}), git_sha="def456")
    assert _load("bench_linear").main(["--tuning-from", str(results), str(large),
                                       "--write-tuning", str(table)]) == 0
    entry = json.loads(table.read_text())["gpus"]["GPU X"]
    assert entry["linear"] == {"cuda_max_m": 16, "cuda_gemv_max_m": 1,
                               "cuda_tensor_cores": True, "triton_gemm_tile": True,
                               "triton_min_m": 256, "triton_max_m": 256}
    assert entry["_measured"]["linear"]["source"] == f"{results}, {large}"
    with warnings.catch_warnings():  # what --tuning-from writes, dispatch reads as it is
        warnings.simplefilter("error")
        check_tuning_table(json.loads(table.read_text()), str(table))
    assert entry["_measured"]["linear"]["git_sha"] == "abc123, def456"
    assert entry["_measured"]["linear"]["date"] == "2026-01-02"
    other_gpu = _write_results(tmp_path / "y.json", rows, gpu="GPU Y")
    for bad in (["--tuning-from", str(results)],  # no --write-tuning
                ["--tuning-from", str(results), str(other_gpu), "--write-tuning", str(table)],
                ["--tuning-from", str(_write_results(tmp_path / "s.json", rows, smoke=True)),
                 "--write-tuning", str(table)],
                ["--tuning-from", str(_write_results(tmp_path / "c.json", rows, gpu=None)),
                 "--write-tuning", str(table)]):
        with pytest.raises(SystemExit):
            _load("bench_linear").main(bad)


def _results_text(rows: list) -> str:
    return json.dumps({"meta": {"subject": "linear", "gpu": "GPU X"}, "rows": rows})


_CONFIG = {"p50_us": 5.0, "M": 1, "shape": "8x8", "granularity": "channel"}


@pytest.mark.parametrize("content, message", [
    (None, "cannot read it"), ("{not json", "cannot read it"),
    ('{"rows": []}', "not a results JSON"), ("[1, 2]", "not a results JSON"),
    ('{"meta": 5, "rows": []}', "not a results JSON"),
    (_results_text([None]), "row 0 is not a timed row"),
    (_results_text([{"p50_us": 5.0, "shape": "8x8"}]), "row 0 is not a timed row"),
    (_results_text([{**_CONFIG, "bits": None}]), "row 0 is not a timed row")],
    ids=["missing", "not-json", "no-meta", "a-list", "meta-a-number", "a-null-row",
         "no-M", "bits-null"])
def test_tuning_from_names_a_results_file_it_cannot_use(tmp_path, content, message):
    """A missing, broken or foreign results file stops --tuning-from with its name, not a
    traceback."""
    results = tmp_path / "linear.json"
    if content is not None:
        results.write_text(content)
    argv = ["--tuning-from", str(results), "--write-tuning", str(tmp_path / "t.json")]
    with pytest.raises(SystemExit) as stop:
        _load("bench_linear").main(argv)
    assert str(stop.value).startswith(f"{results}: {message}")
    assert not (tmp_path / "t.json").exists()


def test_a_kernel_with_non_finite_output_never_wins(tmp_path):
    """A NaN output gives rel_err inf, which the results JSON stores as null: re-derived
    from the file (--tuning-from), that row is as wrong as it was in the run."""
    derive, linear = _load("derive"), _load("bench_linear")
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 10.0}, 16: {"dequant": 100.0,
                                                                    "lut_gemv": 10.0}})
    for row in rows:
        row["rel_err"] = 1e-4 if row["backend"] == "dequant" else math.inf
    in_run = linear.derive_crossovers([dict(r) for r in rows])[0]
    stored = [_load("common").clean(r) for r in rows]
    assert [r["rel_err"] for r in stored if r["backend"] == "cuda"] == [None, None]
    assert linear.derive_crossovers(stored)[0] == in_run
    assert in_run.get("cuda_max_m", 0) == 0
    assert [derive.is_right(r) for r in ({}, {"rel_err": 1e-3}, {"rel_err": None},
                                         {"rel_err": 0.5})] == [True, True, False, False]
    common = _load("common")
    assert common.rel_error(torch.ones(3, 1), torch.ones(3, 4)) == math.inf  # no broadcast


def test_write_tuning_merges_only_into_a_tuning_table(tmp_path):
    """--write-tuning PATH that holds something else (a results JSON, text that is not
    JSON, a folder) stops the bench before any timing or writing, naming it."""
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0}})
    results = _write_results(tmp_path / "linear.json", rows)
    before = results.read_text()
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    for target in (results, broken, tmp_path):
        with pytest.raises(SystemExit, match=f"--write-tuning {target}: it merges into"):
            _load("bench_linear").main(["--tuning-from", str(results), "--write-tuning",
                                        str(target)])
        with pytest.raises(SystemExit, match="it merges into"):  # before it times anything
            _load("bench_linear").main(["--smoke", "--write-tuning", str(target),
                                        "--out", str(tmp_path / "never")])
    assert results.read_text() == before and broken.read_text() == "{not json"
    assert not (tmp_path / "never").exists()


def test_tuning_changes_tells_an_unreadable_table_from_no_change(tmp_path):
    """derive.py --tuning-changes: 0 changes, 1 none, 2 a file it cannot read (the suite
    then reports the tuned step as failed, not as ok)."""
    def code(path) -> int:
        return subprocess.run([sys.executable, str(BENCH / "derive.py"), "--tuning-changes",
                               str(path)], capture_output=True).returncode

    listed = tmp_path / "list.json"
    listed.write_text("[1]")
    shipped = BENCH.parent / "otq_kernels" / "tuning" / "default.json"
    changed = json.loads(shipped.read_text())
    changed["gpus"]["GPU X"] = {"linear": {"cuda_max_m": 3}}
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    assert [code(p) for p in (tmp_path / "changed.json", shipped, tmp_path / "missing.json",
                              listed)] == [0, 1, 2, 2]


def test_tuning_from_names_its_close_calls(tmp_path, capsys):
    """Every speedup of the evidence within 2% of even is named after the derived values
    (nested maps and single numbers alike); none, no line."""
    derive = _load("derive")
    evidence = {"cuda": {"1": 1.5, "16": 1.019}, "cuda_by_bits": {"8": {"16": 0.985}},
                "dequant_walk_k": 1.0, "triton_splitk_field_major": {"16": 0.97}}
    assert derive.close_calls(evidence) == ["cuda 16 x1.019", "cuda_by_bits 8 16 x0.985",
                                            "dequant_walk_k x1.000"]
    conv_rows = [{"M": 49, "shape": "8x8x3x3@7x7", "bits": 4, "granularity": "channel",
                  "backend": b, "kernel": k, "p50_us": t}
                 for b, k, t in (("dequant", "cudnn", 10.0), ("triton", "implicit_gemm", 9.9))]
    conv = _write_results(tmp_path / "conv.json", conv_rows, subject="conv")
    argv = ["--tuning-from", str(conv), "--write-tuning", str(tmp_path / "t.json")]
    assert _load("bench_conv").main(argv) == 0
    assert "close calls (speedup within 2% of even, about the run-to-run spread; check " \
        "before shipping): triton 49 x1.010" in capsys.readouterr().out
    conv_rows[1]["p50_us"] = 5.0
    _write_results(tmp_path / "conv.json", conv_rows, subject="conv")
    assert _load("bench_conv").main(argv) == 0
    assert "close calls" not in capsys.readouterr().out


def test_shipped_h200_entry_matches_its_results(tmp_path, capsys):
    """The shipped NVIDIA H200 entry (and the default, its copy) is what --tuning-from
    writes from the committed results it names, with their evidence (the bench's own
    command, which reads the results' dense fp16 rows too)."""
    table = json.loads((BENCH.parent / "otq_kernels" / "tuning" / "default.json").read_text())
    entry = table["gpus"]["NVIDIA H200"]
    for bench, section in (("bench_linear", "linear"), ("bench_conv", "conv2d")):
        measured = entry["_measured"][section]
        sources = [BENCH.parent / name for name in measured["source"].split(", ")]
        assert all(path.parent.parent == BENCH / "results" / "nvidia-h200" for path in sources)
        if not all(path.exists() for path in sources):
            pytest.skip(f"{sources} not in this checkout")
        out = tmp_path / f"{section}.json"
        assert _load(bench).main(["--tuning-from", *map(str, sources),
                                  "--write-tuning", str(out)]) == 0
        written = json.loads(out.read_text())["gpus"]["NVIDIA H200"]
        assert written[section] == entry[section] == table["default"][section]
        assert written["_measured"][section] == measured
    printed = capsys.readouterr()
    assert "warning" not in printed.out + printed.err


def test_splitk_layout_choice_from_rows():
    """splitk_fm is chosen from forced splitk/splitk_fm rows, only at dispatch's splitk M."""
    linear = _load("bench_linear")
    rows = []
    for m, t_strided, t_fm in ((1, 10.0, 1.0), (16, 20.0, 10.0), (64, 30.0, 120.0),
                               (256, 50.0, 5.0)):
        base = {"M": m, "shape": "8x8", "bits": 4, "granularity": "channel",
                "backend": "triton"}
        rows += [{**base, "kernel": "splitk", "p50_us": t_strided},
                 {**base, "kernel": "splitk_fm", "p50_us": t_fm}]
    values, evidence = linear.derive_crossovers(rows)
    assert evidence["triton_splitk_field_major"] == {"16": 2.0, "64": 0.25}
    assert values["triton_splitk_field_major"] is False  # geomean of 2.0 and 0.25: ~0.71
    faster = [{**r, "p50_us": 1.0} if r["kernel"] == "splitk_fm" else r for r in rows]
    assert linear.derive_crossovers(faster)[0]["triton_splitk_field_major"] is True
    assert "triton_splitk_field_major" not in linear.derive_crossovers(
        [r for r in rows if r["M"] in (1, 256)])[0]



def test_bench_splitk_range_matches_dispatch():
    """bench_linear judges splitk_fm over the M where dispatch runs splitk."""
    matmul = pytest.importorskip("otq_kernels.backends.triton.matmul")
    linear = _load("bench_linear")
    assert linear.SPLITK_MIN_M == matmul.GEMV_MAX_M + 1
    assert linear.GEMM_MIN_M == matmul.SPLITK_MAX_M + 1


def test_conv_split_comparison_row_and_crossover():
    """The no-split conv row is timed next to the auto one and never sets the crossover."""
    conv = _load("bench_conv")
    common = _load("common")
    run = common.Run.__new__(common.Run)
    run.device = torch.device("cpu")  # the interpreter (conftest) makes triton runnable
    kernels = [(b, k) for b, k, _ in conv.candidates(run, ["triton"])]
    assert kernels == [("triton", "implicit_gemm"), ("triton", conv.NOSPLIT)]
    base = {"M": 49, "shape": "8x8x3x3@7x7", "bits": 4, "granularity": "channel"}
    rows = [{**base, "backend": "dequant", "kernel": "cudnn", "p50_us": 10.0},
            {**base, "backend": "triton", "kernel": "implicit_gemm", "p50_us": 20.0},
            {**base, "backend": "triton", "kernel": conv.NOSPLIT, "p50_us": 5.0}]
    assert conv.derive_crossover(rows)[0] == {"triton_max_m": 0, "kernel_sizes": ["3x3"]}


def test_conv_cuda_crossover_against_the_faster_rival():
    """cuda_max_m: the CUDA conv must beat the faster of dequant and Triton at every M up to
    it; the evidence is its geometric-mean speedup per M."""
    conv = _load("bench_conv")
    rows = []
    for m, dequant, triton, cuda in ((49, 10.0, 8.0, 4.0), (196, 10.0, 20.0, 8.0),
                                     (784, 10.0, 30.0, 12.0), (3136, 10.0, 40.0, 5.0)):
        base = {"M": m, "shape": "8x8x3x3@7x7", "bits": 4, "granularity": "channel"}
        rows += [{**base, "backend": "dequant", "kernel": "cudnn", "p50_us": dequant},
                 {**base, "backend": "triton", "kernel": "implicit_gemm", "p50_us": triton},
                 {**base, "backend": "cuda", "kernel": "lut_conv", "p50_us": cuda}]
        rows.append({**base, "backend": "cuda", "kernel": conv.CHANNELS_LAST, "p50_us": 1.0})
    values, evidence = conv.derive_crossover(rows)  # judged on NCHW x: lut_conv_cl left out
    assert values == {"triton_max_m": 49, "cuda_max_m": 196, "kernel_sizes": ["3x3"]}
    assert evidence["cuda"] == {"49": 2.0, "196": 1.25, "784": 0.833, "3136": 2.0}


def test_conv_entry_names_the_kernel_sizes_it_measured():
    """kernel_sizes: those of the layers whose rows were judged (1×1 convs only where the
    run included them); rows that judge no path write no entry at all."""
    conv = _load("bench_conv")
    rows = [{"M": 49, "shape": shape, "bits": 4, "granularity": "channel", "backend": b,
             "kernel": k, "p50_us": t}
            for shape in ("8x8x3x3@7x7", "16x8x1x1@7x7", "8x4x1x5@9x9")
            for b, k, t in (("dequant", "cudnn", 10.0), ("cuda", "lut_conv", 5.0))]
    assert conv.derive_crossover(rows)[0] == {
        "cuda_max_m": 49, "kernel_sizes": ["1x1", "1x5", "3x3"]}
    dense_only = [r for r in rows if r["backend"] == "dequant"]
    assert conv.derive_crossover(dense_only) == ({}, {})


def test_conv_crossover_of_its_own_for_a_kernel_size_that_differs():
    """Where one kernel size's layers alone cross over at another M than all layers
    together (here the 1×1 convs lose at M = 196, the 3×3 ones win up to 784), the entry
    maps that size to its own crossover, with its evidence."""
    conv = _load("bench_conv")
    rows = []
    for m, hw in ((49, "7x7"), (196, "14x14"), (784, "28x28")):
        for shape, cuda in ((f"8x8x3x3@{hw}", 4.0), (f"16x8x1x1@{hw}", 5.0 if m == 49 else 12.0)):
            base = {"M": m, "shape": shape, "bits": 4, "granularity": "channel"}
            rows += [{**base, "backend": "dequant", "kernel": "cudnn", "p50_us": 10.0},
                     {**base, "backend": "cuda", "kernel": "lut_conv", "p50_us": cuda}]
    values, evidence = conv.derive_crossover(rows)
    assert values == {"cuda_max_m": 784, "cuda_max_m_by_kernel": {"1x1": 49},
                      "kernel_sizes": ["1x1", "3x3"]}
    assert evidence["cuda_by_kernel"] == {"1x1": {"49": 2.0, "196": 0.833, "784": 0.833},
                                          "3x3": {"49": 2.5, "196": 2.5, "784": 2.5}}


def test_conv_path_without_times_on_a_kernel_size_is_kept_off_it():
    """lut_conv timed on the 3×3 layers only (here: not timed on the 1×1 ones, which
    Triton ran): the 1×1 convs get cuda_max_m 0, not the 3×3 layers' crossover."""
    conv = _load("bench_conv")
    rows = []
    for m, hw in ((49, "7x7"), (196, "14x14")):
        for shape in (f"8x8x3x3@{hw}", f"16x8x1x1@{hw}"):
            base = {"M": m, "shape": shape, "bits": 4, "granularity": "channel"}
            rows += [{**base, "backend": "dequant", "kernel": "cudnn", "p50_us": 10.0},
                     {**base, "backend": "triton", "kernel": "implicit_gemm", "p50_us": 20.0}]
            if "3x3" in shape:
                rows.append({**base, "backend": "cuda", "kernel": "lut_conv", "p50_us": 4.0})
    values, _ = conv.derive_crossover(rows)
    assert values == {"triton_max_m": 0, "cuda_max_m": 196, "cuda_max_m_by_kernel": {"1x1": 0},
                      "kernel_sizes": ["1x1", "3x3"]}


@pytest.mark.parametrize("failure", [{"error": "RuntimeError: lut_frag ..."},
                                     {"rel_err": 0.5}, {"rel_err": None}],
                         ids=["raised", "wrong", "non-finite"])
def test_a_path_that_failed_somewhere_wins_nowhere(failure, capsys):
    """lut_frag faster everywhere but raising or wrong at 3 bits: cuda_mma_fragment is not
    set (it applies to every width), and a warning names the path."""
    linear = _load("bench_linear")
    times = {1: {"dequant": 100.0, "lut_gemv": 30.0, "lut_mma": 50.0, "lut_frag": 20.0},
             16: {"dequant": 100.0, "lut_gemv": 160.0, "lut_mma": 80.0, "lut_frag": 40.0}}
    rows = _cuda_rows(times) + _cuda_rows(times, bits=3)
    assert linear.derive_crossovers(rows)[0]["cuda_mma_fragment"] is True
    for r in rows:
        if r["kernel"] == "lut_frag" and r["bits"] == 3 and r["M"] == 16:
            r.update(failure, p50_us=None if "error" in failure else r["p50_us"])
    values, evidence = linear.derive_crossovers(rows)
    assert "cuda_mma_fragment" not in values and "cuda_mma_fragment" not in evidence
    assert "warning: lut_frag raised or gave wrong results" in capsys.readouterr().err


def test_a_row_timed_eagerly_among_graph_replays_is_compared_with_none(tmp_path, capsys):
    """A path whose CUDA-graph capture failed is timed eagerly (host launch time
    included): it gets no ratio against the graph-timed FP16 row, wins no decision (a
    warning names it), and files timed in the two modes are not derived from together."""
    linear, common = _load("bench_linear"), _load("common")
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0},
                       16: {"dequant": 100.0, "lut_gemv": 60.0}})
    for r in rows:
        r["timing"] = "events" if r["kernel"] == "lut_gemv" and r["M"] == 16 else "graph"
    rows += [{**rows[0], "backend": "fp16", "kernel": "cublas", "p50_us": 50.0, "M": m}
             for m in (1, 16)]
    common.fill_ratios(rows, ("shape", "M"))
    assert [(r["M"], r.get("ratio")) for r in rows if r["kernel"] == "lut_gemv"] == [
        (1, 50.0 / 30.0), (16, None)]
    assert linear.derive_crossovers(rows)[0] == {"cuda_max_m": 1}
    assert "1 rows timed eagerly (their CUDA-graph capture failed: lut_gemv)" in (
        capsys.readouterr().err)
    graphs = _write_results(tmp_path / "g.json", rows, graph=True)
    eager = _write_results(tmp_path / "e.json", rows, graph=False)
    with pytest.raises(SystemExit, match="timed eagerly, .*g.json timed as CUDA-graph"):
        linear.main(["--tuning-from", str(graphs), str(eager), "--write-tuning",
                     str(tmp_path / "t.json")])


def test_a_width_the_run_meant_to_time_but_did_not_gets_no_cuda():
    """A budget cut before 8 bits: the 8-bit layers get cuda_max_m_by_bits 0 (they were
    dispatched to the LUT GEMV up to the 4-bit crossover, never timed at 8 bits)."""
    linear = _load("bench_linear")
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0},
                       16: {"dequant": 100.0, "lut_gemv": 60.0}})
    assert linear.derive_crossovers(rows, widths=[4])[0] == {"cuda_max_m": 16}
    values, _ = linear.derive_crossovers(rows, widths=[4, 8])
    assert values == {"cuda_max_m": 16, "cuda_max_m_by_bits": {"8": 0}}


def test_tuning_from_names_what_a_cut_short_run_left_out(tmp_path, capsys):
    """A results file of a run cut short, ended by a fatal error or over budget: the
    derivation goes on, warns, and records the gaps with the evidence."""
    rows = _cuda_rows({1: {"dequant": 100.0, "lut_gemv": 30.0}})
    results = _write_results(tmp_path / "linear.json", rows, complete=False, bits=[4, 8],
                              fatal_error="CUDA error: an illegal memory access",
                              skipped_configs=["('goal', 8192, 8192, 8, 'channel')"])
    table = tmp_path / "tuning.json"
    assert _load("bench_linear").main(["--tuning-from", str(results), "--write-tuning",
                                       str(table)]) == 0
    out = capsys.readouterr().out
    entry = json.loads(table.read_text())["gpus"]["GPU X"]
    gaps = entry["_measured"]["linear"]["gaps"]
    assert [gap.split(": ", 1)[1][:20] for gap in gaps] == [
        "the run was cut shor", "a fatal CUDA error e", "1 configurations wer"]
    assert all(f"warning: {gap}" in out for gap in gaps)
    assert entry["linear"] == {"cuda_max_m": 1, "cuda_max_m_by_bits": {"8": 0}}


def test_conv_cuda_is_timed_on_both_input_layouts(tmp_path, monkeypatch):
    """lut_conv runs on the NCHW x (its copy timed with it) and, as lut_conv_cl, on a
    channels-last x made once outside the timing (the layout cudnn_nhwc gets)."""
    conv = _load("bench_conv")
    seen = []

    def fake_cuda(x, qt, stride, padding):
        seen.append(x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())
        return torch.nn.functional.conv2d(x, qt.dequantize(x.dtype), None, stride, padding)

    monkeypatch.setattr(conv, "candidates", lambda run, backends: [
        ("cuda", "lut_conv", fake_cuda), ("cuda", conv.CHANNELS_LAST, fake_cuda)])
    time_dense = conv.time_dense

    def with_a_faster_nhwc_row(run, layer_key, *args):  # (timed on a GPU only)
        fresh = layer_key not in args[-1]
        time_dense(run, layer_key, *args)
        if fresh:
            nchw = run.rows[-1]
            run.add({**nchw, "kernel": "cudnn_nhwc", "p50_us": nchw["p50_us"] / 2})

    monkeypatch.setattr(conv, "time_dense", with_a_faster_nhwc_row)
    assert conv.main(["--smoke", "--quiet", "--out", str(tmp_path), "--bits", "4",
                      "--granularity", "channel", "--batches", "2"]) == 0
    rows = json.loads((tmp_path / "conv.json").read_text())["rows"]
    kernels = {r["kernel"]: r for r in rows if r["backend"] == "cuda"}
    assert set(kernels) == {"lut_conv", conv.CHANNELS_LAST}
    assert all(r["rel_err"] < 1e-5 for r in kernels.values())
    assert set(seen) == {False, True} and seen == sorted(seen)  # NCHW calls, then NHWC
    dense = {(r["kernel"], r["shape"]): r["p50_us"] for r in rows if r["backend"] == "fp16"}
    for r in rows:  # ratio: against NCHW cuDNN (it was the last dense row's, NHWC's)
        nchw, nhwc = dense[("cudnn", r["shape"])], dense[("cudnn_nhwc", r["shape"])]
        assert r["ratio"] == pytest.approx(nchw / r["p50_us"], rel=1e-3)
        assert r["ratio_best"] == pytest.approx(min(nchw, nhwc) / r["p50_us"], rel=1e-3)


def test_tensor_core_kernel_is_timed_only_where_it_runs():
    linear = _load("bench_linear")
    for kernel in ("lut_mma", "lut_frag"):
        names, applies = linear.LIMITED[kernel]
        assert applies(torch.float16, 4, "channel") and applies(torch.bfloat16, 2, "tensor")
        assert not applies(torch.float32, 4, "tensor")
        assert not applies(torch.float16, 5, "tensor")
        assert not applies(torch.float16, 8, "channel")
    assert linear.LIMITED["lut_frag"][1](torch.float16, 8, "tensor")
    assert not linear.LIMITED["lut_mma"][1](torch.float16, 8, "tensor")
    wide = linear.LIMITED["lut_frag32"][1]  # cuda.wide_blocks_support's codes, fp16/bf16
    assert [wide(torch.float16, b, "tensor") for b in (2, 3, 4, 5, 8)] == [
        True, True, True, False, True]
    assert [wide(torch.bfloat16, b, "channel") for b in (2, 3, 4, 8)] == [
        True, True, False, False]
    assert not wide(torch.float32, 2, "tensor")
    common = _load("common")
    run = common.Run.__new__(common.Run)
    run.device = torch.device("cpu")
    kernels = [(b, k) for b, k, *_ in linear.candidates(run, ["cuda"])]
    assert kernels == [("cuda", "lut_gemv"), ("cuda", "lut_mma"), ("cuda", "lut_frag"),
                       ("cuda", "lut_frag32")]


def test_peak_memory_is_measured_on_a_warmed_up_step(monkeypatch):
    """The first step autotunes (Triton's do_bench holds a 256 MB buffer): not measured;
    cuBLAS workspaces of earlier variants are released first."""
    e2e = _load("bench_e2e")
    events = []
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda d=None: events.append("reset"))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda d=None: events.append("read") or 7)
    monkeypatch.setattr(cuda, "memory_stats",
                        lambda d=None: {"requested_bytes.all.peak": 6, "allocated_bytes": 0})
    monkeypatch.setattr(e2e, "release_cublas_workspaces", lambda: events.append("release"))

    class FakeRun:
        device = torch.device("cuda")

        def sync(self):
            events.append("sync")

    assert e2e.peak_step_bytes(FakeRun(), lambda: events.append("step")) == {
        "peak_bytes": 7, "peak_requested_bytes": 6}
    assert events == ["sync", "release", "step", "sync", "reset", "step", "sync", "read"]


def test_memory_ratios_against_the_fp16_step_of_the_same_batch_and_mode():
    e2e = _load("bench_e2e")
    row = {"M": 1, "kernel": "graph", "p50_us": 10.0, "model_bytes": 30,
           "peak_bytes": 40, "peak_requested_bytes": 36}
    rows = [{**row, "backend": "fp16", "model_bytes": 100, "peak_bytes": 160,
             "peak_requested_bytes": 150},
            {**row, "backend": "cuda"}, {**row, "backend": "cuda", "kernel": "events"}]
    e2e.fill_memory_ratios(rows)
    assert (rows[1]["peak_ratio"], rows[1]["peak_requested_ratio"]) == (0.25, 0.24)
    assert rows[1]["model_bytes_ratio"] == 0.3 and "peak_ratio" not in rows[2]


def test_error_rows_keep_the_schema():
    common = _load("common")
    try:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
    except RuntimeError as err:
        row = common.error_row(err, op="linear", backend="triton", M=1)
        assert common.is_fatal_cuda(err)
    assert row["skipped"].startswith("error: RuntimeError: CUDA error")
    assert "Traceback" in row["error"] and row["p50_us"] is None
    payload = {"meta": {k: None for k in common.META_KEYS}, "rows": [row]}
    assert common.validate(payload) == []


def test_autotune_variables_that_are_not_numbers_are_named(monkeypatch):
    gpu_limits = _load("gpu_limits")
    monkeypatch.setenv("OTQ_AUTOTUNE_MAX_CONFIGS", "4.0")
    with pytest.raises(ValueError, match="OTQ_AUTOTUNE_MAX_CONFIGS='4.0' is not an integer"):
        gpu_limits._env_int("OTQ_AUTOTUNE_MAX_CONFIGS")
    monkeypatch.setenv("OTQ_AUTOTUNE_REP_MS", "20ms")
    with pytest.raises(ValueError, match="OTQ_AUTOTUNE_REP_MS='20ms' is not a number"):
        gpu_limits._env_float("OTQ_AUTOTUNE_REP_MS")
    monkeypatch.setenv("OTQ_AUTOTUNE_REP_MS", " 2.5 ")
    assert gpu_limits._env_float("OTQ_AUTOTUNE_REP_MS") == 2.5


AUTOTUNE_PROBE = """
import sys, triton, triton.language as tl
sys.path.insert(0, sys.argv[1])
import gpu_limits

@triton.jit
def kernel(x_ptr, n, BLOCK: tl.constexpr):
    pass

configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (16, 32, 64, 128)]
tuner = triton.autotune(configs, key=["n"])(kernel)
applied = gpu_limits.apply(int(sys.argv[2]), 5.0, require_cuda=False)
tuner.nargs = {"x_ptr": None, "n": 100}
kept = tuner.prune_configs({})
bench = tuner.do_bench
timed = bench(lambda: None, quantiles=(0.5, 0.2)) if bench.__name__ == "skip" else ""
print(applied["max_configs"], len(kept), bench.__name__, timed)
"""


@pytest.mark.parametrize("limit,expected", [(2, "2 2 bench"), (1, "1 1 skip [0.0, 0.0]")])
def test_autotune_limit_patches_triton(limit, expected, tmp_path):
    """gpu_limits caps the configs autotuning tries and skips timing a lone config."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = tmp_path / "probe.py"  # @triton.jit needs its source in a file
    script.write_text(AUTOTUNE_PROBE)
    probe = subprocess.run([sys.executable, str(script), str(BENCH), str(limit)],
                           capture_output=True, text=True, timeout=120, env=env)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().startswith(expected)


def test_goal_preset_times_both_splitk_layouts_only_where_dispatch_runs_them(tmp_path):
    """Whichever layout the GPU's tuning picks for `auto`, the goal grid times the other
    at M = 16; the strided splitk is not timed in GEMM's range (M > 64)."""
    pytest.importorskip("otq_kernels.backends.triton.matmul")
    code = _run_smoke("linear", tmp_path, "--preset", "goal", "--ms", "16,80",
                      "--backends", "triton", "--bits", "2", "--granularity", "tensor")
    assert code == 0
    rows = json.loads((tmp_path / "linear.json").read_text())["rows"]
    timed = {(r["kernel"], r["M"]) for r in rows if r["backend"] == "triton" and not r["skipped"]}
    assert timed == {("auto", 16), ("splitk", 16), ("splitk_fm", 16),
                     ("auto", 80), ("gemm_strided", 80)}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_e2e_runs_the_model_in_half_precision(dtype, tmp_path):
    """The GPU runs time the UNet in fp16: every variant must run in a half dtype (a
    model-level dtype bug shows up as error rows, not as a failed run)."""
    assert _run_smoke("e2e", tmp_path, "--dtype", dtype) == 0
    rows = json.loads((tmp_path / "e2e.json").read_text())["rows"]
    assert rows and all(not row["error"] and not row["skipped"] for row in rows), rows
    assert {row["dtype"] for row in rows} == {dtype}


def test_e2e_channels_last_runs_every_variant_channels_last(tmp_path, monkeypatch):
    """--channels-last: the model's dense 4-D weights and the input are channels-last,
    every variant still runs, and the results say so."""
    bench = _load("bench_e2e")
    seen = []
    step_fn = bench.step_fn

    def spy(model, x, t, dt):
        assert x.is_contiguous(memory_format=torch.channels_last)
        seen.extend(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                    for p in model.parameters() if p.dim() == 4 and min(p.shape[1:]) > 1)
        return step_fn(model, x, t, dt)

    monkeypatch.setattr(bench, "step_fn", spy)
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--smoke", "--quiet", "--out", str(tmp_path), "--channels-last"]) == 0
    finally:
        torch.set_num_threads(threads)  # smoke mode pins 1 thread on CPU
    payload = json.loads((tmp_path / "e2e.json").read_text())
    assert payload["meta"]["channels_last"] is True
    assert payload["rows"] and all(not r["error"] for r in payload["rows"]), payload["rows"]
    assert seen and all(seen)


def test_e2e_checks_each_variants_output(smoke_dir):
    """Every quantized e2e row carries its velocity error vs the dense model (non-zero:
    quantization changes it) and, for fused variants, vs dequant (the same codes: small)."""
    out, _ = smoke_dir
    rows = json.loads((out / "e2e.json").read_text())["rows"]
    quantized = [r for r in rows if r["bits"] is not None and r.get("p50_us")]
    assert {r["backend"] for r in quantized} == {"auto", "dequant"}
    for r in quantized:
        assert 0 < r["rel_err_vs_dense"] < 0.5, r
    fused = [r for r in quantized if r["backend"] != "dequant"]
    assert fused and all(r["rel_err_vs_dequant"] < 1e-4 for r in fused), fused
    assert all("rel_err_vs_dequant" not in r for r in quantized if r["backend"] == "dequant")
    assert all(r["runtime_layout_bytes"] == 0 for r in rows if r.get("p50_us"))  # CPU: none
    # what the quantized layers ran in the step: dequant's rows on dequant only, auto's on
    # the CPU's picks; the same number of layer calls in both; none in the dense model
    calls = {r["backend"]: sum(d["calls"] for d in r["dispatch"]) for r in quantized}
    assert calls["auto"] == calls["dequant"] > 10
    assert {d["backend"] for r in quantized if r["backend"] == "dequant"
            for d in r["dispatch"]} == {"dequant"}
    assert {d["backend"] for r in fused for d in r["dispatch"]} <= {"cpu", "dequant"}
    assert all(r["dispatch"] == [] for r in rows if r["bits"] is None and r.get("p50_us"))


def test_e2e_output_errors_compare_like_with_like():
    """fill_output_errors pairs a row with the dense and dequant outputs of its batch."""
    e2e = _load("bench_e2e")
    ref = torch.ones(2, 1, 4, 4)
    outputs = {((None, None, "fp16"), 2): ref, ((4, "channel", "dequant"), 2): ref * 1.1,
               ((4, "channel", "auto"), 2): ref * 1.1 + 1e-3}
    rows = [{"bits": 4, "granularity": "channel", "backend": "auto", "M": 2, "p50_us": 1.0},
            {"bits": 4, "granularity": "channel", "backend": "dequant", "M": 2, "p50_us": 1.0},
            {"bits": 4, "granularity": "channel", "backend": "auto", "M": 16, "p50_us": 1.0}]
    e2e.fill_output_errors(rows, outputs)
    assert abs(rows[0]["rel_err_vs_dense"] - 0.101) < 1e-4
    assert abs(rows[0]["rel_err_vs_dequant"] - 1e-3 / 1.1) < 1e-6
    assert abs(rows[1]["rel_err_vs_dense"] - 0.1) < 1e-6 and "rel_err_vs_dequant" not in rows[1]
    assert "rel_err_vs_dense" not in rows[2]  # no output at that batch


def test_gpu_checks_model_runs_in_fp16_with_an_informative_output():
    """gpu_checks' quantized fp16 UNet (graph and compile checks) runs a forward whose
    output is not all zeros (ADM's zero-init layers are filled), and its comparison
    refuses an all-zero reference."""
    checks = _load("gpu_checks")
    model, x, t = checks.quantized_unet("tiny", torch.device("cpu"))
    with torch.inference_mode():
        y = model(x, t)
    assert y.dtype == torch.float16 and y.shape == x.shape and bool(y.isfinite().all())
    assert y.float().abs().mean() > 1e-3
    assert checks.compare(y + 1e-4, y)["ok"] and not checks.compare(y + 1, y)["ok"]
    zero = torch.zeros_like(y)
    assert not checks.compare(zero, zero)["ok"]


@pytest.mark.parametrize("flags,subject,kernel", [((), "splitk", "lut_gemv"),
                                                  (("--tensor-cores",), "splitk_mma", "lut_mma")])
def test_splitk_sweep_without_a_gpu_writes_a_skipped_row(tmp_path, flags, subject, kernel):
    """sweep_splitk.py times only the CUDA kernels: on CPU its one row says why it did not."""
    code = _load("sweep_splitk").main(["--smoke", "--quiet", "--device", "cpu",
                                       "--out", str(tmp_path), *flags])
    payload = json.loads((tmp_path / f"{subject}.json").read_text())
    assert code == 0 and payload["meta"]["complete"] is True
    assert [(bool(row["skipped"]), row["kernel"]) for row in payload["rows"]] == [(True, kernel)]
    assert _load("common").validate(payload) == []


def test_digest_summarizes_split_k_sweeps(tmp_path, capsys):
    """One line per kernel and M: how often each split won, the heuristic's worst excess."""
    def row(shape, split, us, picked=2):
        return {"backend": "cuda", "kernel": "lut_mma", "M": 16, "shape": shape, "bits": 4,
                "granularity": "channel", "split_k": split, "heuristic_split_k": picked,
                "p50_us": us}

    rows = [row("a", 1, 10.0), row("a", 2, 12.0), row("b", 1, 20.0), row("b", 2, 19.0),
            {"backend": "fp16", "kernel": "cublas", "M": 16, "p50_us": 5.0}]
    (tmp_path / "splitk_mma.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    line = [ln for ln in capsys.readouterr().out.splitlines() if "lut_mma M16" in ln]
    assert line == ["   lut_mma M16: fastest split (cells) {1: 1, 2: 1}; heuristic at worst "
                    "+20% (a b4 ch, split 2)"]


def test_digest_compares_lut_frag_with_lut_mma(tmp_path, capsys):
    """Per bit width and M, the geometric mean of t_lut_mma / t_lut_frag, and of
    t_lut_frag / t_lut_frag32."""
    def row(kernel, shape, gran, us, m=1):
        return {"backend": "cuda", "kernel": kernel, "M": m, "shape": shape, "bits": 2,
                "granularity": gran, "p50_us": us}

    rows = [row("lut_mma", "a", "channel", 20.0), row("lut_frag", "a", "channel", 10.0),
            row("lut_mma", "b", "tensor", 20.0), row("lut_frag", "b", "tensor", 40.0),
            row("lut_gemv", "a", "channel", 5.0), row("lut_mma", "a", "channel", 30.0, 16),
            row("lut_frag", "a", "channel", 30.0, 16), row("lut_frag32", "a", "channel", 20.0, 16),
            {"backend": "fp16", "kernel": "cublas", "M": 1, "shape": "a", "p50_us": 50.0}]
    (tmp_path / "goal_graph").mkdir()
    (tmp_path / "goal_graph" / "linear.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "   lut_frag vs lut_mma b2: M1 x1.00 | M16 x1.00" in out  # sqrt(2 * 0.5)
    assert "   lut_frag32 vs lut_frag b2: M16 x1.50" in out


def test_digest_says_when_the_best_kernel_was_timed_unlike_fp16(tmp_path, capsys):
    rows = [{"backend": "cuda", "kernel": "lut_gemv", "M": 1, "shape": "a", "bits": 4,
             "granularity": "channel", "p50_us": 10.0, "timing": "events"},
            {"backend": "fp16", "kernel": "cublas", "M": 1, "shape": "a", "p50_us": 50.0,
             "timing": "graph"}]
    (tmp_path / "goal_graph").mkdir()
    (tmp_path / "goal_graph" / "linear.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    assert "M1 x5.00 c/lut_gemv 10.0us ? (events against fp16's graph)" in (
        capsys.readouterr().out)


def test_digest_times_a_run_against_an_earlier_one(tmp_path, capsys):
    """--against OLD: per (op, backend, kernel), t_new / t_old over the rows both files
    timed (geometric mean and range); rows of one file only, and untimed ones, left out."""
    def row(backend, kernel, m, us, shape="a"):
        return {"op": "linear", "backend": backend, "kernel": kernel, "M": m, "shape": shape,
                "bits": None if backend == "fp16" else 4, "granularity": "channel",
                "p50_us": us}

    new = [row("fp16", "cublas", 1, 20.0), row("fp16", "cublas", 16, 40.0),
           row("cuda", "lut_mma", 1, 10.0), row("cuda", "lut_mma", 16, 30.0, "b")]
    old = [row("fp16", "cublas", 1, 10.0), row("fp16", "cublas", 16, 80.0),
           row("cuda", "lut_mma", 1, 20.0), row("cuda", "lut_mma", 16, None, "b"),
           row("cuda", "lut_frag", 1, 5.0)]
    for folder, rows, sha in (("new", new, "bbb"), ("old", old, "aaa")):
        (tmp_path / folder / "goal_graph").mkdir(parents=True)
        meta = {"git_sha": sha, "gpu": "G", "date": "2026-12-04T17:40:42"}
        (tmp_path / folder / "goal_graph" / "linear.json").write_text(
            json.dumps({"meta": meta, "rows": rows}))
    digest = _load("digest")
    assert digest.main([str(tmp_path / "new"), "--against", str(tmp_path / "old")]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "t / t at" in ln]
    assert lines == ["   t / t at aaa (2026-12-04): linear:cuda/lut_mma n1 x0.500 "
                     "[0.500, 0.500]; linear:fp16/cublas n2 x1.000 [0.500, 2.000]"]
    assert digest.main([str(tmp_path / "new")]) == 0  # without --against: no such line
    assert "t / t at" not in capsys.readouterr().out


def test_expand_times_the_dequant_kernel_alone(tmp_path, capsys):
    """--expand: per (shape, bits, granularity) Triton's expansion kernel on both grids, as
    op "dequantize" rows at M 0 (left out of the linear rows' digest, listed on their own),
    bit-exact, and the CUDA one (a skipped row without a GPU); the Triton grids' speedup
    sets dequant_walk_k."""
    code = _run_smoke("linear", tmp_path, "--expand", "--backends", "dequant",
                      "--granularity", "channel")
    assert code == 0
    rows = json.loads((tmp_path / "linear.json").read_text())["rows"]
    expand = [r for r in rows if r["op"] == "dequantize" and r["backend"] == "triton"]
    assert sorted(r["kernel"] for r in expand) == ["expand_1tile", "expand_walk"]
    native = [r for r in rows if r["op"] == "dequantize" and r["backend"] == "cuda"]
    assert [r["kernel"] for r in native] == ["expand_native"]
    if native[0].get("skipped"):  # no GPU (or no CUDA part): the reason is recorded
        assert "CUDA" in native[0]["skipped"]
    else:
        expand += native
    assert all(r["M"] == 0 and r["p50_us"] and r["bytes"] and not r["error"]
               and r["rel_err"] == 0 for r in expand)
    assert _load("digest").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out if "dequantize" in line] == [
        "   dequantize 40x72 b3 ch"]
    assert any(line.startswith("   40x72 b3 ch: M3") for line in out)
    linear = _load("bench_linear")
    walk, one = (next(r for r in expand if r["kernel"] == k) for k in ("expand_walk",
                                                                        "expand_1tile"))
    walk["p50_us"], one["p50_us"] = 10.0, 15.0
    values, evidence = linear.derive_crossovers(rows)
    assert values["dequant_walk_k"] is True and evidence["dequant_walk_k"] == 1.5
    walk["p50_us"] = 20.0
    assert linear.derive_crossovers(rows)[0]["dequant_walk_k"] is False


def test_digest_conv_geomeans_leave_out_the_no_split_rows(tmp_path, capsys):
    """Per bits/granularity/batch/kernel size, the geometric mean of each path's ratio_best
    over the layers (lut_conv on channels-last x apart, as cuda_cl), the no-split Triton
    comparison rows left out (they once halved Triton's)."""
    def row(backend, kernel, shape, ratio):
        return {"backend": backend, "kernel": kernel, "bits": 4, "granularity": "channel",
                "batch": 1, "shape": shape, "p50_us": 10.0, "ratio_best": ratio}

    a, b, c = "8x8x3x3@7x7", "8x8x3x3@14x14", "8x16x1x1@7x7"
    rows = [row("cuda", "lut_conv", a, 2.0), row("cuda", "lut_conv", b, 0.5),
            row("cuda", "lut_conv_cl", a, 4.0), row("cuda", "lut_conv_cl", b, 1.0),
            row("triton", "implicit_gemm", a, 0.25), row("triton", "implicit_gemm", b, 0.25),
            row("triton", "implicit_gemm_nosplit", a, 0.01),
            row("dequant", "cudnn", a, 0.5), row("dequant", "cudnn", b, 0.5),
            row("cuda", "lut_conv", c, 3.0), row("dequant", "cudnn", c, 0.25)]
    (tmp_path / "goal_graph").mkdir()
    (tmp_path / "goal_graph" / "conv.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert ("   b4 ch batch 1 3x3: geomean over 2 layers: cuda x1.00, cuda_cl x2.00, "
            "triton x0.25, dequant x0.50 (vs best dense layout)") in out
    assert ("   b4 ch batch 1 1x1: geomean over 1 layers: cuda x3.00, dequant x0.25 "
            "(vs best dense layout)") in out
    assert f"     cuda/lut_conv_cl 4b ch batch 1 {a} (xNone): 10.0us x4.00 err -" in out
    assert sum("implicit_gemm_nosplit" in line or "x0.01" in line for line in out) == 0


def test_digest_shows_the_runtime_layouts_of_an_e2e_step(tmp_path, capsys):
    """A variant that cached runtime code layouts says how many MB (part of its peak)."""
    base = {"M": 1, "kernel": "graph", "p50_us": 4000.0, "ratio": 0.9, "peak_ratio": 0.4,
            "model_bytes_ratio": 0.28, "granularity": "channel", "bits": 4}
    rows = [{**base, "backend": "cuda", "runtime_layout_bytes": 21.5e6},
            {**base, "backend": "auto", "runtime_layout_bytes": 0}]
    (tmp_path / "e2e.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    cuda, auto = [line for line in capsys.readouterr().out.splitlines() if "4b ch" in line]
    assert "bytes x0.28 layouts 21.5 MB err" in cuda
    assert "layouts" not in auto and "bytes x0.28 err" in auto


def test_digest_says_once_per_variant_and_batch_what_the_layers_ran(tmp_path, capsys):
    base = {"M": 1, "p50_us": 4000.0, "granularity": "channel", "bits": 4, "backend": "auto",
            "dispatch": [{"op": "conv2d", "backend": "dequant", "kernels": "dequant_cuda + "
                          "F.conv2d", "calls": 95}, {"op": "linear", "backend": "cuda",
                                                     "kernels": "lut_gemv", "calls": 31}]}
    rows = [{**base, "kernel": "eager"}, {**base, "kernel": "graph"},
            {**base, "M": 8, "kernel": "eager"}]
    (tmp_path / "e2e.json").write_text(json.dumps({"meta": {}, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    ran = [line.strip() for line in capsys.readouterr().out.splitlines() if "ran:" in line]
    assert ran == [f"4b ch auto       batch {m:<3} ran: 95 conv2d dequant (dequant_cuda + "
                   f"F.conv2d); 31 linear cuda (lut_gemv)" for m in (1, 8)]


def test_digest_summarizes_the_e2e_profile(tmp_path, capsys):
    """Per variant and category kernels and µs per step, then memory with the largest
    kept block's innermost call site."""
    meta = {"memory": {"fp16": {"kept_after_step": 34.6e6, "peak": 161.8e6},
                       "4b": {"kept_after_step": 0, "peak": 41.0e6},
                       "2b": {"error": "RuntimeError: out of memory"}},
            "kept_allocations": {"fp16": [{"bytes": 33554432, "frames": ["layers.py:9(f)"]}],
                                 "4b": []}}
    rows = [{"backend": "fp16", "kernel": "gemm", "kernels_per_step": 100, "p50_us": 396.7}]
    (tmp_path / "e2e_profile.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    assert _load("digest").main([str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "   fp16             gemm       100 kernels     396.7 µs" in out
    assert ("   fp16             memory: kept 34.6 MB, peak 161.8 MB; largest kept 33.6 MB "
            "at layers.py:9(f)") in out
    assert "   4b               memory: kept 0.0 MB, peak 41.0 MB" in out
    assert "   2b               memory: error RuntimeError: out of memory" in out


def test_git_sha_prefers_the_suites_explicit_sha(monkeypatch):
    """The GPU machine's copy may carry a stale .git: OTQ_GIT_SHA wins over it."""
    common = _load("common")
    monkeypatch.setenv("OTQ_GIT_SHA", "feedbeef")
    assert common.git_sha() == "feedbeef"
    monkeypatch.delenv("OTQ_GIT_SHA")
    assert common.git_sha() != "feedbeef"


@pytest.mark.parametrize("subject", ["linear", "conv"])
def test_graph_option_is_recorded(subject, tmp_path):
    """--graph (CUDA-graph replays on a GPU; ignored by CPU wall-clock timing) runs and
    lands in meta, so that graph and eager results are never mixed up."""
    assert _run_smoke(subject, tmp_path, "--graph") == 0
    payload = json.loads((tmp_path / f"{subject}.json").read_text())
    assert payload["meta"]["graph"] is True


def test_e2e_profile_categories():
    """Kernel names fall into the categories whose times the e2e profile sums; our Triton
    kernels are found by their function names (before the cuDNN/cuBLAS patterns)."""
    profile = _load("profile_e2e")
    names = profile.triton_kernel_names()
    assert "_conv2d_kernel" in names and "_decode_rows" in names
    kernels = [("_conv2d_kernel", 5.0), ("void otq::cuda::lut_gemv_kernel<...>", 3.0),
               ("void otq::cuda::splitk_fixup_kernel<float>", 1.0),
               ("sm90_xmma_fprop_implicit_gemm_f16f16", 7.0), ("nvjet_hsh_64x8_64x16", 2.0),
               ("void at::native::vectorized_elementwise_kernel<4, ...>", 0.5),
               ("Memset (Device)", 0.25), ("some_unknown_kernel", 0.1)]
    assert profile.categorize(kernels, names) == {
        "otq_triton": (1, 5.0), "otq_cuda": (2, 4.0), "conv": (1, 7.0), "gemm": (1, 2.0),
        "torch": (1, 0.5), "copy": (1, 0.25), "other": (1, 0.1)}


def test_e2e_profile_top_kernel_names():
    """Per category, the most expensive kernel names with their counts and total µs."""
    profile = _load("profile_e2e")
    kernels = [("nvjet_a", 2.0), ("nvjet_b", 1.0), ("nvjet_a", 2.5), ("nvjet_c", 0.5),
               ("_conv2d_kernel", 4.0), ("x" * 300, 0.1)]
    top = profile.top_kernel_names(kernels, {"_conv2d_kernel"}, top=2, width=10)
    assert top == {"gemm": [("nvjet_a", 2, 4.5), ("nvjet_b", 1, 1.0)],
                   "otq_triton": [("_conv2d_ke", 1, 4.0)], "other": [("x" * 10, 1, 0.1)]}


def test_e2e_profile_kept_allocations_from_a_snapshot():
    """The largest still-allocated blocks with an allocation stack, innermost frames first,
    torch's module-call wrappers dropped; freed blocks and blocks without a stack left out."""
    frame = lambda file, line, name: {"filename": file, "line": line, "name": name}  # noqa: E731
    workspace = [frame("/x/otq_kernels/models/layers.py", 230, "forward"),
                 frame("/t/torch/nn/modules/module.py", 1783, "_call_impl"),
                 frame("/x/otq_kernels/models/unet.py", 160, "forward"),
                 frame("/x/bench_e2e.py", 77, "step"), frame("/x/run.py", 1, "main")]
    snapshot = {"segments": [
        {"blocks": [{"size": 1 << 25, "state": "active_allocated", "frames": workspace},
                    {"size": 1 << 26, "state": "inactive", "frames": workspace},
                    {"size": 1 << 27, "state": "active_allocated", "frames": []}]},
        {"blocks": [{"size": 512, "state": "active_allocated",
                     "frames": [frame("/x/a.py", 3, "f")]}]}]}
    kept = _load("profile_e2e").kept_allocations(snapshot, top=5, depth=3)
    assert kept == [{"bytes": 1 << 25, "frames": ["layers.py:230(forward)",
                                                   "unet.py:160(forward)",
                                                   "bench_e2e.py:77(step)"]},
                    {"bytes": 512, "frames": ["a.py:3(f)"]}]


def test_e2e_profile_reads_the_profilers_raw_events():
    """device_kernels uses torch's kineto events API: on a CPU-only profile, no GPU rows."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.randn(8).sum()
    assert _load("profile_e2e").device_kernels(prof) == []


def test_e2e_profile_python_hot_spots():
    """The Python functions with the most own time in one call, most first."""
    def busy():
        return sum(i * i for i in range(200_000))

    def step():
        busy()
        return len("idle")

    spots = _load("profile_e2e").python_hot_spots(step, top=3)
    assert len(spots) == 3 and any("(<genexpr>)" in name for name, *_ in spots)
    own = [t for _, _, t, _ in spots]
    assert own == sorted(own, reverse=True) and all(cum >= t for _, _, t, cum in spots)


def test_e2e_profile_without_a_gpu_writes_a_skipped_row(tmp_path):
    code = _load("profile_e2e").main(["--smoke", "--quiet", "--device", "cpu",
                                      "--out", str(tmp_path)])
    payload = json.loads((tmp_path / "e2e_profile.json").read_text())
    assert code == 0 and [bool(row["skipped"]) for row in payload["rows"]] == [True]
    assert _load("common").validate(payload) == []


def test_cpu_bench_writes_call_unet_linear_and_expand_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the checkout
    out = tmp_path / "cpu.json"
    _load("bench_cpu").main(["--out", str(out), "--reps", "1", "--configs", "tiny",
                             "--linear-shapes", "8,40"])
    data = json.loads(out.read_text())
    calls = [r for r in data["rows"] if r["op"] == "call"]
    assert [(r["layer"][:4], r["variant"]) for r in calls] == [
        ("line", "float32"), ("line", "4b channel auto"),
        ("conv", "float32"), ("conv", "4b channel auto")]
    assert all(r["us"] > 0 for r in calls)
    steps = [r for r in data["rows"] if r["op"] == "unet_step"]
    assert [r["variant"] for r in steps][:2] == ["float32", "4b channel auto"]
    linear = [r for r in data["rows"] if r["op"] == "linear"]
    assert {r["backend"] for r in linear} >= {"cpu", "cpu (OTQ_CPU_SIMD=none)", "dequant"}
    assert len(linear) == 3 * 4 * 5 and "OTQ_CPU_SIMD" not in os.environ
    expand = [r for r in data["rows"] if r["op"] == "expand"]
    assert len(expand) == 3 * 3 and "cpu (OTQ_CPU_SIMD=avx2)" in {r["backend"] for r in expand}
    assert all(r["ms"] > 0 for r in steps + linear + expand) and data["meta"]["cores"] >= 1
    assert set(data["meta"]["simd_path"].values()) <= {"avx512", "avx2", "none"}
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, cwd=BENCH).stdout.strip()
    assert data["meta"]["git_sha"] == sha  # the checkout's, wherever it runs from
    with pytest.raises(SystemExit):  # at parse time, not after the work
        _load("bench_cpu").main(["--out", str(tmp_path / "no.json"), "--reps", "0"])



class _Parsed(Exception):
    """Raised by a bench's parse_args in place of running it (the parse-only tests)."""


def _parse_only(monkeypatch) -> None:
    parse = argparse.ArgumentParser.parse_args

    def parsed(self, args=None, namespace=None):
        raise _Parsed(parse(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parsed)


def _suite_commands() -> list[tuple[str, list[str]]]:
    """(script, argv) of every ``$PY benchmarks/<script>.py ...`` in gpu_suite.sh, its
    shell variables replaced by values of the same kind."""
    text = (BENCH / "gpu_suite.sh").read_text().replace("\\\n", " ")
    text = re.sub(r"\$\(\([^)]*\)\)", "5", text).replace("$STEP_BUDGET", "5")
    commands = []
    for script, args in re.findall(r"\$PY benchmarks/(\w+)\.py([^\n'|;)]*)", text):
        argv = shlex.split(args.replace("$DIR", "/tmp/otq_suite_dir"))
        commands.append((script, [a for a in argv if not re.fullmatch(r"\d?>.*", a)]))
    return commands


def test_every_bench_command_of_the_gpu_suite_parses(monkeypatch):
    """A flag or value that a bench's parser refuses would cost a GPU session a step: each
    command line of the suite (every plan) must parse, and none may be missed."""
    commands = _suite_commands()
    scripts = {script for script, _ in commands}
    assert scripts >= {"bench_linear", "bench_conv", "bench_e2e", "bench_fit", "profile_e2e",
                       "sweep_splitk", "gpu_checks", "plot"}
    assert ("bench_linear", ["--preset", "goal", "--graph", "--ms", "256,1024", "--bits", "4",
            "--granularity", "channel", "--backends", "triton,dequant", "--kernels",
            "gemm,gemm_tile", "--out", "/tmp/otq_suite_dir/goal_large_m", "--budget-s", "5",
            "--quiet"]) in commands
    _parse_only(monkeypatch)
    for script, argv in commands:
        if script in ("common", "derive", "digest"):  # no parser: --tree-hash,
            continue  # --tuning-changes PATH (run by its own test), a folder
        with pytest.raises(_Parsed):
            _load(script).main(argv)


@pytest.mark.parametrize("script, argv, message", [
    ("bench_linear", ["--kernels", "gemm,gemm_tiles"], "'gemm_tiles' is not a Triton kernel"),
    ("bench_linear", ["--backends", "cuda,dequnt"], "'dequnt' is not a backend"),
    ("bench_linear", ["--bits", "4,9"], "'9' is not a bit width"),
    ("bench_linear", ["--ms", "1,0"], "'0' is not a positive integer"),
    ("bench_linear", ["--shapes", "8192x"], "'8192x' is not a shape NxK"),
    ("bench_conv", ["--granularity", "chanel"], "'chanel' is not a granularity"),
    ("bench_e2e", ["--variants", "fp16,4:channel:cdua"], "'4:channel:cdua' is not a variant"),
    ("bench_e2e", ["--variants", "4:channel"], "'4:channel' is not a variant"),
    ("bench_fit", ["--methods", "ot,kmeans"], "'kmeans' is not a method"),
    ("sweep_splitk", ["--splits", "1,two"], "'two' is not a positive integer"),
    ("gpu_checks", ["--checks", "graph,compiled"], "'compiled' is not a check"),
], ids=lambda v: v if isinstance(v, str) and not v.startswith("'") else None)
def test_a_bad_list_value_stops_the_bench_at_parse_time(script, argv, message, capsys):
    """Before: a typo ran the bench with error or skipped rows (or, for --kernels, without
    the kernel it named) and exited 0."""
    with pytest.raises(SystemExit) as stop:
        _load(script).main(argv)
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_list_options_parse_to_lists(monkeypatch):
    _parse_only(monkeypatch)
    with pytest.raises(_Parsed) as linear:
        _load("bench_linear").main(["--ms", "1, 16", "--shapes", "8192x4096,64X32"])
    args = linear.value.args[0]
    assert args.ms == [1, 16] and args.shapes == [(8192, 4096), (64, 32)]
    assert args.granularity == ["channel", "tensor"] and args.bits is None
    with pytest.raises(_Parsed) as e2e:
        _load("bench_e2e").main(["--variants", "fp16,3:tensor:auto"])
    assert e2e.value.args[0].variants == [(None, None, "fp16"), (3, "tensor", "auto")]


@pytest.mark.parametrize("include_1x1", [False, True], ids=["3x3", "with-1x1"])
def test_conv_layers_put_the_goal_convs_first(include_1x1):
    """The UNet's unique convs, lowest resolution first, the 1x1 ones (--include-1x1) after
    every 3x3 one: a step's budget that runs out cuts 1x1 convs before goal layers."""
    conv = _load("bench_conv")
    args = argparse.Namespace(smoke=False, include_1x1=include_1x1)
    layers, _ = conv.conv_layers(args)
    pointwise = [tuple(v["weight_shape"][2:]) == (1, 1) for v in layers]
    assert any(pointwise) == include_1x1
    assert pointwise == sorted(pointwise)
    spatial = [v["input_shape"][1] for v, p in zip(layers, pointwise, strict=True) if not p]
    assert spatial == sorted(spatial) and len(spatial) > 1


def test_tuning_changes_name_what_a_derived_table_would_dispatch_differently(tmp_path):
    """The GPU suite runs the tuned e2e only where the tuning its run earns differs from
    the shipped one: a GPU's derived sections against its shipped entry (else the
    default), evidence aside; the CLI exits 0 and names them, or 1 for none."""
    derive = _load("derive")
    shipped = json.loads((BENCH.parent / "otq_kernels" / "tuning" / "default.json").read_text())
    table = json.loads(json.dumps(shipped))
    h200 = table["gpus"]["NVIDIA H200"]
    h200["_measured"] = {"linear": {"note": "evidence only"}}
    table["gpus"]["GPU X"] = {k: shipped["default"][k] for k in ("linear", "conv2d")}
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(table))
    assert derive.tuning_changes(path) == {}
    cli = [sys.executable, str(BENCH / "derive.py"), "--tuning-changes", str(path)]
    assert subprocess.run(cli, capture_output=True).returncode == 1
    h200["conv2d"] = {**h200["conv2d"], "cuda_max_m": 784}
    table["gpus"]["GPU X"]["linear"] = {"cuda_max_m": 8}
    path.write_text(json.dumps(table))
    assert derive.tuning_changes(path) == {"NVIDIA H200": ["conv2d"], "GPU X": ["linear"]}
    done = subprocess.run(cli, capture_output=True, text=True)
    assert done.returncode == 0 and "GPU X" in done.stdout


def test_results_name_the_dispatch_tuning_they_ran_under(monkeypatch):
    """meta.tuning_file / meta.tuning: which table auto dispatch read (None on CPU)."""
    common = _load("common")
    monkeypatch.setenv("OTQ_TUNING_FILE", "/tmp/some_tuning.json")
    meta = common.base_meta("e2e", torch.device("cpu"), smoke=True)
    assert meta["tuning_file"] == "/tmp/some_tuning.json" and meta["tuning"] is None
    monkeypatch.delenv("OTQ_TUNING_FILE")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    tuning = common.dispatch_tuning(torch.device("cuda", 0))
    from otq_kernels import ops

    shipped = ops.tuning_table("NVIDIA H200")
    assert tuning == {"linear": shipped["linear"], "conv2d": shipped["conv2d"]}
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU Y")
    monkeypatch.setenv("OTQ_TUNING_FILE", "/tmp/no_such_tuning.json")
    error = common.dispatch_tuning(torch.device("cuda", 0))["error"]
    assert "OTQ_TUNING_FILE=/tmp/no_such_tuning.json: cannot read it" in error
    ops.reload_tuning()  # (nothing cached for GPU Y: it raised)


def test_graph_timing_captures_through_the_packages_capture(monkeypatch):
    """capture_graph (the benches' graph replays) captures with otq_kernels.graphs'
    capture_cuda_graph, one warm-up, and returns None with the error text when that fails
    (the bench then times eagerly)."""
    common = _load("common")
    synced, graph = [], object()
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: synced.append(True))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)

    def capture(fn, device, warmup=1):
        assert device == torch.device("cuda", 0) and warmup == 1
        return fn(), graph

    monkeypatch.setattr(common, "capture_cuda_graph", capture)
    assert common.capture_graph(lambda: None) is graph and synced

    def failing(fn, device, warmup=1):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(common, "capture_cuda_graph", failing)
    errors = []
    assert common.capture_graph(lambda: None, errors) is None
    assert "stream is capturing" in errors[0]


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_a_complete_write_gives_the_caller_its_sigterm_handler_back(tmp_path):
    """A Run writes its rows on SIGTERM; its final write puts the handler it replaced
    back (a checkpoint keeps its own), so an in-process caller keeps its own."""
    import signal

    common = _load("common")
    before, threads = signal.getsignal(signal.SIGTERM), torch.get_num_threads()
    args = common.parser("probe", "").parse_args(["--smoke", "--quiet", "--out", str(tmp_path)])
    try:
        run = common.Run("probe", args, measure_ceilings=False)
        assert signal.getsignal(signal.SIGTERM) is not before
        run.write(quiet=True)
        assert signal.getsignal(signal.SIGTERM) is not before
        run.write(quiet=True, complete=True)
        assert signal.getsignal(signal.SIGTERM) is before
    finally:
        signal.signal(signal.SIGTERM, before)
        torch.set_num_threads(threads)  # (smoke mode pins 1 thread on CPU)


def test_apply_says_what_it_applied_where_it_patches_nothing(monkeypatch):
    """meta.autotune_limit records apply's answer: under the interpreter, without a CUDA
    device or without triton nothing is patched, and the answer says so (and is kept:
    apply runs once per process)."""
    if torch.cuda.is_available():
        pytest.skip("would patch triton in this process")
    monkeypatch.setenv("OTQ_AUTOTUNE_MAX_CONFIGS", "3")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    gpu_limits = _load("gpu_limits")  # (a fresh module: nothing applied yet)
    assert gpu_limits.apply_from_env() == {"max_configs": None, "rep_ms": None}
    assert gpu_limits.apply(1, 5.0, require_cuda=False) is gpu_limits.apply_from_env()
    monkeypatch.delenv("TRITON_INTERPRET")
    gpu_limits = _load("gpu_limits")
    assert gpu_limits.apply_from_env() == {"max_configs": None, "rep_ms": None,
                                           "note": "no CUDA device: not applied"}
    monkeypatch.delenv("OTQ_AUTOTUNE_MAX_CONFIGS")
    gpu_limits = _load("gpu_limits")  # (nothing asked: nothing to patch, nothing to say)
    assert gpu_limits.apply_from_env() == {"max_configs": None, "rep_ms": None}
    gpu_limits = _load("gpu_limits")
    monkeypatch.setitem(sys.modules, "triton.runtime.autotuner", None)
    assert gpu_limits.apply(2, 5.0, require_cuda=False) == {
        "max_configs": None, "rep_ms": None, "note": "triton not importable: ModuleNotFoundError"}


APPLIED_PROBE = """
import sys
sys.path.insert(0, sys.argv[1])
import gpu_limits
print(gpu_limits.apply(int(sys.argv[2]), float(sys.argv[3]), require_cuda=False))
"""


@pytest.mark.parametrize("limit,rep_ms,expected", [
    (3, 5.0, "{'max_configs': 3, 'rep_ms': 5.0}"),
    (0, 0.0, "{'max_configs': None, 'rep_ms': None}")])  # (0: no cap, triton's own timing)
def test_apply_records_the_limits_it_patched_in(limit, rep_ms, expected, tmp_path):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    probe = subprocess.run([sys.executable, "-c", APPLIED_PROBE, str(BENCH), str(limit),
                            str(rep_ms)], capture_output=True, text=True, timeout=120, env=env)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip() == expected


def test_bound_ratio_is_16_over_the_stored_bits_per_weight():
    """A 4-bit per-tensor layer of 64x128 weights stores 4096 bytes of codes and a
    16-entry fp32 codebook: 4.0625 bits/weight, a memory-bound cap of x3.94 over fp16."""
    common = _load("common")
    qt = common.random_qt(64, 128, 4, "tensor", torch.device("cpu"))
    assert common.quantized_bytes(qt) == 4096 + 64
    assert common.bound_ratio(qt) == pytest.approx(16 / 4.0625)


@pytest.mark.parametrize("argv", [[], ["--tuning-changes"], ["--tuning-changes", "a", "b"],
                                  ["--tuning", "x.json"]])
def test_derive_without_its_one_option_prints_its_usage_and_exits_2(argv):
    done = subprocess.run([sys.executable, str(BENCH / "derive.py"), *argv],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "--tuning-changes PATH" in done.stdout
