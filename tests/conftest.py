"""Test set-up: Triton's interpreter on CPU-only machines, `cuda` marker skipping, and
``OTQ_EXPECT_NATIVE=1`` (set by ``make test``): the native extension must load, or the
run stops (its tests would all skip)."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before any @triton.jit function is created.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    if os.environ.get("OTQ_EXPECT_NATIVE") == "1":
        from otq_kernels._native import unavailable_reason

        reason = unavailable_reason()
        if reason is not None:
            raise pytest.UsageError(f"OTQ_EXPECT_NATIVE=1: {reason}")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda") is not None:  # (not keywords: a param id "cuda")
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernels run: the GPU when present, else CPU (Triton via its interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def spy(monkeypatch):
    """A function ``(module, name) -> calls``: ``module.name`` still runs, and each call's
    positional arguments are appended to ``calls`` (which backend a call reached)."""

    def watch(module, name):
        calls, real = [], getattr(module, name)

        def recorded(*args, **kwargs):
            calls.append(args)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)
        return calls

    return watch


@pytest.fixture
def one_thread():
    """Run a test with one torch thread: tiny CPU models are faster so on shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def renamed_over_after_the_header(monkeypatch):
    """A function ``(path, other)``: the next safetensors read of ``path`` has ``other``
    renamed over it (an atomic save) right after its header is checked."""
    from otq_kernels import checkpoint

    def arrange(path, other):
        checked = checkpoint._checked_metadata

        def then_replaced(file, name):
            metadata = checked(file, name)
            if os.path.exists(other):
                os.replace(other, path)
            return metadata

        monkeypatch.setattr(checkpoint, "_checked_metadata", then_replaced)

    return arrange
