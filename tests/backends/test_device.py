"""Per-device facts are read from torch once per device, not once per call; Triton
launches run with their tensors' GPU current."""

import re
from contextlib import contextmanager
from types import SimpleNamespace
from unittest import mock

import pytest
import torch

import otq_kernels as otq
from otq_kernels.backends import _device
from otq_kernels.backends import triton as triton_backend


def test_properties_read_once_per_device(monkeypatch):
    calls = []

    def properties(index):
        calls.append(index)
        return SimpleNamespace(multi_processor_count=100 + index, name=f"GPU {index}")

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    _device._properties.cache_clear()
    try:
        for _ in range(3):
            assert _device.sm_count(torch.device("cuda", 0)) == 100
            assert _device.gpu_name(torch.device("cuda", 0)) == "GPU 0"
            assert _device.sm_count(torch.device("cuda")) == 101  # the current device
        assert sorted(calls) == [0, 1]
    finally:
        _device._properties.cache_clear()


def test_non_cuda_device_has_one_sm():
    assert _device.sm_count(torch.device("cpu")) == 1


def test_triton_launches_with_the_tensors_gpu_current(monkeypatch):
    """Triton launches on the current device: a call on a cuda:1 tensor while cuda:0 is
    current makes cuda:1 current for the launch, and back after; no guard otherwise."""
    current, entered = [0], []

    @contextmanager
    def device(d):
        entered.append(d)
        before, current[0] = current[0], torch.device(d).index
        yield
        current[0] = before

    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)

    def on(index):
        t = mock.Mock(spec=torch.Tensor, is_cuda=True, device=torch.device("cuda", index))
        t.get_device.return_value = index
        return t

    def launch(arg):
        return arg, current[0]

    assert triton_backend._on_its_gpu(on(1), launch, "x") == ("x", 1) and current == [0]
    assert entered == [torch.device("cuda", 1)]
    assert triton_backend._on_its_gpu(on(0), launch, "y") == ("y", 0)
    assert triton_backend._on_its_gpu(torch.zeros(1), launch, "z") == ("z", 0)
    assert triton_backend._on_its_gpu(None, launch, "w") == ("w", 0)
    assert len(entered) == 1


def test_every_triton_entry_point_launches_through_the_device_guard(monkeypatch):
    pytest.importorskip("triton")
    seen = []
    real = triton_backend._on_its_gpu
    monkeypatch.setattr(triton_backend, "_on_its_gpu",
                        lambda t, launch, *a: seen.append(launch.__name__) or real(t, launch, *a))
    torch.manual_seed(0)
    qt = otq.fit_codebook(torch.randn(4, 32), 2, "ot", "channel")
    conv_qt = otq.fit_codebook(torch.randn(4, 2, 3, 3), 2, "ot", "channel")
    triton_backend.linear(torch.randn(1, 32), qt, None)
    triton_backend.conv2d(torch.randn(1, 2, 4, 4), conv_qt, None, (1, 1), (1, 1), (1, 1), 1)
    triton_backend.fit_rows(torch.randn(2, 16), 2)
    planes = triton_backend.pack(torch.randint(0, 4, (4, 32)), 2)
    triton_backend.unpack(planes, 2, 32)
    triton_backend.dequantize_triton(qt, torch.float32)
    assert seen == ["linear_triton", "conv2d_triton", "fit_rows_triton", "pack_triton",
                    "unpack_triton", "dequantize_triton"]


@pytest.mark.parametrize("capability, says", [
    ((8, 6), "no kernels for this GPU \\(sm_86\\).*rebuild it with OTQ_CUDA_ARCHS=86"),
    ((7, 5), "sm_75\\) is older than the CUDA kernels' minimum, sm_80"),
])
def test_a_gpu_without_kernel_images_gets_the_way_that_works(monkeypatch, capability, says):
    """A GPU the build has no image for: a rebuild for its architecture where the kernels
    can run (sm_80 on), none before (their mma.m16n8k16 cannot compile for sm_75)."""
    from otq_kernels.backends import cuda

    def no_image():
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(cuda, "native", lambda require_cuda: SimpleNamespace(
        cuda_check_kernel_image=no_image))
    monkeypatch.setattr(torch.cuda, "device", lambda index: contextmanager(lambda: (
        yield))())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capability)
    cuda._no_kernel_image.cache_clear()
    try:
        assert re.search(says, cuda._no_kernel_image(0))
    finally:
        cuda._no_kernel_image.cache_clear()
