"""Quant* layers and quantize_model (CPU, tiny shapes)."""

import copy
import dataclasses
import json
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otq_kernels as otq
from otq_kernels import checkpoint as ckpt
from otq_kernels import nn as qnn
from otq_kernels import sharing
from otq_kernels.metrics.weights import sqnr_db
from otq_kernels.models import load_fm_checkpoint
from otq_kernels.sharing import memory_key


def _dequant_twin(float_module: nn.Module, quant: qnn._QuantModule) -> nn.Module:
    """The float module with its weight replaced by the dequantized one (reference path)."""
    twin = copy.deepcopy(float_module)
    with torch.no_grad():
        twin.weight.copy_(quant.dequantize())
    return twin


def _quantized_pair(make, x_shape, bits: int):
    """(float layer, its Quant* layer at ``bits``, an input of ``x_shape``), seeded."""
    torch.manual_seed(0)
    layer = make()
    return layer, qnn.QUANT_TYPES[type(layer)].from_float(layer, bits=bits), torch.randn(x_shape)


@pytest.mark.parametrize(
    "make,x_shape",
    [
        (lambda: nn.Linear(300, 24), (3, 5, 300)),
        (lambda: nn.Conv1d(64, 48, 1), (2, 64, 9)),  # pointwise -> linear path
        (lambda: nn.Conv1d(16, 24, 3, stride=2, padding=1, groups=2, bias=False), (2, 16, 11)),
        (lambda: nn.Conv1d(8, 12, 4, padding="same", dilation=2), (1, 8, 10)),
        (lambda: nn.Conv2d(32, 16, 3, padding=1), (2, 32, 7, 6)),
        (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4), (2, 8, 9, 9)),
        (lambda: nn.Conv2d(8, 12, 4, padding="same"), (1, 8, 6, 7)),
        (lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"), (1, 4, 5, 5)),
        (lambda: nn.Conv2d(4, 6, 1, stride=2), (2, 4, 5, 5)),
    ],
)
@pytest.mark.filterwarnings("ignore:Using padding='same'")
def test_from_float_matches_float_layer(make, x_shape):
    layer, quant, x = _quantized_pair(make, x_shape, bits=8)
    with torch.no_grad():
        y_q, y_f = quant(x), layer(x)
        y_ref = _dequant_twin(layer, quant)(x)
    assert y_q.shape == y_f.shape and y_q.dtype == x.dtype
    torch.testing.assert_close(y_q, y_ref, rtol=1e-5, atol=1e-5)  # = reference dequant path
    assert sqnr_db(layer.weight, quant.dequantize()) > 30
    assert quant.stats["sqnr_db"] > 30
    assert (y_q - y_f).abs().max() < 0.1 * y_f.abs().max()


EACH_LAYER_PATH = pytest.mark.parametrize("make,x_shape", [
    (lambda: nn.Linear(30, 24), (3, 5, 30)),
    (lambda: nn.Conv1d(16, 12, 1), (2, 16, 9)),
    (lambda: nn.Conv1d(16, 12, 3, padding=1), (2, 16, 9)),
    (lambda: nn.Conv2d(8, 12, 3, padding=1), (2, 8, 5, 6)),
], ids=["linear", "pointwise-conv1d", "conv1d", "conv2d"])


@EACH_LAYER_PATH
def test_layers_follow_autocast_like_float_layers(make, x_shape):
    layer, quant, x = _quantized_pair(make, x_shape, bits=8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y_q, y_ref = quant(x), _dequant_twin(layer, quant)(x)
    assert y_q.dtype == y_ref.dtype == torch.bfloat16
    torch.testing.assert_close(y_q, y_ref, rtol=2e-2, atol=2e-2)


@EACH_LAYER_PATH
@pytest.mark.parametrize("autocast", [False, True], ids=["plain", "under-autocast"])
def test_float64_layers_take_float64_activations(make, x_shape, autocast):
    """A float64 model stays float64 after quantization, as torch's layers do, also under
    autocast, which never casts float64 (the layers ran it in bfloat16)."""
    layer, quant, x = _quantized_pair(lambda: make().double(), x_shape, bits=4)
    x = x.double()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y_q, y_ref = quant(x), _dequant_twin(layer, quant)(x)
    assert y_q.dtype == y_ref.dtype == torch.float64
    torch.testing.assert_close(y_q, y_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make,x_shape", [
    (lambda: nn.Conv1d(6, 4, 3, padding=1), (6, 9)),
    (lambda: nn.Conv1d(6, 4, 1), (6, 9)),  # pointwise: the linear path
    (lambda: nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect"), (6, 5, 7)),
], ids=["conv1d", "pointwise-conv1d", "conv2d"])
def test_convs_take_unbatched_input_like_torch(make, x_shape):
    layer, quant, x = _quantized_pair(make, x_shape, bits=4)
    with torch.no_grad():
        y = quant(x)
        assert y.shape == layer(x).shape
        torch.testing.assert_close(y, quant(x.unsqueeze(0))[0])
    with pytest.raises(ValueError, match=r"expects x \[B, C, .*\] or \[C, "):
        quant(x[0])  # one dimension fewer still: refused, as torch refuses it


def test_reference_backend_is_exact():
    torch.manual_seed(1)
    lin = nn.Linear(40, 24)
    q = qnn.QuantLinear.from_float(lin, bits=3, method="lloyd", backend="reference")
    x = torch.randn(7, 40)
    assert torch.equal(q(x), F.linear(x, q.dequantize(), lin.bias))
    conv = nn.Conv2d(6, 10, 3, padding=1)
    q = qnn.QuantConv2d.from_float(conv, bits=4, method="uniform", backend="reference")
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(q(x), F.conv2d(x, q.dequantize(), conv.bias, padding=1))


def test_bits_sqnr_monotone_and_repr():
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 32, 3)
    sq = [qnn.QuantConv2d.from_float(conv, bits=b).stats["sqnr_db"] for b in (2, 4, 8)]
    assert sq[0] < sq[1] < sq[2]
    q = qnn.QuantConv2d.from_float(conv, bits=4, method="piecewise", granularity="tensor")
    text = repr(q)
    for piece in ("16, 32", "kernel_size=(3, 3)", "bits=4", "method='piecewise'",
                  "granularity='tensor'", "bits_per_weight=", "backend='auto'"):
        assert piece in text
    assert q.qweight.shape == (32, 16, 3, 3)
    assert q.bits_per_weight == pytest.approx(8 * q.nbytes / conv.weight.numel())


def test_buffers_state_dict_and_dtypes():
    torch.manual_seed(3)
    q = qnn.QuantConv1d.from_float(nn.Conv1d(8, 24, 1), bits=7)
    assert sorted(k for k, _ in q.named_buffers()) == ["codebook", "plane0", "plane1", "plane2"]
    assert set(q.state_dict()) == {"plane0", "plane1", "plane2", "codebook", "bias"}
    x = torch.randn(2, 8, 5)
    y = q(x)
    q2 = qnn.QuantConv1d.from_float(nn.Conv1d(8, 24, 1), bits=7)
    q2.load_state_dict(q.state_dict())
    assert torch.equal(q2(x), y)  # the cached QuantizedTensor view follows the new buffers
    q.half()
    assert q.codebook.dtype == torch.float32 and q.plane0.dtype == torch.int32
    assert q.bias.dtype == torch.float16
    yh = q(x.half())
    assert yh.dtype == torch.float16
    torch.testing.assert_close(yh.float(), y, rtol=1e-2, atol=1e-2)
    q.type(torch.float16)  # casts every buffer: the planes keep their codes
    assert q.plane0.dtype == torch.int32 and q.codebook.dtype == torch.float32
    torch.testing.assert_close(q.type(torch.float32)(x), y, rtol=1e-2, atol=1e-2)


def test_load_state_dict_refuses_a_layer_the_planes_cannot_tell_apart():
    """K = 33 and K = 40 pack to the same plane shapes: the state dict's metadata says
    which layer it holds, and a mismatch is a load error, as a float layer's size mismatch
    is (it loaded silently, and the layer ran on the other layer's codes). A NaN codebook
    is one too (the constructor refuses it)."""
    torch.manual_seed(0)
    model = otq.quantize_model(nn.Sequential(nn.Linear(40, 8)), bits=4, progress=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for other in (nn.Linear(33, 8), nn.Linear(40, 8)):
        theirs = otq.quantize_model(nn.Sequential(other), bits=4 if other.in_features == 33
                                    else 3, progress=False)
        with pytest.raises(RuntimeError, match="0: the state dict holds a quantized layer of "
                                               "bits, granularity, weight shape"):
            model.load_state_dict(theirs.state_dict())
    same = otq.quantize_model(nn.Sequential(nn.Linear(40, 8)), bits=4, progress=False)
    state = same.state_dict()
    state["0.codebook"] = state["0.codebook"].clone()
    state["0.codebook"][0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"0.codebook: the codebook \[8, 16\] has 1 NaN"):
        model.load_state_dict(state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.load_state_dict(same.state_dict())
    x = torch.randn(2, 40)
    assert torch.equal(model(x), same(x))


def test_loaded_codes_bring_their_method_and_error_stats():
    """The state dict's metadata carries the method and stats of its codes: a layer that
    loads another's codes reports theirs (it kept its own: summaries and saved files
    described codes it no longer held); a plain dict without metadata changes neither."""
    torch.manual_seed(0)
    theirs = otq.quantize_model(nn.Sequential(nn.Linear(64, 32)), bits=4, method="uniform",
                                progress=False)
    model = otq.quantize_model(nn.Sequential(nn.Linear(64, 32)), bits=4, progress=False)
    own = (model[0].method, dict(model[0].stats))
    model.load_state_dict(dict(theirs.state_dict()))  # (dict(): no metadata)
    assert (model[0].method, model[0].stats) == own
    model.load_state_dict(theirs.state_dict())
    assert model[0].method == model[0].qweight.method == "uniform"
    assert model[0].stats == theirs[0].stats != own[1]
    row = otq.nn.quantization_summary(model).layers[0]
    assert row.method == "uniform" and row.sqnr_db == theirs[0].stats["sqnr_db"]


@pytest.mark.parametrize("name", ["codebook", "plane0"])
def test_parametrized_codes_are_named_at_the_call(name):
    """torch's parametrize moves a parametrized buffer out of the buffers: the call names
    it and the way back (a KeyError from deep inside before); repr and .half() still work."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, t):
            return t * 2

    torch.manual_seed(0)
    model = otq.quantize_model(nn.Sequential(nn.Linear(40, 8)), bits=4, progress=False)
    x = torch.randn(2, 40)
    want = model(x)
    parametrize.register_parametrization(model[0], name, Twice())
    with pytest.raises(RuntimeError, match=f"its '{name}' is no longer a buffer .*"
                                           "remove_parametrizations"):
        model(x)
    assert "codes moved" in repr(model)
    copy.deepcopy(model).half()
    parametrize.remove_parametrizations(model[0], name, leave_parametrized=False)
    assert torch.equal(model(x), want)


def test_a_parametrized_bias_is_taken_as_the_bias_it_computes():
    """quantize_model and dequantize_model take a parametrized bias as the plain bias it
    computes (documented): same outputs, a plain parameter, the parametrization left."""
    from torch.nn.utils import parametrize

    class Twice(nn.Module):
        def forward(self, t):
            return t * 2

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(40, 8)), torch.randn(2, 40)
    parametrize.register_parametrization(model[0], "bias", Twice())
    bias = model[0].bias.detach().clone()
    otq.quantize_model(model, bits=4, progress=False)
    assert not parametrize.is_parametrized(model[0]) and torch.equal(model[0].bias, bias)
    parametrize.register_parametrization(model[0], "bias", Twice())
    want = model(x)
    otq.dequantize_model(model)
    assert not parametrize.is_parametrized(model[0])
    assert torch.equal(model[0].bias, 2 * bias) and torch.allclose(model(x), want)


@pytest.mark.parametrize("key, convert, assign, match", [
    ("plane0", torch.Tensor.long, False, None),
    ("codebook", torch.Tensor.double, False, None),
    ("codebook", lambda t: t, True, None),
    ("plane0", torch.Tensor.long, True, r"0.plane0: load_state_dict\(assign=True\) takes it "
                                        r"as torch.int32 only \(got torch.int64\)"),
    ("codebook", torch.Tensor.half, True, "0.codebook: .*assign=True.* torch.float32 only"),
    ("plane0", torch.Tensor.float, False,
     "0.plane0: a torch.int32 buffer cannot take torch.float32 values"),
    ("codebook", torch.Tensor.int, False, "a torch.float32 buffer cannot take torch.int32"),
    ("codebook", torch.Tensor.bool, False, "cannot take torch.bool values"),
], ids=["plane-int64", "codebook-float64", "assign", "assign-plane-int64",
        "assign-codebook-fp16", "plane-float", "codebook-int", "codebook-bool"])
def test_load_state_dict_takes_codes_its_buffers_can_hold(key, convert, assign, match):
    """A copy casts integer planes (their bits kept) and float codebooks; float planes
    (codes rounded) and integer or bool codebooks are a load error, and so is, under
    assign=True, any dtype but the buffers' own (it kept an fp16 codebook or int64 planes,
    which the kernels do not take)."""
    torch.manual_seed(0)
    model = otq.quantize_model(nn.Sequential(nn.Linear(40, 8)), bits=4, progress=False)
    theirs = otq.quantize_model(nn.Sequential(nn.Linear(40, 8)), bits=4, progress=False)
    state = theirs.state_dict()
    state[f"0.{key}"] = convert(state[f"0.{key}"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if match is not None:
        with pytest.raises(RuntimeError, match=match):
            model.load_state_dict(state, assign=assign)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    model.load_state_dict(state, assign=assign)
    assert model[0].plane0.dtype == torch.int32 and model[0].codebook.dtype == torch.float32
    x = torch.randn(2, 40)
    assert torch.equal(model(x), theirs(x))


@pytest.mark.parametrize("options, match", [
    (dict(in_channels=99), r"in_channels=99, out_channels=6 do not fit the weight \[6, 2, 3, 3\]"),
    (dict(out_channels=5), "do not fit the weight"),
    (dict(groups=2.5), "groups must be an integer, got 2.5"),
    (dict(groups="2"), "groups must be an integer"),
    (dict(groups=4), "groups=4 must be >= 1 and divide the 6 output channels"),
    (dict(padding_mode="bogus"), "padding_mode must be one of"),
    (dict(stride=0), "stride .* must be >= 1"),
    (dict(dilation=(1, 0)), "dilation .* must be >= 1"),
    (dict(padding=-1), "padding .* must be >= 0"),
    (dict(stride=True), "expected an integer or 2 integers, got True"),
    (dict(bias=torch.zeros(5)),
     r"bias must be None or a float tensor \[6\], got torch.float32 \[5\]"),
    (dict(bias=torch.zeros(6, dtype=torch.long)), "bias must be None or a float tensor"),
], ids=["in-channels", "out-channels", "groups-float", "groups-text", "groups-4", "mode",
        "stride-0", "dilation-0", "padding-negative", "stride-bool", "bias-short", "bias-int"])
def test_layers_built_from_codes_refuse_a_geometry_that_does_not_fit(options, match):
    """What nn.Conv2d refuses, or what does not fit the weight: refused when the layer is
    made (it failed at the first call, or dequantize_model failed half-way)."""
    qt = qnn.QuantConv2d.from_float(nn.Conv2d(2, 6, 3), bits=3).qweight
    with pytest.raises(ValueError, match=match):
        qnn.QuantConv2d(qt, **options)
    grouped = qnn.QuantConv2d(qt, groups=2, in_channels=4)
    assert grouped(torch.randn(1, 4, 5, 5)).shape == (1, 6, 3, 3)


def test_no_dense_weight_attribute_says_where_the_weight_is():
    q = qnn.QuantConv1d.from_float(nn.Conv1d(8, 24, 3), bits=4)
    assert not hasattr(q, "weight") and getattr(q, "weight", None) is None
    where = r"\.qweight is the QuantizedTensor, \.dequantize\(dtype\) the dense weight \[24, 8, 3\]"
    with pytest.raises(AttributeError, match=where):
        q.weight  # noqa: B018
    with pytest.raises(AttributeError, match="'QuantConv1d' object has no attribute 'wieght'"):
        q.wieght  # noqa: B018


def test_from_float_rejects_bad_input():
    with pytest.raises(TypeError):
        qnn.QuantLinear.from_float(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="bits"):
        qnn.QuantLinear.from_float(nn.Linear(4, 4), bits=9)
    with pytest.raises(ValueError, match="method"):
        qnn.QuantLinear.from_float(nn.Linear(4, 4), method="kmeans")
    with pytest.raises(ValueError, match="unknown backend 'cuda2'"):
        qnn.QuantLinear.from_float(nn.Linear(4, 4), backend="cuda2")
    with pytest.raises(ValueError, match="meta device"):
        qnn.QuantLinear.from_float(nn.Linear(4, 4, device="meta"))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_layers_refuse_a_codebook_that_is_not_finite(bad):
    qt = qnn.QuantLinear.from_float(nn.Linear(6, 4), bits=2).qweight
    book = qt.codebook.clone()
    book[1, 2] = bad
    qt = dataclasses.replace(qt, codebook=book)
    with pytest.raises(ValueError, match=r"codebook \[4, 4\] has 1 NaN/Inf entries"):
        qnn.QuantLinear(qt)
    conv = qnn.QuantConv1d.from_float(nn.Conv1d(2, 4, 3), bits=2).qweight
    with pytest.raises(ValueError, match="NaN/Inf"):
        qnn.QuantConv1d(dataclasses.replace(conv, codebook=qt.codebook))


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.GroupNorm(2, 8),
                                    nn.Conv2d(8, 8, 1))
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.up(self.blocks(self.stem(x)))  # [B, 8, 2H, 2W]
        seq = h.flatten(2).transpose(1, 2)
        seq = self.attn(seq, seq, seq, need_weights=False)[0]
        seq = self.proj(seq.transpose(1, 2)).transpose(1, 2) + self.emb.weight[:1]
        return self.head(seq.mean(1))


def _rows(model):
    return {r.name: r for r in model.otq_summary.layers}


def test_quantize_model_selection_and_summary():
    torch.manual_seed(4)
    model = Toy().eval()
    x = torch.randn(2, 3, 4, 4)
    ref = model(x)
    out = otq.nn.quantize_model(model, bits=4, exclude=["blocks.2"],
                                overrides={"stem": {"bits": 8}, "head": {"method": "lloyd"}},
                                progress=False)
    assert out is model
    rows = _rows(model)
    assert isinstance(model.stem, qnn.QuantConv2d) and model.stem.bits == 8
    assert isinstance(model.blocks[0], qnn.QuantConv2d) and model.blocks[0].bits == 4
    assert isinstance(model.blocks[2], nn.Conv2d)
    assert rows["blocks.2"].status == "kept float (excluded)"
    assert isinstance(model.proj, qnn.QuantConv1d)
    assert isinstance(model.head, qnn.QuantLinear) and model.head.method == "lloyd"
    assert rows["up"].status == "kept float (unsupported type)"
    assert rows["emb"].status == "kept float (unsupported type)"
    assert rows["attn"].status == "kept float (unsupported type)"
    assert "MultiheadAttention" in rows["attn.out_proj"].status
    assert isinstance(model.attn.out_proj, nn.Linear)
    assert rows["stem"].bits == 8 and rows["stem"].sqnr_db > 30 and rows["stem"].w2 >= 0
    assert model(x).shape == ref.shape
    s = model.otq_summary
    params = sum(p.numel() for p in Toy().parameters())
    assert s.params == params and s.bytes_fp32 == 4 * params and s.bytes_fp16 == 2 * params
    stored = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert s.bytes_after == stored  # tiny layers: per-channel codebooks cost more than fp32
    text = otq.nn.format_summary(s)
    assert "kept float (unsupported type)" in text and "bits/weight overall" in text
    assert text.splitlines()[2].startswith("stem          QuantConv2d ")  # as wide as names
    assert str(s) == text and s.to_dict()["model_bits_per_weight"] == s.model_bits_per_weight
    assert otq.nn.format_summary(s, max_rows=2).splitlines()[4] == (
        f"... {len(s.layers) - 2} more layers")
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="max_rows must be None or an integer >= 0"):
            otq.nn.format_summary(s, max_rows=bad)


def test_summary_table_prints_long_layer_names_whole_up_to_its_limit():
    from otq_kernels.summary import NAME_WIDTH_MAX
    model = nn.ModuleDict({"head": nn.Linear(4, 4),
                           "transformer_blocks_0_ff_context_proj": nn.Linear(4, 4),
                           "x" * NAME_WIDTH_MAX + "_proj": nn.Linear(4, 4)})
    otq.quantize_model(model, bits=2, progress=False)
    long = "x" * NAME_WIDTH_MAX + "_proj"
    lines = otq.nn.format_summary(model.otq_summary).splitlines()
    assert lines[2].startswith("head ") and lines[2].index("QuantLinear") == NAME_WIDTH_MAX + 1
    assert lines[3].startswith("transformer_blocks_0_ff_context_proj ")
    assert lines[4].startswith("..." + long[-(NAME_WIDTH_MAX - 3):] + " QuantLinear")


def test_summary_table_widens_its_type_column_for_long_type_names():
    """(MultiheadAttention and its NonDynamicallyQuantizableLinear pushed their rows out
    of line.)"""
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 4))
    otq.quantize_model(model, bits=2, progress=False)
    lines = otq.nn.format_summary(model.otq_summary).splitlines()
    shape = lines[0].index("shape")
    rows = [line for line in lines[2:] if "x" in line.split()[-1:] or "float" in line
            or "QuantLinear" in line][:3]
    assert len(rows) == 3 and all(row[shape - 1] == " " and row[shape].isdigit()
                                  for row in rows), "\n".join(lines)


def test_quantize_model_include_and_errors():
    model = Toy()
    otq.nn.quantize_model(model, bits=2, include=["blocks.*"], progress=False)
    rows = _rows(model)
    assert {n for n, r in rows.items() if r.status == "quantized"} == {"blocks.0", "blocks.2"}
    assert rows["stem"].status == "kept float (not included)"
    # a second call quantizes what is left and keeps the first layers
    otq.nn.quantize_model(model, bits=8, include="stem", progress=False)
    assert model.stem.bits == 8 and model.blocks[0].bits == 2
    assert otq.nn.quantization_summary(model).layers[0].name == "stem"
    with pytest.raises(ValueError, match="unknown keys"):
        otq.nn.quantize_model(Toy(), overrides={"stem": {"bitz": 8}}, progress=False)
    with pytest.raises(ValueError, match="layer 'stem'"):
        otq.nn.quantize_model(Toy(), overrides={"stem": {"bits": 1}}, progress=False)
    with pytest.raises(ValueError, match="method"):
        otq.nn.quantize_model(Toy(), method="nope", progress=False)
    with pytest.raises(ValueError, match="an fnmatch pattern or a list of them"):
        otq.nn.quantize_model(Toy(), include=5, progress=False)
    with pytest.raises(ValueError, match="overrides must be a dict"):
        otq.nn.quantize_model(Toy(), overrides=["stem"], progress=False)
    with pytest.raises(ValueError, match="override 'stem': 8 must be a dict of options"):
        otq.nn.quantize_model(Toy(), overrides={"stem": 8}, progress=False)
    with pytest.raises(ValueError, match="unknown keys"):  # matching no layer: still checked
        otq.nn.quantize_model(Toy(), overrides={"nothing": {"bitz": 8}}, progress=False)


@pytest.mark.parametrize("call, args", [
    (otq.quantize_model, ()), (otq.dequantize_model, ()), (otq.save_quantized, ("q.st",)),
    (lambda m: otq.load_quantized("missing.safetensors", m), ()),
    (lambda m: load_fm_checkpoint("missing.safetensors", m), ()),
], ids=["quantize_model", "dequantize_model", "save_quantized", "load_quantized",
        "load_fm_checkpoint"])
def test_model_arguments_that_are_not_modules_are_named(call, args, request):
    what = request.node.callspec.id
    with pytest.raises(TypeError, match=f"{what}: the model must be a torch.nn.Module, got str"):
        call("model", *args)


def test_to_float_refuses_a_dtype_that_is_not_floating_point():
    model = otq.quantize_model(nn.Sequential(nn.Linear(4, 4)), progress=False)
    for dtype in (torch.int32, "float16", torch.complex64, torch.float8_e4m3fn):
        with pytest.raises(ValueError, match="dtype must be float16, bfloat16, float32 or "
                                             "float64, got"):
            otq.dequantize_model(model, dtype=dtype)
        with pytest.raises(ValueError, match="dtype must be float16, bfloat16, float32 or"):
            model[0].dequantize(dtype)  # (float8 reached the cpu backend's own message)
    assert isinstance(model[0], qnn.QuantLinear)  # unchanged


@pytest.mark.parametrize("kwargs, match", [
    ({"overrides": {"head": {"backend": "gpu"}}}, "layer 'head': unknown backend 'gpu'"),
    ({"overrides": {"head": {"granularity": "row"}}}, "layer 'head': unknown granularity"),
    ({"backend": "gpu"}, "unknown backend 'gpu'"),
    ({"poison": "head"}, "layer 'head': weight has 1 NaN/Inf"),
    ({"lazy": True}, r"parameter 'tail.weight' is not initialised yet \(a lazy module\)"),
], ids=["override-backend", "override-granularity", "backend", "nan-weight-last-layer",
        "lazy-layer"])
def test_quantize_model_checks_every_layer_before_touching_the_model(kwargs, match):
    """A bad option or weight of any layer (here the last one, head, or a lazy layer after
    it) raises before any layer is swapped: the model comes back as it was."""
    model = Toy()
    poisoned = kwargs.pop("poison", None)
    if poisoned:
        with torch.no_grad():
            model.get_submodule(poisoned).weight[0, 0] = float("nan")
    if kwargs.pop("lazy", False):
        model.tail = nn.LazyLinear(4)
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match=match):
        otq.nn.quantize_model(model, progress=False, **kwargs)
    assert {name: type(m) for name, m in model.named_modules()} == before
    assert not hasattr(model, "otq_summary")


def test_a_pattern_matching_a_container_covers_the_layers_inside():
    def statuses(**kwargs):
        model = otq.nn.quantize_model(Toy(), progress=False, **kwargs)
        return {r.name: (r.status, r.bits) for r in model.otq_summary.layers
                if r.name.startswith(("blocks", "stem"))}

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a container's name is a match: no warning
        assert statuses(exclude="blocks") == {
            "stem": ("quantized", 4), "blocks.0": ("kept float (excluded)", None),
            "blocks.2": ("kept float (excluded)", None)}
        assert statuses(include="blocks", overrides={"blocks": {"bits": 8},
                                                     "blocks.2": {"bits": 3}}) == {
            "stem": ("kept float (not included)", None), "blocks.0": ("quantized", 8),
            "blocks.2": ("quantized", 3)}


def test_quantize_model_warns_of_patterns_that_match_nothing():
    with pytest.warns(UserWarning, match="include pattern 'blocks.9' matches no module"):
        otq.nn.quantize_model(Toy(), include=["blocks.*", "blocks.9"], progress=False)
    with pytest.warns(UserWarning, match="exclude pattern 'stme' matches no module"):
        otq.nn.quantize_model(Toy(), exclude="stme", progress=False)
    with pytest.warns(UserWarning, match="override pattern 'stem' matches no layer that is "
                                         "quantized"):
        otq.nn.quantize_model(Toy(), exclude="stem", overrides={"stem": {"bits": 8}},
                              progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        otq.nn.quantize_model(Toy(), include="blocks.*", exclude="blocks.2",
                              overrides={"blocks.0": {"bits": 8}}, progress=False)


class TiedHead(nn.Module):
    """Two Linears tying one weight (their biases apart), a third, an embedding tied to a
    head."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(40, 40), nn.Linear(40, 40), nn.Linear(40, 40)
        self.b.weight = self.a.weight
        self.emb, self.head = nn.Embedding(50, 40), nn.Linear(40, 50, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.c(self.b(self.a(x)))) + self.emb.weight.sum()


def test_tied_weights_share_one_set_of_codes(tmp_path):
    """Layers tying one weight are fitted once and share the codes: counted and stored
    once, still tied after saving, loading and dequantizing; a head tied to an embedding
    (which stays float) stays float, as does a layer tied to an excluded one."""
    torch.manual_seed(0)
    model, x = TiedHead(), torch.randn(3, 40)
    before = otq.nn.quantization_summary(model)
    otq.quantize_model(model, bits=3, progress=False)
    assert isinstance(model.a, qnn.QuantLinear) and isinstance(model.b, qnn.QuantLinear)
    assert model.a.codebook is model.b.codebook and model.a.plane0 is model.b.plane0
    assert [n for n, _ in model.named_buffers() if n.startswith("b.")] == []  # listed once
    assert not torch.equal(model.a.bias, model.b.bias)
    assert model.b.stats == model.a.stats and set(model.a.stats) == {"mse", "sqnr_db", "w2"}
    rows = {row.name: row for row in model.otq_summary.layers}
    assert rows["b"].sqnr_db == rows["a"].sqnr_db is not None
    assert type(model.head) is nn.Linear and model.head.weight is model.emb.weight
    assert model.otq_summary.params == before.params
    assert model.otq_summary.bytes_fp32 == before.bytes_fp32
    reasons = {r.name: r.status for r in model.otq_summary.layers}
    assert reasons["head"] == "kept float (weight tied to emb.weight, which stays float)"
    path = otq.save_quantized(model, tmp_path / "tied.safetensors")
    assert json.loads(ckpt.read_safetensors(path)[0]["aliases"]) == {
        "b.plane0": "a.plane0", "b.plane1": "a.plane1", "b.codebook": "a.codebook",
        "head.weight": "emb.weight"}
    loaded = otq.load_quantized(path, TiedHead())
    assert loaded.a.codebook.data_ptr() == loaded.b.codebook.data_ptr()
    assert loaded.b.stats == loaded.a.stats == model.a.stats
    assert torch.equal(loaded(x), model(x))
    want = model(x)
    otq.dequantize_model(model)
    assert model.a.weight is model.b.weight and model.head.weight is model.emb.weight
    torch.testing.assert_close(model(x), want)
    partly = otq.quantize_model(TiedHead(), bits=3, exclude="b", progress=False)
    assert type(partly.a) is nn.Linear and partly.a.weight is partly.b.weight
    assert {r.name: r.status for r in partly.otq_summary.layers}["a"] == (
        "kept float (weight tied to b.weight, which stays float)")


def _views_of_one_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (not a.is_meta and memory_key(a) == memory_key(b))


@pytest.mark.parametrize("convert, dtype", [
    (lambda m: m.half(), torch.float16), (lambda m: m.to(torch.float64), torch.float64),
    (lambda m: m.type(torch.float16), torch.float16), (lambda m: m.to("meta"), None),
    (lambda m: m.to_empty(device="cpu"), None),
    (lambda m: copy.deepcopy(m).bfloat16(), torch.bfloat16),
    (lambda m: m.to("meta").to_empty(device="cpu"), None),
    (lambda m: pickle.loads(pickle.dumps(m)), torch.float32),
], ids=["half", "to-float64", "type-half", "to-meta", "to-empty", "deepcopy-bf16",
        "meta-then-to-empty", "pickle"])
def test_tied_codes_stay_shared_through_conversions(convert, dtype):
    """.half(), .to(dtype/device), .type(), .to_empty() give tied layers one converted
    codebook and planes (each layer converted apart made two copies: stored, moved and
    saved twice), keep the codes' dtypes and values, and hold nothing past the call."""
    torch.manual_seed(0)
    model = otq.quantize_model(TiedHead(), bits=3, progress=False)
    x = torch.randn(3, 40)
    want, codebook = model.b(model.a(x)), model.a.codebook.clone()
    planes = [model.a._buffers[f"plane{i}"].clone() for i in range(model.a.num_planes)]
    model = convert(model)
    a, b = model.a, model.b
    assert _views_of_one_memory(a.codebook, b.codebook) and a.codebook.dtype == torch.float32
    for i in range(a.num_planes):
        plane = a._buffers[f"plane{i}"]
        assert _views_of_one_memory(plane, b._buffers[f"plane{i}"])
        assert plane.dtype == torch.int32
    assert not sharing._RESULTS  # forgotten once the conversion is over
    if dtype is not None:
        assert torch.equal(a.codebook, codebook)  # (not rounded through the model's dtype)
        assert all(torch.equal(a._buffers[f"plane{i}"], p) for i, p in enumerate(planes))
        assert model(x.to(dtype)).dtype == dtype
        got = b(a(x.to(dtype))).float()  # (the tied layers: the model adds a large constant)
        tol = {torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-6}.get(dtype, 0)
        torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_a_conversion_drops_the_views_of_the_codes_it_replaced():
    """After a conversion that gives the layers new code tensors (``to_empty`` here; on a
    GPU ``model.cuda()``), no cached view keeps the old ones alive (a CPU copy of every
    layer's codes until its next read), and the views read the new buffers."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = otq.quantize_model(nn.Sequential(nn.Linear(16, 16), nn.Conv1d(16, 8, 3)),
                               bits=3, progress=False)
    old = [weakref.ref(t) for m in model for t in (*m._planes(), m.codebook)]
    model.to_empty(device="cpu")
    gc.collect()
    assert [ref for ref in old if ref() is not None] == []
    for m in model:
        assert m.qweight.planes[0] is m.plane0 and m.qweight.codebook is m.codebook


@pytest.mark.cuda
def test_tied_codes_stay_shared_on_the_gpu_and_back():
    torch.manual_seed(0)
    model = otq.quantize_model(TiedHead(), bits=3, progress=False)
    x = torch.randn(3, 40)
    want = model(x)
    for device in ("cuda", "cpu"):
        model.to(device)
        for name in ("codebook", *(f"plane{i}" for i in range(model.a.num_planes))):
            a, b = model.a._buffers[name], model.b._buffers[name]
            assert a.device.type == device and memory_key(a) == memory_key(b)
        torch.testing.assert_close(model(x.to(device)).cpu(), want)
    assert not sharing._RESULTS


@pytest.mark.parametrize("name", ["otq_summary", "_otq_reasons"])
@pytest.mark.parametrize("kind", ["submodule", "parameter"])
def test_a_model_holding_a_name_quantize_model_sets_is_refused_first(tmp_path, name, kind):
    """(it failed after every layer was swapped, in torch's words)"""
    model = nn.Sequential(nn.Linear(8, 8))
    held = nn.Linear(8, 8) if kind == "submodule" else nn.Parameter(torch.zeros(3))
    setattr(model, name, held)
    match = f"quantize_model: the model holds a submodule, parameter or buffer named '{name}'"
    with pytest.raises(ValueError, match=match):
        otq.quantize_model(model, bits=4, progress=False)
    assert type(model[0]) is nn.Linear
    path = otq.save_quantized(otq.quantize_model(nn.Sequential(nn.Linear(8, 8)), bits=4,
                                                 progress=False), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match=match.replace("quantize_model", "load_quantized")):
        otq.load_quantized(path, model)
    assert type(model[0]) is nn.Linear


def test_layers_sharing_a_bias_stay_float_and_shared():
    """A bias two layers hold (tied biases): quantizing either would untie it (each
    quantized layer's bias is its own: stored twice, fine-tuned apart), so both stay
    float with the reason; their weights' ties follow."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16),
                          nn.Linear(16, 16))
    model[1].bias = model[0].bias
    model[2].weight = model[1].weight
    x = torch.randn(2, 16)
    otq.quantize_model(model, bits=4, progress=False)
    assert [type(m).__name__ for m in model] == ["Linear", "Linear", "Linear", "QuantLinear"]
    assert model[1].bias is model[0].bias and model[2].weight is model[1].weight
    reasons = {r.name: r.status for r in model.otq_summary.layers}
    assert reasons["0"] == "kept float (bias shared with 1.bias, which quantizing would untie)"
    assert reasons["2"] == "kept float (weight tied to 1.weight, which stays float)"
    assert model(x).shape == (2, 16)


def test_tied_layers_given_different_options_are_refused():
    model = TiedHead()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layer 'b': its weight is tied to 'a''s, which is "
                                         "given other options"):
        otq.quantize_model(model, bits=3, overrides={"b": {"bits": 4}}, progress=False)
    assert type(model.a) is nn.Linear and all(torch.equal(v, state[k])
                                              for k, v in model.state_dict().items())


class Shared(nn.Module):
    """One Linear registered under three names (``b``, ``c.0``: aliases of ``a``)."""

    def __init__(self, shared: bool = True):
        super().__init__()
        self.a = nn.Linear(40, 40)
        self.b = self.a if shared else nn.Linear(40, 40)
        self.c = nn.Sequential(self.a if shared else nn.Linear(40, 40), nn.ReLU())

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_a_shared_layer_is_quantized_under_every_name():
    torch.manual_seed(0)
    model = Shared()
    otq.nn.quantize_model(model, bits=3, progress=False)
    assert isinstance(model.a, qnn.QuantLinear) and model.a is model.b is model.c[0]
    summary = model.otq_summary
    assert [r.name for r in summary.layers] == ["a"] and summary.params == 40 * 41
    x = torch.randn(2, 40)
    w, bias = model.a.dequantize(), model.a.bias
    want = F.relu(F.linear(F.linear(F.linear(x, w, bias), w, bias), w, bias))
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    # patterns match any of the layer's names
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = otq.nn.quantize_model(Shared(), exclude="b", progress=False)
        assert type(kept.c[0]) is nn.Linear and kept.otq_summary.layers[0].name == "a"
        eight = otq.nn.quantize_model(Shared(), overrides={"c.0": {"bits": 8}}, progress=False)
        assert eight.a.bits == 8


def _weight_normed(kind: str) -> nn.Module:
    """Conv1d -> Linear, both under weight norm (``kind``: the parametrize API or the legacy
    hook), and an excluded spectral-normed Linear, as vocoders of FM speech models use."""
    from torch.nn.utils import parametrizations

    if kind == "parametrize":
        norm = parametrizations.weight_norm
    else:
        def norm(layer):
            with warnings.catch_warnings():  # torch deprecates the hook-based weight_norm
                warnings.simplefilter("ignore", FutureWarning)
                return torch.nn.utils.weight_norm(layer)
    return nn.Sequential(norm(nn.Conv1d(6, 8, 3, padding=1)), nn.Flatten(),
                         norm(nn.Linear(8 * 5, 12)),
                         parametrizations.spectral_norm(nn.Linear(12, 3))).eval()


@pytest.mark.parametrize("kind", ["parametrize", "legacy"])
def test_weight_normed_layers_are_quantized_from_the_weight_they_compute(kind):
    torch.manual_seed(0)
    model, reference = _weight_normed(kind), _weight_normed(kind)
    model.load_state_dict(reference.state_dict())  # new values, and no forward call since
    x = torch.randn(2, 6, 5)
    want = reference(x)
    otq.nn.quantize_model(model, bits=8, exclude="3", progress=False)
    assert isinstance(model[0], qnn.QuantConv1d) and isinstance(model[2], qnn.QuantLinear)
    rows = {r.name: r for r in model.otq_summary.layers}
    assert list(rows) == ["0", "2", "3"] and rows["3"].status == "kept float (excluded)"
    assert rows["3"].shape == [3, 12] and rows["0"].sqnr_db > 40
    assert sqnr_db(want, model(x)) > 35


def test_a_pruned_layer_is_quantized_from_its_masked_weight():
    """torch.nn.utils.prune keeps weight_orig and weight_mask; its weight attribute is
    stale after a load_state_dict until a forward call (quantized from it, the output was
    off by the whole difference)."""
    from torch.nn.utils import prune

    def pruned(seed):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 16), nn.ReLU())
        prune.l1_unstructured(model[0], "weight", amount=0.5)
        prune.random_unstructured(model[0], "bias", amount=0.5)  # a pruned bias: not the weight
        return model.eval()

    model, reference = pruned(0), pruned(1)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 32)
    want = reference(x)
    otq.nn.quantize_model(model, bits=8, progress=False)
    assert isinstance(model[0], qnn.QuantLinear)
    assert (model[0].dequantize() == 0).sum() >= 16 * 32 // 2  # the mask's zeros stay zero
    assert sqnr_db(want, model(x)) > 35


def test_a_legacy_spectral_normed_layer_is_quantized_from_its_normalised_weight():
    def spectral(seed):
        torch.manual_seed(seed)
        return torch.nn.utils.spectral_norm(nn.Linear(12, 3)).eval()

    layer, reference = spectral(0), spectral(1)
    layer.load_state_dict(reference.state_dict())
    x = torch.randn(4, 12)
    quant = qnn.QuantLinear.from_float(layer, bits=8)
    assert sqnr_db(reference(x), quant(x)) > 35


def transformer_encoder() -> nn.Module:
    """Two encoder layers whose eval-mode fast path (batch_first, relu, even heads) reads
    linear1.weight and linear2.weight; the encoder takes its nested-tensor path too."""
    layer = nn.TransformerEncoderLayer(16, 2, 24, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()


def _twin_with_dense_weights(model: nn.Module, quantized: nn.Module) -> nn.Module:
    """``model`` (float) with every layer quantized in ``quantized`` set to its dense
    weight: what torch's own paths compute with the quantized weights."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, qnn._QuantModule):
                twin.get_submodule(name).weight.copy_(module.dequantize())
    return twin


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
@pytest.mark.parametrize("exclude", [None, "layers.0.*"], ids=["all", "first-layer-float"])
def test_transformer_encoder_layers_are_quantized_and_leave_their_fast_path(exclude):
    """Also with the first layer kept float (a common recipe): the encoder's nested tensor
    reached the quantized second layer, which failed inside the op."""
    torch.manual_seed(0)
    model = transformer_encoder()
    quant = otq.nn.quantize_model(copy.deepcopy(model), bits=4, exclude=exclude,
                                  progress=False)
    layer = quant.layers[1]
    assert isinstance(layer.linear1, qnn.QuantLinear) and isinstance(layer.linear2, qnn.QuantLinear)
    assert type(layer.self_attn.out_proj) is not qnn.QuantLinear  # MultiheadAttention's
    twin = _twin_with_dense_weights(model, quant)
    x = torch.randn(3, 5, 16)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    with torch.no_grad():  # where torch takes its fused paths
        for kwargs in ({}, {"src_key_padding_mask": pad}):
            got, want = quant(x, **kwargs), twin(x, **kwargs)
            keep = ~kwargs.get("src_key_padding_mask", torch.zeros(3, 5, dtype=torch.bool))
            torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-4)
    assert model.layers[0].activation_relu_or_gelu and model.use_nested_tensor  # untouched


def test_dequantize_model_gives_the_dense_model_of_the_same_weights():
    torch.manual_seed(0)
    model = otq.quantize_model(Toy().eval(), bits=3, exclude="blocks.2", progress=False)
    quantized = {name: m for name, m in model.named_modules()
                 if isinstance(m, qnn._QuantModule)}
    x = torch.randn(2, 3, 4, 4)
    want = model(x)
    assert otq.dequantize_model(model) is model and not hasattr(model, "otq_summary")
    for name, quant in quantized.items():
        layer = model.get_submodule(name)
        assert type(layer) is quant.FLOAT_TYPE and not layer.training
        assert torch.equal(layer.weight, quant.dequantize()) and torch.equal(layer.bias, quant.bias)
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, qnn._QuantModule) for m in model.modules())
    assert model.stem.padding == (1, 1) and model.proj.kernel_size == (1,)


def test_dequantize_model_keeps_sharing_and_the_model_dtype():
    torch.manual_seed(0)
    shared = otq.dequantize_model(otq.quantize_model(Shared(), bits=4, progress=False))
    assert type(shared.a) is nn.Linear and shared.a is shared.b is shared.c[0]
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 4))
    otq.quantize_model(model, bits=4, progress=False).half()
    otq.dequantize_model(model)
    assert model[0].weight.dtype == model[1].weight.dtype == torch.float16
    assert otq.dequantize_model(model.float(), dtype=torch.float32) is model
    with pytest.raises(ValueError, match="the model is itself a QuantLinear; its .to_float"):
        otq.dequantize_model(qnn.QuantLinear.from_float(nn.Linear(8, 4), bits=3))


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_dequantize_model_gives_transformer_layers_their_fast_path_back(monkeypatch):
    fused = []
    real = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd",
                        lambda *a, **k: fused.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = transformer_encoder()
    otq.quantize_model(model, bits=4, progress=False)
    assert model.layers[0].activation_relu_or_gelu == 0 and not model.use_nested_tensor
    otq.quantize_model(model, bits=4, progress=False)  # again: nothing left to switch
    otq.dequantize_model(model)
    assert model.layers[0].activation_relu_or_gelu == 1 and model.use_nested_tensor
    assert "_otq_fast_path" not in vars(model) and "_otq_fast_path" not in vars(model.layers[1])
    with torch.no_grad():  # torch's fused path on the dense weights
        model(torch.randn(2, 5, 16))
    assert len(fused) == 2


def test_a_replaced_layers_hooks_go_with_it():
    """Forward and backward hooks on a float layer run on the quantized one, and their
    handles still remove them (a swap dropped them silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU())
    calls = []
    pre = model[0].register_forward_pre_hook(lambda m, args: calls.append(type(m).__name__))
    model[0].register_forward_hook(lambda m, args, kwargs, out: calls.append(tuple(out.shape)),
                                   with_kwargs=True)
    model[0].register_full_backward_hook(lambda m, grad_in, grad_out: calls.append("grad"))
    otq.quantize_model(model, bits=4, progress=False)
    x = torch.randn(2, 8, requires_grad=True)
    model(x).sum().backward()
    assert calls == ["QuantLinear", (2, 6), "grad"]
    pre.remove()
    calls.clear()
    with torch.no_grad():
        model(x)
        otq.dequantize_model(model)
        model(x)
    assert calls == [(2, 6), (2, 6)] and type(model[0]) is nn.Linear


def test_from_float_and_to_float_copy_hooks_for_layers_that_both_live_on():
    """A hook added to the float layer after from_float (or to a to_float copy) stays on
    that layer: the shared hook dicts made each hook fire on both, and a comparison of
    their outputs through hooks read an MSE of 0."""
    torch.manual_seed(0)
    linear, seen = nn.Linear(16, 8), []
    linear.register_forward_hook(lambda m, args, out: seen.append(type(m).__name__))
    quantized = qnn.QuantLinear.from_float(linear, bits=2)
    linear.register_forward_hook(lambda m, args, out: seen.append("float only"))
    dense = quantized.to_float()
    dense.register_forward_pre_hook(lambda m, args: seen.append("dense only"))
    x = torch.randn(2, 16)
    for layer in (linear, quantized, dense):
        layer(x)
    assert seen == ["Linear", "float only", "QuantLinear", "dense only", "Linear"]


@pytest.mark.parametrize("bias, match", [
    (lambda: nn.Parameter(torch.empty(8, device="meta")), "bias is on the meta device"),
    (lambda: nn.Parameter(torch.zeros(8, dtype=torch.int64), requires_grad=False),
     "bias must be None or a float tensor \\[8\\], got torch.int64"),
], ids=["meta", "int64"])
def test_biases_are_checked_before_any_layer_is_replaced(bias, match):
    """(The last layer's bias was checked only when its turn came: earlier layers were
    already swapped, and a meta bias raised torch's NotImplementedError.)"""
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 8))
    model[2].bias = bias()
    with pytest.raises(ValueError, match=f"layer '2': {match}"):
        otq.quantize_model(model, progress=False)
    assert [type(m) for m in model] == [nn.Linear, nn.ReLU, nn.Linear]


def test_an_interrupted_quantize_model_leaves_torch_s_fast_paths_consistent(monkeypatch):
    """A failure after some layers are swapped (memory, Ctrl-C) still turns the fused
    transformer path off where a layer is quantized (its next eval call failed on a
    QuantLinear without a dense .weight); a second call finishes the job."""
    layer = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, batch_first=True).eval()
    model = nn.Sequential(layer)
    real, calls = qnn._quantized, []

    def fails_second(name, module, opts):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(name, module, opts)

    monkeypatch.setattr(qnn, "_quantized", fails_second)
    with pytest.raises(KeyboardInterrupt):
        otq.quantize_model(model, progress=False)
    assert any(isinstance(m, qnn.QuantLinear) for m in model.modules())
    with torch.no_grad():
        model(torch.randn(2, 5, 16))  # (the fused path would need every dense weight)


def test_load_state_dict_of_other_code_shapes_loads_no_code():
    """A plain dict (no layout metadata) of a per-tensor layer into a per-channel one:
    the planes fit, the codebook does not; nothing is loaded (the planes were, leaving
    one layer's codes on another's codebook)."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    mine = qnn.QuantLinear.from_float(linear, bits=4, granularity="channel")
    theirs = qnn.QuantLinear.from_float(nn.Linear(64, 8), bits=4, granularity="tensor")
    before = mine.dequantize()
    plain = {key: value.clone() for key, value in theirs.state_dict().items()}
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="codebook: size mismatch.*no code loaded"):
            mine.load_state_dict(plain, strict=strict)
        assert torch.equal(mine.dequantize(), before)


def test_include_patterns_that_select_no_quantizable_layer_warn():
    """(A DiT's attention out_proj, or layers quantized already, included: nothing was
    quantized and nothing said.)"""
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 4))
    with pytest.warns(UserWarning, match="include patterns select no layer it quantizes"):
        otq.quantize_model(model, include=["*.out_proj"], progress=False)
    otq.quantize_model(model, progress=False)
    with pytest.warns(UserWarning, match="select no layer it quantizes"):
        otq.quantize_model(model, include=["1"], progress=False)


class LoRALinear(nn.Linear):
    """A Linear whose forward adds a low-rank branch (its own two Linears)."""

    def __init__(self, n: int, rank: int = 2):
        super().__init__(n, n)
        self.lora = nn.Sequential(nn.Linear(n, rank, bias=False), nn.Linear(rank, n, bias=False))

    def forward(self, x):
        return super().forward(x) + self.lora(x)


class Tagged(nn.Linear):
    """A Linear subclass with the Linear forward and an unused child module."""

    def __init__(self, n: int):
        super().__init__(n, n)
        self.note = nn.Linear(1, 1)


def test_linear_subclasses_with_their_own_forward_stay_float():
    torch.manual_seed(0)
    model = nn.Sequential(LoRALinear(16), nn.ReLU(), Tagged(16)).eval()
    x = torch.randn(3, 16)
    want = model(x)
    otq.nn.quantize_model(model, bits=8, progress=False)
    assert type(model[0]) is LoRALinear and isinstance(model[0].lora[1], qnn.QuantLinear)
    assert isinstance(model[2], qnn.QuantLinear)  # replaced whole, its child with it
    rows = {r.name: r.status for r in model.otq_summary.layers}
    assert rows == {"0": "kept float (LoRALinear overrides forward)", "0.lora.0": "quantized",
                    "0.lora.1": "quantized", "2": "quantized"}
    assert sqnr_db(want, model(x)) > 35


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_quantized_layers_keep_the_float_layers_mode(training):
    model = otq.nn.quantize_model(Shared(shared=False).train(training), progress=False)
    assert {m.training for m in model.modules()} == {training}


def test_layers_quantized_under_inference_mode_are_normal_tensors():
    """Loadable afterwards, and they feed an input gradient (FM likelihoods need it)."""
    torch.manual_seed(0)
    model = Shared(shared=False).eval()
    with torch.inference_mode():
        otq.nn.quantize_model(model, bits=4, progress=False)
    assert not any(t.is_inference() for t in model.state_dict().values())
    model.load_state_dict(model.state_dict())
    x = torch.randn(2, 40, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and bool(x.grad.abs().sum() > 0)


def test_quantize_tiny_unet_close_at_8_bits():
    from otq_kernels.demo import random_model

    model = random_model("tiny", seed=0)
    q = otq.nn.quantize_model(copy.deepcopy(model), bits=8, progress=False)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    with torch.no_grad():
        y, yq = model(x, t), q(x, t)
    kinds = {type(m).__name__ for m in q.modules()}
    assert {"QuantLinear", "QuantConv1d", "QuantConv2d"} <= kinds
    assert not any(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in q.modules())
    assert torch.linalg.norm(yq - y) < 0.05 * torch.linalg.norm(y)


def test_quantized_unet_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces a whole quantized UNet (Quant* modules + ops)."""
    from otq_kernels.models import build_model

    torch.manual_seed(0)
    model = build_model("tiny").eval()
    with torch.no_grad():
        for p in model.parameters():  # the out conv is zero-initialized: make outputs non-trivial
            p.normal_(0, 0.1)
    model = otq.quantize_model(model, bits=4, progress=False)
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        eager = model(x, t)
        assert eager.abs().mean() > 1e-3
        torch.testing.assert_close(compiled(x, t), eager)


def test_quantized_unet_exports_and_keeps_no_traced_tensors():
    """torch.export traces a quantized UNet to the otq ops; the layers' cached weight views
    are not filled with the trace's tensors (torch warned of "tensor attributes ...
    assigned during export")."""
    from otq_kernels.models import build_model

    torch.manual_seed(0)
    model = otq.quantize_model(build_model("tiny").eval(), bits=3, progress=False)
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        program = torch.export.export(model, (x, t))
    ops_seen = {str(node.target) for node in program.graph.nodes}
    assert "otq.codebook_conv2d.default" in ops_seen and "otq.codebook_linear.default" in ops_seen
    for layer in (m for m in model.modules() if isinstance(m, qnn._QuantModule)):
        for tensors, _ in layer._cache.values():  # the layer's own buffers only
            assert all(a is b for a, b in zip(tensors, [*layer._planes(), layer.codebook],
                                              strict=True))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x, t), model(x, t))


def test_exported_quantized_unet_saves_loads_and_compiles_ahead_of_time(tmp_path):
    """What a deployer does with an exported program of dynamic batch: torch.export.save /
    load it, and compile it with AOTInductor into a .pt2 package (the otq ops run through
    the package's fallback calls while otq_kernels is imported). Same output every way,
    at every batch size."""
    from otq_kernels.models import build_model

    torch.manual_seed(0)
    model = otq.quantize_model(build_model("tiny").eval(), bits=3, progress=False)
    x, t = torch.randn(2, 1, 16, 16), torch.full((2,), 0.5)
    batch = torch.export.Dim("batch", min=1, max=256)
    with torch.no_grad():
        program = torch.export.export(model, (x, t), dynamic_shapes=({0: batch}, {0: batch}))
        torch.export.save(program, tmp_path / "unet.pt2")
        loaded = torch.export.load(tmp_path / "unet.pt2").module()
        package = torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp_path / "unet_aoti.pt2"))
        runner = torch._inductor.aoti_load_package(package)
        for b in (1, 5):
            xb, tb = torch.randn(b, 1, 16, 16), torch.rand(b)
            eager = model(xb, tb)
            torch.testing.assert_close(loaded(xb, tb), eager, rtol=0, atol=0)
            torch.testing.assert_close(runner(xb, tb), eager)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_export_with_a_dynamic_batch_dispatches_by_the_rows_it_runs_with(strict, monkeypatch):
    """Auto dispatch compares M with the kernels' ranges; torch.export turned that into a
    guard that refused dynamic batch sizes outside one kernel's range ("Constraints
    violated"). Export now leaves the choice to the op, which makes it per call: an
    exported program runs the kernel eager auto dispatch picks at each M."""
    torch.manual_seed(0)
    model = otq.quantize_model(nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 8)),
                               bits=4, progress=False).eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.randn(4, 32),), dynamic_shapes=({0: batch},),
                                  strict=strict)
    assert [node.args[-1] for node in program.graph.nodes
            if str(node.target) == "otq.codebook_linear.default"] == ["auto", "auto"]
    ran = []
    real = otq.ops._run_linear
    monkeypatch.setattr(otq.ops, "_run_linear", lambda x, qt, bias, name: ran.append(name)
                        or real(x, qt, bias, name))
    exported = program.module()
    for m in (1, otq.ops.CPU_LUT_MAX_M, otq.ops.CPU_LUT_MAX_M + 1, 100):
        x = torch.randn(m, 32)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=0, atol=0)
        expected = otq.ops.resolve_backend("auto", "linear", x.device, m, 4)
        assert ran[-4:] == [expected] * 4  # the program's two layers, then eager's two


def test_tiny_unet_on_triton_matches_reference(monkeypatch):
    """Every layer of a quantized UNet on the Triton kernels (the interpreter on CPU) with a
    132-SM split heuristic, so small convs split their channel blocks and NCHW activations
    are read in place: same output as the reference."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CPU interpreter test")
    from otq_kernels.backends import _device
    from otq_kernels.backends.triton import conv
    from otq_kernels.demo import random_model

    monkeypatch.setattr(_device, "sm_count", lambda device: 132)
    kernels = []
    for name in ("_reduce_splits", "linear_triton"):  # count the paths taken
        real = getattr(conv, name)
        monkeypatch.setattr(conv, name, lambda *a, real=real, name=name, **k:
                            kernels.append(name) or real(*a, **k))
    model = otq.nn.quantize_model(random_model("tiny", seed=1), bits=4, progress=False)
    x, t = torch.randn(1, 1, 16, 16), torch.full((1,), 0.3)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "qweight"):
                m.backend = "reference"
        want = model(x, t)
        for m in model.modules():
            if hasattr(m, "qweight"):
                m.backend = "triton"
        got = model(x, t)
    assert want.abs().mean() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert "_reduce_splits" in kernels  # some conv split its channel blocks
    # attention's pointwise Conv1d gets channels-last views: the linear kernels, no copy
    assert "linear_triton" in kernels


@pytest.mark.parametrize("backend, path", [("auto", "conv2d"), ("reference", "linear"),
                                           ("cpu", "linear"), ("triton", "conv2d")])
def test_pointwise_conv1d_takes_a_conv_kernel_where_one_runs(backend, path, monkeypatch):
    """reference and cpu (no conv kernel) run pointwise Conv1d as a linear layer; a backend
    with a conv kernel reads x in place: triton (through the interpreter here) and auto,
    which on CPU picks dequant (the dense weight and torch's conv) for convs."""
    pytest.importorskip("triton")
    if backend == "cpu" and otq.backends.get("cpu").unavailable(torch.device("cpu")):
        pytest.skip("native CPU extension not built")
    torch.manual_seed(0)
    conv = nn.Conv1d(24, 20, 1)
    q = otq.nn.QuantConv1d.from_float(conv, bits=4, backend=backend)
    seen = []
    for name in ("codebook_linear", "codebook_conv2d"):
        real = getattr(otq.ops, name)
        monkeypatch.setattr(otq.ops, name, lambda *a, real=real, name=name, **k:
                            seen.append(name) or real(*a, **k))
    x = torch.randn(2, 24, 7)
    with torch.no_grad():
        y = q(x)
    assert seen == [f"codebook_{path}"]
    assert y.shape == (2, 20, 7) and y.is_contiguous() == (path == "conv2d")
    torch.testing.assert_close(y, F.conv1d(x, q.dequantize(), q.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make, backend, bits, match", [
    (lambda: nn.Conv2d(4, 6, 3), "cpu", 4, "backend 'cpu' has no conv kernel"),
    (lambda: nn.Conv2d(4, 6, 1), "cpu", 4, "backend 'cpu' has no conv kernel"),
    (lambda: nn.Conv1d(4, 6, 3), "cpu", 4, "backend 'cpu' has no conv kernel"),
    (lambda: nn.Conv1d(4, 6, 1, padding_mode="reflect"), "cpu", 4, "'cpu' has no conv"),
    (lambda: nn.Conv2d(4, 6, 3), "cuda", 8, "of backend 'cuda' does not take 8-bit codes"),
    (lambda: nn.Conv2d(4, 6, 3, groups=2), "cuda", 4, "does not take 4-bit codes with groups=2"),
], ids=["cpu-3x3", "cpu-1x1", "cpu-conv1d-k3", "cpu-conv1d-reflect", "cuda-8bit",
        "cuda-groups"])
def test_a_named_backend_without_a_kernel_for_the_layer_is_refused_when_it_is_made(
        make, backend, bits, match, tmp_path):
    """Before, these failed at the first call, inside the op, without naming the layer."""
    torch.manual_seed(0)
    conv = make()
    cls = qnn.QuantConv1d if isinstance(conv, nn.Conv1d) else qnn.QuantConv2d
    with pytest.raises(ValueError, match=match):
        cls.from_float(conv, bits=bits, backend=backend)
    layer = cls.from_float(conv, bits=bits)
    with pytest.raises(ValueError, match=match):
        cls.replacing(conv, layer.qweight, None, backend)
    model = nn.Sequential(nn.Linear(4, 4), nn.Unflatten(1, (4, 1, 1)), conv)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"layer '2': .*{match}"):
        otq.quantize_model(model, bits=bits, backend=backend, progress=False)
    with pytest.raises(ValueError, match=f"layer '2': .*{match}"):
        otq.quantize_model(model, bits=2, overrides={"2": {"bits": bits, "backend": backend}},
                           progress=False)
    assert isinstance(model[0], nn.Linear) and model.state_dict().keys() == before.keys()
    path = tmp_path / "q.safetensors"
    otq.save_quantized(otq.quantize_model(copy.deepcopy(model), bits=bits, progress=False),
                       path)
    with pytest.raises(ValueError, match=f"q.safetensors: layer '2': .*{match}"):
        otq.load_quantized(path, model, backend=backend)
    assert isinstance(model[0], nn.Linear)


@pytest.mark.parametrize("backend", ["cpu", "cuda", "triton", "dequant", "reference"],
                         ids=lambda name: f"named-{name}")  # (an id "cuda" means a GPU test)
def test_named_backends_that_run_the_layer_are_taken(backend):
    """Layers a named backend can run are built (nothing runs: no GPU needed): pointwise
    Conv1d as a linear layer on any backend, 2-4-bit groups=1 convs on cuda."""
    conv1 = qnn.QuantConv1d.from_float(nn.Conv1d(4, 6, 1), bits=8, backend=backend)
    assert conv1.backend == backend and conv1.pointwise
    if backend != "cpu":
        for bits in (2, 3, 4):
            conv = qnn.QuantConv2d.from_float(nn.Conv2d(4, 6, 3), bits=bits, backend=backend)
            assert conv.backend == backend


def test_conv_backends_are_those_with_a_conv_kernel():
    from otq_kernels.modules import CONV_BACKENDS
    assert set(CONV_BACKENDS) == {name for name in otq.backends.NAMES
                                  if hasattr(otq.backends.get(name), "conv2d")}


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton", "auto"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_autocast_on_the_gpu_feeds_the_kernels_its_dtype(backend, dtype):
    """A float32 model under torch.autocast("cuda"): the quantized layers run on x and bias
    cast to autocast's dtype (the fused kernels' own dtypes) and return that dtype."""
    if backend != "auto" and otq.backends.get(backend).unavailable(torch.device("cuda")):
        pytest.skip(f"backend {backend} unavailable")
    torch.manual_seed(0)
    layer = nn.Linear(1024, 512).cuda()
    quant = qnn.QuantLinear.from_float(layer, bits=4, backend=backend)
    conv = qnn.QuantConv2d.from_float(nn.Conv2d(64, 64, 3, padding=1).cuda(), bits=4,
                                      backend=backend)
    x, img = torch.randn(3, 1024, device="cuda"), torch.randn(1, 64, 8, 8, device="cuda")
    with torch.no_grad():
        with torch.autocast("cuda", dtype=dtype):
            y, z = quant(x), conv(img)
        assert y.dtype == z.dtype == dtype
        same = {"rtol": 1e-3, "atol": 1e-3}  # (a split-K reduction may reorder sums)
        torch.testing.assert_close(y, otq.ops.codebook_linear(
            x.to(dtype), quant.qweight, quant.bias.to(dtype), backend), **same)
        torch.testing.assert_close(z, otq.ops.codebook_conv2d(
            img.to(dtype), conv.qweight, conv.bias.to(dtype), 1, 1, backend=backend), **same)


@pytest.mark.cuda
def test_float64_transforms_and_flop_counts_on_the_gpu():
    """On the GPU: a float64 layer runs on the expanding backends; vmap and jvp over the
    layers see the dense twin; FlopCounterMode counts them as the twin's layers."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    layers = [nn.Linear(96, 64), nn.Conv2d(8, 16, 3, padding=1)]
    shapes = [(4, 96), (2, 8, 6, 6)]
    for layer, shape in zip(layers, shapes, strict=True):
        layer = layer.cuda()
        quant = qnn.QUANT_TYPES[type(layer)].from_float(layer, bits=4)
        twin = _dequant_twin(layer, quant)
        x, t = torch.randn(shape, device="cuda"), torch.randn(shape, device="cuda")
        wide = copy.deepcopy(quant).double()
        with torch.no_grad():
            got = wide(x.double())
        assert got.dtype == torch.float64
        want = copy.deepcopy(twin).double()(x.double())
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        close = {"rtol": 1e-4, "atol": 1e-4}  # (TF32 may differ between the two GEMMs)
        torch.testing.assert_close(torch.func.vmap(quant)(x.unsqueeze(1)),
                                   torch.func.vmap(twin)(x.unsqueeze(1)), **close)
        torch.testing.assert_close(torch.func.jvp(quant, (x,), (t,))[1],
                                   torch.func.jvp(twin, (x,), (t,))[1], **close)
        counts = []
        for net in (quant, twin):
            with FlopCounterMode(display=False) as counter, torch.no_grad():
                net(x)
            counts.append(counter.get_total_flops())
        assert counts[0] == counts[1] > 0


@pytest.mark.cuda
def test_export_with_a_dynamic_batch_on_the_gpu():
    """On the GPU, where dispatch picks among cuda, triton and dequant by M: an exported
    fp16 model of dynamic batch runs each call on eager's kernel, with eager's output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Unflatten(1, (32, 4, 4)),
                          nn.Conv2d(32, 16, 3, padding=1)).cuda().half().eval()
    otq.quantize_model(model, bits=4, progress=False)
    batch = torch.export.Dim("batch", min=1, max=512)
    x = torch.randn(4, 256, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},)).module()
        for m in (1, 16, 300):
            x = torch.randn(m, 256, device="cuda", dtype=torch.float16)
            torch.testing.assert_close(exported(x), model(x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference", "dequant"])
def test_a_default_device_context_leaves_a_cpu_model_s_work_on_the_cpu(backend, tmp_path):
    """Under ``with torch.device(...)`` (meta here; "cuda" on a GPU machine) float layers
    on CPU inputs compute on the CPU, and so do ours: the cpu backend allocated its
    outputs on the context's device and handed their pointers to the C++ kernels (a null
    pointer under meta, GPU memory under cuda)."""
    from otq_kernels import backends

    reason = backends.cannot_run(backend, torch.device("cpu")) if backend != "auto" else None
    if reason:
        pytest.skip(reason)

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))

    x = torch.randn(3, 40)
    outside = qnn.quantize_model(make(), bits=3, backend=backend, progress=False)
    expected = outside(x)
    otq.save_quantized(outside, tmp_path / "outside.safetensors")
    model, skeleton = make(), make()  # (float models built outside: inside they are meta)
    with torch.device("meta"):
        qnn.quantize_model(model, bits=3, backend=backend, progress=False)
        assert torch.equal(model(x), expected)
        assert torch.equal(model[0].dequantize(), outside[0].dequantize())
        otq.save_quantized(model, tmp_path / "inside.safetensors")
        loaded = ckpt.load_quantized(tmp_path / "inside.safetensors", skeleton, backend=backend)
        assert torch.equal(loaded(x), expected)
    assert (tmp_path / "inside.safetensors").read_bytes() == (
        tmp_path / "outside.safetensors").read_bytes()


def test_layers_sharing_only_a_codebook_keep_their_own_codes():
    """Two layers of their own codes and one codebook tensor (a model-wide codebook):
    dequantize_model gave both the first layer's weight (tied weights were recognized by
    the codebook alone), and the summary counted one layer's parameters."""
    book = torch.linspace(-1, 1, 16).reshape(1, 16)
    torch.manual_seed(0)
    layers = [qnn.QuantLinear(otq.QuantizedTensor(
        otq.pack_codes(torch.randint(0, 16, (8, 8)), 4), book, 4, (8, 8), "tensor"))
        for _ in range(2)]
    model = nn.Sequential(layers[0], nn.ReLU(), layers[1])
    assert model[0].codebook is model[2].codebook
    summary = qnn.quantization_summary(model)
    planes = sum(p.nbytes for layer in layers for p in layer._planes())
    assert summary.params == 128 and summary.bytes_after == planes + book.nbytes
    x = torch.randn(3, 8)
    expected = model(x)
    dense = qnn.dequantize_model(model)
    assert dense[0].weight is not dense[2].weight
    torch.testing.assert_close(dense(x), expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_summary_totals_line_gives_sizes_in_kib_below_a_mib_and_in_mib_from_it():
    s = qnn.QuantizationSummary([], params=1024, bytes_fp32=4 * 1024 ** 2,
                                bytes_fp16=1024 ** 2 - 1, bytes_after=1536)
    assert qnn.format_summary(s).splitlines()[-1] == (
        "model size: 4.00 MiB fp32, 1024.0 KiB fp16 -> 1.5 KiB quantized (12.000 bits/weight "
        "overall, codebooks, biases and float layers included)")


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_fast_paths_are_switched_off_only_where_weights_are_quantized():
    """sync_fast_paths leaves a float model's and a float layer's fast path on, switches a
    quantized layer's off, and a second sync leaves it off (idempotent)."""
    from otq_kernels.fast_paths import sync_fast_paths

    model = transformer_encoder()
    sync_fast_paths(model)
    assert model.layers[0].activation_relu_or_gelu and model.use_nested_tensor
    quant = otq.nn.quantize_model(copy.deepcopy(model), bits=4, exclude="layers.0.*",
                                  progress=False)
    for _ in range(2):
        assert quant.layers[0].activation_relu_or_gelu  # float: torch's fast path kept
        assert quant.layers[1].activation_relu_or_gelu == 0 and not quant.use_nested_tensor
        sync_fast_paths(quant)
