"""record_dispatch: which backend and kernels each quantized layer call ran."""

import contextlib
import threading

import pytest
import torch
from torch import nn

import otq_kernels as otq
from otq_kernels import dispatch_log, ops
from otq_kernels.backends import cpu

HAS_CPU_KERNELS = cpu.unavailable(torch.device("cpu")) is None
# What each backend runs for these calls on CPU tensors (the cpu backend's expansion where
# the extension is built, torch's otherwise).
EXPANSION = "dequant_cpu" if HAS_CPU_KERNELS else "dequant_torch"


class _Net(nn.Module):
    """conv 3->8 (3x3, stride 2) -> pointwise Conv1d 8->8 -> flatten -> linear 128->5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.mix = nn.Conv1d(8, 8, 1)
        self.head = nn.Linear(8 * 16, 5)

    def forward(self, x):
        h = self.conv(x)  # [B, 8, 4, 4]
        h = self.mix(h.flatten(2))  # [B, 8, 16]
        return self.head(h.flatten(1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return otq.quantize_model(_Net(), bits=3, progress=False)


def _conv_m(batch):
    return batch * 4 * 4


@pytest.mark.parametrize("batch", [1, 7, 40])
def test_auto_records_each_layer_with_the_backend_dispatch_picks(net, batch):
    x = torch.randn(batch, 3, 8, 8)
    with otq.record_dispatch(net) as log:
        y = net(x)
    assert y.shape == (batch, 5)
    # (the pointwise Conv1d runs as a conv where a conv kernel takes it: dequant on CPU)
    assert [(r.layer, r.op) for r in log] == [("conv", "conv2d"), ("mix", "conv2d"),
                                             ("head", "linear")]
    assert [r.m for r in log] == [_conv_m(batch), batch * 16, batch]
    assert [r.weight_shape for r in log] == [(8, 3, 3, 3), (8, 8, 1, 1), (5, 128)]
    assert all(r.bits == 3 and r.dtype == "float32" and r.device == "cpu" for r in log)
    dev = torch.device("cpu")
    for r in log[:2]:
        kernel = r.weight_shape[2:]
        assert r.backend == ops.resolve_conv_backend(None, dev, r.m, torch.float32, 3, 1, kernel)
        assert r.kernels == [EXPANSION, "F.conv2d"]
    head = log[2]
    assert head.backend == ops.resolve_linear_backend(None, dev, head.m, torch.float32, 3)
    assert head.kernels == (["cpu_lut"] if head.backend == "cpu" else [EXPANSION, "F.linear"])


@pytest.mark.parametrize("backend, kernels", [
    ("reference", {"linear": ["dequant_torch", "F.linear"],
                   "conv2d": ["dequant_torch", "F.conv2d"]}),
    ("dequant", {"linear": [EXPANSION, "F.linear"], "conv2d": [EXPANSION, "F.conv2d"]}),
])
def test_named_backends_record_their_kernels(backend, kernels):
    torch.manual_seed(1)
    qt_lin = otq.fit_codebook(torch.randn(6, 40), 4)
    qt_conv = otq.fit_codebook(torch.randn(6, 2, 3, 3), 2)
    with otq.record_dispatch() as log:
        ops.codebook_linear(torch.randn(3, 40), qt_lin, backend=backend)
        ops.codebook_conv2d(torch.randn(1, 2, 5, 5), qt_conv, backend=backend)
    assert [(r.layer, r.op, r.backend, r.m) for r in log] == [
        (None, "linear", backend, 3), (None, "conv2d", backend, 9)]
    assert [r.kernels for r in log] == [kernels["linear"], kernels["conv2d"]]


@pytest.mark.skipif(not HAS_CPU_KERNELS, reason="needs the extension's CPU kernels")
def test_cpu_backend_and_chunked_expansion():
    torch.manual_seed(2)
    qt = otq.fit_codebook(torch.randn(8, 32), 4)
    wide = otq.fit_codebook(torch.randn(2100, 1024), 2, granularity="tensor")  # > 8 MiB fp32
    with otq.record_dispatch() as log:
        ops.codebook_linear(torch.randn(2, 32), qt, backend="cpu")
        ops.codebook_linear(torch.randn(1, 1024), wide, backend="dequant")
    assert [r.kernels for r in log] == [["cpu_lut"], ["dequant_cpu", "torch.mm by row chunks"]]


def test_float64_and_transforms_record_the_reference_path():
    torch.manual_seed(3)
    qt = otq.fit_codebook(torch.randn(4, 16), 3)
    qt_conv = otq.fit_codebook(torch.randn(4, 2, 1, 1), 3)
    with otq.record_dispatch() as log:
        ops.codebook_linear(torch.randn(2, 16, dtype=torch.float64), qt)
        torch.func.vmap(lambda v: ops.codebook_linear(v, qt))(torch.randn(5, 1, 16))
        torch.func.vmap(lambda v: ops.codebook_conv2d(v, qt_conv))(torch.randn(3, 1, 2, 2, 2))
    assert log[0].dtype == "float64" and log[0].kernels[0] == "dequant_torch"
    assert [(r.op, r.backend) for r in log[1:]] == [("linear", "reference"),
                                                    ("conv2d", "reference")]


def test_grad_calls_go_through_the_op_and_are_recorded(net):
    """Calls with an autograd graph run through the op and are recorded as in inference;
    the backward's own expansions are no layer call's and change no record."""
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad(), otq.record_dispatch(net) as plain:
        net(x)
    x.requires_grad_(True)
    with otq.record_dispatch(net) as log:
        net(x).sum().backward()
    assert [r.layer for r in log] == ["conv", "mix", "head"]
    assert [r.kernels for r in log] == [r.kernels for r in plain]
    assert x.grad is not None


def test_blocks_nest_and_clean_up(net):
    x = torch.randn(1, 3, 8, 8)
    with otq.record_dispatch() as outer:
        net(x)
        with otq.record_dispatch(net) as inner:
            net(x)
    net(x)  # after both blocks: recorded nowhere
    assert len(inner) == 3 and [r.layer for r in inner] == ["conv", "mix", "head"]
    assert len(outer) == 6 and all(r.layer is None for r in outer)
    assert not dispatch_log.recording()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_an_inner_log_equal_to_the_outer_one_closes_itself_only(net):
    """Logs are lists: when every call so far was made inside the inner block, the two are
    equal, and leaving the inner block must still close the inner one."""
    x = torch.randn(1, 3, 8, 8)
    with otq.record_dispatch(net) as outer:
        with otq.record_dispatch(net) as inner:
            net(x)
        assert inner == outer
        net(x)
    assert (len(outer), len(inner)) == (6, 3) and not dispatch_log.recording()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_an_error_inside_the_block_closes_the_log(net):
    with pytest.raises(ValueError, match="must be"), otq.record_dispatch(net) as log:
        net(torch.randn(1, 3, 8, 8))
        ops.codebook_linear(torch.randn(2, 7), net.head.qweight)
    assert len(log) == 3 and not dispatch_log.recording()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_a_layer_failing_inside_the_model_leaves_no_stale_name(net):
    with otq.record_dispatch(net) as log:
        with pytest.raises(ValueError):
            net.head(torch.randn(2, 7))
        ops.codebook_linear(torch.randn(1, 128), net.head.qweight)
    assert [r.layer for r in log] == [None]


def test_a_log_opened_inside_a_layer_call_leaves_that_call_alone(net):
    """A call already inside a layer when the log's hooks are installed (another thread's,
    in a server) exits through a hook that never saw it enter: it raised IndexError."""
    blocks = contextlib.ExitStack()
    logs = []
    handle = net.head.register_forward_pre_hook(
        lambda module, args: logs.append(blocks.enter_context(otq.record_dispatch(net))))
    try:
        assert net(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    finally:
        handle.remove()
        blocks.close()
    assert [r.layer for r in logs[0]] == [None]  # (head's call, unnamed: entered before)


def test_other_threads_calls_are_named_by_their_own_layers(net):
    """Each thread's calls are named by its own layer stack."""
    x = torch.randn(2, 3, 8, 8)
    with otq.record_dispatch(net) as log:
        worker = threading.Thread(target=net, args=(x,))
        worker.start()
        worker.join()
        net(x)
    assert [r.layer for r in log] == ["conv", "mix", "head"] * 2
    assert [r.model_call for r in log] == [0, 0, 0, 1, 1, 1]


def test_overlapping_calls_in_threads_number_their_own_records(net):
    """Thread A's call starts, B's starts and ends, then A's goes on: every record of
    A's call carries A's number (it read the log's count when recorded: B's)."""
    x = torch.randn(2, 3, 8, 8)
    a_started, b_done = threading.Event(), threading.Event()

    def a_waits_for_b(module, args):
        if threading.current_thread().name == "A" and not b_done.is_set():
            a_started.set()
            b_done.wait(10)

    def b():
        a_started.wait(10)
        net(x)
        b_done.set()

    handle = net.mix.register_forward_pre_hook(a_waits_for_b)
    try:
        with otq.record_dispatch(net) as log:
            threads = [threading.Thread(target=net, args=(x,), name="A"),
                       threading.Thread(target=b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(20)
    finally:
        handle.remove()
    assert b_done.is_set() and log.model_calls == 2
    calls = {call: [r.layer for r in log if r.model_call == call] for call in (0, 1)}
    assert calls == {0: ["conv", "mix", "head"], 1: ["conv", "mix", "head"]}


def test_empty_batch_runs_no_kernel_and_is_not_recorded(net):
    with otq.record_dispatch(net) as log:
        assert net(torch.randn(0, 3, 8, 8)).shape == (0, 5)
    assert len(log) == 0


def test_shared_layer_is_named_once_per_call():
    torch.manual_seed(4)
    shared = nn.Linear(6, 6)
    model = otq.quantize_model(nn.Sequential(shared, nn.ReLU(), shared), bits=4, progress=False)
    with otq.record_dispatch(model) as log:
        model(torch.randn(2, 6))
    assert [r.layer for r in log] == ["0", "0"]


def test_table_and_counts(net):
    with otq.record_dispatch(net) as log:
        net(torch.randn(1, 3, 8, 8))
        net(torch.randn(1, 3, 8, 8))
    counts = log.counts()
    head = ("linear", log[2].backend, " + ".join(log[2].kernels))
    assert counts == {("conv2d", "dequant", f"{EXPANSION} + F.conv2d"): 4, head: 2}
    assert list(counts)[0][0] == "conv2d"  # most frequent first
    lines = log.table().splitlines()
    assert lines[0].split() == ["layer", "op", "weight", "M", "dtype", "bits", "backend",
                                "kernels"]
    assert lines[1].split()[:6] == ["conv", "conv2d", "8x3x3x3", "16", "float32", "3"]
    assert len(lines) == 1 + 6 + 2 + len(counts)
    assert log.to_dicts()[5] == {
        "layer": "head", "op": "linear", "backend": log[2].backend, "m": 1,
        "dtype": "float32", "bits": 3, "weight_shape": [5, 128], "device": "cpu",
        "model_call": 1, "kernels": log[2].kernels}
    second = log.table(model_call=1).splitlines()  # that call's rows and their counts
    assert len(second) == 1 + 3 + 2 + len(counts)
    assert [line.split()[0] for line in second[1:4]] == ["conv", "mix", "head"]
    half = dispatch_log.format_counts({key: n // 2 for key, n in counts.items()})
    assert second[-1 - len(counts):] == half.splitlines()


def test_model_calls_are_counted_and_numbered(net):
    x = torch.randn(1, 3, 8, 8)
    with otq.record_dispatch(net) as log:
        net(x)
        ops.codebook_linear(torch.randn(1, 128), net.head.qweight)  # outside the model
        net(x)
    assert log.model_calls == 2
    assert [r.model_call for r in log] == [0, 0, 0, None, 1, 1, 1]
    with otq.record_dispatch() as log:
        net(x)
    assert log.model_calls == 0 and [r.model_call for r in log] == [None] * 3


def test_compiled_model_records_its_op_calls(net):
    compiled = torch.compile(net, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 8, 8)
    compiled(x)  # compile outside the block
    with otq.record_dispatch(compiled) as log:  # hooks on a compiled model: a recompile
        y = compiled(x)
    torch.testing.assert_close(y, net(x))
    assert [(r.op, r.m) for r in log] == [("conv2d", 32), ("conv2d", 32), ("linear", 2)]
    names = ["_orig_mod.conv", "_orig_mod.mix", "_orig_mod.head"]
    assert all(r.layer in (None, name) for r, name in zip(log, names, strict=True))


def test_note_kernel_outside_a_recorded_call_is_a_no_op():
    dispatch_log.note_kernel("lut_gemv")  # nothing open
    x = torch.randn(2, 4)
    with otq.record_dispatch() as log:
        dispatch_log.note_kernel("lut_gemv")  # open log, no call recorded yet
        with dispatch_log.recorded_call("linear", "cuda", x, (3, 4), 4, 2):
            dispatch_log.note_kernel("lut_mma", split_k=2)
        dispatch_log.note_kernel("lut_frag")  # after the call: no call's
    assert [r.kernels for r in log] == [["lut_mma split_k=2"]]


def test_a_call_inside_another_calls_backend_returns_the_notes_to_it():
    x = torch.randn(2, 4)
    with otq.record_dispatch() as log:
        with dispatch_log.recorded_call("conv2d", "cuda", x, (3, 4, 1, 1), 4, 2):
            with dispatch_log.recorded_call("linear", "cuda", x, (3, 4), 4, 2):
                dispatch_log.note_kernel("lut_gemv")
            dispatch_log.note_kernel("lut_conv")  # the outer call's again
    assert [(r.op, r.kernels) for r in log] == [("conv2d", ["lut_conv"]),
                                                ("linear", ["lut_gemv"])]


@pytest.mark.parametrize("m, kernels", [(1, ["triton_gemv"]), (20, ["triton_splitk"]),
                                        (100, ["x to field-major", "triton_gemm"])])
def test_triton_records_the_kernel_it_picks_by_m(m, kernels, device):
    pytest.importorskip("triton")
    torch.manual_seed(5)
    qt = otq.fit_codebook(torch.randn(16, 64), 4).to(device)
    with otq.record_dispatch() as log:
        ops.codebook_linear(torch.randn(m, 64, device=device), qt, backend="triton")
    (record,) = log
    assert record.backend == "triton" and record.m == m
    assert [name.partition(" split_k=")[0] for name in record.kernels] == kernels


def test_triton_field_major_copy_and_conv(device):
    pytest.importorskip("triton")
    from otq_kernels.backends.triton.matmul import linear_triton

    torch.manual_seed(6)
    qt = otq.fit_codebook(torch.randn(16, 64), 2).to(device)
    qt_conv = otq.fit_codebook(torch.randn(8, 4, 3, 3), 4).to(device)
    x = torch.randn(12, 64, device=device)
    with otq.record_dispatch() as log:
        with dispatch_log.recorded_call("linear", "triton", x, qt.shape, 2, 12):
            linear_triton(x, qt, kernel="splitk_fm", split_k=2)
        ops.codebook_conv2d(torch.randn(1, 4, 6, 6, device=device), qt_conv, padding=1,
                            backend="triton")
    assert log[0].kernels == ["x to field-major", "triton_splitk_fm split_k=2"]
    assert log[1].kernels[0].partition(" split_k=")[0] == "triton_conv"


@pytest.mark.parametrize("kernel_size, hw, channels_last, copied", [
    (3, 6, False, False),   # M = 36: NCHW x read in place
    (3, 33, False, True),   # M = 1089: above NCHW_IN_PLACE_MAX_M, a channels-last copy
    (3, 33, True, False),
    (1, 2, False, True),    # 1x1 at M = 4: the linear kernels on an NHWC copy
    (1, 2, True, False),
], ids=["3x3-in-place", "3x3-copy", "3x3-cl", "1x1-copy", "1x1-cl"])
def test_triton_conv_says_when_it_copies_x(kernel_size, hw, channels_last, copied, device):
    pytest.importorskip("triton")
    torch.manual_seed(7)
    qt = otq.fit_codebook(torch.randn(8, 4, kernel_size, kernel_size), 3).to(device)
    x = torch.randn(1, 4, hw, hw, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with otq.record_dispatch() as log:
        y = ops.codebook_conv2d(x, qt, padding=kernel_size // 2, backend="triton")
    torch.testing.assert_close(y, ops.codebook_conv2d(x, qt, padding=kernel_size // 2,
                                                      backend="reference"),
                               atol=1e-4, rtol=1e-4)
    assert ("x to channels-last" in log[0].kernels) == copied
    assert log[0].kernels[-1].startswith("triton_conv" if kernel_size == 3 else "triton_gemv")


FINAL_KERNEL = {"cuda": "lut_", "triton": "triton_", "dequant": "F.", "reference": "F."}


@pytest.mark.cuda
def test_on_the_gpu_each_call_names_the_kernel_of_its_backend():
    """A 4-bit tiny UNet in fp16 at batch 1 and 4 on the GPU under auto dispatch: each call
    is recorded with the backend dispatch resolves for it and ends in that backend's
    kernel; the cuda linear calls name the kernel cuda.linear_kernel picks."""
    from otq_kernels.backends import cuda
    from otq_kernels.demo import random_model
    from otq_kernels.models import IMAGE_SIZES

    model = otq.quantize_model(random_model("tiny", seed=0), bits=4, progress=False)
    model = model.cuda().half().eval()
    layers = sum(isinstance(m, otq.nn.QuantLinear | otq.nn.QuantConv1d | otq.nn.QuantConv2d)
                 for m in model.modules())
    size, dev = IMAGE_SIZES["tiny"], torch.device("cuda")
    for batch in (1, 4):
        x = torch.randn(batch, model.in_channels, size, size, device=dev, dtype=torch.half)
        with torch.inference_mode(), otq.record_dispatch(model) as log:
            model(x, torch.full((batch,), 0.5, device=dev))
        assert len(log) == layers and log.model_calls == 1
        for r in log:
            assert r.device.startswith("cuda") and r.dtype == "float16"
            assert r.kernels and r.kernels[-1].startswith(FINAL_KERNEL[r.backend]), r
            if r.op == "linear":
                assert r.backend == ops.resolve_linear_backend(None, dev, r.m, torch.half, 4)
            if r.op == "linear" and r.backend == "cuda":
                kernel = cuda.linear_kernel(torch.half, 4, r.m, dev, per_channel=True)
                assert r.kernels[-1].partition(" ")[0] == f"lut_{kernel}", r


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_a_call_with_no_kernel_noted_shows_a_dash():
    log = dispatch_log.DispatchLog()
    log.append(dispatch_log.DispatchRecord(None, "linear", "x", 1, "float32", 4, (2, 3), "cpu"))
    lines = log.table().splitlines()
    assert lines[1].split() == ["-", "linear", "2x3", "1", "float32", "4", "x", "-"]
    assert lines[-1].split() == ["1", "linear", "/", "x", "/", "-"]


def test_a_model_that_calls_itself_makes_one_model_call():
    """A recursive call of the model (its forward calling the model again) belongs to the
    outer call: one index per outer call."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, again=True):
            y = self.lin(x)
            return self(y, again=False) if again else y

    model = otq.quantize_model(Twice(), bits=3, progress=False)
    with otq.record_dispatch(model) as log:
        model(torch.randn(2, 4))
        model(torch.randn(2, 4))
    assert log.model_calls == 2
    assert [(r.layer, r.model_call) for r in log] == [("lin", 0), ("lin", 0), ("lin", 1),
                                                       ("lin", 1)]


def test_a_model_call_that_raises_still_ends():
    """The model's exit hook runs when its forward raises: the next call is a call of its
    own, numbered after it."""
    model = otq.quantize_model(nn.Sequential(nn.Linear(4, 4)), bits=3, progress=False)
    with otq.record_dispatch(model) as log:
        with pytest.raises(ValueError, match="K=4"):
            model(torch.randn(2, 5))
        model(torch.randn(2, 4))
    assert log.model_calls == 2
    assert [(r.layer, r.model_call) for r in log] == [("0", 1)]
