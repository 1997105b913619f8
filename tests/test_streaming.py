"""load_and_quantize: a float checkpoint quantized while it loads, one layer at a time, gives
what quantize_model gives after load_fm_checkpoint (otq_kernels.streaming)."""

import platform
import weakref

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import otq_kernels as otq
from otq_kernels import cli, streaming
from otq_kernels.models import build_model, load_fm_checkpoint

OPTIONS = dict(bits=3, exclude=["time_embed.*"], overrides={"out.*": {"bits": 5}},
               progress=False)


def _float_unet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    return model.eval()


def _meta(config: str = "tiny") -> nn.Module:
    with torch.device("meta"):
        return build_model(config).eval()


def _meta_names(model: nn.Module) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def _assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key, value in sa.items():
        assert value.dtype == sb[key].dtype and torch.equal(value, sb[key]), key
    assert a.otq_summary.layers == b.otq_summary.layers


def _sources(tmp_path, src: nn.Module) -> dict:
    """The same weights as the checkpoints a user has: safetensors (fp32 and fp16), a
    wrapper-prefixed safetensors, a state dict, the examples' EMA .pth layout."""
    state = src.state_dict()
    save_file(state, str(tmp_path / "f32.safetensors"))
    save_file({k: v.half() for k, v in state.items()}, str(tmp_path / "f16.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ddp.safetensors"))
    ema = {f"model.{k}": torch.zeros_like(v) for k, v in state.items()}
    ema.update({f"shadow_params.{i}": p.detach().clone() for i, p in
                enumerate(src.parameters())})
    torch.save({"model": ema, "epoch": 1}, tmp_path / "ema.pth")
    return {"f32": tmp_path / "f32.safetensors", "f16": tmp_path / "f16.safetensors",
            "ddp": tmp_path / "ddp.safetensors", "dict": dict(state),
            "ema": tmp_path / "ema.pth"}


@pytest.mark.parametrize("kind", ["f32", "f16", "ddp", "dict", "ema"])
def test_quantizing_while_loading_equals_loading_then_quantizing(tmp_path, kind):
    source = _sources(tmp_path, _float_unet())[kind]
    expected = otq.quantize_model(load_fm_checkpoint(source, _meta()), **OPTIONS)
    skeleton = _meta()
    model = otq.load_and_quantize(source, skeleton, **OPTIONS)
    assert model is skeleton and _meta_names(model) == []
    assert model.input_blocks[0][0].codebook.device.type == "cpu"
    assert isinstance(model.time_embed[0], nn.Linear)  # excluded
    assert model.out[2].bits == 5  # overridden
    _assert_same_model(model, expected)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert torch.equal(model(x, t), expected(x, t))


def test_no_more_than_one_float_layer_is_alive_at_a_time(tmp_path, monkeypatch):
    path = _sources(tmp_path, _float_unet())["f32"]
    made, alive_at_fit, alive_at_build = [], [], []
    real_layer, real_fit = streaming._float_layer, otq.nn.QuantConv2d.from_float.__func__

    def float_layer(*args):
        alive_at_build.append(sum(ref() is not None for ref in made))
        layer = real_layer(*args)
        made.append(weakref.ref(layer))
        return layer

    def from_float(cls, module, **kwargs):
        alive_at_fit.append(sum(ref() is not None for ref in made))
        return real_fit(cls, module, **kwargs)

    monkeypatch.setattr(streaming, "_float_layer", float_layer)
    monkeypatch.setattr(otq.nn.QuantConv2d, "from_float", classmethod(from_float))
    otq.load_and_quantize(path, _meta(), **OPTIONS)
    assert len(alive_at_fit) > 5 and max(alive_at_fit) == 1
    assert max(alive_at_build) == 0  # the last one is gone before the next is read


class Net(nn.Module):
    """A shared layer, two Linears tying one weight, a float ConvTranspose, a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 8, 2)
        self.again = self.conv_b = nn.Conv2d(8, 8, 1)
        self.head, self.tail = nn.Linear(8, 8), nn.Linear(8, 8)
        self.tail.weight = self.head.weight

    def forward(self, x):
        h = self.again(self.conv_b(self.up(self.bn(self.conv(x))))).mean((2, 3))
        return self.tail(self.head(h))

    def record(self, module, args):  # a hook bound to the model
        self.seen = [*getattr(self, "seen", []), type(module).__name__]


def test_shared_and_tied_layers_and_float_ones(tmp_path):
    torch.manual_seed(0)
    src = Net().eval()
    src.bn.running_mean.normal_()
    path = tmp_path / "net.safetensors"
    save_file({k: v.clone() for k, v in src.state_dict().items()}, str(path))
    expected = otq.quantize_model(load_fm_checkpoint(path, Net().eval()), bits=4,
                                  progress=False)
    with torch.device("meta"):
        skeleton = Net().eval()
    calls = []
    handle = skeleton.conv.register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    skeleton.head.register_forward_pre_hook(skeleton.record)
    model = otq.load_and_quantize(path, skeleton, bits=4, progress=False)
    assert model.again is model.conv_b and isinstance(model.again, otq.nn.QuantConv2d)
    model(torch.randn(1, 3, 6, 6))
    assert calls == ["QuantConv2d"] and model.seen == ["QuantLinear"]  # not copies of them
    assert model.head.codebook.data_ptr() == model.tail.codebook.data_ptr()  # tied: one set
    handle.remove()
    model(torch.randn(1, 3, 6, 6))
    assert calls == ["QuantConv2d"]
    assert isinstance(model.up, nn.ConvTranspose2d) and torch.equal(model.up.weight,
                                                                    src.up.weight)
    assert torch.equal(model.bn.running_mean, src.bn.running_mean)
    _assert_same_model(model, expected)
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), expected(x))


def _net_skeleton() -> nn.Module:
    with torch.device("meta"):
        return Net().eval()


def _both_loads(source) -> tuple[nn.Module, nn.Module]:
    """(load_and_quantize, quantize_model after load_fm_checkpoint) of ``source``."""
    expected = otq.quantize_model(load_fm_checkpoint(source, Net().eval()), bits=4,
                                  progress=False)
    return otq.load_and_quantize(source, _net_skeleton(), bits=4, progress=False), expected


def test_an_ema_layout_fills_every_name_of_a_shared_or_tied_tensor():
    """The shadows index model.parameters(), which lists a shared tensor once: its other
    names (a shared layer's, a tied weight's) take the shadow too, not the raw weight."""
    torch.manual_seed(0)
    src = Net().eval()
    ema = {f"model.{k}": torch.zeros_like(v) for k, v in src.state_dict().items()}
    ema.update({f"shadow_params.{i}": p.detach().clone() for i, p in
                enumerate(src.parameters())})
    model, expected = _both_loads(ema)
    _assert_same_model(model, expected)
    loaded = load_fm_checkpoint(ema, Net().eval())
    for name, value in src.state_dict().items():
        if "running" not in name and "num_batches" not in name:  # (buffers: raw, zeros)
            assert torch.equal(loaded.state_dict()[name], value), name


def test_a_file_with_one_name_of_each_shared_tensor_loads(tmp_path):
    """safetensors' save_model stores a tensor the model holds under several names once:
    the names it dropped take the stored value."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    src = Net().eval()
    path = tmp_path / "save_model.safetensors"
    save_model(src, str(path))
    full = tmp_path / "full.safetensors"
    save_file({k: v.clone() for k, v in src.state_dict().items()}, str(full))
    model, expected = _both_loads(path)
    _assert_same_model(model, expected)
    _assert_same_model(model, _both_loads(full)[0])


def test_a_file_holding_two_values_for_one_shared_tensor_is_refused(tmp_path):
    """The model holds one tensor under both names: which copy would it take? (torch's
    load_state_dict takes the last silently.) Identical copies, NaNs included, are one."""
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in Net().state_dict().items()}
    state["tail.weight"] = state["head.weight"] + 1
    path = tmp_path / "two.safetensors"
    save_file(state, str(path))
    message = "different values for 'head.weight' and 'tail.weight', which are one tensor"
    skeleton = _net_skeleton()
    with pytest.raises(ValueError, match=message):
        otq.load_and_quantize(path, skeleton, bits=4, progress=False)
    assert _meta_names(skeleton) == _meta_names(_net_skeleton())  # untouched
    with pytest.raises(ValueError, match=message):
        load_fm_checkpoint(path, Net())
    state["head.weight"][0, 0] = state["tail.weight"][0, 0] = float("nan")
    state["tail.weight"] = state["head.weight"].clone()
    save_file(state, str(path))
    with pytest.raises(ValueError, match="layer 'head': weight has 1 NaN/Inf"):
        otq.load_and_quantize(path, _net_skeleton(), bits=4, progress=False)


def test_a_real_model_is_filled_and_moved_too(tmp_path):
    src = _float_unet()
    path = _sources(tmp_path, src)["f32"]
    model = otq.load_and_quantize(path, _float_unet(seed=1), bits=4, progress=False)
    expected = otq.quantize_model(src, bits=4, progress=False)
    _assert_same_model(model, expected)


def test_a_bad_weight_or_option_leaves_the_skeleton_untouched(tmp_path):
    state = _float_unet().state_dict()
    state["output_blocks.1.0.in_layers.2.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(state, str(path))
    skeleton = _meta()
    before = _meta_names(skeleton)
    with pytest.raises(ValueError, match=r"layer 'output_blocks.1.0.in_layers.2': weight "
                                         r"has 1 NaN"):
        otq.load_and_quantize(path, skeleton, bits=4, progress=False)
    with pytest.raises(ValueError, match="layer 'input_blocks.0.0': backend 'cpu' has no conv"):
        otq.load_and_quantize(path, skeleton, bits=4, backend="cpu", progress=False)
    assert _meta_names(skeleton) == before
    assert isinstance(skeleton.input_blocks[0][0], nn.Conv2d)


def test_a_file_of_another_model_or_no_float_file_is_refused(tmp_path):
    path = tmp_path / "digits.safetensors"
    save_file(build_model("digits").state_dict(), str(path))
    with pytest.raises(ValueError, match="missing keys .*unexpected keys"):
        otq.load_and_quantize(path, _meta(), progress=False)
    quantized = tmp_path / "q.safetensors"
    otq.save_quantized(otq.quantize_model(_float_unet(), bits=4, progress=False), quantized)
    with pytest.raises(ValueError, match="already quantized: load it with otq.load_quantized"):
        otq.load_and_quantize(quantized, _meta(), progress=False)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        otq.load_and_quantize(truncated, _meta(), progress=False)
    with pytest.raises(FileNotFoundError):
        otq.load_and_quantize(tmp_path / "none.safetensors", _meta(), progress=False)
    with pytest.raises(ValueError, match="cannot load onto the meta device"):
        otq.load_and_quantize(path, _meta(), device="meta", progress=False)


def test_a_damaged_file_is_refused_before_the_skeleton_is_touched(tmp_path):
    """Bytes changed in the header or its length, or the file cut anywhere: a ValueError
    with the skeleton still empty, or (a change that changed nothing) the same model."""
    import random

    path = tmp_path / "f32.safetensors"
    save_file(_float_unet().state_dict(), str(path))
    clean = otq.load_and_quantize(path, _meta(), **OPTIONS)
    raw = path.read_bytes()
    header_end = 8 + int.from_bytes(raw[:8], "little")
    rng = random.Random(0)
    for case in range(36):
        damaged = bytearray(raw)
        if case % 3 == 0:
            for _ in range(rng.randint(1, 4)):
                damaged[rng.randrange(8, header_end)] = rng.randrange(256)
        elif case % 3 == 1:
            damaged[rng.randrange(8)] = rng.randrange(256)
        else:
            damaged = damaged[:rng.randrange(len(raw))]
        (tmp_path / "damaged.safetensors").write_bytes(bytes(damaged))
        skeleton = _meta()
        try:
            loaded = otq.load_and_quantize(tmp_path / "damaged.safetensors", skeleton, **OPTIONS)
        except ValueError:
            assert _meta_names(skeleton) == _meta_names(_meta()), case
        else:
            _assert_same_model(loaded, clean)


class _WithBuffer(nn.Module):
    def __init__(self, buffer: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(32, 16)
        self.register_buffer("odd", buffer)


def test_packed_and_unknown_dtypes_in_a_float_file(tmp_path):
    """A packed 4-bit buffer (F4: two values a byte) loads with its torch shape (it was
    refused as mis-shaped); a dtype this torch cannot hold (F6) is a ValueError before
    the model is touched (it was safetensors' own error after the layers were swapped)."""
    import json
    import struct

    torch.manual_seed(0)
    def fp4(fill):
        return torch.full((4, 2), fill, dtype=torch.uint8).view(torch.float4_e2m1fn_x2)

    model = _WithBuffer(fp4(0x21))
    save_file(model.state_dict(), str(tmp_path / "f4.safetensors"))
    loaded = otq.load_and_quantize(tmp_path / "f4.safetensors", _WithBuffer(fp4(0)),
                                   bits=3, progress=False)
    assert torch.equal(loaded.odd.view(torch.uint8), fp4(0x21).view(torch.uint8))
    header, blobs, offset = {}, [], 0
    for key, value in model.state_dict().items():
        data = value.numpy().tobytes() if key != "odd" else b"\0\0\0"
        header[key] = {"dtype": "F32" if key != "odd" else "F6_E2M3",
                       "shape": list(value.shape) if key != "odd" else [4],
                       "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (tmp_path / "f6.safetensors").write_bytes(struct.pack("<Q", len(text)) + text
                                              + b"".join(blobs))
    skeleton = _WithBuffer(fp4(0))
    with pytest.raises(ValueError, match="tensor 'odd' has dtype 'F6_E2M3', which this torch"):
        otq.load_and_quantize(tmp_path / "f6.safetensors", skeleton, bits=3, progress=False)
    assert type(skeleton.lin) is nn.Linear


def test_after_layer_is_called_once_each_layer_is_in(tmp_path):
    source = _sources(tmp_path, _float_unet())["f32"]
    skeleton, seen = _meta(), []

    def after_layer(name):
        assert isinstance(skeleton.get_submodule(name), otq.nn.QuantLinear | otq.nn.QuantConv1d
                          | otq.nn.QuantConv2d)
        seen.append(name)

    otq.load_and_quantize(source, skeleton, after_layer=after_layer, **OPTIONS)
    quantized = [r.name for r in skeleton.otq_summary.quantized]
    assert seen == quantized and len(seen) == 41  # 43 weighted layers less time_embed.0, .2
    fresh = _meta()
    with pytest.raises(ValueError, match="after_layer must be None or a function"):
        otq.load_and_quantize(source, fresh, after_layer=1, **OPTIONS)
    assert _meta_names(fresh) == _meta_names(_meta())  # untouched


def test_the_cli_returns_freed_heap_pages_where_glibc_can(monkeypatch):
    if platform.libc_ver()[0] == "glibc":
        assert cli._malloc_trim() is not None
    cli.release_freed_heap("any.layer")  # a no-op where the C library has no malloc_trim
    cli._malloc_trim.cache_clear()
    monkeypatch.setattr(cli.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError()))
    assert cli._malloc_trim() is None
    cli.release_freed_heap()
    cli._malloc_trim.cache_clear()


def test_the_cli_quantizes_a_float_file_while_loading_it(tmp_path, monkeypatch):
    path = _sources(tmp_path, _float_unet())["f32"]
    calls = []
    real = streaming.load_and_quantize
    monkeypatch.setattr(streaming, "load_and_quantize",
                        lambda *args, **kwargs: calls.append(kwargs) or real(*args, **kwargs))
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--checkpoint", str(path), "--config", "tiny", "--bits", "3",
                     "--exclude", "time_embed.*", "--override", "out.*=5", "--device", "cpu",
                     "--quiet", "-o", str(out)]) == 0
    assert len(calls) == 1 and calls[0]["bits"] == 3
    assert calls[0]["after_layer"] is cli.release_freed_heap
    loaded = otq.load_quantized(out, _meta())
    expected = otq.quantize_model(load_fm_checkpoint(path, _meta()), **OPTIONS)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert torch.equal(loaded(x, t), expected(x, t))


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated")
def test_weight_normed_layers_are_quantized_from_the_weight_they_compute(tmp_path):
    from torch.nn.utils import parametrizations, weight_norm

    def build():
        torch.manual_seed(0)
        return nn.Sequential(parametrizations.weight_norm(nn.Linear(16, 24)), nn.SiLU(),
                             weight_norm(nn.Linear(24, 8))).eval()

    src = build()
    path = tmp_path / "wn.safetensors"
    save_file({k: v.clone() for k, v in src.state_dict().items()}, str(path))
    expected = otq.quantize_model(load_fm_checkpoint(path, build()), bits=3, progress=False)
    with torch.device("meta"):
        skeleton = build()
    model = otq.load_and_quantize(path, skeleton, bits=3, progress=False)
    assert all(isinstance(model[i], otq.nn.QuantLinear) for i in (0, 2))
    _assert_same_model(model, expected)


@pytest.mark.cuda
def test_quantizing_onto_the_gpu_never_holds_the_float_model_there(tmp_path):
    """The mnist UNet (223 MB in fp32) read from a file and quantized to 4 bits on the GPU:
    the GPU's peak is the quantized model plus one float layer and the fit's workspace,
    below the float model's size (loading it first and quantizing after needs all of it)."""
    torch.manual_seed(0)
    path = tmp_path / "mnist.safetensors"
    src = build_model("mnist")
    save_file(src.state_dict(), str(path))
    float_bytes = sum(p.numel() * p.element_size() for p in src.parameters())
    del src
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = otq.load_and_quantize(path, _meta("mnist"), bits=4, device="cuda",
                                  progress=False)
    torch.cuda.synchronize()
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"cuda"}
    assert torch.cuda.max_memory_allocated() - before < 0.6 * float_bytes
    x, t = torch.randn(1, 1, 28, 28, device="cuda"), torch.rand(1, device="cuda")
    assert torch.isfinite(model(x, t)).all()
