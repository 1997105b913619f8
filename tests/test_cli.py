"""The `otq` CLI and the evaluation engine (tiny random UNets, few samples and steps)."""

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import otq_kernels as otq
from otq_kernels import cli, demo, report
from otq_kernels import nn as qnn
from otq_kernels.checkpoint import read_metadata

SUBCOMMANDS = ["quantize", "sample", "eval", "info", "bench", "demo"]


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: otq {command}" in out
    assert "--random-init" not in out  # hidden test flag


def test_top_level_help_subprocess():
    out = subprocess.run([sys.executable, "-m", "otq_kernels.cli", "--help"], check=True,
                         capture_output=True, text=True).stdout
    for command in SUBCOMMANDS:
        assert command in out


def test_quantize_sample_round_trip(tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(out), "--bits", "3",
                     "--override", "input_blocks.0.0=8:lloyd", "--exclude", "out.*",
                     "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "kept float (excluded)" in text and "bits/weight overall" in text
    meta = read_metadata(out)
    assert meta["layers"]["input_blocks.0.0"]["bits"] == 8
    assert meta["layers"]["input_blocks.0.0"]["method"] == "lloyd"
    assert "out.2" not in meta["layers"] and meta["user"]["config"] == "tiny"
    png = tmp_path / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(out), "--n", "4", "--steps", "2",
                     "--method", "euler", "-o", str(png)]) == 0
    assert png.stat().st_size > 0 and "quantized model" in capsys.readouterr().out
    # a float checkpoint with --config
    from safetensors.torch import save_file

    fp = tmp_path / "fp.safetensors"
    save_file(demo.random_model("tiny").state_dict(), str(fp))
    assert cli.main(["sample", "--checkpoint", str(fp), "--config", "tiny", "--n", "2",
                     "--steps", "1", "-o", str(tmp_path / "fp.png")]) == 0
    assert "pass --config" in _refused(["sample", "--checkpoint", str(fp), "-o",
                                        str(tmp_path / "x.png")], capsys)
    # files that name a bundled config in their metadata, as the README's example writes
    save_file(demo.random_model("tiny").state_dict(), str(fp), metadata={"config": "tiny"})
    api = tmp_path / "api.safetensors"
    otq.save_quantized(otq.quantize_model(demo.random_model("tiny"), bits=3, progress=False),
                       api, metadata={"config": "tiny"})
    for path in (fp, api):
        assert cli.main(["sample", "--checkpoint", str(path), "--n", "1", "--steps", "1",
                         "-o", str(tmp_path / "named.png")]) == 0
    if not torch.cuda.is_available():
        assert "--cuda-graph needs a CUDA device" in _refused(
            ["sample", "--checkpoint", str(out), "--n", "1", "--steps", "1", "--cuda-graph",
             "-o", str(tmp_path / "g.png")], capsys)


def test_sample_prints_what_each_layer_ran(tmp_path, capsys):
    """--dispatch: each quantized layer of the model's first call with its backend and
    kernels, then the counts over every call (midpoint x 2 steps: 4 model calls)."""
    ckpt = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(ckpt), "--bits", "3",
                     "--exclude", "out.*", "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(ckpt), "--n", "2", "--steps", "2",
                     "--method", "midpoint", "-o", str(tmp_path / "s.png"), "--dispatch"]) == 0
    out = capsys.readouterr().out
    first, every = out.split("dispatch, the model's first call:\n")[1].split("\n\ndispatch, ")
    float_layers = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d)
    layers = [n for n, m in demo.random_model("tiny").named_modules()
              if isinstance(m, float_layers) and not n.startswith("out.")]
    rows = first.splitlines()[1:1 + len(layers)]
    assert [row.split()[0] for row in rows] == layers and "out.2" not in first
    assert rows[0].split()[3] == "2"  # time_embed.0: M = the batch
    per_call = sum(int(line.split()[0]) for line in first.splitlines()[len(layers) + 3:])
    assert per_call == len(layers)
    assert every.startswith(f"all {4 * len(layers)} layer calls in 4 recorded model calls:")
    float_ckpt = tmp_path / "fp.safetensors"
    from safetensors.torch import save_file

    save_file(demo.random_model("tiny").state_dict(), str(float_ckpt))
    assert cli.main(["sample", "--checkpoint", str(float_ckpt), "--config", "tiny", "--n", "1",
                     "--steps", "1", "-o", str(tmp_path / "f.png"), "--dispatch"]) == 0
    assert "dispatch: no quantized layer call was recorded" in capsys.readouterr().out


@pytest.mark.parametrize("dtype, tol", [("float16", 1e-3), ("bfloat16", 5e-3)])
def test_sample_in_half_precision(tmp_path, capsys, dtype, tol):
    """`otq sample --dtype` runs the quantized model in fp16/bf16: same grid as float32."""
    import matplotlib.pyplot as plt

    ckpt = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(ckpt), "--bits", "4",
                     "--quiet"]) == 0
    grids = {}
    for name in ("float32", dtype):
        png = tmp_path / f"{name}.png"
        assert cli.main(["sample", "--checkpoint", str(ckpt), "--n", "4", "--steps", "2",
                         "--method", "euler", "--dtype", name, "-o", str(png)]) == 0
        assert capsys.readouterr().out.rstrip().endswith(name)
        grids[name] = plt.imread(png)
    diff = abs(grids[dtype] - grids["float32"])
    assert 0 < diff.max() and diff.mean() < tol


@pytest.mark.parametrize("argv, message", [
    (["quantize", "--bits", "9"], "argument --bits: bits must be an integer in 2..8, got 9"),
    (["quantize", "--backend", "gpu"], "argument --backend: invalid choice: 'gpu'"),
    (["sample", "--n", "0"], "argument --n: must be at least 1, got 0"),
    (["sample", "--steps", "-2"], "argument --steps: must be at least 1, got -2"),
    (["eval", "--bits", "4", "1"], "argument --bits: bits must be an integer in 2..8, got 1"),
    (["demo", "--n", "two"], "argument --n: 'two' is not an integer"),
    (["sample", "--seed", str(2**64)], "argument --seed: must be between -2**63 and 2**64 - 1"),
    (["quantize", "--override", "out.2=4:ot:tensor:x"],
     "override 'out.2=4:ot:tensor:x' must be PATTERN=BITS[:METHOD[:GRANULARITY]]"),
], ids=["quantize-bits", "backend", "sample-n", "sample-steps", "eval-bits", "demo-n",
        "seed-range", "override-fields"])
def test_bad_arguments_stop_at_parse_time(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_bad_input_is_one_line_not_a_traceback(tmp_path, capsys, monkeypatch):
    """ValueErrors and OSErrors (a missing or unwritable file) of a command print
    `otq CMD: error: ...` and return 1 (OTQ_DEBUG=1 re-raises); a bad --device and a
    selection that quantizes nothing stop with a message and write nothing."""
    ckpt = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(ckpt), "--quiet"]) == 0
    raw = bytearray(ckpt.read_bytes())
    raw[-3] ^= 1  # a bit of the last tensor
    ckpt.write_bytes(bytes(raw))
    argv = ["sample", "--checkpoint", str(ckpt), "--n", "1", "--steps", "1",
            "-o", str(tmp_path / "x.png")]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("otq sample: error: ") and "does not match its checksum" in err
    assert "Traceback" not in err and not (tmp_path / "x.png").exists()
    monkeypatch.setenv("OTQ_DEBUG", "1")
    with pytest.raises(ValueError, match="checksum"):
        cli.main(argv)
    monkeypatch.delenv("OTQ_DEBUG")
    assert "--device 'gpu0' is not a device" in _refused(
        ["sample", "--random-init", "tiny", "--device", "gpu0"], capsys)
    if not torch.cuda.is_available():
        assert "--device cuda: no CUDA device is available" in _refused(
            ["sample", "--random-init", "tiny", "--device", "cuda"], capsys)
    out = tmp_path / "none.safetensors"
    with pytest.warns(UserWarning, match="include pattern 'zz\\*' matches no module"):
        assert "no layer was quantized" in _refused(
            ["quantize", "--random-init", "tiny", "--include", "zz*", "-o", str(out),
             "--quiet"], capsys)
    assert not out.exists()


def test_info_describes_a_file_and_refuses_a_damaged_one(tmp_path, capsys):
    ckpt = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(ckpt), "--bits", "3",
                     "--exclude", "out.*", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert cli.main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "format version 1" in text and "config 'tiny', UNet arguments recorded" in text
    assert "checksums match" in text and "out.2 " in text and "kept float (excluded)" in text
    assert printed.split("\n")[-3] in text  # the totals line `otq quantize` printed
    assert cli.main(["info", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quantized"] and data["metadata"]["config"] == "tiny"
    assert len(data["summary"]["layers"]) == 43
    raw = bytearray(ckpt.read_bytes())
    raw[-3] ^= 1
    ckpt.write_bytes(bytes(raw))
    assert "does not match its checksum" in _refused(["info", str(ckpt)], capsys)
    assert cli.main(["info", str(ckpt), "--no-verify"]) == 0
    assert "tensors not read" in capsys.readouterr().out


def _refused(argv, capsys) -> str:
    """What `otq ARGV` printed on stderr: one line `otq COMMAND: error: ...`, exit code 1."""
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"otq {argv[0]}: error: ") and err.count("\n") == 1, err
    return err


def test_outputs_devices_and_backends_are_refused_before_any_work(tmp_path, capsys,
                                                                  monkeypatch):
    """An output the command could not write (no image extension, under a file, a
    directory for a file, empty, the file being read), a device that holds no values or
    that this torch lacks, and a backend that cannot run on the device: one line, before
    the model is loaded or anything sampled."""
    def never(*_args, **_kwargs):
        raise AssertionError("the command went on to load or sample")

    monkeypatch.setattr(cli, "load_model", never)
    monkeypatch.setattr(demo, "run", never)
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    tiny = ["--random-init", "tiny"]
    for argv, message in [
        (["sample", *tiny, "-o", str(tmp_path / "s.txt")], "s.txt: an image grid is written "
         "as .png, .jpg, .jpeg, .pdf, .svg; not .txt"),
        (["sample", *tiny, "-o", str(a_file / "s.png")], f"-o {a_file / 's.png'}: {a_file} "
         "is not a directory"),
        (["quantize", *tiny, "-o", str(tmp_path)], f"-o {tmp_path}: {tmp_path} is a directory"),
        (["quantize", *tiny, "-o", ""], "-o: the path is empty"),
        (["quantize", *tiny, "-o", f"{a_file}/"], f"-o {a_file}/: a file name is wanted, "
         "not a directory's"),
        (["quantize", *tiny, "-o", str(fifo)], f"-o {fifo}: not a regular file"),
        (["quantize", "--checkpoint", str(a_file), "-o", str(a_file)],
         f"-o {a_file} is the checkpoint being quantized; write to another file"),
        (["eval", *tiny, "--out-dir", str(a_file / "d")], f"{a_file} is not a directory"),
        (["demo", "--out-dir", str(a_file)], f"--out-dir {a_file}: {a_file} is not a "
         "directory"),
    ]:
        assert message in _refused(argv, capsys)
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("device, message", [
    ("meta", "--device meta: cannot use the meta device (it holds no values)"),
    ("mps", "--device mps: cannot use device 'mps': Could not run"),
], ids=["meta", "mps"])
def test_a_device_that_holds_no_values_is_refused(device, message, tmp_path, capsys):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has an MPS device")
    for argv in (["sample", "--random-init", "tiny", "-o", str(tmp_path / "s.png")],
                 ["demo", "--out-dir", str(tmp_path / "d")]):
        assert message in _refused([*argv, "--device", device], capsys)
    assert not any(tmp_path.iterdir())


def test_eval_refuses_a_backend_that_cannot_run_on_the_device(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("the cuda backend runs here")
    argv = ["eval", "--random-init", "tiny", "--bits", "2", "--methods", "ot", "--n", "1",
            "--steps", "1", "--n-real", "1", "--quiet", "--backend", "cuda",
            "--out-dir", str(tmp_path / "ev")]
    assert "backend 'cuda' cannot run on cpu: the cuda backend needs CUDA tensors" in \
        _refused(argv, capsys)
    assert not (tmp_path / "ev").exists()


def test_every_refusal_has_one_format(tmp_path, capsys):
    """Input the commands refuse after parsing (a file, an architecture, a subject) prints
    one line, as the library's ValueErrors do."""
    quantized = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(quantized), "--quiet"]) == 0
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    (tmp_path / "model.pth").write_bytes(b"\x80\x02")
    refusals = {
        ("sample", "--checkpoint", str(garbage)): f"{garbage}: not a readable safetensors",
        ("sample", "--checkpoint", str(tmp_path / "no.safetensors")): "checkpoint not found",
        ("sample", "--checkpoint", str(tmp_path / "no.pt")): "checkpoint not found",
        ("quantize", "--checkpoint", str(tmp_path)): f"{tmp_path} is a directory",
        ("quantize", "--checkpoint", str(quantized), "-o", str(tmp_path / "again.safetensors"),
         "--quiet"): "the checkpoint is already quantized",
        ("eval", "--checkpoint", str(quantized)): "give the float model",
        ("bench", "no_such_subject"): "unknown subject(s) ['no_such_subject']",
        ("info", str(garbage)): f"{garbage}: not a readable safetensors",
        ("info", str(tmp_path / "model.pth")): "safetensors files only",
    }
    for argv, message in refusals.items():
        assert message in _refused(list(argv), capsys)
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.parametrize("module, extra", [("flow_matching", "fm"), ("sklearn", "fm")])
def test_a_missing_optional_dependency_names_the_extra(module, extra, tmp_path, capsys,
                                                       monkeypatch):
    """A command that needs an optional dependency (flow_matching to sample, the digits
    of scikit-learn to evaluate) says which extra installs it, in the one-line format."""
    monkeypatch.setitem(sys.modules, module, None)  # (an import of it now fails)
    monkeypatch.setitem(sys.modules, f"{module}.solver", None)
    monkeypatch.setitem(sys.modules, f"{module}.datasets", None)
    argv = (["sample", "--random-init", "tiny", "--n", "1", "--steps", "1", "-o",
             str(tmp_path / "x.png")] if module == "flow_matching" else
            ["eval", "--bits", "4", "--methods", "ot", "--n", "2", "--steps", "1",
             "--n-real", "8", "--out-dir", str(tmp_path / "eval")])
    message = _refused(argv, capsys)
    assert f"needs '{module}', an optional dependency: pip install 'otq_kernels[{extra}]'" in (
        message)


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(
        tmp_path, capsys, monkeypatch):
    """(root passes permission checks: the check is what os.access says.)"""
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != tmp_path)
    out = tmp_path / "new" / "q.safetensors"
    assert f"-o {out}: cannot write in {tmp_path}" in _refused(
        ["quantize", "--random-init", "tiny", "-o", str(out)], capsys)
    assert not out.parent.exists()


def test_a_symlink_is_checked_where_it_points(tmp_path, capsys, monkeypatch):
    """A (dangling) symlink into a folder the command cannot write is refused before any
    work; it was found only when the checkpoint was written."""
    locked = tmp_path / "locked"
    locked.mkdir()
    monkeypatch.setattr(cli.os, "access", lambda path, mode: Path(path) != locked)
    link = tmp_path / "q.safetensors"
    link.symlink_to(locked / "q.safetensors")
    assert f"-o {link}: cannot write in {locked}" in _refused(
        ["quantize", "--random-init", "tiny", "-o", str(link)], capsys)


def test_a_dangling_symlink_is_written_through_into_a_new_folder(tmp_path, capsys):
    """-o a symlink to a file in a folder not made yet: the folder made is the target's
    (it was the link's, and the save failed after quantizing)."""
    link = tmp_path / "q.safetensors"
    link.symlink_to(tmp_path / "new" / "q.safetensors")
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(link), "--quiet"]) == 0
    assert (tmp_path / "new" / "q.safetensors").is_file() and link.resolve().is_file()


def test_files_are_read_by_their_content_not_their_name(tmp_path, capsys):
    """A checkpoint written under any name (`-o Q.PT`) is read back as the safetensors it
    is (it was read as a pickle, or refused as 'unsupported format')."""
    for name in ("Q.PT", "q_no_suffix"):
        path = tmp_path / name
        assert cli.main(["quantize", "--random-init", "tiny", "-o", str(path), "--quiet"]) == 0
        assert cli.main(["info", "--", str(path)]) == 0  # (`--` ends the options)
        assert "quantized checkpoint" in capsys.readouterr().out
        assert cli.main(["sample", "--checkpoint", str(path), "--n", "1", "--steps", "1",
                         "-o", str(tmp_path / "s.png")]) == 0
    fp = tmp_path / "FP.SAFETENSORS"
    from safetensors.torch import save_file

    save_file(demo.random_model("tiny").state_dict(), str(fp), metadata={"config": "tiny"})
    assert cli.main(["sample", "--checkpoint", str(fp), "--n", "1", "--steps", "1",
                     "-o", str(tmp_path / "f.png")]) == 0


def test_a_reader_of_stdout_that_leaves_loses_no_output(tmp_path):
    """`otq quantize ... | head -1`: the file is written before the summary is printed, and
    the broken pipe ends the command quietly with 141, as SIGPIPE ends a Unix tool (it
    printed an error and returned 1, having written nothing)."""
    out = tmp_path / "q.safetensors"
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, "-m", "otq_kernels.cli", "quantize",
                           "--random-init", "tiny", "--quiet", "-o", str(out)],
                          stdout=write, stderr=subprocess.PIPE, env=env, text=True)
    os.close(write)
    assert done.returncode == 141 and done.stderr == ""
    assert read_metadata(out)["user"]["config"] == "tiny"


def test_out_of_memory_is_one_line_and_a_bug_keeps_its_traceback(capsys, monkeypatch):
    def runs_out(args):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to "
                           "allocate 4398046511104 bytes.\nmore")

    monkeypatch.setattr(cli, "cmd_info", runs_out)
    assert "out of memory: DefaultCPUAllocator: can't allocate memory" in _refused(
        ["info", "x"], capsys)
    monkeypatch.setattr(cli, "cmd_info", lambda args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["info", "x"])


def test_a_file_s_architecture_and_image_size_are_checked_before_use(tmp_path, capsys):
    """Metadata a file could hold (written by hand, checksums restamped) gives the one-line
    error, never a traceback from deep inside (AttributeError, TypeError, a negative
    dimension); an image size the UNet cannot halve is refused before quantizing."""
    from safetensors.torch import load_file, save_file

    from otq_kernels import checkpoint as ckpt

    tiny = ["--random-init", "tiny"]
    assert "image size 7 (--image-size, or the checkpoint's image_size) must be a positive " \
        "integer divisible by" in _refused(["quantize", *tiny, "--image-size", "7", "-o",
                                           str(tmp_path / "q7.safetensors")], capsys)
    assert not (tmp_path / "q7.safetensors").exists()
    good = tmp_path / "q.safetensors"
    assert cli.main(["quantize", *tiny, "-o", str(good), "--quiet"]) == 0
    capsys.readouterr()
    meta, tensors = ckpt.read_safetensors(good)
    for user, message in [("[1]", "metadata 'user' must be a JSON object"),
                          ('{"config": "tiny", "image_size": -16}', "image size -16"),
                          ('{"config": "tiny", "image_size": [16]}', "image size [16]"),
                          ('{"config_kwargs": [1, 2]}', "config_kwargs is not a JSON object"),
                          ('{"config_kwargs": {"bogus": 1}}', "UNet arguments do not fit")]:
        bad = dict(meta, user=user)
        bad[ckpt.CHECKSUMS] = ckpt._checksums(bad, tensors)
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
        assert message in _refused(["sample", "--checkpoint", str(tmp_path / "bad.safetensors"),
                                    "--n", "1", "-o", str(tmp_path / "s.png")], capsys)
    fp = tmp_path / "fp.safetensors"
    save_file(load_file(str(good)), str(fp), metadata={"config_kwargs": "[1, 2]"})
    assert "config_kwargs is not a JSON object" in _refused(
        ["sample", "--checkpoint", str(fp), "--n", "1", "-o", str(tmp_path / "s.png")], capsys)


def test_json_output_takes_what_json_does(tmp_path, capsys):
    """inf/nan as strings, tensors and numpy values as lists and numbers, and metadata as
    deeply nested as json.loads takes (600 levels overflowed the recursive conversion)."""
    import numpy as np

    assert report.jsonable({"a": [math.inf, -math.inf, math.nan], 3: torch.tensor([1, 2]),
                            "b": np.float32(0.5), "c": (np.arange(2),)}) == {
        "a": ["inf", "-inf", "nan"], "3": [1, 2], "b": 0.5, "c": [[0, 1]]}
    deep = nested = {}
    for _ in range(600):
        nested["x"] = nested = {}
    path = tmp_path / "q.safetensors"
    otq.save_quantized(otq.quantize_model(nn.Sequential(nn.Linear(8, 4)), progress=False),
                       path, metadata={"deep": deep})
    capsys.readouterr()
    assert cli.main(["info", "--json", str(path)]) == 0
    got, depth = json.loads(capsys.readouterr().out)["metadata"]["deep"], 0
    while got:
        got, depth = got["x"], depth + 1
    assert depth == 600


def test_warnings_and_interrupts_are_one_line(tmp_path, capsys, monkeypatch):
    """A warning prints as `otq CMD: warning: ...` (it printed Python's file:line and the
    source line); Ctrl-C ends with 130 and one line (it printed a traceback)."""
    done = subprocess.run([sys.executable, "-m", "otq_kernels.cli", "quantize", "--random-init",
                           "tiny", "--quiet", "--include", "zz*", "-o",
                           str(tmp_path / "q.safetensors")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.splitlines() == [
        "otq quantize: warning: quantize_model: include pattern 'zz*' matches no module",
        "otq quantize: error: no layer was quantized (each is excluded, not included or of a "
        "type kept float); nothing written"]

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert cli.main(["info", "x"]) == 130
    assert capsys.readouterr().err == "otq info: interrupted\n"


def test_the_cli_offers_every_solver_fm_sample_takes():
    from otq_kernels import fm

    assert cli.SOLVERS == fm.FIXED_STEP_METHODS + fm.ADAPTIVE_METHODS


def test_review_of_the_session_67_cli(tmp_path, capsys, monkeypatch):
    """An adaptive solver in float16 is refused before any work (torchdiffeq's 'underflow
    in dt' traceback); --image-size is checked before quantizing while loading; a
    non-string config in the metadata is one line; --config names the config recorded;
    the command recorded is main's argv (a host program's sys.argv before); a bench
    script killed by a signal gives 128 + N."""
    import argparse

    from safetensors.torch import save_file

    from otq_kernels import streaming

    assert "the adaptive method 'dopri5' needs float32" in _refused(
        ["sample", "--random-init", "tiny", "--method", "dopri5", "--dtype", "float16",
         "-o", str(tmp_path / "s.png")], capsys)
    fp = tmp_path / "fp.safetensors"
    save_file(demo.random_model("tiny").state_dict(), str(fp), metadata={"config": "mnist"})
    monkeypatch.setattr(streaming, "load_and_quantize",
                        lambda *a, **k: pytest.fail("quantized before checking the size"))
    assert "image size 7" in _refused(["quantize", "--checkpoint", str(fp), "--config",
                                       "tiny", "--image-size", "7", "-o",
                                       str(tmp_path / "q7.safetensors")], capsys)
    args = argparse.Namespace(checkpoint=str(fp), config="tiny", image_size=None,
                              random_init=None, device="cpu")
    _, info = cli.load_model(args)
    assert info["config"] == "tiny" and info["image_size"] == 16  # (it kept 'mnist', 28)
    monkeypatch.undo()
    out = tmp_path / "q.safetensors"
    monkeypatch.setattr(sys, "argv", ["host-program", "its-own-argument"])
    assert cli.main(["quantize", "--random-init", "tiny", "--quiet", "-o", str(out)]) == 0
    assert read_metadata(out)["user"]["command"] == (
        f"otq quantize --random-init tiny --quiet -o {out}")
    meta, tensors = otq.checkpoint.read_safetensors(out)
    user = json.loads(meta["user"])
    bad = dict(meta, user=json.dumps(dict(user, config=["tiny"])))
    bad[otq.checkpoint.CHECKSUMS] = otq.checkpoint._checksums(bad, tensors)
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
    assert "its metadata 'config' is not a config name" in _refused(
        ["sample", "--checkpoint", str(tmp_path / "bad.safetensors"), "-o",
         str(tmp_path / "s.png")], capsys)
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: -13)
    assert cli.main(["bench", "linear", "--smoke"]) == 141


def test_a_closed_stdout_is_no_error(tmp_path):
    """`otq quantize ... >&-`: Python sets sys.stdout to None; the command still succeeds."""
    out = tmp_path / "q.safetensors"
    done = subprocess.run(f"{shlex.quote(sys.executable)} -m otq_kernels.cli quantize "
                          f"--random-init tiny --quiet -o {shlex.quote(str(out))} >&-",
                          shell=True, capture_output=True, text=True)
    assert done.returncode == 0 and "Traceback" not in done.stderr and out.exists()


def test_threads_are_set_for_the_command_only(tmp_path, capsys):
    """--threads N sets torch's CPU threads while the command runs; main() called from
    Python leaves its caller's setting (it kept N)."""
    before = torch.get_num_threads()
    wanted = 2 if before == 1 else 1
    seen = []
    real = cli.cmd_eval

    def spy(args):
        seen.append(torch.get_num_threads())
        return real(args)

    parser = cli.build_parser()
    eval_parser = parser._subparsers._group_actions[0].choices["eval"]
    eval_parser.set_defaults(func=spy)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cli, "build_parser", lambda: parser)
            assert cli.main(["eval", "--bits", "4", "--methods", "ot", "--n", "2", "--steps",
                             "1", "--n-real", "8", "--quiet", "--threads", str(wanted),
                             "--out-dir", str(tmp_path / "e")]) == 0
            after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert seen == [wanted] and after == before


def test_one_line_warnings_are_undone_when_commands_overlap_in_threads(monkeypatch):
    """(Each command put back the formatter it found: overlapping ones left theirs for
    good, and every later warning in the process printed as `otq info: warning`.)"""
    import threading
    import warnings

    python_format = warnings.formatwarning
    both_inside, lines = threading.Barrier(2, timeout=10), []

    def info(args):
        both_inside.wait()
        lines.append(warnings.formatwarning(f"from {args.file}", UserWarning, "f.py", 1))
        return 0

    monkeypatch.setattr(cli, "cmd_info", info)
    threads = [threading.Thread(target=cli.main, args=(["info", name],)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(lines) == ["otq info: warning: from a\n", "otq info: warning: from b\n"]
    assert warnings.formatwarning is python_format


def test_a_diverged_setting_is_a_row_not_the_end_of_the_sweep(monkeypatch, tmp_path):
    """Non-finite samples at one setting (an overflow) give that row NaN scores; the other
    settings and the outputs are written (the pixel W2 raised and lost the whole sweep)."""
    quantize = demo.quantize_model

    def diverging(model, **options):
        q = quantize(model, **options)
        if options["method"] == "uniform":
            q.out.register_forward_hook(lambda module, args, out: out * math.nan)
        return q

    monkeypatch.setattr(demo, "quantize_model", diverging)
    result = demo.evaluate(demo.random_model("tiny"), bits=(2,), methods=("ot", "uniform"),
                           n=2, steps=1, n_real=4, progress=False, log=lambda _text: None,
                           out_dir=tmp_path / "ev")
    ot, uniform = result["rows"]
    assert math.isfinite(ot["pixel_w2"]["mean"]) and math.isnan(uniform["pixel_w2"]["mean"])
    assert uniform["pixel_w2"]["method"].startswith("not computed")
    assert (tmp_path / "ev" / "results.json").exists()


def test_evaluate_quantizes_copies_that_share_the_float_tensors(monkeypatch):
    model = demo.random_model("tiny")
    tensors = model.state_dict(keep_vars=True)
    shared = []
    quantize = demo.quantize_model

    def checking(copy, **options):
        given = copy.state_dict(keep_vars=True)
        shared.append(copy is not model and given.keys() == tensors.keys()
                      and all(given[key] is value for key, value in tensors.items()))
        return quantize(copy, **options)

    monkeypatch.setattr(demo, "quantize_model", checking)
    demo.evaluate(model, bits=[2], methods=["ot", "uniform"], n=1, steps=1, n_real=2,
                  progress=False, log=lambda _text: None)
    assert shared == [True, True]
    assert model.state_dict(keep_vars=True).keys() == tensors.keys()
    assert not any(isinstance(m, (qnn.QuantLinear, qnn.QuantConv2d)) for m in model.modules())


def test_the_table_says_when_pixel_w2_is_an_upper_bound():
    exact = [{"pixel_w2": {"method": "exact", "kappa": None}}]
    bounds = [{"pixel_w2": {"method": "bounds", "kappa": 2}}]
    assert report._w2_kind(exact) == "exact per pair"
    assert "upper bound per pair: kappa=2" in report._w2_kind(exact + bounds)


def test_override_parsing():
    assert cli._parse_override("out.2=8") == ("out.2", {"bits": 8})
    assert cli._parse_override("a=b=4:lloyd:tensor") == (
        "a=b", {"bits": 4, "method": "lloyd", "granularity": "tensor"})
    with pytest.raises(Exception, match="PATTERN=BITS"):
        cli._parse_override("nobits")


def test_evaluate_leaves_the_model_as_it_was_and_checks_the_image_size_first(monkeypatch):
    model = demo.random_model("tiny").train()
    model.out.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    state = {key: value.clone() for key, value in model.state_dict().items()}
    tensors = {key: id(value) for key, value in model.state_dict(keep_vars=True).items()}
    demo.evaluate(model, bits=[8], methods=["uniform"], n=1, steps=1, n_real=2,
                  progress=False, log=lambda _text: None)
    assert {name: m.training for name, m in model.named_modules()} == modes
    after = model.state_dict(keep_vars=True)
    assert {key: id(value) for key, value in after.items()} == tensors
    assert all(torch.equal(after[key], value) for key, value in state.items())
    monkeypatch.setattr(demo, "_sample", lambda *a: pytest.fail("sampled before checking"))
    with pytest.raises(ValueError, match="SSIM needs images of at least 6x6 pixels"):
        demo.evaluate(model, image_size=5, progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes


def test_eval_writes_results(tmp_path, capsys):
    """... and leaves matplotlib's backend alone (it switched a notebook's to Agg)."""
    import matplotlib

    out_dir = tmp_path / "ev"
    backend = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        assert cli.main(["eval", "--random-init", "tiny", "--bits", "2", "8", "--methods",
                         "ot", "uniform", "--n", "4", "--steps", "2", "--n-real", "8",
                         "--quiet", "--out-dir", str(out_dir)]) == 0
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    printed = capsys.readouterr().out
    assert "vPSNR@0" in printed and "FID" in printed
    res = json.loads((out_dir / "results.json").read_text())
    assert [(r["bits"], r["method"]) for r in res["rows"]] == [
        (2, "ot"), (2, "uniform"), (8, "ot"), (8, "uniform")]
    for r in res["rows"]:
        assert r["pixel_w2"]["method"] == "exact" and len(r["pixel_w2"]["w2sq"]) == 4
        assert {"psnr", "ssim"} <= set(r["samples"]) and {"psnr", "ssim"} <= set(
            r["paper_velocity_t0"])
        assert r["latent_t0"]["n"] == 8 and r["size"]["layer_bits_per_weight"] > r["bits"]
        if r["fid"]["fid"] is None:
            assert r["fid"]["fid_unavailable"]  # a reason, never a made-up number
    by = {(r["bits"], r["method"]): r for r in res["rows"]}
    assert by[8, "ot"]["samples"]["psnr"] > by[2, "ot"]["samples"]["psnr"]
    assert by[8, "ot"]["size"]["model_bytes"] > by[2, "ot"]["size"]["model_bytes"]
    for name in ("table.txt", "fidelity_vs_bits.png", "psnr_ssim_vs_bits.png",
                 "psnr_vs_size.png", "samples_mosaic.png", "samples/fp.png",
                 "samples/b2_ot.png"):
        assert (out_dir / name).stat().st_size > 0, name


def test_fused_paper_protocol_matches_metrics():
    """The demo's one-forward velocity + latent probe equals the metrics package's."""
    from otq_kernels.metrics.fidelity import paper_velocity_psnr_ssim, velocity_psnr_ssim
    from otq_kernels.metrics.latent import latent_variance_probe

    model = demo.random_model("tiny", seed=0)
    q = qnn.quantize_model(demo.random_model("tiny", seed=0), bits=2, progress=False)
    real, _ = demo.real_images((1, 16, 16), 8)
    v_fp, _ = demo.velocity_and_latent(model, real)
    v_q, latent = demo.velocity_and_latent(q, real)
    got = velocity_psnr_ssim(v_fp, v_q)
    ref = paper_velocity_psnr_ssim(model, q, real)
    assert got["psnr"] == pytest.approx(ref["psnr"], rel=1e-4)
    assert got["ssim"] == pytest.approx(ref["ssim"], rel=1e-5)
    probe = latent_variance_probe(q, real, ts=(0.0,))[0.0]
    assert latent["mean"] == pytest.approx(probe["mean"], rel=1e-5)
    assert latent["collapsed"] == probe["collapsed"] and latent["dim"] == probe["dim"]


def test_bench_lists_or_explains(capsys, monkeypatch):
    assert cli.main(["bench", "--list"]) == 0
    assert "benchmarks in" in capsys.readouterr().out
    calls = []  # arguments after -- reach the script; nothing is actually run here
    monkeypatch.setattr(cli.subprocess, "call", lambda cmd, cwd: calls.append(cmd) or 0)
    assert cli.main(["bench", "linear", "--smoke", "--", "--bits", "4"]) == 0
    assert calls[0][2:] == ["--smoke", "--bits", "4"]
    assert calls[0][1].endswith("bench_linear.py")
    monkeypatch.setattr(cli, "_bench_dir", lambda: None)  # installed from a wheel
    assert "Clone the repository" in _refused(["bench", "--list"], capsys)
    with pytest.raises(SystemExit):
        cli.main(["sample", "--", "--x"])


def test_grid_image_shapes():
    g = report.grid_image(torch.zeros(5, 1, 4, 4), nrow=3)
    assert g.shape == (2 * 5 + 1, 3 * 5 + 1)
    g = report.grid_image(torch.zeros(2, 3, 4, 4), nrow=2)
    assert g.shape == (6, 11, 3)


@pytest.mark.parametrize("suffix", report.GRID_SUFFIXES)
@pytest.mark.parametrize("channels", [1, 3])
def test_save_grid_writes_every_format_it_accepts(tmp_path, suffix, channels):
    path = tmp_path / f"grid{suffix.upper() if suffix == '.png' else suffix}"
    report.save_grid(torch.rand(3, channels, 4, 4) * 2 - 1, path, nrow=2)
    assert path.stat().st_size > 0
    with pytest.raises(ValueError, match="not .tif"):
        report.save_grid(torch.zeros(1, 1, 2, 2), tmp_path / "grid.tif")


def _flushing() -> bool:
    return float(torch.tensor(2.0 ** -1000, dtype=torch.float64) * 2.0 ** -60) == 0.0


@pytest.mark.parametrize("before", [False, True])
def test_demo_flushes_denormals_only_while_it_runs(monkeypatch, before):
    """demo.run samples with denormals flushed and gives the caller's mode back (it left
    them flushed for the whole process)."""
    inside = []
    monkeypatch.setattr(demo, "_run", lambda *args: inside.append(_flushing()) or {})
    torch.set_flush_denormal(before)
    try:
        assert demo.run(log=lambda *a: None) == {}
        assert inside == [True] and _flushing() is before
    finally:
        torch.set_flush_denormal(False)


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_sample_grid_rows_hold_at_most_n_images(tmp_path, monkeypatch):
    """--nrow is the most images a grid row holds: fewer samples than --nrow make one
    row of them (not a row padded out with empty cells)."""
    calls = []
    monkeypatch.setattr(report, "save_grid",
                        lambda x, path, nrow=8: calls.append((len(x), nrow)))
    for n, nrow in ((3, 8), (5, 2)):
        assert cli.main(["sample", "--random-init", "tiny", "--n", str(n), "--nrow", str(nrow),
                         "--steps", "1", "--method", "euler",
                         "-o", str(tmp_path / "g.png")]) == 0
    assert calls == [(3, 3), (5, 2)]


def test_the_demo_sweeps_the_bits_it_names_from_the_api_and_the_command():
    """`otq demo` and demo.run/evaluate sweep the same widths: 2, 3, 4 and 8 bits."""
    assert demo.DEMO_BITS == (2, 3, 4, 8)
    assert cli.build_parser().parse_args(["demo"]).bits == list(demo.DEMO_BITS)


def test_each_command_puts_back_the_warning_format_it_found(monkeypatch):
    """The formatter a command found is back after it, and the next command installs its
    own again (the threads test compares with the formatter it finds at its start, which
    an earlier test's leak would already have replaced)."""
    import warnings

    def mine(message, category, filename, lineno, line=None):
        return "mine\n"

    lines = []
    monkeypatch.setattr(warnings, "formatwarning", mine)
    monkeypatch.setattr(cli, "cmd_info", lambda args: lines.append(
        warnings.formatwarning("w", UserWarning, "f.py", 1)) or 0)
    for _ in range(2):
        assert cli.main(["info", "x"]) == 0
        assert warnings.formatwarning is mine
    assert lines == ["otq info: warning: w\n"] * 2


def test_the_paper_protocol_reads_the_velocity_at_t_0():
    """velocity_and_latent's default time is the paper's t = 0 (what evaluate and score
    call it with), for every image of the batch."""
    seen = []

    class Probe(nn.Module):
        def forward(self, x, t):
            seen.append(t)
            return x

    v, latent = demo.velocity_and_latent(Probe(), torch.ones(2, 1, 8, 8))
    assert latent is None and torch.equal(v, torch.ones(2, 1, 8, 8))
    assert torch.equal(seen[0], torch.zeros(2))
