"""torch.library ops, input checks and backend dispatch (reference backend on CPU)."""

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import otq_kernels as otq
from otq_kernels import backends, ops


def _qt(shape=(9, 13), bits=4, granularity="channel"):
    torch.manual_seed(0)
    return otq.fit_codebook(torch.randn(shape), bits, "ot", granularity)


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 5), ()])
def test_linear_matches_dense(lead):
    qt = _qt()
    x = torch.randn(*lead, 13)
    bias = torch.randn(9)
    y = ops.codebook_linear(x, qt, bias, backend="reference")
    assert y.shape == (*lead, 9)
    torch.testing.assert_close(y, F.linear(x, qt.dequantize(), bias))


def test_linear_identity_reproduces_weight():
    qt = _qt(shape=(6, 11), bits=3, granularity="tensor")
    y = ops.codebook_linear(torch.eye(11), qt, backend="reference")
    assert torch.equal(y, qt.dequantize().T)


def test_linear_non_contiguous_and_empty_batch():
    qt = _qt()
    x = torch.randn(13, 4).T  # non-contiguous [4, 13]
    torch.testing.assert_close(ops.codebook_linear(x, qt), F.linear(x, qt.dequantize()))
    assert ops.codebook_linear(torch.randn(0, 13), qt).shape == (0, 9)


@pytest.mark.parametrize("stride, padding, dilation, groups", [
    (1, 0, 1, 1), (2, 1, 1, 1), (1, 1, 2, 2), ((2, 1), (0, 1), 1, 2)])
def test_conv2d_matches_dense(stride, padding, dilation, groups):
    qt = _qt(shape=(6, 4 // groups, 3, 3), bits=5)
    x = torch.randn(2, 4, 7, 9)
    bias = torch.randn(6)
    y = ops.codebook_conv2d(x, qt, bias, stride, padding, dilation, groups, backend="reference")
    ref = F.conv2d(x, qt.dequantize(), bias, stride, padding, dilation, groups)
    torch.testing.assert_close(y, ref)


@pytest.mark.parametrize("backend", [None, "dequant", "reference"])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_float64_activations_run_in_float64(backend, m):
    """float64 x (a float64 model, e.g. an ODE likelihood) computes in float64 on the
    expanding backends, as F.linear/F.conv2d do on the float64 dense weight; the gradient
    of x is float64 too."""
    qt = _qt(shape=(9, 13), bits=3)
    x = torch.randn(m, 13, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, dtype=torch.float64)
    y = ops.codebook_linear(x, qt, bias, backend=backend)
    ref = F.linear(x, qt.dequantize(torch.float64), bias)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(y.square().sum(), x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    assert grad.dtype == torch.float64
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    cq = _qt(shape=(4, 3, 3, 3), bits=5)
    xc = torch.randn(m, 3, 6, 5, dtype=torch.float64)
    yc = ops.codebook_conv2d(xc, cq, padding=1, backend=backend)
    assert yc.dtype == torch.float64
    torch.testing.assert_close(yc, F.conv2d(xc, cq.dequantize(torch.float64), padding=1),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda qt: ops.codebook_linear(torch.randn(2, 12), qt), "K=13"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13).long(), qt),
     "float16/bfloat16/float32/float64, got torch.int64"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13).double(), qt, backend="cpu"),
     "backend 'cpu' has no float64 kernel; float64 activations run on 'dequant' or "
     "'reference'"),
    (lambda qt: ops.codebook_conv2d(torch.randn(1, 3, 4, 4).double(),
                                    _qt(shape=(2, 3, 3, 3)), backend="triton"),
     "backend 'triton' has no float64 kernel"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13), qt, torch.randn(8)), "bias"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13), qt, backend="gpu"), "unknown backend"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13), qt, backend="cuda"), "cannot run"),
    (lambda qt: ops.codebook_conv2d(torch.randn(1, 13, 4, 4), qt), "4-D"),
    (lambda qt: ops.codebook_linear(torch.tensor(1.0), qt), r"\[\.\.\., K=13\].*got \[\]"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13), qt, torch.ones(9, dtype=torch.long)),
     "bias must be a floating-point tensor, got torch.int64"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13), qt, [0.0] * 9),
     "bias must be a floating-point tensor, got list"),
    (lambda qt: ops.codebook_linear(torch.randn(2, 13), qt.dequantize()),
     "weight must be a QuantizedTensor.*got Tensor"),
    (lambda qt: ops.codebook_conv2d(torch.randn(1, 13, 4, 4), qt.dequantize()),
     "weight must be a QuantizedTensor"),
])
def test_bad_input_clear_error(call, match):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        call(_qt())


def test_conv2d_shape_errors():
    qt = _qt(shape=(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        ops.codebook_conv2d(torch.randn(1, 5, 8, 8), qt)
    with pytest.raises(ValueError, match="too small"):
        ops.codebook_conv2d(torch.randn(1, 3, 2, 2), qt)


@pytest.mark.parametrize("kwargs, match", [
    ({"stride": 0}, "stride must be an int ≥ 1 or a pair of them, got 0"),
    ({"stride": (1, 1, 1)}, r"stride must .* got \(1, 1, 1\)"),
    ({"stride": 1.5}, "stride must .* got 1.5"),
    ({"padding": -1}, "padding must be an int ≥ 0 .* got -1"),
    ({"padding": "same"}, "padding must .* got 'same'"),
    ({"dilation": (1, 0)}, "dilation must be an int ≥ 1"),
    ({"groups": 0}, "groups must be an int ≥ 1, got 0"),
    ({"groups": 1.0}, "groups must be an int ≥ 1, got 1.0"),
    ({"stride": True}, "stride must .* got True"),
    ({"padding": (False, 1)}, r"padding must .* got \(False, 1\)"),
    ({"groups": True}, "groups must be an int ≥ 1, got True"),
], ids=lambda v: repr(v) if isinstance(v, dict) else None)
def test_conv2d_parameter_errors(kwargs, match):
    """Bad stride, padding, dilation or groups: a ValueError naming it, before any kernel
    (bools too, as torch refuses them; numpy integers are taken, as torch takes them)."""
    with pytest.raises(ValueError, match=match):
        ops.codebook_conv2d(torch.randn(1, 3, 8, 8), _qt(shape=(4, 3, 3, 3)), **kwargs)
    y = ops.codebook_conv2d(torch.randn(1, 3, 8, 8), _qt(shape=(4, 3, 3, 3)),
                            stride=torch.tensor(2).item(), padding=(1, 0), groups=np.int64(1))
    assert y.shape == (1, 4, 4, 3)


def test_opcheck_linear_and_conv():
    qt = _qt()
    args = (torch.randn(3, 13), qt.planes, qt.codebook, qt.bits, qt.n, qt.k, torch.randn(9),
            "reference")
    torch.library.opcheck(torch.ops.otq.codebook_linear.default, args)
    cq = _qt(shape=(4, 2, 3, 3))
    cargs = (torch.randn(1, 2, 6, 5), cq.planes, cq.codebook, cq.bits, list(cq.shape), None,
             [1, 1], [1, 1], [1, 1], 1, "reference")
    torch.library.opcheck(torch.ops.otq.codebook_conv2d.default, cargs)


def test_output_format_follows_torch():
    nchw = torch.empty(2, 3, 4, 5)
    assert backends.conv_output_format(nchw) == torch.contiguous_format
    nhwc = nchw.to(memory_format=torch.channels_last)
    assert backends.conv_output_format(nhwc) == torch.channels_last
    one_channel = torch.empty(2, 1, 4, 5).to(memory_format=torch.channels_last)  # both
    assert backends.conv_output_format(one_channel) == torch.contiguous_format
    assert backends.conv_output_format(nchw[:, :, ::2]) == torch.contiguous_format


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=str)
def test_conv_output_layout_follows_x_and_fake_agrees(layout):
    """y is channels-last exactly when x is (as torch's conv), and the fake kernel says the
    same strides, so compiled graphs see the real layout."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    cq = _qt(shape=(4, 3, 3, 3))
    x = torch.randn(2, 3, 6, 5).to(memory_format=layout)
    args = (cq.planes, cq.codebook, cq.bits, list(cq.shape), None, [1, 1], [1, 1], [1, 1], 1,
            "reference")
    y = torch.ops.otq.codebook_conv2d(x, *args)
    assert y.is_contiguous(memory_format=layout)
    assert ops.codebook_conv2d(x, cq, padding=1).is_contiguous(memory_format=layout)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = torch.ops.otq.codebook_conv2d(mode.from_tensor(x), *args)
    assert fake.stride() == y.stride()
    torch.library.opcheck(torch.ops.otq.codebook_conv2d.default, (x, *args))


def test_opcheck_fit_pack_unpack():
    rows = torch.randn(3, 40)
    torch.library.opcheck(torch.ops.otq.fit_codebook.default, (rows, 3, "ot", "rank", "reference"))
    codes = torch.randint(0, 8, (3, 40))
    torch.library.opcheck(torch.ops.otq.pack.default, (codes, 3, "reference"))
    planes = otq.pack_codes(codes, 3)
    torch.library.opcheck(torch.ops.otq.unpack.default, (planes, 3, 40, "reference"))


def test_torch_compile_fullgraph():
    qt = _qt()
    conv_qt = _qt(shape=(4, 2, 3, 3))

    def f(x, img):
        return ops.codebook_linear(x, qt, backend="reference").sum() + ops.codebook_conv2d(
            img, conv_qt, None, 1, 1, backend="reference").sum()

    for dynamic in (False, True):
        compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
        for m in (2, 3):
            x, img = torch.randn(m, 13), torch.randn(1, 2, 5, 4 + m)
            torch.testing.assert_close(compiled(x, img), f(x, img))


@pytest.mark.parametrize("backend", ["auto", "reference", "cpu", "dequant"])
def test_autocast_runs_in_its_dtype_like_torch(backend):
    """Under torch.autocast x and bias are cast to autocast's dtype, as F.linear/F.conv2d
    cast theirs: the output has that dtype and equals the call on cast inputs, and the
    gradient of float32 x comes back float32. Outside autocast nothing is cast."""
    if backend == "cpu" and otq.backends.get("cpu").unavailable(torch.device("cpu")):
        pytest.skip("native CPU extension not built")
    qt, cq = _qt((9, 13), 3), _qt((4, 2, 3, 3), 3)
    bias, x, img = torch.randn(9), torch.randn(4, 13, requires_grad=True), torch.randn(1, 2, 6, 5)
    conv_backend = "reference" if backend == "cpu" else backend  # cpu has no conv
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.codebook_linear(x, qt, bias, backend)
        z = ops.codebook_conv2d(img, cq, bias[:4], 1, 1, backend=conv_backend)
        assert F.linear(x, qt.dequantize(), bias).dtype == torch.bfloat16  # torch's rule
    assert y.dtype == z.dtype == torch.bfloat16
    assert torch.equal(y, ops.codebook_linear(x.bfloat16(), qt, bias.bfloat16(), backend))
    assert torch.equal(z, ops.codebook_conv2d(img.bfloat16(), cq, bias[:4].bfloat16(), 1, 1,
                                              backend=conv_backend))
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and x.grad.abs().sum() > 0
    assert ops.codebook_linear(x, qt, bias, backend).dtype == torch.float32


def test_autocast_on_another_device_type_casts_nothing():
    """Autocast on for CUDA only (the flag, set directly): a CPU call, bf16 x with a
    float32 bias, runs as without autocast (the cpu backend adds the float32 bias in
    float32; cast to bf16 first, it would round it)."""
    if otq.backends.get("cpu").unavailable(torch.device("cpu")):
        pytest.skip("native CPU extension not built")
    torch.manual_seed(0)
    qt, bias, x = _qt(), torch.randn(9) * 1e3, torch.randn(3, 13).bfloat16()
    want = ops.codebook_linear(x, qt, bias, "cpu")
    assert not torch.equal(want, ops.codebook_linear(x, qt, bias.bfloat16(), "cpu"))
    torch.set_autocast_enabled("cuda", True)
    try:
        assert torch._C._is_any_autocast_enabled() and not torch.is_autocast_enabled("cpu")
        assert torch.equal(ops.codebook_linear(x, qt, bias, "cpu"), want)
    finally:
        torch.set_autocast_enabled("cuda", False)


def test_autocast_compiles_fullgraph():
    qt, bias = _qt(), torch.randn(9)

    def f(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.codebook_linear(x, qt, bias, backend="reference")

    x = torch.randn(3, 13)
    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, f(x))


class _OpRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops that reach the dispatcher (a mode forces the torch.library op path)."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("shape, granularity", [((9, 13), "channel"), ((1, 13), "channel"),
                                                ((9, 13), "tensor")])
def test_plain_eager_call_skips_the_op_with_the_same_result(backend, shape, granularity,
                                                            monkeypatch):
    """Plain eager calls run the backend directly; a dispatch mode sees the op, same numbers."""
    if backend == "cpu" and otq.backends.get("cpu").unavailable(torch.device("cpu")):
        pytest.skip("native CPU extension not built")
    qt, bias, x = _qt(shape, 3, granularity), torch.randn(shape[0]), torch.randn(4, 13)
    cq, img = _qt((4, 2, 3, 3), 3, granularity), torch.randn(1, 2, 6, 5)
    teach = ops._teach_dispatch_mode  # (run before each op call, never on the direct path)
    monkeypatch.setattr(ops, "_teach_dispatch_mode", lambda: pytest.fail("took the op"))
    direct = (ops.codebook_linear(x, qt, bias, backend),
              ops.codebook_conv2d(img, cq, None, 1, 1))
    monkeypatch.setattr(ops, "_teach_dispatch_mode", teach)
    with _OpRecorder() as seen:
        via_op = (ops.codebook_linear(x, qt, bias, backend),
                  ops.codebook_conv2d(img, cq, None, 1, 1))
    assert {"otq.codebook_linear.default", "otq.codebook_conv2d.default"} <= set(seen.ops)
    for a, b in zip(direct, via_op, strict=True):
        assert torch.equal(a, b)


def test_plain_eager_call_conditions():
    x = torch.randn(2, 13)
    assert ops._plain_eager_call(x)
    grad = x.clone().requires_grad_()
    assert not ops._plain_eager_call(grad)  # the op's backward (tests/test_autograd.py)
    assert not ops._plain_eager_call(x, torch.zeros(9, requires_grad=True))
    assert ops._plain_eager_call(x, torch.zeros(9))
    with torch.no_grad():
        assert ops._plain_eager_call(grad)
    with _OpRecorder():
        assert not ops._plain_eager_call(x)
    assert torch.vmap(lambda t: torch.tensor(ops._plain_eager_call(t)))(x).sum() == 0
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():  # a dual x: the native path would drop its tangent
        assert not ops._plain_eager_call(fwAD.make_dual(x, torch.ones_like(x)))
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch >= 2.13 deprecates torch.jit.trace)
        torch.jit.trace(lambda t: seen.append(ops._plain_eager_call(t)) or t, (x,),
                        check_trace=False)
    assert seen == [False]  # tracing: the trace must record the op


def test_trace_constant_marks_like_torch():
    def f():
        return 0

    def g():
        return 0

    marked = torch.compiler.assume_constant_result(f)
    assert vars(marked) == vars(ops._trace_constant(g)) == {"_dynamo_marked_constant": True}


def test_import_leaves_dynamo_and_triton_unloaded():
    import subprocess
    import sys

    code = ("import sys, otq_kernels, otq_kernels.nn; bad = [m for m in ('torch._dynamo', "
            "'triton', 'torch.utils.flop_counter') if m in sys.modules]; "
            "assert not bad, bad")
    root = __file__.rsplit("/tests/", 1)[0]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_quantizing_and_running_a_model_eagerly_leaves_dynamo_unloaded(tmp_path):
    """Plain eager fitting, packing and unpacking run the backends directly: the ops'
    first call imported torch._dynamo (a first fit took 1.2 s and 140 MB more on this
    CPU)."""
    import os
    import subprocess
    import sys

    code = ("import sys, torch, otq_kernels as otq; "
            "m = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Conv1d(32, 8, 1)); "
            "q = otq.quantize_model(m, bits=3, progress=False); q[0](torch.randn(2, 64)); "
            "otq.unpack_codes(q[0].qweight); otq.save_quantized(q, 'q.safetensors'); "
            "otq.load_quantized('q.safetensors', torch.nn.Sequential(torch.nn.Linear(64, 32), "
            "torch.nn.Conv1d(32, 8, 1))); assert 'torch._dynamo' not in sys.modules")
    env = {**os.environ, "PYTHONPATH": __file__.rsplit("/tests/", 1)[0]}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("rows, options, match", [
    (torch.tensor([[1.0, float("nan"), 2.0]]), {}, "weight has 1 NaN/Inf"),
    (torch.randn(4, 0), {}, "non-empty"),
    (torch.randn(12), {}, r"rows must be a matrix \[R, n\]"),
    (torch.randn(2, 3, 4), {}, r"rows must be a matrix"),
    (torch.randn(2, 8), {"method": "bogus"}, "unknown method 'bogus'"),
], ids=["nan", "no-columns", "1-d", "3-d", "method"])
def test_fit_rows_refuses_what_no_backend_fits(backend, rows, options, match, monkeypatch):
    """Before any backend runs: a NaN row made the Triton fit write codes past its row
    (heap corruption under the interpreter), and the others failed in their own ways."""
    if backend == "triton":
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match=match):
        ops.fit_rows(rows, 3, backend=backend, **options)


def test_inference_tensors_quantize_with_grad_mode_on():
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(16, 8))
    otq.quantize_model(model, bits=3, progress=False)
    assert isinstance(model[0], otq.nn.QuantLinear)


def test_fit_pack_unpack_wrappers_agree_with_format():
    rows = torch.randn(4, 50)
    codes, cents = ops.fit_rows(rows, 3, backend="reference")
    assert codes.shape == (4, 50) and cents.shape == (4, 8)
    planes = ops.pack(codes, 3, backend="reference")
    qt = otq.QuantizedTensor(planes, cents, 3, (4, 50), "channel")
    assert torch.equal(ops.unpack(qt, backend="reference"), codes)


def test_ot_fit_on_the_reference_backend_runs_its_fit_rows(spy):
    """backend="reference" reaches the reference backend's own ``fit_rows`` for "ot" (the
    method it declares); other methods take the torch fit without it."""
    calls = spy(otq.backends.get("reference"), "fit_rows")
    rows = torch.randn(3, 20)
    codes, cents = ops.fit_rows(rows, 2, backend="reference")
    assert [args[1] for args in calls] == [2]
    want_codes, want_cents = otq.quantizers.ot_rows(rows.double(), 2)
    assert torch.equal(codes, want_codes) and torch.equal(cents, want_cents.float())
    ops.fit_rows(rows, 2, method="lloyd", backend="reference")
    assert len(calls) == 1


def test_unpack_rows_of_a_layer():
    """ops.unpack(rows=slice) gives those rows' codes, as the whole unpack's slice."""
    codes = torch.randint(0, 8, (9, 70))
    qt = otq.QuantizedTensor(ops.pack(codes, 3), torch.randn(9, 8), 3, (9, 70), "channel")
    for rows in (slice(0, 9), slice(3, 7), slice(8, 9), slice(5, 5)):
        assert torch.equal(ops.unpack(qt, rows=rows), codes[rows])


def test_dispatch_env_and_auto(monkeypatch):
    cpu = torch.device("cpu")
    native = otq.backends.get("cpu").unavailable(cpu) is None
    assert ops.resolve_backend(None, "linear", cpu, 1) == ("cpu" if native else "dequant")
    assert ops.resolve_backend(None, "linear", cpu, ops.CPU_LUT_MAX_M) == (
        "cpu" if native else "dequant")
    assert ops.resolve_backend(None, "linear", cpu, ops.CPU_LUT_MAX_M + 1) == "dequant"
    assert ops.resolve_backend("auto", "conv2d", cpu, 1) == "dequant"
    monkeypatch.setenv("OTQ_BACKEND", "reference")
    assert ops.resolve_backend(None, "linear", cpu, 1) == "reference"
    monkeypatch.setenv("OTQ_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="OTQ_BACKEND='nonsense': unknown backend"):
        ops.resolve_backend(None, "linear", cpu, 1)
    with pytest.raises(ValueError, match="unknown backend"):  # not a str: no TypeError
        backends.get(["cpu"])


def test_env_backend_applies_to_the_ops_it_has(monkeypatch):
    """OTQ_BACKEND names the layers' backend: quantizing still works under one without a
    fit (dequant), a layer op it lacks or a device it cannot run on is an error naming the
    variable, and an empty value means unset."""
    cpu = torch.device("cpu")
    auto = {op: ops.resolve_backend(None, op, cpu, 1) for op in ("fit", "pack", "unpack")}
    monkeypatch.setenv("OTQ_BACKEND", "")
    assert ops.resolve_backend(None, "linear", cpu, 1) == ops.resolve_backend("auto", "linear",
                                                                             cpu, 1)
    monkeypatch.setenv("OTQ_BACKEND", "dequant")
    assert {op: ops.resolve_backend(None, op, cpu, 1) for op in auto} == auto
    model = nn.Sequential(nn.Linear(40, 8))
    x = torch.randn(3, 40)
    otq.quantize_model(model, bits=3, progress=False)
    with otq.record_dispatch() as calls:
        y = model(x)
    assert [call.backend for call in calls] == ["dequant"]
    torch.testing.assert_close(y, x @ model[0].dequantize().T + model[0].bias)
    monkeypatch.setenv("OTQ_BACKEND", "cpu")
    with pytest.raises(ValueError, match="OTQ_BACKEND='cpu': backend 'cpu' has no conv2d"):
        ops.resolve_backend(None, "conv2d", cpu, 1)
    monkeypatch.setenv("OTQ_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="OTQ_BACKEND='cuda': backend 'cuda' cannot run"):
        ops.resolve_backend(None, "fit", cpu, 1)


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for op in ("linear", "conv2d", "fit", "pack", "unpack"):
        assert ops.resolve_backend(None, op, torch.device("cpu"), 1) != "triton"


def _gpu_plan(monkeypatch, table: dict) -> torch.device:
    """A CUDA device whose tuning entry is ``table``, every candidate taken as runnable."""
    monkeypatch.setattr(ops, "_gpu_table", lambda device: table)
    runnable = ("cuda", "triton", "dequant")
    monkeypatch.setattr(ops, "_auto_plan", lambda op, device, bits=None, kernel=None: tuple(
        c for c in ops._candidates(op, torch.device(device), bits, kernel) if c[0] in runnable))
    return torch.device("cuda", 0)


def test_gpu_candidates_follow_tuning_table(monkeypatch):
    """By M, and for the bit widths that cuda_max_m_by_bits lists by theirs."""
    gpu = _gpu_plan(monkeypatch, {
        "linear": {"cuda_max_m": 4, "triton_max_m": 32, "cuda_max_m_by_bits": {"8": 1}},
        "conv2d": {"triton_max_m": 64}})
    assert ops.resolve_backend(None, "linear", gpu, 1) == "cuda"
    assert ops.resolve_backend(None, "linear", gpu, 16) == "triton"
    assert ops.resolve_backend(None, "linear", gpu, 1024) == "dequant"
    assert ops.resolve_backend(None, "conv2d", gpu, 65) == "dequant"
    assert ops.resolve_backend(None, "conv2d", gpu, 64) == "triton"
    assert [ops.resolve_backend(None, "linear", gpu, m, 8) for m in (1, 2)] == ["cuda", "triton"]
    assert ops.resolve_backend(None, "linear", gpu, 4, 4) == "cuda"  # 4 bits: not listed


def test_triton_band_from_tuning_table(monkeypatch):
    """triton_min_m..triton_max_m: a fused GEMM that wins only at large M; dequant between."""
    gpu = _gpu_plan(monkeypatch, {"linear": {"cuda_max_m": 16, "triton_min_m": 256,
                                             "triton_max_m": 1024}})
    assert [ops.resolve_backend(None, "linear", gpu, m) for m in (16, 17, 255, 256, 1024, 1025)
            ] == ["cuda", "dequant", "dequant", "triton", "triton", "dequant"]


def _conv_backend(device, dtype, bits, groups=1, m=49, kernel=(3, 3)) -> str:
    return ops.resolve_conv_backend(None, device, m, dtype, bits, groups, kernel)


def test_auto_passes_convs_the_cuda_conv_refuses_on(monkeypatch):
    """Under a measured conv2d.cuda_max_m, auto gives lut_conv only the convs it takes
    (fp16/bf16 x, 2-4-bit codes, groups = 1); the rest (e.g. the usual 8-bit first and
    last convs) go on to the next backend instead of failing in cuda.conv2d."""
    gpu = _gpu_plan(monkeypatch, {"conv2d": {"cuda_max_m": 1024, "triton_max_m": 64}})
    assert _conv_backend(gpu, torch.float16, 4) == "cuda"
    assert _conv_backend(gpu, torch.bfloat16, 2) == "cuda"
    assert _conv_backend(gpu, torch.float16, 8) == "triton"
    assert _conv_backend(gpu, torch.float32, 4) == "triton"
    assert _conv_backend(gpu, torch.float16, 3, groups=2) == "triton"
    assert _conv_backend(gpu, torch.float16, 8, m=256) == "dequant"
    assert _conv_backend(gpu, torch.float16, 4, m=2048) == "dequant"


def test_conv_entry_takes_only_the_kernel_sizes_it_measured(monkeypatch):
    """A conv2d entry that lists kernel_sizes (bench_conv writes those it timed: the 3×3
    convs unless --include-1x1) leaves convs of other sizes on dequant; an entry without
    the list covers every size."""
    entry = {"cuda_max_m": 1024, "triton_max_m": 64, "kernel_sizes": ["3x3"]}
    gpu = _gpu_plan(monkeypatch, {"conv2d": entry})
    assert _conv_backend(gpu, torch.float16, 4) == "cuda"
    assert _conv_backend(gpu, torch.float16, 8) == "triton"
    for kernel in ((1, 1), (1, 3), (5, 5)):
        assert _conv_backend(gpu, torch.float16, 4, kernel=kernel) == "dequant"
        assert _conv_backend(gpu, torch.float16, 8, kernel=kernel) == "dequant"
    del entry["kernel_sizes"]
    assert _conv_backend(gpu, torch.float16, 4, kernel=(1, 1)) == "cuda"


def test_conv_crossovers_of_their_own_by_kernel_size(monkeypatch):
    """cuda_max_m_by_kernel / triton_max_m_by_kernel: a measured size's own crossovers."""
    gpu = _gpu_plan(monkeypatch, {"conv2d": {
        "cuda_max_m": 784, "cuda_max_m_by_kernel": {"1x1": 49}, "triton_max_m": 0,
        "triton_max_m_by_kernel": {"1x1": 196}, "kernel_sizes": ["1x1", "3x3"]}})
    assert [_conv_backend(gpu, torch.float16, 4, m=m) for m in (49, 784, 785)
            ] == ["cuda", "cuda", "dequant"]
    assert [_conv_backend(gpu, torch.float16, 4, m=m, kernel=(1, 1)) for m in (49, 50, 197)
            ] == ["cuda", "triton", "dequant"]


def test_convs_dispatch_by_their_kernel_size(monkeypatch):
    """codebook_conv2d asks dispatch for its weight's (KH, KW), and a pointwise QuantConv1d
    for (1, 1) (as the conv2d it would run)."""
    asked = []

    def plan(op, device, bits=None, kernel=None):
        if op == "conv2d":
            asked.append(kernel)
        return (("reference", 0, ops.UNLIMITED),)

    monkeypatch.setattr(ops, "_auto_plan", plan)
    ops.codebook_conv2d(torch.randn(1, 4, 6, 6), _qt((3, 4, 3, 1)))
    ops.codebook_conv2d(torch.randn(1, 2, 6, 6), _qt((4, 1, 1, 1)), groups=2)
    otq.nn.QuantConv1d.from_float(torch.nn.Conv1d(4, 3, 1), bits=4)(torch.randn(1, 4, 5))
    assert asked == [(3, 1), (1, 1), (1, 1)]


@pytest.mark.parametrize("bits, groups", [(4, 1), (8, 1), (3, 2)], ids=str)
def test_a_conv_the_first_backend_refuses_runs_on_the_next(bits, groups, monkeypatch):
    """End to end on CPU tensors, with a plan that puts cuda first: float32 x (or 8-bit
    codes, or groups) is not cuda.conv2d's, so the conv runs on dequant, as reference."""
    plan = (("cuda", 0, ops.UNLIMITED), ("dequant", 0, ops.UNLIMITED),
            ("reference", 0, ops.UNLIMITED))
    torch.manual_seed(0)
    qt = _qt((6, 4 // groups, 3, 3), bits)
    x = torch.randn(2, 4, 7, 5)
    monkeypatch.setattr(ops, "_auto_plan", lambda op, device, bits=None, kernel=None: plan)
    y = ops.codebook_conv2d(x, qt, None, padding=1, groups=groups)
    want = ops.codebook_conv2d(x, qt, None, padding=1, groups=groups, backend="reference")
    torch.testing.assert_close(y, want)


def test_default_tuning_table_has_every_op():
    table = ops.tuning_table("some unknown GPU")
    assert {"linear", "conv2d"} <= set(table)


def test_shipped_tuning_table_follows_the_schema():
    """Every key the shipped table (and its H200 entry) sets is one dispatch reads, of its
    kind: no warning, no error."""
    from otq_kernels.tuning_schema import check_tuning_table

    shipped = json.loads((Path(ops.__file__).parent / "tuning" / "default.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tuning_table(shipped, "shipped")


_GOOD_ENTRY = {"linear": {"cuda_max_m": 16}, "conv2d": {"kernel_sizes": ["3x3"]}}


@pytest.mark.parametrize("table, match", [
    ([], "a JSON object with a 'default' entry"),
    ({"gpus": {}}, "a JSON object with a 'default' entry"),
    ({"default": _GOOD_ENTRY, "gpus": []}, "'gpus' must map GPU names to entries"),
    ({"default": _GOOD_ENTRY, "gpus": {"GPU X": 5}}, "entry 'GPU X' must be a JSON object"),
    ({"default": {"linear": [16]}}, "section 'linear' must be a JSON object"),
    ({"default": {"linear": {"cuda_max_m": "16"}}}, "linear.cuda_max_m must be an integer "
                                                     ">= 0, got '16'"),
    ({"default": {"linear": {"cuda_max_m": True}}}, "linear.cuda_max_m must be an integer"),
    ({"default": {"linear": {"cuda_max_m": -5}}}, "linear.cuda_max_m must be an integer >= 0"),
    ({"default": {"linear": {"cuda_tensor_cores": 1}}}, "must be true or false, got 1"),
    ({"default": {"linear": {"cuda_max_m_by_bits": {"9": 1}}}}, "map of bit widths"),
    ({"default": {"linear": {"cuda_max_m_by_bits": {"08": 1}}}}, "map of bit widths"),
    ({"default": {"linear": {"cuda_max_m_by_bits": {"\u0668": 1}}}}, "map of bit widths"),
    ({"default": {"conv2d": {"kernel_sizes": ["3"]}}}, "list of kernel sizes"),
    ({"default": {"conv2d": {"cuda_max_m_by_kernel": {"3x3": 1.5}}}}, "map of kernel sizes"),
], ids=["a-list", "no-default", "gpus-list", "entry-number", "section-list", "int-as-text",
        "int-as-bool", "negative", "bool-as-int", "bits-9", "bits-08", "bits-arabic-8", "size-3",
        "float-crossover"])
def test_tuning_table_of_the_wrong_shape_is_refused(table, match, tmp_path, monkeypatch):
    """Through OTQ_TUNING_FILE: a ValueError naming the file (and entry, section and key)
    at the first dispatch, not a KeyError or AttributeError deep in it."""
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps(table))
    monkeypatch.setenv("OTQ_TUNING_FILE", str(path))
    ops.reload_tuning()
    try:
        with pytest.raises(ValueError, match=match) as err:
            ops.tuning_table("GPU X")
        assert str(err.value).startswith(f"OTQ_TUNING_FILE={path}: ")
        for text, why in [("{not json", "Expecting property name"),
                          ("[" * 100_000, "nested too deeply"),
                          ('{"default": {}, "default": {}}', "key 'default' appears twice"),
                          ('{"default": {"linear": {"cuda_max_m": ' + "9" * 5000 + "}}}",
                           "Exceeds the limit")]:
            path.write_text(text)
            ops.reload_tuning()
            with pytest.raises(ValueError, match=f"cannot read it as JSON|{why}") as err:
                ops.tuning_table("GPU X")
            assert why in str(err.value) and str(err.value).startswith("OTQ_TUNING_FILE=")
    finally:
        monkeypatch.delenv("OTQ_TUNING_FILE")
        ops.reload_tuning()


def test_tuning_keys_that_dispatch_does_not_read_warn():
    from otq_kernels.tuning_schema import check_tuning_table

    table = {"default": {"linear": {"cuda_max_M": 16, "_note": "kept"}, "conv3d": {},
                         "_measured": {"anything": 1}}, "gpu": {}, "_about": "",
             "gpus": {"_about": "a note, as at every other level"}}
    with pytest.warns(UserWarning) as caught:
        check_tuning_table(table, "T")
    assert [str(w.message) for w in caught] == [
        "T: 'gpu' is not read by dispatch (it reads 'default' and 'gpus')",
        "T: entry 'default': linear.cuda_max_M is not read by dispatch (a typo?)",
        "T: entry 'default': section 'conv3d' is not read by dispatch (known: ['conv2d', "
        "'fit', 'linear'])"]


def test_cuda_tensor_cores_follow_tuning_table(monkeypatch):
    """cuda.linear(tensor_cores=None) asks the GPU's tuning entry (the shipped default,
    measured on an H200: tensor cores at every M, but above M = 1 at 4 bits)."""
    from otq_kernels.backends import _device, cuda

    default = ops.tuning_table("some unknown GPU")["linear"]
    assert default["cuda_tensor_cores"] is True and default["cuda_gemv_max_m"] == 0
    assert default["cuda_gemv_max_m_by_bits"] == {"4": 1}
    assert default["cuda_max_m_by_bits"] == {"8": 1}  # the 8-bit GEMV lost at M = 16
    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    monkeypatch.setattr(ops, "tuning_table", lambda name: {
        "linear": {"cuda_tensor_cores": name == "GPU X"}})
    assert cuda.tuned_for_tensor_cores(torch.device("cuda", 0)) is True
    monkeypatch.setattr(ops, "tuning_table", lambda name: {"linear": {}})
    assert cuda.tuned_for_tensor_cores(torch.device("cuda", 0)) is False
    assert cuda.tensor_cores_support(torch.bfloat16, 3)
    assert not cuda.tensor_cores_support(torch.float32, 3)


def test_fragment_layout_follows_tuning_table(monkeypatch):
    """The tensor-core kernel reads fragment-order codes only where the GPU's entry says
    cuda_mma_fragment: true; the shipped table does not (lut_frag is untimed)."""
    from otq_kernels.backends import _device, cuda

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    assert "cuda_mma_fragment" not in ops.tuning_table("some unknown GPU")["linear"]
    assert cuda.use_fragment_layout(gpu) is False
    monkeypatch.setattr(ops, "tuning_table", lambda name: {
        "linear": {"cuda_mma_fragment": name == "GPU X"}})
    assert cuda.use_fragment_layout(gpu) is True
    assert cuda.use_fragment_layout(torch.device("cpu")) is False


def test_fragment_block_rows_follow_tuning_table(monkeypatch):
    """lut_frag runs 32-row blocks from the entry's cuda_frag_32_rows_min_m (absent: never;
    the shipped table has none: untimed), only on the codes they take; explicit values
    are checked."""
    from otq_kernels.backends import _device, cuda

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    assert "cuda_frag_32_rows_min_m" not in ops.tuning_table("some unknown GPU")["linear"]
    assert [cuda.tuned_block_rows(gpu, m, 4, False) for m in (1, 16, 1024)] == [16, 16, 16]
    monkeypatch.setattr(ops, "tuning_table", lambda name: {
        "linear": {"cuda_frag_32_rows_min_m": 9}})
    assert [cuda.tuned_block_rows(gpu, m, 4, False) for m in (1, 8, 9, 16, 64)] == [
        16, 16, 32, 32, 32]
    assert [cuda.tuned_block_rows(gpu, 16, b, True) for b in (2, 3, 4)] == [32, 32, 16]
    assert cuda.tuned_block_rows(torch.device("cpu"), 16, 4, False) == 16
    check = cuda._checked_block_rows
    assert check(None, True, gpu, 16, 8, False) == 32
    assert check(None, False, gpu, 16, 4, False) == 16  # not lut_frag: its blocks stay
    assert check(16, True, gpu, 16, 4, False) == 16
    for args, match in (((32, True, gpu, 1, 4, True), "2 and 3 bits"),
                        ((32, False, gpu, 1, 4, False), "fragment"),
                        ((8, True, gpu, 1, 4, False), "16 or 32"),
                        ((32.0, True, gpu, 1, 4, False), "16 or 32"),
                        ((True, True, gpu, 1, 4, False), "16 or 32")):
        with pytest.raises(ValueError, match=match):
            check(*args)


@pytest.mark.parametrize("entry, want", [
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m": 1}, [False, True, True]),
    ({"cuda_tensor_cores": True}, [True, True, True]),  # no cuda_gemv_max_m: 0
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m": 16}, [False, False, True]),
    ({"cuda_tensor_cores": False, "cuda_gemv_max_m": 1}, [False, False, False]),
    ({}, [False, False, False]),
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m": 0,  # x's 4 bits listed
      "cuda_gemv_max_m_by_bits": {"4": 1}}, [False, True, True]),
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m": 1,  # only other bit widths listed
      "cuda_gemv_max_m_by_bits": {"2": 0, "3": 16}}, [False, True, True]),
])
def test_cuda_kernel_choice_by_m(entry, want, monkeypatch):
    """tensor_cores=None: the mma kernel where it runs, the GPU is tuned for it and
    M > cuda_gemv_max_m; fp32 x, 8-bit codes and non-CUDA devices never take it."""
    from otq_kernels.backends import _device, cuda

    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    monkeypatch.setattr(ops, "tuning_table", lambda name: {"linear": entry})
    gpu = torch.device("cuda", 0)
    assert [cuda.use_tensor_cores(torch.float16, 4, m, gpu) for m in (1, 2, 17)] == want
    assert not cuda.use_tensor_cores(torch.float32, 4, 17, gpu)
    assert not cuda.use_tensor_cores(torch.bfloat16, 8, 17, gpu)  # 8 bits: no entry of their own
    assert not cuda.use_tensor_cores(torch.float16, 4, 17, torch.device("cpu"))


def test_eight_bit_codes_take_tensor_cores_only_with_their_own_entry(monkeypatch):
    """8-bit codes with a per-tensor codebook run on tensor cores (lut_frag) where
    cuda_gemv_max_m_by_bits lists 8; per-channel 8-bit codes never (no kernel)."""
    from otq_kernels.backends import _device, cuda

    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    monkeypatch.setattr(ops, "tuning_table", lambda name: {"linear": {
        "cuda_tensor_cores": True, "cuda_gemv_max_m": 0, "cuda_gemv_max_m_by_bits": {"8": 1}}})
    gpu = torch.device("cuda", 0)
    assert [cuda.use_tensor_cores(torch.float16, 8, m, gpu) for m in (1, 2)] == [False, True]
    assert not cuda.use_tensor_cores(torch.float16, 8, 2, gpu, per_channel=True)
    assert cuda.use_tensor_cores(torch.float16, 4, 1, gpu)  # 4 bits: cuda_gemv_max_m 0


_TUNING_ENTRIES = [  # (a linear entry a measurement could write, the kernels it uses)
    ({}, {"gemv"}),
    ({"cuda_tensor_cores": True}, {"gemv", "mma"}),
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m": 1, "cuda_gemv_max_m_by_bits": {"4": 8}},
     {"gemv", "mma"}),
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m_by_bits": {"8": 1}},
     {"gemv", "mma", "frag"}),  # 8-bit per-tensor codes: lut_frag, their only mma kernel
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m": 0, "cuda_gemv_max_m_by_bits": {"8": 1},
      "cuda_mma_fragment": True}, {"gemv", "frag"}),
    ({"cuda_tensor_cores": True, "cuda_gemv_max_m_by_bits": {"8": 4, "3": 2},
      "cuda_mma_fragment": True, "cuda_frag_32_rows_min_m": 9}, {"gemv", "frag", "frag32"}),
    ({"cuda_tensor_cores": False, "cuda_mma_fragment": True, "cuda_frag_32_rows_min_m": 1},
     {"gemv"}),
]


@pytest.mark.parametrize("entry, kernels", _TUNING_ENTRIES,
                         ids=[",".join(sorted(e)) or "empty" for e, _ in _TUNING_ENTRIES])
def test_every_tuning_entry_picks_a_kernel_that_takes_the_call(entry, kernels, monkeypatch):
    """Whatever a measured entry turns on, linear's automatic choice is a kernel that takes
    the call (dtype, bits, codebook, M), for every combination: no ValueError in a GPU run."""
    from otq_kernels.backends import _device, cuda

    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    monkeypatch.setattr(ops, "tuning_table", lambda name: {"linear": entry})
    gpu = torch.device("cuda", 0)
    seen = set()
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for bits in range(2, 9):
            for per_channel in (False, True):
                for m in (1, 2, 8, 9, 16):
                    kernel = cuda.linear_kernel(dtype, bits, m, gpu, per_channel)
                    seen.add(kernel)
                    if kernel == "mma":
                        assert cuda.tensor_cores_support(dtype, bits)
                    if kernel.startswith("frag"):
                        assert cuda.fragment_supports(dtype, bits, per_channel)
                    if kernel == "frag32":
                        assert cuda.wide_blocks_support(bits, per_channel)
                    if dtype == torch.float32:
                        assert kernel == "gemv"
                    canonical = cuda.linear_kernel(dtype, bits, m, gpu, per_channel,
                                                   fragment=False)  # (8 bits: no mma)
                    assert canonical == "gemv" or (
                        canonical == "mma" and cuda.tensor_cores_support(dtype, bits))
    assert seen == kernels


def test_explicit_kernel_arguments_are_checked(monkeypatch):
    """linear's explicit tensor_cores/fragment/block_rows: the kernel they name, or a
    ValueError saying why none takes them."""
    from otq_kernels.backends import _device, cuda

    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    monkeypatch.setattr(ops, "tuning_table", lambda name: {"linear": {}})
    gpu = torch.device("cuda", 0)
    choose = cuda.linear_kernel
    assert choose(torch.float16, 4, 1, gpu, False, tensor_cores=True) == "mma"
    assert choose(torch.float16, 4, 1, gpu, False, tensor_cores=False) == "gemv"
    assert choose(torch.float16, 4, 1, gpu, False, fragment=True) == "frag"
    assert choose(torch.float16, 3, 1, gpu, True, block_rows=32) == "frag32"
    assert choose(torch.float16, 8, 1, gpu, False, tensor_cores=True) == "frag"
    assert choose(torch.float16, 4, 1, gpu, False, fragment=False) == "gemv"
    for kwargs, dtype, bits, per_channel, match in (
            ({"tensor_cores": True}, torch.float32, 4, False, "tensor_cores needs"),
            ({"fragment": True}, torch.float16, 8, True, "fragment=True needs"),
            ({"fragment": True, "tensor_cores": False}, torch.float16, 4, False, "needs the"),
            ({"block_rows": 32}, torch.float16, 4, True, "2 and 3 bits"),
            ({"block_rows": 32, "fragment": False}, torch.float16, 2, False, "fragment")):
        with pytest.raises(ValueError, match=match):
            choose(dtype, bits, 1, gpu, per_channel, **kwargs)


@pytest.mark.parametrize("n, k, want", [
    (8192, 8192, 1),    # 512 blocks on 132 SMs: no split (measured on the H200)
    (14336, 4096, 1),
    (1024, 8192, 5),    # 64 blocks: split up to 2 blocks per SM
    (1024, 512, 1),     # 16 groups: no warp slice of 32 groups to split off
    (16, 1 << 20, 64),  # capped at MAX_SPLIT_K
])
def test_split_k_heuristic(n, k, want):
    from otq_kernels.backends import cuda

    assert cuda.split_k_for(n, k, 132) == want


def test_split_k_heuristic_counts_32_row_blocks():
    """lut_frag's 32-row blocks halve the block count: 8192 rows are 256 blocks, under
    2 per SM of 132, so K splits in 2."""
    from otq_kernels.backends import cuda

    assert cuda.split_k_for(8192, 8192, 132, rows_per_block=32) == 2
    assert cuda.split_k_for(14336, 4096, 132, rows_per_block=32) == 1


def test_cuda_kernel_choice_from_a_tuning_file(tmp_path, monkeypatch):
    """The same through OTQ_TUNING_FILE, read once per process: a change of the variable
    takes effect at reload_tuning(), which also drops the dispatch plans built before."""
    from otq_kernels.backends import _device, cuda

    monkeypatch.setattr(_device, "gpu_name", lambda device: "GPU X")
    gpu = torch.device("cuda", 0)
    ops.reload_tuning()
    shipped = ops.tuning_int(gpu, "linear", "cuda_max_m")  # the default entry's
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"default": {"linear": {}}, "gpus": {
        "GPU X": {"linear": {"cuda_tensor_cores": True, "cuda_gemv_max_m": 4,
                             "cuda_max_m": shipped + 3}}}}))
    try:
        monkeypatch.setenv("OTQ_TUNING_FILE", str(path))
        assert ops.tuning_int(gpu, "linear", "cuda_max_m") == shipped  # not read again yet
        ops._PLANS["a plan built before"] = ()
        ops.reload_tuning()
        assert "a plan built before" not in ops._PLANS
        assert ops.tuning_int(gpu, "linear", "cuda_max_m") == shipped + 3
        assert ops.tuning_int(gpu, "linear", "cuda_gemv_max_m") == 4
        assert ops.tuning_int(torch.device("cpu"), "linear", "cuda_gemv_max_m") == 0
        assert [cuda.use_tensor_cores(torch.float16, 2, m, gpu) for m in (4, 5)] == \
            [False, True]
        assert ops._candidates("linear", gpu)[0] == ("cuda", 0, shipped + 3)
    finally:
        monkeypatch.delenv("OTQ_TUNING_FILE", raising=False)
        ops.reload_tuning()  # later tests read the shipped table again


# ------------------------------------------------ pinned by a mutation campaign (session 69)
def test_reference_backend_takes_a_bias_of_another_float_dtype():
    """The oracle casts a float32 bias to x's dtype (F.linear/F.conv2d would refuse the
    mix), for linear and conv alike."""
    torch.manual_seed(0)
    qt, cq = otq.fit_codebook(torch.randn(4, 6), 3), otq.fit_codebook(torch.randn(4, 2, 3, 3), 3)
    bias = torch.randn(4)
    for dtype in (torch.bfloat16, torch.float64):
        x, img = torch.randn(3, 6, dtype=dtype), torch.randn(1, 2, 5, 5, dtype=dtype)
        y = otq.ops.codebook_linear(x, qt, bias, backend="reference")
        assert y.dtype == dtype
        assert torch.equal(y, otq.ops.codebook_linear(x, qt, bias.to(dtype), backend="reference"))
        z = otq.ops.codebook_conv2d(img, cq, bias, 1, 1, backend="reference")
        assert z.dtype == dtype
        assert torch.equal(z, otq.ops.codebook_conv2d(img, cq, bias.to(dtype), 1, 1,
                                                      backend="reference"))


def test_reference_pack_refuses_codes_out_of_range():
    """ops.pack: 'each backend checks the codes' values (format.check_codes)', the
    reference backend too (not clamped or wrapped into the planes)."""
    for codes in (torch.tensor([[0, 4]]), torch.tensor([[0, -1]])):
        with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
            otq.ops.pack(codes, 2, backend="reference")


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_gpu_fit_takes_triton_up_to_its_tuned_row_length_then_cuda(monkeypatch):
    """fit on a GPU: the Triton fit for rows of up to fit.triton_max_n (4096 where the
    table has none), the cuda fit for longer rows; pack and unpack take Triton whatever
    the fit entry says."""
    gpu = _gpu_plan(monkeypatch, {})
    assert [ops.resolve_backend(None, "fit", gpu, n) for n in (1, 4096, 4097)] == [
        "triton", "triton", "cuda"]
    gpu = _gpu_plan(monkeypatch, {"fit": {"triton_max_n": 0}})
    assert ops.resolve_backend(None, "fit", gpu, 1) == "cuda"
    assert [ops.resolve_backend(None, op, gpu) for op in ("pack", "unpack")] == ["triton"] * 2


def test_auto_passes_over_a_backend_that_cannot_run(monkeypatch):
    """Without the native build the cpu backend cannot run: auto takes dequant for layers
    and the reference for fits (plans built before are dropped by reload_tuning)."""
    monkeypatch.setattr(backends.get("cpu"), "unavailable", lambda device: "not built")
    ops.reload_tuning()
    try:
        cpu = torch.device("cpu")
        assert ops.resolve_backend(None, "linear", cpu, 1) == "dequant"
        assert ops.resolve_backend(None, "fit", cpu, 8) == "reference"
    finally:
        monkeypatch.undo()
        ops.reload_tuning()


@pytest.mark.parametrize("value", [None, "", "cpu", "dequant ", "é-∂"])
def test_env_reads_what_os_environ_holds(value, monkeypatch):
    """Dispatch's quick read of a variable agrees with os.environ.get, after a set or an
    unset through os.environ (the mapping it reads is the one those write through to)."""
    monkeypatch.setenv("OTQ_TEST_VARIABLE", "before")
    if value is None:
        monkeypatch.delenv("OTQ_TEST_VARIABLE")
    else:
        monkeypatch.setenv("OTQ_TEST_VARIABLE", value)
    assert ops._env("OTQ_TEST_VARIABLE") == os.environ.get("OTQ_TEST_VARIABLE") == value


def test_gpu_plans_are_keyed_by_triton_interpret_and_cpu_plans_by_nothing(monkeypatch):
    """Availability on a GPU reads TRITON_INTERPRET: a change of it builds a new plan (a
    value seen before reuses its plan); the CPU's plans read no variable."""
    built = []
    monkeypatch.setattr(ops, "_runnable_candidates",
                        lambda op, dev, bits, kernel: built.append(str(dev)) or ())
    ops.reload_tuning()
    try:
        for value in ("1", "0", "1"):
            monkeypatch.setenv("TRITON_INTERPRET", value)
            ops._auto_plan("linear", "cuda:0")
            ops._auto_plan("linear", "cpu")
        assert built == ["cuda:0", "cpu", "cuda:0"]
    finally:
        ops.reload_tuning()


def test_bias_of_the_wrong_shape_is_refused_by_name():
    qt, cq = _qt(), _qt(shape=(4, 3, 3, 3))
    with pytest.raises(ValueError, match=r"codebook_linear: bias must be \[9\] on cpu, got "
                                         r"\(8,\) on cpu"):
        ops.codebook_linear(torch.randn(2, 13), qt, torch.randn(8))
    with pytest.raises(ValueError, match=r"codebook_conv2d: bias must be \[4\] on cpu, got "
                                         r"\(3,\) on cpu"):
        ops.codebook_conv2d(torch.randn(1, 3, 8, 8), cq, torch.randn(3))


def test_autocast_leaves_float64_activations_as_they_are():
    """torch.autocast never casts float64 x (F.linear keeps it float64), so neither do the
    quantized ops."""
    qt, cq = _qt(), _qt(shape=(4, 3, 3, 3))
    x, img = torch.randn(3, 13, dtype=torch.float64), torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert F.linear(x, qt.dequantize(torch.float64)).dtype == torch.float64  # torch's rule
        assert ops.compute_dtype(x) == torch.float64
        y = ops.codebook_linear(x, qt)
        z = ops.codebook_conv2d(img, cq, padding=1)
    assert y.dtype == z.dtype == torch.float64
    torch.testing.assert_close(y, F.linear(x, qt.dequantize(torch.float64)))


def test_conv_dispatch_is_asked_with_every_output_pixel_of_the_batch(spy):
    """A conv's M is B × OH × OW (the rows of its implicit GEMM), as the tuning measured."""
    calls = spy(ops, "resolve_conv_backend")
    cq = _qt(shape=(6, 4, 3, 3))
    ops.codebook_conv2d(torch.randn(2, 4, 7, 5), cq, padding=1)
    ops.codebook_conv2d(torch.randn(3, 4, 7, 5), cq, stride=2)
    assert [args[2] for args in calls] == [2 * 7 * 5, 3 * 3 * 2]


def test_fit_pack_and_unpack_run_through_their_ops_under_a_dispatch_mode():
    """As the layers' ops: a dispatch mode sees otq::fit_codebook, otq::pack and
    otq::unpack, with the direct path's results."""
    torch.manual_seed(0)
    rows = torch.randn(3, 40)
    codes, cents = ops.fit_rows(rows, 3, backend="reference")
    with _OpRecorder() as seen:
        via_op = ops.fit_rows(rows, 3, backend="reference")
        planes = ops.pack(codes, 3, backend="reference")
        qt = otq.QuantizedTensor(planes, cents, 3, (3, 40), "channel")
        unpacked = ops.unpack(qt, backend="reference")
    assert {"otq.fit_codebook.default", "otq.pack.default", "otq.unpack.default"} <= set(seen.ops)
    assert torch.equal(via_op[0], codes) and torch.equal(via_op[1], cents)
    assert torch.equal(unpacked, codes)


def test_pack_and_unpack_refuse_arguments_of_the_wrong_type():
    with pytest.raises(ValueError, match="codes must be a torch.Tensor, got list"):
        ops.pack([[0, 1]], 2)
    with pytest.raises(ValueError, match="unpack takes a QuantizedTensor, got Tensor"):
        ops.unpack(torch.zeros(2, 2, dtype=torch.int32))


def test_a_repeated_tuning_key_is_named_once():
    from otq_kernels.tuning_schema import parse_tuning_table

    with pytest.raises(ValueError) as err:
        parse_tuning_table('{"default": {"linear": {}, "linear": {}}}', "T")
    assert str(err.value) == "T: key 'linear' appears twice in one object"


def test_crossovers_by_kernel_size_are_checked_as_kernel_sizes():
    """*_by_kernel maps take "KHxKW" keys (not bit widths), *_by_bits maps the reverse."""
    from otq_kernels.tuning_schema import check_tuning_table

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_tuning_table({"default": {"conv2d": {"cuda_max_m_by_kernel": {"1x1": 49},
                                                   "cuda_max_m_by_bits": {"4": 9}}}}, "T")
    for key, value in (("cuda_max_m_by_kernel", {"4": 1}), ("cuda_max_m_by_bits", {"3x3": 1})):
        with pytest.raises(ValueError, match=f"conv2d.{key} must be a map of"):
            check_tuning_table({"default": {"conv2d": {key: value}}}, "T")


def test_check_name_refuses_what_is_not_a_backend_name():
    assert backends.check_name("auto") == "auto" and backends.check_name("cpu") == "cpu"
    for name in ("gpu", ["cpu"], None):
        with pytest.raises(ValueError, match="unknown backend"):  # not a str: no TypeError
            backends.check_name(name)


def test_named_cpu_backend_has_no_conv_kernel():
    """conv_kernel_takes: a backend without conv2d (cpu) and the reference take no conv;
    dequant takes every dtype, bits and groups, float64 included."""
    assert not ops.conv_kernel_takes("cpu", torch.float32, 4)
    assert not ops.conv_kernel_takes("reference", torch.float32, 4)
    assert ops.conv_kernel_takes("dequant", torch.float64, 8, 2)


@pytest.mark.parametrize("backend", ["dequant", "reference"])
def test_conv_bias_is_added_on_the_expanding_backends(backend):
    torch.manual_seed(0)
    cq, x, bias = _qt((4, 3, 3, 3), 3), torch.randn(2, 3, 6, 5), torch.randn(4)
    y = ops.codebook_conv2d(x, cq, bias, padding=1, backend=backend)
    torch.testing.assert_close(y, F.conv2d(x, cq.dequantize(), bias, padding=1))


@pytest.mark.parametrize("budget, chunks", [(64, [1] * 5), (256, [2, 2, 1])])
def test_dequant_linear_expands_the_rows_its_chunk_budget_holds(budget, chunks, monkeypatch,
                                                                spy):
    """On CPU a weight over CPU_CHUNK_BYTES (fp32) is expanded a chunk of rows at a time:
    as many rows as the budget holds, one where a single row exceeds it."""
    from otq_kernels.backends import dequant

    torch.manual_seed(0)
    qt, x, bias = _qt((5, 32), 3), torch.randn(3, 32), torch.randn(5)
    monkeypatch.setattr(dequant, "CPU_CHUNK_BYTES", budget)  # a row of 32 is 128 bytes
    calls = spy(dequant, "_row_chunk")
    y = ops.codebook_linear(x, qt, bias, backend="dequant")
    assert [last - first for _, first, last in calls] == chunks
    torch.testing.assert_close(y, F.linear(x, qt.dequantize(), bias))
