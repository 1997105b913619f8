"""Gradients through the codebook ops and layers: x and bias, never the frozen weight.

The oracle is torch's own autograd through F.linear / F.conv2d on the dequantized weight.
"""

import copy
import gc
import pickle
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import otq_kernels as otq
from otq_kernels import ops

pytestmark = pytest.mark.usefixtures("one_thread")


def _qt(shape, bits=4, granularity="channel"):
    torch.manual_seed(0)
    return otq.fit_codebook(torch.randn(shape), bits, "ot", granularity)


def _skip_unavailable(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    reason = otq.backends.get(backend).unavailable(torch.device("cpu"))
    if reason:
        pytest.skip(reason)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_()


def _grads(fn, *inputs):
    """Gradients of sum(fn(*inputs) * r) w.r.t. each input (fresh leaves), r fixed random."""
    leaves = [_leaf(t) for t in inputs]
    y = fn(*leaves)
    r = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).to(y)
    return torch.autograd.grad((y * r).sum(), leaves)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("bits, granularity, m, n, k", [
    (2, "tensor", 1, 9, 13), (3, "channel", 5, 17, 37), (4, "channel", 9, 8, 64),
    (8, "tensor", 3, 6, 33)], ids=lambda v: str(v))
def test_linear_grads_match_the_dense_weight(backend, bits, granularity, m, n, k):
    _skip_unavailable(backend)
    qt = _qt((n, k), bits, granularity)
    x, bias = torch.randn(2, m, k), torch.randn(n)
    got = _grads(lambda a, b: ops.codebook_linear(a, qt, b, backend), x, bias)
    want = _grads(lambda a, b: F.linear(a, qt.dequantize(), b), x, bias)
    for g, w in zip(got, want, strict=True):
        assert g.abs().max() > 0
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("stride, padding, dilation, groups, channels_last", [
    (1, 1, 1, 1, False), (2, 0, 1, 2, True), ((2, 1), (1, 2), 2, 1, False)],
    ids=lambda v: str(v))
def test_conv2d_grads_match_the_dense_weight(backend, stride, padding, dilation, groups,
                                             channels_last):
    _skip_unavailable(backend)
    qt = _qt((6, 4 // groups, 3, 3), bits=3)
    x, bias = torch.randn(2, 4, 9, 8), torch.randn(6)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    args = (stride, padding, dilation, groups)
    got = _grads(lambda a, b: ops.codebook_conv2d(a, qt, b, *args, backend=backend), x, bias)
    want = _grads(lambda a, b: F.conv2d(a, qt.dequantize(), b, *args), x, bias)
    assert got[0].shape == x.shape
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_bias_alone_gets_its_gradient():
    """x without grad but a trainable bias: the call must still build the autograd graph."""
    qt = _qt((9, 13))
    x, bias = torch.randn(4, 13), torch.randn(9, requires_grad=True)
    ops.codebook_linear(x, qt, bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((9,), 4.0))


@pytest.mark.parametrize("op", ["linear", "conv2d"])
def test_empty_batch_keeps_its_gradient_links(op):
    """M = 0, as F.linear / F.conv2d: empty x grad, zero bias grad, no 'does not require grad'."""
    if op == "linear":
        qt, x = _qt((9, 13)), _leaf(torch.randn(2, 0, 13))
        want_shape = (2, 0, 9)
        call = ops.codebook_linear
    else:
        qt, x = _qt((9, 4, 3, 3)), _leaf(torch.randn(0, 4, 6, 6))
        want_shape = (0, 9, 4, 4)
        call = ops.codebook_conv2d
    bias = _leaf(torch.randn(9).double())
    y = call(x, qt, bias)
    assert y.shape == want_shape and y.dtype == x.dtype
    y.sum().backward()
    assert x.grad.shape == x.shape
    torch.testing.assert_close(bias.grad, torch.zeros_like(bias))


def test_half_precision_grads_keep_their_dtypes():
    qt = _qt((9, 13))
    x, bias = _leaf(torch.randn(3, 13).bfloat16()), _leaf(torch.randn(9))
    ops.codebook_linear(x, qt, bias, "reference").sum().backward()
    assert x.grad.dtype == torch.bfloat16 and bias.grad.dtype == torch.float32
    want = qt.dequantize(torch.bfloat16).sum(0).expand(3, 13)
    torch.testing.assert_close(x.grad, want)


def test_create_graph_gives_differentiable_input_grads():
    """Hutchinson-style divergence: grad(v . y, x) is itself differentiable in v."""
    qt = _qt((9, 13), bits=2)
    x, v, u = _leaf(torch.randn(3, 13)), _leaf(torch.randn(3, 9)), torch.randn(3, 13)
    (gx,) = torch.autograd.grad(ops.codebook_linear(x, qt), x, v, create_graph=True)
    (gv,) = torch.autograd.grad((gx * u).sum(), v)
    torch.testing.assert_close(gv, u @ qt.dequantize().T)


def test_frozen_codebook_is_a_clear_error():
    qt = _qt((9, 13))
    qt.codebook.requires_grad_()
    with pytest.raises(ValueError, match="codebook requires grad.*frozen"):
        ops.codebook_linear(torch.randn(2, 13), qt)
    with torch.no_grad():
        assert ops.codebook_linear(torch.randn(2, 13), qt).shape == (2, 9)


def test_opcheck_with_gradients():
    qt, cq = _qt((9, 13)), _qt((4, 2, 3, 3))
    args = (_leaf(torch.randn(3, 13)), qt.planes, qt.codebook, qt.bits, qt.n, qt.k,
            _leaf(torch.randn(9)), "reference")
    torch.library.opcheck(torch.ops.otq.codebook_linear.default, args)
    cargs = (_leaf(torch.randn(1, 2, 6, 5)), cq.planes, cq.codebook, cq.bits, list(cq.shape),
             _leaf(torch.randn(4)), [1, 1], [1, 1], [1, 1], 1, "reference")
    torch.library.opcheck(torch.ops.otq.codebook_conv2d.default, cargs)


@pytest.mark.parametrize("backend", ["dequant", "reference"])
@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Linear(7, 5), (3, 7)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (2, 3, 5, 5)),
    (lambda: nn.Conv1d(3, 4, 1), (2, 3, 6)),
    (lambda: nn.Conv1d(3, 4, 3, stride=2, groups=1), (2, 3, 9)),
], ids=["linear", "conv2d-reflect", "conv1d-pointwise", "conv1d-k3"])
def test_float64_layers_pass_gradcheck_and_gradgradcheck(make, shape, backend):
    """Numerical against analytic gradients in x and the bias (float64 runs on the expanding
    backends), and the backward's own gradients (double backward)."""
    torch.manual_seed(0)
    model = nn.Sequential(make())
    otq.quantize_model(model, bits=3, backend=backend, progress=False)
    model = model.double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    bias = model[0].bias.detach().clone().requires_grad_()
    with_bias = lambda x, b: torch.func.functional_call(model, {"0.bias": b}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(with_bias, (x, bias))
    assert torch.autograd.gradgradcheck(model, (x,))


def test_opcheck_dequantize():
    qt = _qt((4, 2, 3, 3), bits=3, granularity="tensor")
    args = (qt.planes, qt.codebook, qt.bits, list(qt.shape), torch.bfloat16)
    torch.library.opcheck(torch.ops.otq.dequantize.default, args)
    assert torch.equal(torch.ops.otq.dequantize(*args), qt.dequantize(torch.bfloat16))


def test_compiled_backward_expands_the_weight_only_at_run_time(monkeypatch):
    """A compiled backward traces otq::dequantize's fake: the expansion (a Triton kernel
    on a GPU, which cannot take fake tensors) runs on real tensors only, once per call."""
    real, calls = ops.dense_weight, []

    def checked(qt, dtype):
        assert type(qt.codebook) is torch.Tensor, f"expanded a {type(qt.codebook).__name__}"
        calls.append(dtype)
        return real(qt, dtype)

    monkeypatch.setattr(ops, "dense_weight", checked)
    torch._dynamo.reset()
    qt = _qt((9, 13), bits=3)
    step = torch.compile(lambda a: ops.codebook_linear(a, qt, backend="reference").pow(2).sum(),
                         fullgraph=True, backend="aot_eager")
    x = _leaf(torch.randn(4, 13))
    step(x).backward()
    y = F.linear(x.detach(), qt.dequantize())
    torch.testing.assert_close(x.grad, 2 * y @ qt.dequantize())
    assert calls == [torch.float32]


class _Mixed(nn.Module):
    """Every Quant* path: Linear, pointwise and 3-tap Conv1d, reflect-padded Conv2d."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.point = nn.Conv1d(8, 8, 1)
        self.taps = nn.Conv1d(8, 4, 3, padding=1)
        self.head = nn.Linear(4 * 25, 5)

    def forward(self, x):  # x [B, 3, 5, 5] -> [B, 5]
        h = F.silu(self.conv(x)).flatten(2)
        h = self.taps(F.silu(self.point(h)))
        return self.head(h.flatten(1))


def _dequantized_twin(float_model: nn.Module, quant_model: nn.Module) -> nn.Module:
    """float_model with each quantized layer's weight replaced by the dequantized one."""
    twin = copy.deepcopy(float_model)
    with torch.no_grad():
        for name, module in quant_model.named_modules():
            if isinstance(module, otq.nn._QuantModule):
                twin.get_submodule(name).weight.copy_(module.dequantize())
    return twin


def test_quantized_model_input_grads_match_its_dequantized_twin():
    torch.manual_seed(0)
    model = _Mixed()
    quant = otq.quantize_model(copy.deepcopy(model), bits=3, progress=False)
    twin = _dequantized_twin(model, quant)
    x = torch.randn(2, 3, 5, 5)
    (got,) = _grads(quant, x)
    (want,) = _grads(twin, x)
    assert got.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _vmapped_jacobian(net, x, tangent):
    return torch.func.vmap(torch.func.jacrev(lambda v: net(v.unsqueeze(0))[0]))(x)


def _forward_ad_tangent(net, x, tangent):
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        return fwAD.unpack_dual(net(fwAD.make_dual(x, tangent))).tangent


@pytest.mark.parametrize("transform", [
    lambda net, x, t: torch.func.vmap(net)(x.unsqueeze(1)),
    lambda net, x, t: torch.func.grad(lambda v: net(v).square().sum())(x),
    lambda net, x, t: torch.func.jvp(net, (x,), (t,))[1],
    lambda net, x, t: torch.func.jacfwd(net)(x),
    _vmapped_jacobian,
    lambda net, x, t: torch.func.hessian(lambda v: net(v).square().sum())(x[:1]),
    _forward_ad_tangent,
], ids=["vmap", "grad", "jvp", "jacfwd", "vmap-jacrev", "hessian", "forward_ad"])
def test_torch_transforms_see_the_dequantized_twin(transform):
    """torch.func transforms and forward-mode AD (dual tensors) over every Quant* path give
    the dequantized twin's results (jvp once returned a wrong tangent without an error)."""
    torch.manual_seed(0)
    model = _Mixed()
    quant = otq.quantize_model(copy.deepcopy(model), bits=3, progress=False)
    twin = _dequantized_twin(model, quant)
    x, tangent = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    got, want = transform(quant, x, tangent), transform(twin, x, tangent)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_vmap_over_stacked_quantized_models_runs_each_model(bits, granularity):
    """Model ensembling (torch.func.stack_module_state + vmap over functional_call) batches
    the codes too: each model's output (the unpacking updated an unbatched tensor in place
    with batched codes, a RuntimeError)."""
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(otq.quantize_model(_Mixed(), bits=bits, granularity=granularity,
                                         progress=False))
    params, buffers = torch.func.stack_module_state(models)
    skeleton = copy.deepcopy(models[0]).to("meta")
    x = torch.randn(2, 3, 5, 5)

    def one(p, b, x):
        return torch.func.functional_call(skeleton, (p, b), (x,))

    with torch.no_grad():
        got = torch.func.vmap(one, in_dims=(0, 0, None))(params, buffers, x)
        want = torch.stack([model(x) for model in models])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    for copy_of in (copy.deepcopy, pickle.dumps):  # (the layers kept vmap's tensors)
        copy_of(skeleton)


def test_tensors_of_one_call_are_not_kept_and_assigned_ones_are(monkeypatch):
    """The layers keep no reference to tensors swapped in for one call (functional_call,
    an offload hook's copies: they stayed referenced until the next call), and keep the
    view of a buffer assigned for good after its second read (it was rebuilt each
    forward, the old codes kept alive)."""
    from otq_kernels import modules

    torch.manual_seed(0)
    model = otq.quantize_model(_Mixed(), bits=3, progress=False)
    x = torch.randn(2, 3, 5, 5)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.testing.assert_close(torch.func.functional_call(model, state, (x,)), expected)
    passed = [weakref.ref(t) for t in state.values()]
    del state
    gc.collect()
    assert [ref for ref in passed if ref() is not None] == []
    for _ in range(2):  # (each layer keeps its view again from its second read)
        model(x)
    old = weakref.ref(model.head._buffers["codebook"])
    model.head._buffers["codebook"] = model.head.codebook.clone()  # (as accelerate does)
    builds = []
    real = modules.QuantizedTensor
    monkeypatch.setattr(modules, "QuantizedTensor",
                        lambda *a, **k: builds.append(1) or real(*a, **k))
    for _ in range(4):
        torch.testing.assert_close(model(x), expected)
    gc.collect()
    assert len(builds) == 2 and old() is None


def test_a_codebook_that_requires_grad_leaves_the_layer_copyable():
    """A codebook that requires grad, passed to torch.func.functional_call and refused
    there, was kept in the layer's views: the layer could not be deep-copied."""
    torch.manual_seed(0)
    model = otq.quantize_model(_Mixed(), bits=3, progress=False)
    codebook = model.head.codebook.clone().requires_grad_()
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(ValueError):
        torch.func.functional_call(model, {"head.codebook": codebook * 1}, (x,))
    copy.deepcopy(model)


@pytest.mark.parametrize("registered", [False, True], ids=["counter-before-formulas",
                                                         "formulas-registered"])
def test_flop_counter_counts_what_the_dequantized_twin_does(registered, monkeypatch):
    """torch's FlopCounterMode counts the quantized layers as F.linear/F.conv on the dense
    weight (it counted them as zero), forward and backward, also when the counter was
    made before the formulas were registered."""
    from torch.utils import flop_counter

    from otq_kernels.flops import teach_flop_counter

    torch.manual_seed(0)
    model = _Mixed()
    quant = otq.quantize_model(copy.deepcopy(model), bits=3, progress=False)
    twin = _dequantized_twin(model, quant)
    for layer in (twin.conv, twin.point, twin.taps, twin.head):
        layer.weight.requires_grad_(False)  # (the quantized weight gets no gradient)
    for op in (torch.ops.otq.codebook_linear, torch.ops.otq.codebook_conv2d):
        monkeypatch.delitem(flop_counter.flop_registry, op, raising=False)
    if registered:
        teach_flop_counter(None)

    def flops(net):
        with flop_counter.FlopCounterMode(display=False) as counter:
            net(_leaf(torch.randn(2, 3, 5, 5))).sum().backward()
        return counter.get_total_flops()

    assert flops(quant) == flops(twin) > 0
    for op in (torch.ops.otq.codebook_linear, torch.ops.otq.codebook_conv2d):
        monkeypatch.delitem(flop_counter.flop_registry, op, raising=False)

    class Passing(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def nested_flops(net) -> list[int]:  # an outer counter, an inner one, another mode
        x = torch.randn(2, 3, 5, 5)
        with flop_counter.FlopCounterMode(display=False) as outer:
            with flop_counter.FlopCounterMode(display=False) as inner, Passing():
                net(x)
        return [outer.get_total_flops(), inner.get_total_flops()]

    assert nested_flops(quant) == nested_flops(twin) and nested_flops(twin)[0] > 0


@pytest.mark.parametrize("transform", [
    lambda net, x, t: torch.func.vmap(net)(x.unsqueeze(1)),
    lambda net, x, t: torch.func.grad(lambda v: net(v).square().sum())(x),
    lambda net, x, t: torch.func.jvp(net, (x,), (t,))[1],
], ids=["vmap", "grad", "jvp"])
def test_compiled_torch_transforms_see_the_dequantized_twin(transform):
    """The same under torch.compile (a compiled jvp gave a wrong tangent without an error,
    vmap and grad failed in the op's fake kernel), where dynamo folds the functorch
    depth (torch 2.13 does)."""
    torch._dynamo.reset()  # (imports dynamo, which the check reads)
    if not ops._dynamo_folds_functorch_depth():
        pytest.skip("this torch's dynamo does not fold the functorch depth")
    torch.manual_seed(0)
    model = _Mixed()
    quant = otq.quantize_model(copy.deepcopy(model), bits=3, progress=False)
    twin = _dequantized_twin(model, quant)
    x, tangent = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    got = torch.compile(transform, backend="eager")(quant, x, tangent)
    torch.testing.assert_close(got, transform(twin, x, tangent), rtol=1e-4, atol=1e-5)


def test_compiling_without_the_folded_functorch_query_never_asks_it(monkeypatch):
    """A dynamo that does not fold the functorch depth (older torch) is never asked it,
    since the call would break a fullgraph compile: compiled transforms then behave as
    before (the op's path), and a plain compile stays one graph."""
    torch.manual_seed(0)
    quant = otq.quantize_model(_Mixed(), bits=3, progress=False)
    x = torch.randn(2, 3, 5, 5)
    want = quant(x)

    def depth():
        raise AssertionError("asked the functorch depth while compiling")

    monkeypatch.setattr(ops, "_dynamo_folds_functorch_depth",
                        ops._trace_constant(lambda: False))
    monkeypatch.setattr(ops, "_functorch_depth", depth)
    torch._dynamo.reset()
    got = torch.compile(quant, fullgraph=True, backend="eager")(x.requires_grad_())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("before", [lambda m: m, lambda m: m.float(),
                                    lambda m: m.load_state_dict(m.state_dict()) and m],
                         ids=["fresh", "after-float", "after-load-state-dict"])
def test_jit_trace_records_the_ops(before):
    """torch.jit.trace records the otq ops, not the values a native kernel wrote into
    memory the tracer cannot see (the traced module once returned uninitialised memory),
    and passes its own check, which traces twice (a Conv1d's first call read the buffers
    in another order than later ones: "Graphs differed across invocations")."""
    torch.manual_seed(0)
    quant = otq.quantize_model(_Mixed(), bits=3, progress=False)
    before(quant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # (our shape checks)
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch >= 2.13 deprecates it)
        traced = torch.jit.trace(quant, torch.randn(2, 3, 5, 5))
    assert "otq::codebook_linear" in str(traced.inlined_graph)
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(traced(x), quant(x), rtol=1e-5, atol=1e-6)


def test_jit_script_is_refused_with_the_ways_that_work():
    """(it failed deep inside TorchScript, with another error on a second attempt)"""
    torch.manual_seed(0)
    quant = otq.quantize_model(_Mixed(), bits=3, progress=False)
    x = torch.randn(2, 3, 5, 5)
    want = quant(x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # (torch >= 2.13 deprecates it)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="torch.jit.script cannot compile Quant.*"
                                                   "use torch.jit.trace, torch.export or "
                                                   "torch.compile"):
                torch.jit.script(quant)
    assert torch.equal(quant(x), want)


def test_fx_traces_the_layers_as_leaf_modules():
    """The documented way through torch.fx: Quant* layers as leaves."""
    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            quantized = isinstance(module, tuple(otq.nn.QUANT_TYPES.values()))
            return quantized or super().is_leaf_module(module, name)

    torch.manual_seed(0)
    quant = otq.quantize_model(_Mixed(), bits=3, progress=False)
    traced = torch.fx.GraphModule(quant, LeafTracer().trace(quant))
    assert sum(node.op == "call_module" for node in traced.graph.nodes) == 4
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(traced(x), quant(x))


def test_flow_matching_likelihood_of_a_quantized_unet():
    """flow_matching's compute_likelihood (divergence by autograd) runs on a quantized model
    and gives its dequantized twin's log-likelihood."""
    pytest.importorskip("flow_matching")
    from flow_matching.solver import ODESolver

    from otq_kernels.demo import random_model
    from otq_kernels.fm import VelocityWrapper

    model = random_model("tiny", seed=0)  # a fresh UNet's velocity is 0: nothing to compare
    quant = otq.quantize_model(copy.deepcopy(model), bits=4, progress=False)
    twin = _dequantized_twin(model, quant)
    x1 = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))

    def log_p0(x):
        return -0.5 * x.flatten(1).pow(2).sum(1)

    def likelihood(net):
        torch.manual_seed(5)  # the Hutchinson probe
        solver = ODESolver(velocity_model=VelocityWrapper(net))
        return solver.compute_likelihood(x1, log_p0, step_size=0.5, method="euler")[1]

    got, want = likelihood(quant), likelihood(twin)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["auto", "triton", "cuda", "dequant"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_grads_match_the_dense_weight(backend, dtype):
    """On the GPU the backward expands the weight with the Triton dequantize kernel."""
    if backend != "auto":
        reason = otq.backends.get(backend).unavailable(torch.device("cuda"))
        if reason:
            pytest.skip(reason)
    qt = _qt((40, 72), bits=3).to("cuda")
    cq = _qt((16, 8, 3, 3), bits=4).to("cuda")
    x, img = torch.randn(5, 72, device="cuda", dtype=dtype), torch.randn(2, 8, 7, 7, device="cuda")
    bias = torch.randn(40, device="cuda")
    got = _grads(lambda a, b: ops.codebook_linear(a, qt, b, backend), x, bias)
    want = _grads(lambda a, b: F.linear(a, qt.dequantize(dtype), b.to(dtype)), x, bias)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w.to(g.dtype), rtol=2e-2, atol=2e-2)
    if backend == "auto" or hasattr(otq.backends.get(backend), "conv2d"):
        img = img.to(dtype)
        (g_img,) = _grads(lambda a: ops.codebook_conv2d(a, cq, None, 1, 1, backend=backend), img)
        (w_img,) = _grads(lambda a: F.conv2d(a, cq.dequantize(dtype), None, 1, 1), img)
        torch.testing.assert_close(g_img, w_img, rtol=2e-2, atol=2e-2)


@pytest.mark.cuda
def test_gpu_compiled_backward():
    """torch.compile of forward + backward on the GPU: the Triton expansion runs on real
    tensors (otq::dequantize), the fused kernel in the forward."""
    torch._dynamo.reset()
    qt = _qt((40, 72), bits=4).to("cuda")
    step = torch.compile(lambda a: ops.codebook_linear(a, qt).float().pow(2).sum(),
                         fullgraph=True)
    x = _leaf(torch.randn(3, 72, device="cuda", dtype=torch.float16))
    step(x).backward()
    w = qt.dequantize(torch.float32)
    want = 2 * (x.detach().float() @ w.T) @ w
    torch.testing.assert_close(x.grad.float(), want, rtol=2e-2, atol=5e-2)


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_flop_counter_counts_a_model_of_linear_layers_alone(monkeypatch):
    """A linear call teaches a counter made before the formulas were registered, as a conv
    call does (_Mixed's first layer is a conv, which taught the counter for both)."""
    from torch.utils import flop_counter

    torch.manual_seed(0)
    quant = otq.quantize_model(nn.Sequential(nn.Linear(8, 4)), bits=3, progress=False)
    for op in (torch.ops.otq.codebook_linear, torch.ops.otq.codebook_conv2d):
        monkeypatch.delitem(flop_counter.flop_registry, op, raising=False)
    with flop_counter.FlopCounterMode(display=False) as counter:
        quant(torch.randn(2, 8))
    assert counter.get_total_flops() == 2 * 2 * 4 * 8
