"""save_quantized / load_quantized: round trip and every corrupt-checkpoint error."""

import contextlib
import json
import os
import stat
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize, prune

import otq_kernels as otq
from otq_kernels import checkpoint as ckpt
from otq_kernels import nn as qnn


class Net(nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.attn = nn.Conv1d(width, width, 1)
        self.seq = nn.Sequential(nn.Conv1d(width, width, 3, padding=1, bias=False),
                                 nn.GroupNorm(2, width))
        self.up = nn.ConvTranspose2d(width, width, 2)  # stays float
        self.fc = nn.Linear(width, 5)

    def forward(self, x):
        h = self.up(self.conv(x)).flatten(2)          # [B, W, L]
        h = self.seq(self.attn(h))
        return self.fc(h.mean(-1))


def _quantized(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Net().eval()
    return qnn.quantize_model(model, bits=3, overrides={"fc": {"bits": 8, "method": "lloyd"},
                                                        "seq.*": {"granularity": "tensor"}},
                              progress=False)


@pytest.fixture
def saved(tmp_path):
    model = _quantized()
    path = tmp_path / "q.safetensors"
    otq.save_quantized(model, path, metadata={"config": "net"}) if hasattr(
        otq, "save_quantized") else ckpt.save_quantized(model, path, metadata={"config": "net"})
    return model, path


def _rewrite(src, dst, tensors=None, metadata=None, restamp=True):
    """Copy a safetensors file, replacing some tensors / metadata entries; restamp: with
    checksums of the new contents (a consistent file that the checks behind the checksums
    must refuse), else with the old ones (a file changed after it was written)."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors or {})
    data = {k: v for k, v in data.items() if v is not None}
    meta.update(metadata or {})
    if restamp:
        meta[ckpt.CHECKSUMS] = ckpt._checksums(meta, data)
    save_file(data, str(dst), metadata=meta)
    return dst


def _load(path, model=None):
    return ckpt.load_quantized(path, model if model is not None else Net().eval())


def _saved_4bit(make, path):
    """(the model ``make()`` builds, seeded, quantized at 4 bits; the path it was saved to)."""
    torch.manual_seed(0)
    model = qnn.quantize_model(make(), bits=4, progress=False)
    return model, otq.save_quantized(model, path)


def test_round_trip_is_exact(saved):
    model, path = saved
    loaded = _load(path)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded.fc, qnn.QuantLinear) and loaded.fc.bits == 8
    assert loaded.fc.method == "lloyd" and loaded.seq[0].granularity == "tensor"
    assert isinstance(loaded.up, nn.ConvTranspose2d)
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    # summary (with the stats recorded at quantization time) survives the round trip
    rows = {r.name: r for r in loaded.otq_summary.layers}
    assert rows["conv"].sqnr_db == pytest.approx(model.conv.stats["sqnr_db"])
    assert rows["up"].status == "kept float (unsupported type)"
    assert loaded.otq_summary.bytes_after == model.otq_summary.bytes_after
    meta = ckpt.read_metadata(path)
    assert meta["user"] == {"config": "net"} and meta["format_version"] == 1
    assert meta["layers"]["conv"]["shape"] == [8, 3, 3, 3]
    # loading into an already-quantized skeleton works too
    again = _load(path, _quantized(seed=1))
    assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("saved_as, skeleton_as", [
    (torch.float32, torch.float16), (torch.float32, torch.bfloat16),
    (torch.float16, torch.float32)], ids=["fp32-into-fp16", "fp32-into-bf16", "fp16-into-fp32"])
@pytest.mark.parametrize("on", ["cpu", "meta"])
def test_loaded_biases_take_the_skeleton_s_dtype(tmp_path, saved_as, skeleton_as, on):
    """As torch's load_state_dict copies into the model's dtypes: the quantized layers'
    biases kept the file's dtype (a float16 model with float32 biases, whose dequantized
    form then failed on mixed dtypes)."""
    model = _quantized().to(saved_as)
    path = otq.save_quantized(model, tmp_path / "q.safetensors")
    with torch.device(on):
        skeleton = Net().eval().to(skeleton_as)
    loaded = _load(path, skeleton)
    want = {k: v.dtype for k, v in model.to(skeleton_as).state_dict().items()}
    assert {k: v.dtype for k, v in loaded.state_dict().items()} == want
    x = torch.randn(2, 3, 5, 5, dtype=skeleton_as)
    assert torch.equal(loaded(x), model(x))
    otq.dequantize_model(loaded)
    assert loaded(x).dtype == skeleton_as


def test_a_named_backend_is_taken_by_a_quantized_skeleton_too(saved):
    """(a quantized skeleton's layers kept their own backend, the named one ignored)"""
    _, path = saved
    backends = {n: m.backend for n, m in _load(path, _quantized(seed=1)).named_modules()
                if isinstance(m, qnn._QuantModule)}
    assert set(backends.values()) == {"auto"}
    skeleton = _quantized(seed=1)
    skeleton.fc.backend = "reference"
    kept = _load(path, skeleton)
    assert kept.fc.backend == "reference" and kept.conv.backend == "auto"  # (the default)
    named = ckpt.load_quantized(path, _quantized(seed=1), backend="reference")
    assert {m.backend for m in named.modules() if isinstance(m, qnn._QuantModule)} == {
        "reference"}


def test_save_writes_cpu_tensors_without_copying_them(tmp_path, monkeypatch):
    """(every tensor was cloned: a model on the CPU was held twice while it was written);
    tensors sharing memory as different views are still copied, which safetensors needs."""
    import safetensors.torch

    model = _quantized()
    base = torch.randn(2, 8)
    model.halves = nn.ParameterList([nn.Parameter(base[0]), nn.Parameter(base[1])])
    written = {}
    real = safetensors.torch.save_file

    def save_file(tensors, *args, **kwargs):
        written.update(tensors)
        return real(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    path = otq.save_quantized(model, tmp_path / "q.safetensors")
    assert written["fc.plane0"].data_ptr() == model.fc.plane0.data_ptr()
    assert written["conv.codebook"].data_ptr() == model.conv.codebook.data_ptr()
    assert written["halves.0"].data_ptr() != base.data_ptr()
    skeleton = Net().eval()
    skeleton.halves = nn.ParameterList([nn.Parameter(torch.zeros(8)) for _ in range(2)])
    loaded = _load(path, skeleton)
    assert torch.equal(loaded.halves[1], base[1])


def test_save_requires_quantized_layers(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        ckpt.save_quantized(Net(), tmp_path / "x.safetensors")


class _Doubled(nn.Module):
    def forward(self, t):
        return 2 * t


def _non_persistent_codebook(layer):
    layer.register_buffer("codebook", layer.codebook, persistent=False)


def _subclassed(layer):
    layer.__class__ = type("MyQuantLinear", (otq.nn.QuantLinear,), {})


@pytest.mark.parametrize("change, match", [
    (_non_persistent_codebook, r"\['codebook'\] missing from the model's state_dict"),
    (lambda layer: parametrize.register_parametrization(layer, "bias", _Doubled()),
     r"its \['bias'\] are parametrized; .*remove_parametrizations"),
    (_subclassed, "a MyQuantLinear, which load_quantized cannot build"),
    (lambda layer: prune.l1_unstructured(layer, "bias", 0.5),
     r"its \['bias'\] are computed by a forward pre-hook \(pruning\).*prune.remove"),
], ids=["non-persistent-codebook", "parametrized-bias", "subclass", "pruned-bias"])
def test_save_refuses_a_layer_its_file_could_not_load(tmp_path, change, match):
    """(each was written, and load_quantized, verify_checkpoint and otq info refused the
    file)"""
    model = _quantized()
    name = next(n for n, m in model.named_modules() if isinstance(m, otq.nn.QuantLinear))
    change(model.get_submodule(name))
    with pytest.raises(ValueError, match=f"layer '{name}': {match}"):
        ckpt.save_quantized(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_swapped_model_and_path_are_named(tmp_path):
    path = tmp_path / "q.safetensors"
    with pytest.raises(TypeError, match=r"save_quantized\(model, path\): .* swapped"):
        ckpt.save_quantized(str(path), _quantized())
    ckpt.save_quantized(_quantized(), path)
    with pytest.raises(TypeError, match=r"load_quantized\(path, model\): .* swapped"):
        ckpt.load_quantized(Net(), path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        _load(tmp_path)


@pytest.mark.parametrize("metadata, match", [
    ([1, 2], "metadata must be a dict, got list"),
    ({"t": torch.zeros(1)}, "metadata must hold JSON values only.*Tensor"),
    ({"loss": float("nan")}, r"finite numbers, lists, dicts\): Out of range float"),
    ({"best": [float("inf")]}, r"finite numbers, lists, dicts\): Out of range float"),
], ids=["a-list", "a-tensor", "nan", "inf"])
def test_save_refuses_metadata_that_is_not_json(tmp_path, metadata, match):
    path = tmp_path / "q.safetensors"
    with pytest.raises(ValueError, match=match):
        ckpt.save_quantized(_quantized(), path, metadata=metadata)
    assert not path.exists()


def test_save_names_a_path_it_cannot_write(tmp_path):
    for path in (tmp_path / "no" / "dir" / "q.safetensors", tmp_path):
        with pytest.raises(OSError, match=f"cannot write {path}"):
            ckpt.save_quantized(_quantized(), path)


def test_equal_models_give_equal_bytes(tmp_path):
    """Saving one model again gives the same bytes (safetensors wrote its metadata in a
    hash map's order, a new one each save, so hashes of equal checkpoints differed)."""
    model = _quantized()
    paths = [tmp_path / f"q{i}.safetensors" for i in range(4)]
    for path in paths:
        ckpt.save_quantized(model, path, metadata={"b": 1, "a": "é\n"})
    assert len({path.read_bytes() for path in paths}) == 1
    assert list(ckpt.read_safetensors_metadata(paths[0])) == sorted(
        ckpt.read_safetensors_metadata(paths[0]))
    assert _load(paths[0]) is not None


def test_a_failed_write_keeps_the_earlier_file_and_leaves_no_partial(tmp_path, monkeypatch):
    """The file is written beside its name and renamed over it: a write that fails (a
    full disk, an interrupt) leaves the earlier checkpoint whole and nothing else."""
    from safetensors import torch as st

    path = tmp_path / "q.safetensors"
    ckpt.save_quantized(_quantized(), path)
    before = path.read_bytes()
    real = st.save_file

    def fails_half_way(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as file:
            file.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(st, "save_file", fails_half_way)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_quantized(_quantized(seed=1), path)
    assert path.read_bytes() == before and sorted(tmp_path.iterdir()) == [path]


def test_the_file_takes_the_umask_s_mode_and_a_link_s_target(tmp_path):
    """Written through a symlink, the target is replaced and the link kept, as open()
    writes through one; the mode is what the umask leaves (safetensors makes 0600)."""
    target, link = tmp_path / "real.safetensors", tmp_path / "link.safetensors"
    link.symlink_to(target.name)
    umask = os.umask(0o027)
    try:
        ckpt.save_quantized(_quantized(), link)
    finally:
        os.umask(umask)
    assert link.is_symlink() and target.is_file()
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert _load(link) is not None


class _LoRALinear(nn.Linear):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nn.Linear(self.in_features, self.out_features, bias=False)

    def forward(self, x):
        return super().forward(x) + self.lora(x)


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2)

    def forward(self, x):
        return self.attn(x, x, x)[0]


def _named(name: str, layer: nn.Module) -> nn.Module:
    """A model holding ``layer`` under the dotted ``name``."""
    root = module = nn.Module()
    *parents, last = name.split(".")
    for part in parents:
        module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.add_module(last, layer)
    return root


@pytest.mark.parametrize("name, keeps_float, match", [
    ("0", lambda: nn.Sequential(_LoRALinear(16, 16)),
     "layer '0': .* keeps it float \\(_LoRALinear overrides forward\\)"),
    ("0.attn.out_proj", lambda: nn.Sequential(_Attention()),
     "'0.attn.out_proj': .* keeps it float \\(used functionally by MultiheadAttention\\)"),
], ids=["overrides-forward", "used-functionally"])
def test_a_layer_the_model_keeps_float_is_not_swapped_for_the_file_s_codes(
        tmp_path, name, keeps_float, match):
    """(A LoRA layer lost its branch in silence; an attention's out_proj broke its first
    call with an AttributeError.)"""
    model = qnn.quantize_model(_named(name, nn.Linear(16, 16)), bits=4, progress=False)
    path = ckpt.save_quantized(model, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=match):
        ckpt.load_quantized(path, keeps_float())


def test_a_quantized_skeleton_takes_a_layer_the_file_kept_float(tmp_path):
    """A file written with a layer excluded loads into a skeleton quantized whole: that
    layer goes back to float (the file decides, as for the other layers' bits), with the
    skeleton layer's hooks; it failed on missing and unexpected keys."""
    torch.manual_seed(0)
    saved = qnn.quantize_model(Net().eval(), bits=4, exclude=["fc"], progress=False)
    path = ckpt.save_quantized(saved, tmp_path / "q.safetensors")
    skeleton = qnn.quantize_model(Net().eval(), bits=2, progress=False)
    calls = []
    skeleton.fc.register_forward_hook(lambda *args: calls.append(1))
    loaded = ckpt.load_quantized(path, skeleton)
    assert type(loaded.fc) is nn.Linear and not loaded.fc.training
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), saved(x)) and calls == [1]
    assert {row.name: row.status for row in loaded.otq_summary.layers}["fc"].startswith(
        "kept float")


def test_a_layer_back_to_float_takes_the_skeleton_s_dtype_and_keeps_its_tie(tmp_path):
    """A half-precision file's float layer comes back in the float32 skeleton's dtype (it
    came back float16, and the forward failed on mixed dtypes), and tied float weights
    come back as one parameter (they were loaded twice, untied)."""
    class TiedPair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 8)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    saved = qnn.quantize_model(TiedPair().half(), bits=4, exclude=["a", "b"], progress=False)
    path = ckpt.save_quantized(saved, tmp_path / "q.safetensors")
    loaded = ckpt.load_quantized(path, qnn.quantize_model(TiedPair(), bits=2, progress=False))
    assert loaded.a.weight is loaded.b.weight and loaded.a.weight.dtype == torch.float32
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x), saved.float()(x))


@pytest.mark.parametrize("kind", ["fifo", "trailing-slash", "long-name"])
def test_save_refuses_what_a_rename_would_replace_and_takes_long_names(tmp_path, kind):
    """A pipe or device is not replaced by a file (as root, `-o /dev/null` would have
    been), a name ending in '/' is not taken as a file's; a 240-byte name saves (the
    hidden file beside it has a short fixed name)."""
    model = _quantized()
    if kind == "long-name":
        path = tmp_path / ("n" * 228 + ".safetensors")
        ckpt.save_quantized(model, path)
        assert _load(path) is not None and sorted(tmp_path.iterdir()) == [path]
        return
    if kind == "fifo":
        path = tmp_path / "pipe"
        os.mkfifo(path)
        match = "it is not a regular file"
    else:
        path, match = f"{tmp_path}/ckpts/", "it names a directory"
    with pytest.raises(OSError, match=f"cannot write .*: {match}"):
        ckpt.save_quantized(model, path)
    assert not (tmp_path / "ckpts").exists() and (kind != "fifo" or stat.S_ISFIFO(
        os.stat(path).st_mode))


def test_an_unreadable_file_is_named_as_such(tmp_path, monkeypatch):
    """(safetensors reports any open error as 'No such file or directory'.)"""
    path = ckpt.save_quantized(_quantized(), tmp_path / "q.safetensors")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ckpt, "open", denied, raising=False)
    with pytest.raises(PermissionError, match="Permission denied"):
        _load(path)


def test_not_safetensors(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(b"\x13\x00\x00\x00\x00\x00\x00\x00{not json at all}" + bytes(64))
    with pytest.raises(ValueError, match="not a readable safetensors"):
        _load(path)


def test_truncated(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    for cut in (len(raw) - 7, 40, 4):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match="truncated or corrupt"):
            _load(bad)


def _flip_a_bit(path, dst, key):
    """Copy ``path`` with one bit flipped in the middle of tensor ``key``'s bytes (the
    corruption a disk or a copy leaves: the file still parses)."""
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    begin, end = json.loads(raw[8:8 + header_len])[key]["data_offsets"]
    raw[8 + header_len + (begin + end) // 2] ^= 0x10
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.parametrize("key", ["conv.plane1", "fc.codebook", "seq.1.weight", "up.bias"])
def test_a_flipped_bit_is_caught_by_the_tensors_checksum(saved, tmp_path, key):
    """Planes, codebooks and float tensors alike: a changed byte that still parses (codes
    stay in range, floats finite) is refused by name, before the model is touched."""
    _, path = saved
    bad = _flip_a_bit(path, tmp_path / "flip.safetensors", key)
    model = Net()
    with pytest.raises(ValueError, match=f"tensor '{key}' does not match its checksum"):
        _load(bad, model)
    with pytest.raises(ValueError, match="checksum"):
        ckpt.read_metadata(bad)
    assert isinstance(model.conv, nn.Conv2d)  # untouched


def test_changes_after_saving_are_caught_by_the_checksums(saved, tmp_path):
    """Edited metadata (a layer's stats) and a tensor added or dropped, each written with
    the checksums of the original file."""
    _, path = saved
    layers = ckpt.read_metadata(path)["layers"]
    layers["conv"]["stats"]["sqnr_db"] = 99.0
    edited = _rewrite(path, tmp_path / "m.safetensors", restamp=False,
                      metadata={"layers": json.dumps(layers)})
    with pytest.raises(ValueError, match="metadata do not match their checksum"):
        _load(edited)
    for change, listed in (({"up.extra": torch.zeros(1)}, "unlisted \\['up.extra'\\]"),
                           ({"up.bias": None}, "missing \\['up.bias'\\]")):
        bad = _rewrite(path, tmp_path / "t.safetensors", tensors=change, restamp=False)
        with pytest.raises(ValueError, match=f"differ from those the checksums list .*{listed}"):
            _load(bad)
    assert _load(_rewrite(path, tmp_path / "same.safetensors", restamp=False))


def test_a_file_without_checksums_still_loads(saved, tmp_path):
    """Files written before the checksums existed are read without the check."""
    model, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
        data = {k: f.get_tensor(k) for k in f.keys()}
    assert set(json.loads(meta.pop(ckpt.CHECKSUMS))) == set(data) | {"__metadata__"}
    old = tmp_path / "old.safetensors"
    save_file(data, str(old), metadata=meta)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(_load(old)(x), model(x))


def test_format_and_version(saved, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match="unknown format_version '99'"):
        _load(_rewrite(path, tmp_path / "v.safetensors", metadata={"format_version": "99"}))
    plain = tmp_path / "float.safetensors"
    save_file({k: v.contiguous() for k, v in Net().state_dict().items()}, str(plain))
    with pytest.raises(ValueError, match="not an otq_kernels quantized checkpoint"):
        _load(plain)
    with pytest.raises(ValueError, match="'layers' is not valid JSON"):
        _load(_rewrite(path, tmp_path / "j.safetensors", metadata={"layers": "{oops"}))


@pytest.mark.parametrize(
    "key,value,match",
    [
        ("conv.plane0", torch.zeros(8, 3, dtype=torch.int32), "layer 'conv'.*plane"),
        ("conv.plane1", torch.zeros(8, 1, dtype=torch.int64), "'conv.plane1' has dtype"),
        ("conv.plane1", None, "'conv.plane1' is missing"),
        ("fc.codebook", torch.zeros(5, 16), "layer 'fc'.*codebook"),
        ("fc.codebook", torch.zeros(5, 256, dtype=torch.float16), "'fc.codebook' has dtype"),
        ("fc.codebook", torch.full((5, 256), float("nan")), "NaN"),
        ("fc.bias", torch.zeros(7), "'fc.bias' must be float"),
        ("seq.1.weight", torch.zeros(9), "'seq.1.weight' has shape"),
        ("seq.1.bias", torch.zeros(8, dtype=torch.int32), "'seq.1.bias' has dtype"),
        ("up.extra", torch.zeros(1), "unexpected keys \\['up.extra'\\]"),
        ("up.weight", None, "missing keys \\['up.weight'\\]"),
    ],
)
def test_tampered_tensors(saved, tmp_path, key, value, match):
    _, path = saved
    bad = _rewrite(path, tmp_path / "bad.safetensors", tensors={key: value})
    model = Net()
    with pytest.raises(ValueError, match=match):
        _load(bad, model)
    assert isinstance(model.conv, nn.Conv2d) and isinstance(model.fc, nn.Linear)  # untouched


def _with_layer_meta(path, dst, name, **changes):
    layers = ckpt.read_metadata(path)["layers"]
    if changes.pop("drop", False):
        del layers[name]
    else:
        layers[name].update(changes)
    return _rewrite(path, dst, metadata={"layers": json.dumps(layers)})


@pytest.mark.parametrize(
    "name,changes,match",
    [
        ("conv", {"bits": 4}, "'conv.plane1': too many bit planes"),
        ("conv", {"bits": 9}, "layer 'conv'.*bits"),
        ("conv", {"shape": [8, 3, 3, 4]}, "layer 'conv': weight shape"),
        ("conv", {"shape": [8, 3, 3]}, "layer 'conv': shape"),
        ("fc", {"type": "QuantConv9d"}, "layer 'fc': unknown layer type"),
        ("fc", {"type": "QuantConv2d", "shape": [5, 8, 1, 1]}, "layer 'fc': checkpoint has "
                                                               "QuantConv2d"),
        ("fc", {"granularity": "row"}, "layer 'fc': bad granularity"),
        ("fc", {"bias": False}, "layer 'fc': bias"),
        ("fc", {"stats": [1.0]}, "layer 'fc': stats"),
        ("fc", {"stats": {"sqnr_db": "high"}}, "layer 'fc': stats"),
        ("attn", {"drop": True}, "unexpected keys"),
    ],
)
def test_tampered_metadata(saved, tmp_path, name, changes, match):
    _, path = saved
    bad = _with_layer_meta(path, tmp_path / "bad.safetensors", name, **changes)
    with pytest.raises(ValueError, match=match):
        _load(bad)


def test_wrong_model(saved):
    _, path = saved

    class Other(Net):
        def __init__(self):
            super().__init__()
            del self.fc

    with pytest.raises(ValueError, match="layer 'fc' from the checkpoint is missing"):
        _load(path, Other())
    with pytest.raises(ValueError, match="layer 'conv': weight shape"):
        _load(path, Net(width=16))


def test_a_loaded_model_owns_its_tensors(saved):
    """The file overwritten in place or truncated after loading changes nothing: the
    tensors were views of the file's pages mapped into the process (the weights changed
    silently; a truncated file killed the process at the next forward, SIGBUS)."""
    model, path = saved
    loaded = _load(path)
    x = torch.randn(2, 3, 6, 6)
    expected = loaded(x)
    size = path.stat().st_size
    with open(path, "r+b") as file:
        file.seek(size // 2)
        file.write(b"\x7f" * (size - size // 2))
    assert torch.equal(loaded(x), expected)
    os.truncate(path, 16)
    assert torch.equal(loaded(x), expected)


def test_a_file_renamed_over_the_path_while_it_is_read_is_not_mixed_in(
        saved, tmp_path, renamed_over_after_the_header):
    """An atomic save of another model over the path between the header check and the
    tensor reads: the load reads the file it opened, whole (it reopened the path for the
    tensors, and mixed one file's header with the other's data: "corrupt")."""
    model, path = saved
    other = tmp_path / "other.safetensors"
    ckpt.save_quantized(_quantized(seed=1), other)
    renamed_over_after_the_header(path, other)
    loaded = _load(path)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), model(x))


def test_every_dtype_safetensors_holds_is_read(tmp_path):
    """Tensors of dtypes beyond the plain table (complex, 8-bit floats, packed 4-bit) read
    back as safetensors reads them: the one-open reader refused them at first."""
    tensors = {"c64": torch.randn(3, dtype=torch.complex64),
               "e8m0": torch.ones(4).to(torch.float8_e8m0fnu),
               "fp4": torch.zeros(2, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)}
    save_file(tensors, str(tmp_path / "t.safetensors"))
    _, read = ckpt.read_safetensors(tmp_path / "t.safetensors")
    for key, t in tensors.items():
        assert read[key].dtype == t.dtype and read[key].shape == t.shape
        assert torch.equal(read[key].view(torch.uint8), t.view(torch.uint8))


def test_a_lazy_skeleton_is_refused_before_anything_changes(saved):
    """A lazy layer not shaped yet is named (it was torch's RuntimeError from deep inside);
    the model is left as it was."""
    _, path = saved
    model = Net()
    model.fc = nn.LazyLinear(5)
    with pytest.raises(ValueError, match=r"parameter 'fc.weight' is not initialised yet "
                       r"\(a lazy module\): run one forward call to shape it before loading"):
        _load(path, model)
    assert type(model.conv) is nn.Conv2d and type(model.fc) is nn.LazyLinear


def test_a_shared_layer_round_trips_and_must_be_shared_in_the_skeleton(tmp_path):
    from test_nn import Shared

    model, path = _saved_4bit(Shared, tmp_path / "shared.safetensors")
    assert list(ckpt.read_metadata(path)["layers"]) == ["a"]
    loaded = _load(path, Shared())
    assert isinstance(loaded.a, qnn.QuantLinear) and loaded.a is loaded.b is loaded.c[0]
    x = torch.randn(3, 40)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="layers 'a' and 'b' are one module in the checkpoint "
                                         "\\(shared\\), but two in the model"):
        _load(path, Shared(shared=False))  # (it said only: missing and unexpected keys)
    _, separate = _saved_4bit(lambda: Shared(shared=False), tmp_path / "separate.safetensors")
    with pytest.raises(ValueError, match=r"layers \['a', 'b', 'c.0'\] are one module"):
        _load(separate, Shared())


class Tied(nn.Module):
    """A quantized layer shared under two names and a float weight tied between two layers."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(40, 40)
        self.b = self.a
        self.up = nn.ConvTranspose1d(4, 4, 2)  # stays float
        self.down = nn.ConvTranspose1d(4, 4, 2)
        self.down.weight = self.up.weight

    def forward(self, x):
        h = self.b(self.a(x)).reshape(-1, 4, 10)
        return self.down(self.up(h))


@pytest.mark.parametrize("skeleton_on", ["cpu", "meta"])
def test_a_shared_tensor_is_stored_once(tmp_path, skeleton_on):
    model, path = _saved_4bit(Tied, tmp_path / "tied.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored, meta = set(f.keys()), f.metadata()
    assert stored == {"a.plane0", "a.codebook", "a.bias", "up.weight", "up.bias", "down.bias"}
    assert json.loads(meta["aliases"]) == {"b.plane0": "a.plane0", "b.codebook": "a.codebook",
                                           "b.bias": "a.bias", "down.weight": "up.weight"}
    assert ckpt.read_metadata(path)["format_version"] == 2
    with torch.device(skeleton_on):
        skeleton = Tied()
    loaded = _load(path, skeleton)
    assert loaded.a is loaded.b and loaded.down.weight is loaded.up.weight
    x = torch.randn(3, 40)
    assert torch.equal(loaded(x), model(x))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


@pytest.mark.parametrize("aliases, match", [
    ({"b.plane0": "a.plane9"}, r"alias 'b.plane0' -> 'a.plane9' must name a stored tensor"),
    ({"a.plane0": "a.codebook"}, r"alias 'a.plane0' -> 'a.codebook'"),
    ("[1]", "metadata 'aliases' must be a JSON object"),
], ids=["target-missing", "alias-stored", "not-an-object"])
def test_bad_aliases_are_refused(tmp_path, aliases, match):
    _, path = _saved_4bit(Tied, tmp_path / "tied.safetensors")
    text = aliases if isinstance(aliases, str) else json.dumps(aliases)
    with pytest.raises(ValueError, match=match):
        _load(_rewrite(path, tmp_path / "bad.safetensors", metadata={"aliases": text}), Tied())


def test_aliases_need_version_2(saved, tmp_path):
    _, path = saved
    assert ckpt.read_metadata(path)["format_version"] == 1  # nothing shared: version 1
    bad = _rewrite(path, tmp_path / "v1.safetensors", metadata={"aliases": "{}"})
    with pytest.raises(ValueError, match="metadata 'aliases' in a version 1 file"):
        _load(bad)


@pytest.mark.parametrize("skeleton_on", ["cpu", "meta"])
def test_weight_normed_layers_round_trip(tmp_path, skeleton_on):
    from test_nn import _weight_normed

    torch.manual_seed(0)
    model = qnn.quantize_model(_weight_normed("parametrize"), bits=4, exclude="3",
                               progress=False)
    path = tmp_path / "wn.safetensors"
    otq.save_quantized(model, path)
    with torch.device(skeleton_on):
        skeleton = _weight_normed("parametrize")
    loaded = _load(path, skeleton)
    x = torch.randn(2, 6, 5)
    assert torch.equal(loaded(x), model(x))
    assert [r.status for r in loaded.otq_summary.layers] == [
        r.status for r in model.otq_summary.layers]


def test_a_compiled_model_is_quantized_saved_and_loaded_under_its_own_names(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    wrapper = torch.compile(model, backend="eager")  # never called: nothing is compiled
    assert qnn.quantize_model(wrapper, bits=3, exclude="up", progress=False) is wrapper
    assert isinstance(model.fc, qnn.QuantLinear)
    assert [r.name for r in wrapper.otq_summary.layers] == ["conv", "attn", "seq.0", "up", "fc"]
    path = tmp_path / "compiled.safetensors"
    otq.save_quantized(wrapper, path)
    assert set(ckpt.read_metadata(path)["layers"]) == {"conv", "attn", "seq.0", "fc"}
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(_load(path)(x), model(x))
    skeleton = Net().eval()
    compiled_skeleton = torch.compile(skeleton, backend="eager")
    assert _load(path, compiled_skeleton) is compiled_skeleton
    assert torch.equal(skeleton(x), model(x)) and compiled_skeleton.otq_summary.quantized


@pytest.mark.parametrize("skeleton_on", ["cpu", "meta"])
def test_a_loaded_transformer_encoder_leaves_its_fast_path(tmp_path, skeleton_on):
    from test_nn import transformer_encoder

    model, path = _saved_4bit(transformer_encoder, tmp_path / "encoder.safetensors")
    with torch.device(skeleton_on):
        skeleton = transformer_encoder()
    loaded = _load(path, skeleton)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():  # eval, no grad: where the fast path would read linear1.weight
        assert torch.equal(loaded(x), model(x))


@contextlib.contextmanager
def _warns_of_ddp(wrap: str):
    """A warning that DDP will not synchronize the swapped layers' parameters (under DDP
    only: DataParallel replicates the module at every call)."""
    if wrap == "DistributedDataParallel":
        with pytest.warns(UserWarning, match="wrapped in DistributedDataParallel, which "
                                             "synchronizes the parameters it had"):
            yield
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            yield


@pytest.mark.parametrize("wrap", ["DataParallel", "DistributedDataParallel"])
def test_a_data_parallel_model_is_quantized_saved_and_loaded_under_bare_names(tmp_path, wrap):
    """DataParallel / DDP put module. before every name: the files carry the bare names,
    so they load into the bare architecture, and a wrapped skeleton loads them too; the
    swaps warn under DDP (its gradients of the new layers were silently not averaged)."""
    import torch.distributed as dist

    if wrap == "DistributedDataParallel":  # a one-process group over a file store
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                                world_size=1)
    try:
        wrapper = getattr(nn.parallel, wrap)
        torch.manual_seed(0)
        model = Net().eval()
        wrapped = wrapper(model)
        with _warns_of_ddp(wrap):
            assert qnn.quantize_model(wrapped, bits=3, progress=False) is wrapped
        assert isinstance(model.fc, qnn.QuantLinear) and wrapped.otq_summary.quantized
        path = tmp_path / "parallel.safetensors"
        otq.save_quantized(wrapped, path)
        assert set(ckpt.read_metadata(path)["layers"]) == {"conv", "attn", "seq.0", "fc"}
        x = torch.randn(2, 3, 5, 5)
        with torch.no_grad():
            assert torch.equal(_load(path)(x), model(x))
            skeleton = Net().eval()
            with _warns_of_ddp(wrap):
                assert _load(path, wrapper(skeleton)).module is skeleton
            assert torch.equal(skeleton(x), model(x))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_the_skeletons_hooks_go_with_the_loaded_layers(saved):
    model, path = saved
    skeleton, calls = Net().eval(), []
    skeleton.fc.register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    loaded = _load(path, skeleton)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(loaded(x), model(x)) and calls == ["QuantLinear"]


def _mlp(*widths: int) -> nn.Sequential:
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def test_a_quantized_skeleton_layer_the_file_lacks_is_a_value_error(tmp_path):
    """A quantized skeleton with a layer the file holds neither quantized nor float (another
    architecture): the key mismatch, not an AttributeError, and the skeleton untouched."""
    _, path = _saved_4bit(lambda: _mlp(16, 16, 8), tmp_path / "q.safetensors")
    skeleton = qnn.quantize_model(_mlp(16, 16, 8, 8), bits=3, progress=False)
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys \['4\.bias', '4\.codebook'"):
        ckpt.load_quantized(path, skeleton)
    after = skeleton.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("bad", [["16", 16], [16, None], [16, [16]]], ids=str)
def test_a_shape_of_other_than_integers_is_refused_naming_the_layer(tmp_path, bad):
    _, path = _saved_4bit(lambda: _mlp(16, 16, 8), tmp_path / "q.safetensors")
    bad_path = _with_layer_meta(path, tmp_path / "bad.safetensors", "0", shape=bad)
    match = "layer '0': shape .* is not a valid 2-D weight shape"
    with pytest.raises(ValueError, match=match):
        ckpt.load_quantized(bad_path, _mlp(16, 16, 8))
    with pytest.raises(ValueError, match=match):
        ckpt.verify_checkpoint(bad_path)


def test_a_backend_without_a_kernel_for_a_layer_of_the_file_is_named(tmp_path):
    """The cpu backend runs no 3x3 conv: said so, naming the layer (not a key mismatch as
    if the file were another model's); the skeleton stays float."""
    def make():
        return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))

    _, path = _saved_4bit(make, tmp_path / "conv.safetensors")
    skeleton = make()
    with pytest.raises(ValueError, match="layer '0': .*backend 'cpu' has no conv kernel"):
        ckpt.load_quantized(path, skeleton, backend="cpu")
    assert isinstance(skeleton[0], nn.Conv2d) and isinstance(skeleton[2], nn.Linear)
