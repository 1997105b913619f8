"""`otq info`'s reader: a file described without a model says what loading it gives."""

import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import otq_kernels as otq
from otq_kernels import demo
from otq_kernels.checkpoint import _checksums, read_safetensors
from otq_kernels.file_info import describe_file
from otq_kernels.models import build_model


def _quantized_file(tmp_path, model=None, **options):
    model = model or demo.random_model("tiny", seed=1)
    options = {"bits": 3, "progress": False, **options}
    otq.quantize_model(model, **options)
    path = tmp_path / "q.safetensors"
    otq.save_quantized(model, path, metadata={"config": "tiny"})
    return path, model


def _rows(summary, quantized: bool) -> dict:
    """{name: row as a dict} of the quantized rows, or of the kept-float ones without
    their type (a file does not record it)."""
    keep = [r for r in summary.layers if (r.status == "quantized") == quantized]
    return {r.name: {k: v for k, v in dataclasses.asdict(r).items()
                     if quantized or k != "type"} for r in keep}


def _assert_same_summary(described, loaded) -> None:
    assert _rows(described, True) == _rows(loaded, True)
    assert _rows(described, False) == _rows(loaded, False)
    assert (described.params, described.bytes_fp32, described.bytes_fp16,
            described.bytes_after) == (loaded.params, loaded.bytes_fp32, loaded.bytes_fp16,
                                       loaded.bytes_after)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "header-only"])
def test_a_quantized_file_reads_as_the_model_it_loads_into(tmp_path, verify):
    path, _ = _quantized_file(
        tmp_path, exclude=["out.*"],
        overrides={"input_blocks.0.0": {"bits": 8, "granularity": "tensor"},
                   "middle_block.*": {"method": "lloyd", "bits": 2}})
    info = describe_file(path, verify=verify)
    with torch.device("meta"):
        skeleton = build_model("tiny")
    loaded = otq.load_quantized(path, skeleton).otq_summary
    _assert_same_summary(info.summary, loaded)
    assert info.quantized and info.format_version == 1 and info.otq_version == otq.__version__
    assert info.architecture == "config 'tiny' (bundled)" and info.metadata == {"config": "tiny"}
    assert info.file_bytes == path.stat().st_size
    assert set(info.tensors) == {"I32", "F32"}
    assert ("checksums match" in info.checked) == verify
    assert json.loads(json.dumps(info.to_dict()))["summary"]["bytes_after"] == loaded.bytes_after


def test_shared_layers_and_weight_norm_are_counted_as_loading_counts_them(tmp_path):
    """A layer registered twice and a weight two float layers tie are stored once
    (aliases) and counted once; a weight-normed layer kept float holds the weight's parts."""
    shared, tied, tying = nn.Linear(24, 24), nn.Linear(24, 24), nn.Linear(24, 24)
    tying.weight = tied.weight
    model = nn.Sequential(shared, nn.ReLU(), shared,
                          nn.utils.parametrizations.weight_norm(nn.Linear(24, 8)), tied, tying)
    path, quantized = _quantized_file(tmp_path, model, exclude=["3", "4", "5"])
    assert json.loads(read_safetensors(path)[0]["aliases"]) == {
        "2.plane0": "0.plane0", "2.plane1": "0.plane1", "2.codebook": "0.codebook",
        "2.bias": "0.bias", "5.weight": "4.weight"}
    info = describe_file(path)
    _assert_same_summary(info.summary, quantized.otq_summary)
    assert info.summary.bytes_after == sum(n for _, _, n in info.tensors.values())
    rows = {r.name: r for r in info.summary.layers}
    assert rows["3"].shape == [8, 24] and rows["3"].status == "kept float (excluded)"
    assert rows["5"].shape == [24, 24] and rows["5"].nbytes == rows["4"].nbytes


class _RootMatrix(nn.Module):
    """A weight matrix on the root module itself, beside a Linear."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Parameter(torch.randn(8, 16))
        self.a = nn.Linear(16, 16)


def _quantized_twice(model):
    otq.quantize_model(model, bits=3, exclude=["2"], progress=False)
    otq.quantize_model(model, bits=3, progress=False)  # (quantizes what is still float)


def _excluded_then_replaced(model):
    otq.quantize_model(model, bits=3, exclude=["3"], progress=False)
    model[3] = nn.Identity()
    model.add_module("4", nn.Linear(8, 8))  # (added after quantizing: not selected)


@pytest.mark.parametrize("make, edit, kept", [
    (lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), _quantized_twice,
     {}),
    (lambda: nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 8)),
     _excluded_then_replaced, {"4": "kept float (not selected)"}),
    (_RootMatrix, lambda m: otq.quantize_model(m, bits=3, progress=False),
     {"": "kept float (unsupported type)"}),
], ids=["quantized-twice", "kept-float-layer-replaced", "root-matrix"])
def test_kept_float_is_the_saved_model_s_own(tmp_path, make, edit, kept):
    """The file's kept_float lists the float layers the model has when saved (the reasons
    recorded by every quantize_model call, however stale, were written: otq info then
    called the file corrupt), the root's own matrix included."""
    model = make()
    edit(model)
    path = tmp_path / "q.safetensors"
    otq.save_quantized(model, path)
    info = describe_file(path)
    assert {r.name: r.status for r in info.summary.layers if r.status != "quantized"} == kept
    _assert_same_summary(info.summary, otq.nn.quantization_summary(model))


def test_rows_come_in_name_order_numbers_as_numbers(tmp_path):
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(12)])
    path, _ = _quantized_file(tmp_path, model, exclude=["1"])
    assert [r.name for r in describe_file(path).summary.layers] == [str(i) for i in range(12)]


def test_a_float_file_says_what_loading_it_needs(tmp_path):
    model = demo.random_model("tiny")
    for metadata, architecture in [
            (None, "not recorded: loading it needs --config"),
            ({"config": "tiny"}, "config 'tiny' (bundled)"),
            ({"config": "mine"}, "config 'mine' is not a bundled one: loading it needs --config"),
            ({"config_kwargs": json.dumps({"model_channels": 8})},
             "UNet arguments recorded (config_kwargs)")]:
        path = tmp_path / "fp.safetensors"
        save_file(model.state_dict(), str(path), metadata=metadata)
        info = describe_file(path)
        assert not info.quantized and info.summary is None
        assert info.architecture == architecture
        count = sum(t.numel() for t in model.state_dict().values())
        assert info.tensors == {"F32": [len(model.state_dict()), count, 4 * count]}
        assert f"floating-point parameters: {count:,}" in str(info)


def test_a_quantized_state_dict_without_otq_metadata_is_named_so(tmp_path):
    """A quantized model's state dict written by safetensors itself: otq info called it a
    float file and suggested `otq quantize`, which then failed on missing weights."""
    from safetensors.torch import save_model

    from otq_kernels.models import load_fm_checkpoint

    model = demo.random_model("tiny", seed=1)
    otq.quantize_model(model, bits=3, progress=False)
    path = tmp_path / "sd.safetensors"
    save_model(model, str(path))
    with pytest.raises(ValueError, match="holds quantized layers' codes .* without "
                                         "otq_kernels metadata.*otq.save_quantized"):
        describe_file(path)
    with pytest.raises(ValueError, match="it holds quantized layers' codes, not float "
                                         "weights .*otq.load_quantized"):
        load_fm_checkpoint(str(path), demo.random_model("tiny"))


def _rewrite(path, change=None, layers=None, metadata=None) -> None:
    """Write ``path`` again with ``change(tensors)`` applied, the ``layers`` metadata
    updated from ``layers`` ({name: {key: value}}), other metadata strings from
    ``metadata``, and valid checksums."""
    meta, tensors = read_safetensors(path)
    if change:
        change(tensors)
    entries = json.loads(meta["layers"])
    for name, values in (layers or {}).items():
        entries[name].update(values)
    meta["layers"] = json.dumps(entries)
    meta.update(metadata or {})
    meta.pop("checksums")
    meta["checksums"] = _checksums(meta, tensors)
    save_file(tensors, str(path), metadata=meta)


def test_a_damaged_file_is_reported_not_described(tmp_path):
    path, _ = _quantized_file(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="does not match its checksum"):
        describe_file(path)
    assert describe_file(path, verify=False).summary.layers  # the header is intact

    path, _ = _quantized_file(tmp_path)
    _rewrite(path, lambda t: t["out.2.codebook"].fill_(float("nan")))
    with pytest.raises(ValueError, match="'out.2.codebook' contains NaN/Inf"):
        describe_file(path)
    assert describe_file(path, verify=False).summary.layers  # the values are not read
    _rewrite(path, lambda t: t.pop("out.2.codebook"))
    with pytest.raises(ValueError, match="'out.2.codebook' is missing"):
        describe_file(path, verify=False)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "header-only"])
@pytest.mark.parametrize("changes, match", [
    ({"stats": [1.0]}, "layer 'out.2': stats"),
    ({"bits": 9}, "layer 'out.2': bits must be"),
    ({"shape": [1, 32, 3]}, "layer 'out.2': shape"),
    ({"type": ["QuantConv2d"]}, "layer 'out.2': unknown layer type"),
    ({"method": {"ot": 1}}, "layer 'out.2': method {'ot': 1} is not a name"),
    ({"stats": {"sqnr_db": 10**400}}, "layer 'out.2': stats"),
    ({"stats": {"sqnr_db": True}}, "layer 'out.2': stats"),
], ids=["stats", "bits", "shape", "type", "method", "huge-number", "bool"])
def test_metadata_load_quantized_refuses_is_refused(tmp_path, verify, changes, match):
    path, _ = _quantized_file(tmp_path)
    _rewrite(path, layers={"out.2": changes})
    with pytest.raises(ValueError, match=f"{path}: {match}"):
        describe_file(path, verify=verify)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "header-only"])
@pytest.mark.parametrize("metadata, match", [
    ({"aliases": json.dumps({"x.weight": ["out.2.codebook"]})}, "alias 'x.weight' -> \\['out"),
    ({"aliases": json.dumps({"out.2.codebook": "out.2.plane0"})}, "alias 'out.2.codebook'"),
    ({"user": "[" * 100_000 + "]" * 100_000}, "metadata 'user' is nested too deeply"),
], ids=["alias-to-a-list", "alias-over-a-stored-tensor", "deep-nesting"])
def test_crafted_metadata_is_refused(tmp_path, verify, metadata, match):
    """Metadata with valid checksums that no writer makes: a ValueError, not a TypeError
    or RecursionError from inside, nor numbers of one tensor reported for another."""
    path, _ = _quantized_file(tmp_path)
    _rewrite(path, metadata={"format_version": "2", **metadata})
    with pytest.raises(ValueError, match=match):
        describe_file(path, verify=verify)


def _plane0_empty(t):
    t["out.2.plane0"] = t["out.2.plane0"][:, :0].clone()


def _plane0_int64(t):
    t["out.2.plane0"] = t["out.2.plane0"].long()


def _plane2_extra(t):
    t["out.2.plane2"] = t["out.2.plane1"].clone()


def _bias_long(t):
    t["out.2.bias"] = torch.zeros(2)


def _codebook_uint16(t):
    t["out.2.codebook"] = t["out.2.codebook"].view(torch.uint16)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "header-only"])
@pytest.mark.parametrize("change, match", [
    (_plane0_empty, "'out.2': tensors inconsistent with bits=3"),
    (_plane0_int64, "'out.2.plane0' has dtype torch.int64, expected torch.int32"),
    (_plane2_extra, "'out.2.plane2': too many bit planes"),
    (_bias_long, "'out.2.bias' must be float \\[1\\]"),
    (_codebook_uint16, "'out.2.codebook' has dtype"),
], ids=["plane-shape", "plane-dtype", "extra-plane", "bias-shape", "codebook-dtype"])
def test_tensors_that_disagree_with_their_layer_are_refused(tmp_path, verify, change, match):
    """The header alone shows a plane, codebook or bias whose shape or dtype does not fit
    the layer's bits and shape: header-only mode refuses what loading would."""
    path, _ = _quantized_file(tmp_path)
    _rewrite(path, change)
    with pytest.raises(ValueError, match=match):
        describe_file(path, verify=verify)


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "header-only"])
@pytest.mark.parametrize("kept, match", [
    ({"out.2": "excluded"}, "'out.2' is listed both as quantized and as kept float"),
    ({"nowhere": "excluded"}, "'nowhere' is listed as kept float but the file holds no"),
], ids=["quantized-and-kept", "kept-without-tensors"])
def test_kept_float_names_that_fit_no_layer_are_refused(tmp_path, verify, kept, match):
    path, _ = _quantized_file(tmp_path, exclude=["time_embed.*"])
    _rewrite(path, metadata={"kept_float": json.dumps(kept)})
    with pytest.raises(ValueError, match=match):
        describe_file(path, verify=verify)
    _rewrite(path, metadata={"kept_float": json.dumps({"time_embed.0": "excluded"})})
    assert "kept float (excluded)" in str(describe_file(path, verify=verify))


def test_a_file_written_before_checksums_says_so(tmp_path):
    path, _ = _quantized_file(tmp_path)
    meta, tensors = read_safetensors(path)
    del meta["checksums"]
    save_file(tensors, str(path), metadata=meta)
    assert "every tensor read: no checksums (an older file)" in describe_file(path).checked


def test_files_it_does_not_read(tmp_path):
    pickle = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, pickle)
    with pytest.raises(ValueError, match="safetensors files only"):
        describe_file(pickle)
    with pytest.raises(FileNotFoundError):
        describe_file(tmp_path / "missing.safetensors")
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)  # opening it would wait for a writer
    with pytest.raises(ValueError, match="is not a regular file"):
        describe_file(fifo)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 40)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        describe_file(garbage)


def test_json_report_is_strict_json(tmp_path, capsys):
    """An exact codebook's SQNR is inf: `otq info --json` writes it as "inf", not the
    Infinity that strict JSON parsers refuse."""
    from otq_kernels import cli

    path, _ = _quantized_file(tmp_path)
    _rewrite(path, layers={"out.2": {"stats": {"sqnr_db": float("inf")}}})
    assert cli.main(["info", str(path), "--json"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    rows = json.loads(capsys.readouterr().out, parse_constant=refuse)["summary"]["layers"]
    assert [row["sqnr_db"] for row in rows if row["name"] == "out.2"] == ["inf"]


def test_a_file_renamed_over_the_path_while_it_is_described_is_not_mixed_in(
        tmp_path, renamed_over_after_the_header):
    """An atomic save of another model over the path while `otq info` reads: the report is
    the first file's, its checksums checked on its own tensors (the header and the
    tensors were read in two opens: one file's layer table, another's checksums)."""
    path, _ = _quantized_file(tmp_path)
    expected = describe_file(path)
    other = tmp_path / "other.safetensors"
    otq.save_quantized(otq.quantize_model(demo.random_model("tiny", seed=2), bits=2,
                                          progress=False), other)
    renamed_over_after_the_header(path, other)
    assert describe_file(path) == expected
