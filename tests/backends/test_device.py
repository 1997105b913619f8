"""Per-device facts are read from torch once per device, not once per call."""

from types import SimpleNamespace

import torch

from otq_kernels.backends import _device


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
