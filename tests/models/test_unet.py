"""ADM-style UNet: shapes, key names, configs and checkpoint loading (tiny configs)."""

from __future__ import annotations

import argparse
import copy
import os
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

from otq_kernels import quantize_model
from otq_kernels.models import (
    UNetModel,
    build_model,
    config_names,
    load_fm_checkpoint,
    unet_config,
)
from otq_kernels.models.checkpoint import strip_wrapper_prefixes
from otq_kernels.models.layers import AttentionBlock, Downsample, Upsample

pytestmark = pytest.mark.usefixtures("one_thread")


# A sample of key names of flow_matching's examples/image UNet (cifar10 architecture with
# one channel, our "mnist" config).
MNIST_KEYS = [
    "time_embed.0.weight",
    "time_embed.2.bias",
    "input_blocks.0.0.weight",
    "input_blocks.1.0.in_layers.0.weight",
    "input_blocks.1.0.in_layers.2.weight",
    "input_blocks.1.0.emb_layers.1.weight",
    "input_blocks.1.0.out_layers.0.bias",
    "input_blocks.1.0.out_layers.3.weight",
    "input_blocks.6.0.in_layers.2.weight",
    "input_blocks.6.1.norm.weight",
    "input_blocks.6.1.qkv.weight",
    "input_blocks.6.1.proj_out.bias",
    "middle_block.0.in_layers.2.weight",
    "middle_block.1.qkv.weight",
    "middle_block.2.out_layers.3.weight",
    "output_blocks.0.0.skip_connection.weight",
    "output_blocks.7.1.qkv.weight",
    "out.0.weight",
    "out.2.weight",
    "out.2.bias",
]


def _tiny(**kw) -> UNetModel:
    torch.manual_seed(0)
    return build_model("tiny", **kw)


def _randomize(model: nn.Module) -> nn.Module:
    """Give the zero-initialised layers non-zero weights so outputs are informative."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def test_forward_shape_and_scalar_t():
    model = _randomize(_tiny()).eval()
    x = torch.randn(3, 1, 16, 16)
    y = model(x, torch.tensor([0.0, 0.5, 1.0]))
    assert y.shape == x.shape
    torch.testing.assert_close(model(x, 0.5), model(x, torch.full((3,), 0.5)))


def test_zero_init_output():
    model = _tiny().eval()
    y = model(torch.randn(2, 1, 16, 16), torch.rand(2))
    assert torch.count_nonzero(y) == 0


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "quantized"])
@pytest.mark.parametrize("dtype, tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)],
                         ids=["fp16", "bf16"])
def test_half_precision_model_tracks_float32(dtype, tol, quantized):
    """``.to(dtype)`` also converts the GroupNorms' parameters: the model must still run
    (torch refuses a float32 input with half parameters) with float32 times, as the GPU
    benchmarks call it, and stay close to its float32 output."""
    model = _randomize(_tiny()).eval()
    if quantized:
        quantize_model(model, bits=4, method="ot", granularity="channel", progress=False)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    with torch.no_grad():
        ref = model(x, t)
        y = copy.deepcopy(model).to(dtype)(x.to(dtype), t)
    assert y.dtype == dtype
    assert ((y.float() - ref).norm() / ref.norm()).item() < tol


def test_mnist_config_layout_and_size():
    model = build_model("mnist")
    keys = set(model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(55.67e6, rel=1e-3)
    assert len(keys) == 390
    missing = [k for k in MNIST_KEYS if k not in keys]
    assert not missing, missing
    counts = {
        t: sum(isinstance(m, t) for m in model.modules())
        for t in (nn.Conv2d, nn.Linear, nn.Conv1d, nn.GroupNorm)
    }
    assert counts == {nn.Conv2d: 75, nn.Linear: 31, nn.Conv1d: 20, nn.GroupNorm: 69}
    assert all(m.kernel_size == (1,) for m in model.modules() if isinstance(m, nn.Conv1d))


# Facts checked against flow_matching's examples/image UNet (run outside this repository
# on its cifar10 / imagenet configs; "mnist" is our 1-channel variant of cifar10, the
# examples have no MNIST config): exact key -> shape, tensor and parameter counts.
REFERENCE_SHAPES = {
    "mnist": {
        "time_embed.0.weight": (512, 128),
        "time_embed.2.weight": (512, 512),
        "input_blocks.0.0.weight": (256, 1, 3, 3),
        "input_blocks.1.0.emb_layers.1.weight": (512, 512),
        "input_blocks.1.0.out_layers.3.weight": (256, 256, 3, 3),
        "input_blocks.6.1.qkv.weight": (768, 256, 1),
        "middle_block.1.qkv.bias": (768,),
        "output_blocks.0.0.in_layers.0.weight": (512,),
        "output_blocks.0.0.skip_connection.weight": (256, 512, 1, 1),
        "output_blocks.9.0.in_layers.2.weight": (256, 512, 3, 3),
        "out.0.weight": (256,),
        "out.2.weight": (1, 256, 3, 3),
        "out.2.bias": (1,),
    },
    "cifar10": {"input_blocks.0.0.weight": (256, 3, 3, 3), "out.2.weight": (3, 256, 3, 3)},
    "imagenet": {
        "label_emb.weight": (1001, 768),
        "input_blocks.4.0.in_layers.2.weight": (192, 192, 3, 3),
        "input_blocks.5.1.qkv.weight": (1152, 384, 1),
        "output_blocks.3.2.in_layers.2.weight": (768, 768, 3, 3),
        "out.2.weight": (3, 192, 3, 3),
    },
}
REFERENCE_COUNTS = {  # name: (state-dict tensors, parameters)
    "mnist": (390, 55_667_201),
    "cifar10": (390, 55_676_419),
    "imagenet": (541, 295_900_035),
}


@pytest.mark.parametrize("name", sorted(REFERENCE_COUNTS))
def test_matches_flow_matching_reference(name):
    model = build_model(name)
    state = model.state_dict()
    n_tensors, n_params = REFERENCE_COUNTS[name]
    assert len(state) == n_tensors
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert {k: tuple(state[k].shape) for k in REFERENCE_SHAPES[name]} == REFERENCE_SHAPES[name]
    # Attention only at downsampling factor 2 (input blocks 6-9, output blocks 5-9).
    if name != "imagenet":
        attn_in = sorted(int(k.split(".")[1]) for k in state
                         if k.startswith("input_blocks.") and k.endswith(".1.qkv.weight"))
        attn_out = sorted(int(k.split(".")[1]) for k in state
                          if k.startswith("output_blocks.") and k.endswith(".1.qkv.weight"))
        assert (attn_in, attn_out) == ([6, 7, 8, 9], [5, 6, 7, 8, 9])
        assert not any(".op." in k or ".conv." in k for k in state)  # conv_resample=False
    else:
        heads = sorted({m.num_heads for m in model.modules() if hasattr(m, "qkv")})
        assert heads == [6, 9, 12]  # 64-channel heads at 384, 576 and 768 channels


def test_configs():
    assert {"mnist", "cifar10", "imagenet64", "tiny", "digits"} <= set(config_names())
    cfg = unet_config("imagenet64")
    assert cfg["num_classes"] == 1000 and cfg["resblock_updown"] and cfg["model_channels"] == 192
    cfg["model_channels"] = 1
    assert unet_config("imagenet64")["model_channels"] == 192  # a copy
    with pytest.raises(ValueError, match="valid: .*mnist"):
        unet_config("nope")


def test_class_conditional_and_resblock_updown():
    model = _randomize(_tiny(num_classes=10, resblock_updown=True, num_head_channels=32)).eval()
    assert model.label_emb.weight.shape == (11, 128)  # +1 null label
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    y0 = model(x, t, {"label": torch.tensor([0, 1])})
    y1 = model(x, t, {"label": torch.tensor([2, 3])})
    assert y0.shape == x.shape and not torch.allclose(y0, y1)
    # No label means the null label (index num_classes), as in the examples' forward.
    torch.testing.assert_close(model(x, t), model(x, t, {"label": torch.tensor([10, 10])}))
    fresh = _tiny(num_classes=10)
    assert fresh.label_emb.padding_idx == 10
    assert torch.count_nonzero(fresh.label_emb.weight[10]) == 0  # null row starts at zero


def test_attention_orders_agree_for_one_head():
    a = _randomize(_tiny(use_new_attention_order=True)).eval()
    b = _tiny(use_new_attention_order=False).eval()
    b.load_state_dict(a.state_dict())
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    torch.testing.assert_close(a(x, t), b(x, t))


def _adm_attention(qkv: torch.Tensor, heads: int, new_order: bool) -> torch.Tensor:
    """ADM's QKVAttention (new order) / QKVAttentionLegacy written with einsums:
    qkv [B, 3C, T] -> [B, C, T]."""
    b, width, t = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(b * heads, ch, t) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * heads, 3 * ch, t).split(ch, dim=1)
    weights = torch.einsum("bct,bcs->bts", q, k).mul(ch ** -0.5).softmax(dim=-1)
    return torch.einsum("bts,bcs->bct", weights, v).reshape(b, heads * ch, t)


@pytest.mark.parametrize("new_order", [True, False], ids=["new_order", "legacy_order"])
def test_attention_matches_adm_and_feeds_sdpa_channels_last(monkeypatch, new_order):
    block = _randomize(AttentionBlock(32, num_head_channels=8, new_order=new_order)).eval()
    x = torch.randn(2, 32, 5, 3)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append([z.stride(-1) for z in (q, k, v)])
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        y = block(x)
        flat = x.reshape(2, 32, 15)
        attended = _adm_attention(block.qkv(block.norm(flat)), 4, new_order)
        expected = (flat + block.proj_out(attended)).reshape(x.shape)
    assert calls == [[1, 1, 1]]  # the fused CUDA kernels need it; the math path does not
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
def test_attention_runs_a_fused_sdpa_kernel_on_cuda():
    """The mnist attention shape (256 channels, one head, 14 × 14 tokens) in fp16 runs on
    flash or memory-efficient attention: with only those allowed, SDPA raises if neither
    accepts the inputs (the math fallback would call cuBLAS and keep its workspace)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    block = _randomize(AttentionBlock(256)).eval()
    x = torch.randn(1, 256, 14, 14)
    with torch.no_grad():
        expected = block(x)
        block = block.to("cuda", torch.float16)
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            y = block(x.to("cuda", torch.float16))
    torch.testing.assert_close(y.float().cpu(), expected, rtol=2e-2, atol=2e-2)


def test_checkpoint_plain_and_ema_layout(tmp_path):
    src = _randomize(_tiny())
    ema_src = _randomize(_tiny())
    # The examples' EMA layout: raw weights under model.*, shadows by parameter index.
    state = {f"model.{k}": v for k, v in src.state_dict().items()}
    for i, p in enumerate(ema_src.parameters()):
        state[f"shadow_params.{i}"] = p.detach().clone()
    state["num_updates"] = torch.tensor(7)
    # The examples' train.py also saves its command-line args (an argparse.Namespace).
    ckpt = {"model": state, "epoch": 3, "args": argparse.Namespace(dataset="cifar10", lr=1e-4)}

    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    dst = load_fm_checkpoint(ckpt, _tiny(), use_ema=True).eval()
    torch.testing.assert_close(dst(x, t), ema_src.eval()(x, t))
    dst = load_fm_checkpoint(ckpt, _tiny(), use_ema=False).eval()
    torch.testing.assert_close(dst(x, t), src.eval()(x, t))

    from safetensors.torch import save_file

    path = tmp_path / "m.safetensors"
    save_file(src.state_dict(), str(path))
    torch.testing.assert_close(load_fm_checkpoint(path, _tiny()).eval()(x, t), src(x, t))
    pt = tmp_path / "m.pt"
    torch.save(ckpt, pt)
    torch.testing.assert_close(load_fm_checkpoint(pt, _tiny()).eval()(x, t), ema_src(x, t))


@pytest.mark.parametrize("indices", [[0, 2], ["1", "01"]], ids=["gap", "twice"])
def test_ema_shadows_must_be_numbered_once_each(indices):
    """(A gap raised a KeyError from deep inside; `1` and `01` both took index 1 and one
    was dropped, which one by dict order.)"""
    model = nn.Sequential(nn.Linear(2, 2, bias=False), nn.Linear(2, 2, bias=False))
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state.update({f"shadow_params.{i}": torch.zeros(2, 2) for i in indices})
    if indices == ["1", "01"]:
        state["shadow_params.0"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="shadow_params are not numbered 0..[12] once each"):
        load_fm_checkpoint(state, model)


def test_many_wrapper_prefixes_come_off_without_recursion():
    state = {"module." * 3000 + k: v for k, v in nn.Linear(2, 2).state_dict().items()}
    assert set(strip_wrapper_prefixes(state, ["weight", "bias"])) == {"weight", "bias"}


@pytest.mark.parametrize("content", [torch.zeros(3), [torch.zeros(1)], None, 7],
                         ids=["tensor", "list", "none", "int"])
def test_a_torch_file_without_a_state_dict_is_named(tmp_path, content):
    path = tmp_path / "m.pt"
    torch.save(content, path)
    with pytest.raises(ValueError, match=f"{path}: holds a .*, not a state dict"):
        load_fm_checkpoint(path, _tiny())


def test_running_out_of_memory_while_reading_a_torch_file_stays_a_memory_error(
        tmp_path, monkeypatch):
    """(Not "holds a NoneType" nor "not a weights-only torch checkpoint".)"""
    from otq_kernels.models import checkpoint

    path = tmp_path / "m.pt"
    torch.save(_tiny().state_dict(), path)

    def out_of_memory(path):
        raise MemoryError

    monkeypatch.setattr(checkpoint, "_torch_load", out_of_memory)
    with pytest.raises(MemoryError):
        load_fm_checkpoint(path, _tiny())


def test_a_pipe_or_a_directory_named_like_a_checkpoint_is_refused(tmp_path):
    """(A FIFO named .pt blocked torch.load forever.)"""
    fifo = tmp_path / "m.pt"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        load_fm_checkpoint(fifo, _tiny())
    (tmp_path / "d.pth").mkdir()
    with pytest.raises(ValueError, match="is a directory, not a checkpoint file"):
        load_fm_checkpoint(tmp_path / "d.pth", _tiny())


def test_checkpoint_wrong_architecture():
    state = build_model("digits").state_dict()
    with pytest.raises(ValueError, match="missing keys .*unexpected keys"):
        load_fm_checkpoint(state, _tiny())
    with pytest.raises(ValueError, match="shape mismatches .*input_blocks.0.0.weight"):
        load_fm_checkpoint(_tiny(in_channels=3).state_dict(), _tiny())
    with pytest.raises(FileNotFoundError):
        load_fm_checkpoint("/nonexistent/x.safetensors", _tiny())


class _Payload:
    """Unpickling this runs code: it would create the file named."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("name, content, match", [
    ("junk.pth", b"not a zip archive" * 4, "not a weights-only torch checkpoint"),
    ("payload.pt", None, "not a weights-only torch checkpoint"),
    ("cut.safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{", "not a readable safetensors"),
], ids=["junk", "code-running-pickle", "truncated-safetensors"])
def test_unreadable_checkpoint_names_the_file(tmp_path, name, content, match):
    """A file that cannot be read (or that is more than tensors) is a ValueError naming it,
    and a pickle's code never runs."""
    path, ran = tmp_path / name, tmp_path / "payload_ran"
    if content is None:
        torch.save({"weights": torch.zeros(2), "x": _Payload(ran)}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        load_fm_checkpoint(path, _tiny())
    assert str(err.value).startswith(f"{path}: ") and not ran.exists()


def test_demo_model_loads():
    from otq_kernels.models import demo_model_metadata, demo_model_path, load_demo_model

    if not demo_model_path().exists():
        pytest.skip("demo asset not built")
    model = load_demo_model()
    meta = demo_model_metadata()
    assert meta["config"] == "digits" and float(meta["final_loss"]) > 0
    y = model(torch.randn(2, 1, 16, 16), torch.rand(2))
    assert y.shape == (2, 1, 16, 16) and torch.isfinite(y).all()


@pytest.mark.parametrize("shape", [(1, 3, 16, 16), (1, 1, 15, 16), (1, 1, 16), (2, 1, 16, 7)])
def test_wrong_image_shape_is_a_clear_error(shape):
    model = build_model("tiny")
    with pytest.raises(ValueError, match=r"images \[B, 1, H, W\]"):
        model(torch.randn(*shape), torch.zeros(shape[0]))


@pytest.mark.parametrize("t", [torch.full((3, 1, 1, 1), 0.5), torch.tensor([0.5]), 0.5,
                               torch.tensor(0.5, dtype=torch.float64)],
                         ids=["B111", "one", "float", "0-d"])
def test_times_of_every_broadcast_layout_agree(t):
    model = _randomize(_tiny()).eval()
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(model(x, t), model(x, torch.full((3,), 0.5)), rtol=0, atol=0)


def test_empty_batch_gives_an_empty_output():
    model = _randomize(_tiny()).eval()
    assert model(torch.randn(0, 1, 16, 16), torch.zeros(0)).shape == (0, 1, 16, 16)


@pytest.mark.parametrize("conditional, t, label, match", [
    (False, torch.zeros(2), None, r"t must be a scalar, \[1\], \[B\] .* B = 3, got \[2\]"),
    (False, torch.zeros(3, 2), None, r"t must be .* got \[3, 2\]"),
    (False, torch.zeros(3), torch.tensor([1, 2, 3]), "label was given to an unconditional"),
    (True, torch.zeros(3), torch.tensor([0.7, 5.2, 9.9]), "got torch.float32 \\[3\\]"),
    (True, torch.zeros(3), torch.tensor([True, False, True]), "got torch.bool"),
    (True, torch.zeros(3), torch.tensor([[1], [2], [3]]), "got torch.int64 \\[3, 1\\]"),
    (True, torch.zeros(3), torch.tensor([1, 2]), "with B = 3, got torch.int64 \\[2\\]"),
    (True, torch.zeros(3), 3, "got int 3"),
    (True, torch.zeros(3), torch.tensor([0, 11, 3]), r"class indices 0\.\.10 .* got 0\.\.11"),
    (True, torch.zeros(3), torch.tensor([-1, 0, 3], dtype=torch.int32), "got -1\\.\\.3"),
], ids=["t-2-for-3", "t-3x2", "label-unconditional", "label-float", "label-bool",
        "label-B1", "label-2-for-3", "label-int", "label-past-null", "label-negative"])
def test_times_and_labels_that_fit_no_batch_are_refused(conditional, t, label, match):
    """A clear ValueError, not a broadcast error deep in a ResBlock, and never a float
    label truncated to a class or a label ignored."""
    model = _tiny(num_classes=10 if conditional else None).eval()
    with pytest.raises(ValueError, match=match):
        model(torch.randn(3, 1, 16, 16), t, {"label": label} if label is not None else None)


def test_the_null_class_is_a_label_and_traced_labels_are_not_read():
    """num_classes itself (the null class) is in range; while torch.jit.trace or vmap runs
    the values are not read (a trace would hold them as constants, vmap refuses)."""
    model = _randomize(_tiny(num_classes=10)).eval().requires_grad_(False)
    x, t = torch.randn(2, 1, 16, 16), torch.zeros(2)
    torch.testing.assert_close(model(x, t, {"label": torch.tensor([10, 10])}), model(x, t))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        traced = torch.jit.trace(lambda x, label: model(x, t, {"label": label}),
                                 (x, torch.tensor([1, 2])))
    assert not [w for w in caught if "Python integer" in str(w.message)]
    torch.testing.assert_close(traced(x, torch.tensor([3, 4])),
                               model(x, t, {"label": torch.tensor([3, 4])}))
    labels = torch.tensor([[0, 1], [10, 2]])  # (vmap has no rule for reading values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # (attention's batching fallback)
        mapped = torch.func.vmap(lambda x, label: model(x, t, {"label": label}))(
            torch.stack([x, x]), labels)
    torch.testing.assert_close(mapped[1], model(x, t, {"label": labels[1]}))


@pytest.mark.parametrize("resample", [Upsample, Downsample])
def test_resampling_changes_channels_only_through_its_conv(resample):
    """Without a conv the channel count cannot change: a ValueError (an Upsample kept its
    input's channels while its ``out_channels`` said otherwise)."""
    with pytest.raises(ValueError, match="without conv cannot change the channel count"):
        resample(4, use_conv=False, out_channels=8)
    assert resample(4, use_conv=True, out_channels=8)(torch.zeros(1, 4, 4, 4)).shape[1] == 8
    assert resample(4, use_conv=False, out_channels=4)(torch.zeros(1, 4, 4, 4)).shape[1] == 4


@pytest.mark.parametrize("options, match", [
    (dict(num_res_blocks=-1), "num_res_blocks must be an integer >= 0"),
    (dict(channel_mult=()), "channel_mult must be a non-empty sequence"),
    (dict(channel_mult=(1, 0)), "channel_mult must be"),
    (dict(channel_mult=("1", "2")), "channel_mult must be"),
    (dict(attention_resolutions="2"), "attention_resolutions must be a collection"),
    (dict(num_heads=3), "64 channels not divisible by 3 heads"),
    (dict(num_heads=0), "num_heads must be an integer >= 1"),
    (dict(num_heads_upsample=0), "num_heads_upsample must be -1 or an integer >= 1"),
    (dict(num_head_channels=0), "num_head_channels must be -1 or an integer >= 1"),
    (dict(num_classes=0), "num_classes must be None or an integer >= 1"),
    (dict(model_channels=True), "model_channels must be an integer >= 1"),
], ids=["res-blocks-negative", "mult-empty", "mult-zero", "mult-text", "attention-text",
        "heads-3", "heads-0", "heads-up-0", "head-channels-0", "classes-0", "channels-bool"])
def test_arguments_that_build_no_working_unet_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        UNetModel(**{**unet_config("tiny"), **options})


def test_unusual_arguments_that_work_are_kept():
    """No res blocks per level, one base channel (an odd sinusoid width), numpy integers,
    and num_heads ignored where a head width is given."""
    import numpy as np

    x = torch.randn(2, 1, 16, 16)
    for options in (dict(num_res_blocks=0), dict(model_channels=1, channel_mult=(1, 1)),
                    dict(num_res_blocks=np.int64(1)), dict(num_heads=-1, num_head_channels=16)):
        model = _randomize(UNetModel(**{**unet_config("tiny"), **options})).eval()
        assert model(x, 0.5).shape == x.shape and bool(torch.isfinite(model(x, 0.5)).all())
    from otq_kernels.models.layers import timestep_embedding

    assert timestep_embedding(torch.zeros(4), 1).shape == (4, 1)


def test_accepts_the_examples_config_keys():
    kwargs = dict(unet_config("tiny"), image_size=16, dims=2, use_checkpoint=False,
                  with_fourier_features=False)
    assert UNetModel(**kwargs).state_dict().keys() == build_model("tiny").state_dict().keys()
    with pytest.raises(ValueError, match="2-D models without Fourier"):
        UNetModel(**dict(kwargs, with_fourier_features=True))
    with pytest.raises(ValueError, match="dims=3"):
        UNetModel(**dict(kwargs, dims=3))


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_checkpoint_of_a_wrapped_model_loads_into_the_bare_one(prefix):
    """State dicts saved from DDP/DataParallel (module.) or torch.compile (_orig_mod.)
    wrappers: the prefix goes; a compiled model to load into is seen through."""
    src = _randomize(_tiny()).eval()
    state = {prefix + k: v for k, v in src.state_dict().items()}
    x, t = torch.randn(1, 1, 16, 16), torch.rand(1)
    torch.testing.assert_close(load_fm_checkpoint(state, _tiny()).eval()(x, t), src(x, t))
    target = _tiny()
    compiled = torch.compile(target, backend="eager")  # never called: nothing compiled
    assert load_fm_checkpoint({"model": state}, compiled) is compiled
    torch.testing.assert_close(target.eval()(x, t), src(x, t))
    partly = dict(state, extra=torch.zeros(1))  # not every name prefixed: left as it is
    with pytest.raises(ValueError, match="unexpected keys"):
        load_fm_checkpoint(partly, _tiny())


@pytest.mark.parametrize("child", ["module", "_orig_mod"])
def test_a_wrapper_prefix_goes_where_the_model_has_a_child_of_that_name(child):
    """A model with a child called ``module``: its DataParallel state dict (module.module.*,
    module.other.*) loads (the prefix was kept, since one of the model's names carries it);
    the model's own state dict is left as it is."""
    def model():
        torch.manual_seed(0)
        return nn.Sequential(OrderedDict([(child, nn.Linear(4, 4)), ("other", nn.Linear(4, 2))]))

    src = model()
    with torch.no_grad():
        for p in src.parameters():
            p.add_(1.0)
    prefix = "module." if child == "module" else "_orig_mod."
    x = torch.randn(3, 4)
    for state in ({prefix + k: v for k, v in src.state_dict().items()}, src.state_dict()):
        target = model()
        target.load_state_dict(strip_wrapper_prefixes(state, target.state_dict()))
        assert torch.equal(target(x), src(x))


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def _adm_resblock(block, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    """ADM's ResBlock forward written out with functional ops and the block's weights."""
    F = torch.nn.functional

    def norm(gn, z):
        return F.group_norm(z, gn.num_groups, gn.weight, gn.bias, gn.eps)

    h = F.silu(norm(block.in_layers[0], x))
    if isinstance(block.h_upd, nn.Identity):
        pass
    elif hasattr(block.h_upd, "op"):  # down: 2x2 average pooling
        h, x = F.avg_pool2d(h, 2), F.avg_pool2d(x, 2)
    else:  # up: nearest x2
        h, x = F.interpolate(h, scale_factor=2.0), F.interpolate(x, scale_factor=2.0)
    h = block.in_layers[2](h)
    e = block.emb_layers[1](F.silu(emb))[..., None, None]
    if block.use_scale_shift_norm:
        scale, shift = e.chunk(2, dim=1)
        h = norm(block.out_layers[0], h) * (1 + scale) + shift
    else:
        h = norm(block.out_layers[0], h + e)
    return block.skip_connection(x) + block.out_layers[3](F.silu(h))


@pytest.mark.parametrize("resample", ["none", "up", "down"])
@pytest.mark.parametrize("scale_shift", [True, False], ids=["film", "add"])
def test_resblock_matches_adm(resample, scale_shift):
    """With its zero-initialised output conv made non-zero (which hides the whole residual
    branch in a fresh model), a ResBlock computes ADM's forward."""
    from otq_kernels.models.layers import ResBlock

    torch.manual_seed(0)
    block = ResBlock(16, 24, 0.0, out_channels=32, use_scale_shift_norm=scale_shift,
                     up=resample == "up", down=resample == "down")
    block = _randomize(block).eval()
    x, emb = torch.randn(2, 16, 8, 8), torch.randn(2, 24)
    with torch.no_grad():
        torch.testing.assert_close(block(x, emb), _adm_resblock(block, x, emb),
                                   rtol=1e-5, atol=1e-5)


def test_timestep_embedding_is_adms():
    """[cos(t f_i), sin(t f_i)] with f_i = 10000^(-i/half), zero-padded to an odd dim."""
    from otq_kernels.models.layers import timestep_embedding

    t = torch.tensor([0.0, 0.25, 1.0, 700.0])
    freqs = torch.tensor([10000.0 ** (-i / 3) for i in range(3)])
    args = t[:, None] * freqs[None]
    expected = torch.cat([args.cos(), args.sin(), torch.zeros(4, 1)], dim=1)
    torch.testing.assert_close(timestep_embedding(t, 7), expected)
