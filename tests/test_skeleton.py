"""Skeletons built on the meta device load checkpoints like float ones (otq_kernels.skeleton)."""

import argparse

import pytest
import torch
from torch import nn

import otq_kernels as otq
from otq_kernels import cli, skeleton
from otq_kernels import nn as qnn
from otq_kernels.models import build_model, load_fm_checkpoint, unet_config


class Net(nn.Module):
    """A conv, a norm, a buffer, a float layer and two Linears sharing one weight."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(2, 8)
        self.bn = nn.BatchNorm2d(8)  # running stats: persistent buffers
        self.up = nn.ConvTranspose2d(8, 8, 2)  # stays float
        self.head = nn.Linear(8, 8)
        self.tail = nn.Linear(8, 8)
        self.tail.weight = self.head.weight

    def forward(self, x):
        h = self.up(self.bn(self.norm(self.conv(x)))).mean((2, 3))
        return self.tail(self.head(h))


def _saved(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    model.bn.running_mean.normal_()
    qnn.quantize_model(model, bits=3, exclude=["tail"], progress=False)
    path = tmp_path / "q.safetensors"
    otq.save_quantized(model, path)
    return model, path


def _on_meta() -> Net:
    with torch.device("meta"):
        return Net().eval()


def _meta_names(model: nn.Module) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


def test_quantized_checkpoint_loads_into_a_meta_skeleton(tmp_path):
    model, path = _saved(tmp_path)
    skel = _on_meta()
    assert _meta_names(skel)
    loaded = otq.load_quantized(path, skel)
    assert _meta_names(loaded) == []
    assert loaded.conv.codebook.device.type == "cpu"  # default device of a meta skeleton
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(loaded(x), model(x))
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    float_load = otq.load_quantized(path, Net().eval(), device="cpu")
    assert torch.equal(float_load(x), loaded(x))


def test_materialize_keeps_parameters_their_flags_and_ties():
    skel = _on_meta()
    skel.norm.weight.requires_grad_(False)
    skeleton.materialize(skel, torch.device("cpu"))
    assert _meta_names(skel) == []
    assert skel.head.weight is skel.tail.weight  # tied weights stay one tensor
    assert isinstance(skel.conv.weight, nn.Parameter) and skel.conv.weight.requires_grad
    assert not skel.norm.weight.requires_grad
    assert not isinstance(skel.bn.running_mean, nn.Parameter)
    assert skel.bn.num_batches_tracked.dtype == torch.int64
    assert [n for n, _ in skel.named_parameters()] == [n for n, _ in Net().named_parameters()]


def test_a_meta_buffer_no_checkpoint_saves_is_refused_before_any_change(tmp_path):
    _, path = _saved(tmp_path)
    skel = _on_meta()
    with torch.device("meta"):
        skel.norm.register_buffer("scale", torch.ones(8), persistent=False)
    with pytest.raises(ValueError, match=r"\['norm.scale'\] are on the meta device"):
        otq.load_quantized(path, skel)
    assert type(skel.conv) is nn.Conv2d and skel.conv.weight.is_meta  # untouched
    with pytest.raises(ValueError, match="load_fm_checkpoint: the model's buffers"):
        load_fm_checkpoint(Net().state_dict(), skel)
    skel.norm.scale = torch.ones(8)  # given values: now it loads
    assert _meta_names(otq.load_quantized(path, skel)) == []


@pytest.mark.parametrize("skeleton_on", ["meta", "cpu"])
def test_a_load_under_inference_mode_gives_normal_tensors_in_the_skeletons_mode(
        tmp_path, skeleton_on):
    _, path = _saved(tmp_path)
    skel = _on_meta() if skeleton_on == "meta" else Net().eval()
    with torch.inference_mode():
        loaded = otq.load_quantized(path, skel)
    assert {m.training for m in loaded.modules()} == {False}
    assert not any(t.is_inference() for t in loaded.state_dict().values())
    loaded.load_state_dict(loaded.state_dict())  # an inference tensor would refuse this


def test_meta_is_not_a_device_to_load_onto(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(ValueError, match="cannot load onto the meta device"):
        otq.load_quantized(path, Net().eval(), device="meta")


@pytest.mark.parametrize("device", [
    "gpu", pytest.param("cuda", id="absent-gpu",  # (an id with "cuda" would mark it cuda)
                        marks=pytest.mark.skipif(torch.cuda.is_available(),
                                                 reason="this machine has a GPU"))])
def test_a_device_that_cannot_hold_the_weights_is_refused_before_the_model_changes(
        tmp_path, device):
    _, path = _saved(tmp_path)
    skel = Net().eval()
    before = {k: v.clone() for k, v in skel.state_dict().items()}
    with pytest.raises(ValueError, match=f"cannot load onto device '{device}'"):
        otq.load_quantized(path, skel, device=device)
    after = skel.state_dict()
    assert set(after) == set(before) and all(torch.equal(after[k], v) for k, v in before.items())


def test_float_checkpoint_loads_into_a_meta_skeleton():
    torch.manual_seed(0)
    src = build_model("tiny")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    state = {f"model.{k}": v for k, v in src.state_dict().items()}  # the examples' layout
    with torch.device("meta"):
        skel = build_model("tiny")
    loaded = load_fm_checkpoint(state, skel).eval()
    assert _meta_names(loaded) == []
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    assert torch.equal(loaded(x, t), src.eval()(x, t))


@pytest.mark.parametrize("source", ["file", "state dict"])
def test_a_meta_skeleton_takes_the_tensors_read_from_a_file(source, tmp_path, monkeypatch):
    """From a file, every tensor of a meta skeleton is the tensor read for it (the float
    checkpoint was held twice: read, then copied in); a state dict passed in is copied,
    so the caller's tensors stay theirs."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    src = build_model("tiny").eval()
    state = {k: v.clone() for k, v in src.state_dict().items()}
    save_file(state, str(tmp_path / "f.safetensors"))
    adopted = []
    real = skeleton._adoptable
    monkeypatch.setattr(skeleton, "_adoptable",
                        lambda *a: adopted.append(real(*a) is not None) or real(*a))
    with torch.device("meta"):
        skel = build_model("tiny")
    loaded = load_fm_checkpoint(tmp_path / "f.safetensors" if source == "file" else state,
                                skel).eval()
    assert adopted and set(adopted) == {source == "file"}
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2)
    expected = src(x, t)
    assert torch.equal(loaded(x, t), expected)
    for value in state.values():
        value.zero_()
    assert torch.equal(loaded(x, t), expected)


def test_cli_loads_quantized_checkpoints_without_a_float_model(tmp_path, monkeypatch):
    out = tmp_path / "q.safetensors"
    assert cli.main(["quantize", "--random-init", "tiny", "-o", str(out), "--bits", "4",
                     "--quiet"]) == 0
    built_on = []
    real_init = nn.Conv2d.reset_parameters

    def spy(self):  # every float conv the CLI builds initialises its weights here
        built_on.append(self.weight.device.type)
        real_init(self)

    monkeypatch.setattr(nn.Conv2d, "reset_parameters", spy)
    args = argparse.Namespace(checkpoint=str(out), config=None, device="cpu", image_size=None)
    model, info = cli.load_model(args)
    assert built_on and set(built_on) == {"meta"}
    assert info["quantized"] and _meta_names(model) == []
    reference = otq.load_quantized(out, build_model("tiny").eval())
    x, t = torch.randn(1, 1, 16, 16), torch.rand(1)
    assert torch.equal(model(x, t), reference(x, t))
    assert info["config_kwargs"] == unet_config("tiny")


@pytest.mark.cuda
def test_loading_onto_the_gpu_allocates_the_weights_once(tmp_path):
    """A meta skeleton loaded onto the GPU: peak memory = the model's tensors (the file is
    copied into them from the CPU, with no staged device copy; 512-byte allocator rounding
    per tensor allowed)."""
    torch.manual_seed(0)
    path = tmp_path / "digits.safetensors"
    otq.save_quantized(qnn.quantize_model(build_model("digits"), bits=4, progress=False), path)
    with torch.device("meta"):
        skel = build_model("digits")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    model = otq.load_quantized(path, skel, device="cuda")
    torch.cuda.synchronize()
    tensors = [*model.parameters(), *model.buffers()]
    assert {t.device.type for t in tensors} == {"cuda"}
    stored = sum(t.numel() * t.element_size() for t in tensors)
    assert torch.cuda.max_memory_allocated() - before <= stored + 512 * len(tensors)
