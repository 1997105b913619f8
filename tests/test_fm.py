"""Flow Matching glue: noise, sampling with flow_matching's ODESolver, training."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("flow_matching")

from otq_kernels import fm  # noqa: E402
from otq_kernels.models import build_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**kw):
    torch.manual_seed(0)
    model = build_model("tiny", **kw)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_make_noise_is_reproducible():
    a = fm.make_noise((2, 1, 16, 16), seed=3)
    torch.testing.assert_close(a, fm.make_noise((2, 1, 16, 16), seed=3), rtol=0, atol=0)
    assert not torch.equal(a, fm.make_noise((2, 1, 16, 16), seed=4))
    assert fm.make_noise((1, 4), seed=0, dtype=torch.float64).dtype == torch.float64


def test_velocity_wrapper_broadcasts_time():
    model = _model()
    x = torch.randn(3, 1, 16, 16)
    v = fm.VelocityWrapper(model)(x=x, t=torch.tensor(0.3))
    torch.testing.assert_close(v, model(x, torch.full((3,), 0.3)))


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "dopri5"])
def test_sample_methods_deterministic(method):
    model = _model()
    x0 = fm.make_noise((2, 1, 16, 16), seed=0)
    kw = dict(steps=4, method=method, atol=1e-3, rtol=1e-3)
    a = fm.sample(model, x0, **kw)
    b = fm.sample(model, x0.clone(), **kw)
    assert a.shape == x0.shape and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, x0)


def test_sample_euler_matches_manual_loop():
    model = _model()
    x = x0 = fm.make_noise((2, 1, 16, 16), seed=5)
    with torch.no_grad():
        for i in range(3):
            x = x + model(x, torch.full((2,), i / 3)) / 3
    torch.testing.assert_close(fm.sample(model, x0, steps=3), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("steps", [61, 109, 8])
@pytest.mark.parametrize("method, stages", [("euler", 1), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_methods_take_exactly_steps_steps(steps, method, stages):
    """NFE = steps x stages (torchdiffeq's own grid from step_size=1/61 had 62 steps)."""
    model, calls = _model(), []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    fm.sample(model, fm.make_noise((1, 1, 16, 16), seed=0), steps=steps, method=method)
    assert len(calls) == steps * stages


@pytest.mark.parametrize("method", ["rk4", "dopri5"])
def test_sample_with_cuda_graph_replays_the_velocity_calls(method, monkeypatch):
    """cuda_graph=True runs every velocity call of the solver through one CudaGraphed
    (here with a stand-in graph on CPU whose replay re-runs the captured call in place):
    rk4 holds four velocities at once, so each replay must hand back its own tensor; the
    guided, labelled call goes through too."""
    from otq_kernels import graphs

    captures = []

    def capture(call, device, warmup):
        output = call()
        return output, SimpleNamespace(replay=lambda: output.copy_(call()))

    def device_of(values):
        captures.append(len(values))
        return torch.device("cpu")

    monkeypatch.setattr(graphs, "capture_cuda_graph", capture)
    monkeypatch.setattr(graphs, "_cuda_device", device_of)
    cond = _model(num_classes=3)
    x0 = fm.make_noise((2, 1, 16, 16), seed=0)
    kw = dict(steps=3, method=method, atol=1e-3, rtol=1e-3, label=torch.tensor([0, 2]),
              cfg_scale=0.5)
    torch.testing.assert_close(fm.sample(cond, x0, cuda_graph=True, **kw),
                               fm.sample(cond, x0, **kw), rtol=1e-6, atol=1e-6)
    assert captures == [3]  # x, t and the label: one signature for every step


def test_sample_with_cuda_graph_needs_a_gpu_tensor():
    with pytest.raises(ValueError, match="one CUDA device"):
        fm.sample(_model(), fm.make_noise((1, 1, 16, 16), seed=0), steps=1, cuda_graph=True)


def test_sample_intermediates_labels_and_errors():
    model = _model()
    x0 = fm.make_noise((2, 1, 16, 16), seed=0)
    traj = fm.sample(model, x0, steps=2, return_intermediates=True)
    assert traj.shape == (3, 2, 1, 16, 16)
    torch.testing.assert_close(traj[0], x0)
    cond = _model(num_classes=3)
    y = fm.sample(cond, x0, steps=2, label=torch.tensor([0, 2]), cfg_scale=0.5)
    assert y.shape == x0.shape
    with pytest.raises(ValueError, match="unknown method"):
        fm.sample(model, x0, method="leapfrog")
    model.train()
    fm.sample(model, x0, steps=1)
    assert model.training  # mode restored
    for steps in (2.5, 0, True, None):
        with pytest.raises(ValueError, match="steps must be an integer >= 1"):
            fm.sample(model, x0, steps=steps)
    for dtype in (torch.float16, torch.bfloat16):  # (torchdiffeq: 'underflow in dt')
        with pytest.raises(ValueError, match="adaptive method 'dopri5' needs float32"):
            fm.sample(model, x0.to(dtype), method="dopri5")
    for label in (torch.tensor(1), torch.tensor([0, 1, 2]), torch.tensor([0.0, 1.0]), 1,
                  torch.tensor([True, False])):
        with pytest.raises(ValueError, match="label must be an integer tensor \\[B\\] with B = 2"
                                             ", got (torch|int)") as err:
            fm.sample(cond, x0, steps=1, label=label, cfg_scale=0.5)
        if isinstance(label, torch.Tensor):  # (a float label's message showed only its shape)
            assert str(label.dtype) in str(err.value)
    for net, label in ((model, None), (model, torch.tensor([0, 1])), (cond, None)):
        with pytest.raises(ValueError, match="cfg_scale needs a label and a class-conditional"):
            fm.sample(net, x0, steps=1, label=label, cfg_scale=0.5)


def test_sample_checks_label_values_once_before_the_model_runs():
    """A label outside 0..num_classes is a ValueError before any step (the model itself
    reads no GPU label's values, and nn.Embedding would assert on the device)."""
    calls = []

    class Velocity(nn.Module):
        num_classes = 3

        def forward(self, x, t, extra=None):
            calls.append(extra["label"])
            return torch.zeros_like(x)

    x0 = fm.make_noise((2, 1, 4, 4), seed=0)
    for label in (torch.tensor([0, 4]), torch.tensor([-1, 2])):
        with pytest.raises(ValueError, match=r"class indices 0\.\.3 \(3: the null class\)"):
            fm.sample(Velocity(), x0, steps=1, label=label)
    assert calls == []
    fm.sample(Velocity(), x0, steps=1, label=torch.tensor([3, 0]))
    assert [c.tolist() for c in calls] == [[3, 0]]


def test_train_checks_label_values_once_before_any_step():
    model = build_model("tiny", num_classes=3)
    before = {name: p.clone() for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"class indices 0\.\.3 .* got 0\.\.5"):
        fm.train(model, torch.zeros(4, 1, 16, 16), labels=torch.tensor([0, 1, 5, 2]), steps=2,
                 batch_size=2)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_sample_leaves_each_submodule_in_its_mode():
    """A model training with a frozen (eval-mode) part keeps it in eval mode after
    sampling; an error inside the solver leaves the modes as they were too."""
    model = _model().train()
    model.out.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.out.register_forward_hook(lambda m, i, o: seen.append(m.training))
    fm.sample(model, fm.make_noise((1, 1, 16, 16), seed=0), steps=1)
    assert seen == [False] and {n: m.training for n, m in model.named_modules()} == modes
    with pytest.raises(ValueError, match="expects images"):
        fm.sample(model, torch.zeros(1, 2, 16, 16), steps=1)  # wrong channel count
    assert {n: m.training for n, m in model.named_modules()} == modes


def test_overlapping_eval_blocks_on_one_model_share_one_eval_period():
    """Thread A enters, thread B enters, A leaves: B's model stays in eval mode (A's exit
    put it back in train mode, dropout on, while B sampled) and B's exit restores the
    modes from before A's block (it left the model in eval mode for good)."""
    import threading

    model = _model().train()
    model.out.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen_by_b = []

    def a():
        with fm.evaluating(model):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def b():
        a_in.wait(5)
        with fm.evaluating(model):
            b_in.set()
            a_out.wait(5)
            seen_by_b.extend(m.training for m in model.modules())

    threads = [threading.Thread(target=a), threading.Thread(target=b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert a_out.is_set() and seen_by_b and not any(seen_by_b)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert fm._EVALUATING == {}


def test_an_eval_block_is_in_eval_mode_whatever_came_before():
    """An inner block after model.train() inside the outer one runs in eval mode; an
    eval() that raises leaves no block open (the next block skipped eval())."""
    model = _model().train()
    with fm.evaluating(model):
        model.train()
        with fm.evaluating(model):
            assert not model.training
    assert model.training and fm._EVALUATING == {}

    class FailingOnce(torch.nn.Module):
        failed = False

        def train(self, mode=True):
            if not mode and not FailingOnce.failed:
                FailingOnce.failed = True
                raise RuntimeError("eval failed")
            return super().train(mode)

    flaky = FailingOnce().train()
    with pytest.raises(RuntimeError, match="eval failed"), fm.evaluating(flaky):
        pass
    assert fm._EVALUATING == {} and flaky.training
    with fm.evaluating(flaky):
        assert not flaky.training


def test_an_eval_that_opens_a_block_itself_does_not_deadlock():
    """A module whose eval() opens an eval block of its own (on a part): the lock is
    re-entrant (a plain lock deadlocked, holding it while eval() ran)."""
    import threading

    class Opening(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.part = torch.nn.Dropout(0.5)

        def train(self, mode=True):
            if not mode:
                with fm.evaluating(self.part):
                    pass
            return super().train(mode)

    model = Opening().train()
    done = threading.Event()

    def enter():
        with fm.evaluating(model):
            done.set()

    worker = threading.Thread(target=enter, daemon=True)
    worker.start()
    worker.join(10)
    assert done.is_set() and model.training and fm._EVALUATING == {}


def test_train_reduces_loss():
    from otq_kernels.data import load_digits

    torch.manual_seed(0)
    model = build_model("tiny")
    data = load_digits(8)[:256]
    losses = fm.train(model, data, steps=30, batch_size=16, lr=2e-3, seed=0, warmup=5)
    assert len(losses) == 30 and not model.training
    assert sum(losses[-8:]) / 8 < 0.7 * sum(losses[:4]) / 4


def test_train_ema_and_labels_deterministic():
    data = torch.rand(16, 1, 16, 16) * 2 - 1
    labels = torch.arange(16) % 3
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = build_model("tiny", num_classes=3)
        runs.append(
            fm.train(
                model,
                data,
                steps=2,
                batch_size=4,
                seed=1,
                labels=labels,
                ema_decay=0.9,
                schedule="cosine",
            )
        )
    assert runs[0] == runs[1]


def test_the_ema_warms_up_its_decay():
    """Update n uses min(decay, (1 + n) / (10 + n)): after 3 updates toward 1 from 0 the
    initial value keeps 0.1 * 2/11 * 3/12 of its weight (0.999**3 without the warm-up)."""
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    ema = fm.EMA(model, decay=0.999)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(3):
        ema.update(model)
    kept = 0.1 * 2 / 11 * 3 / 12
    assert ema.shadow["weight"].item() == pytest.approx(1 - kept, rel=1e-6)
    plain = fm.EMA(torch.nn.Linear(1, 1, bias=False).requires_grad_(False), 0.999,
                   warmup=False)
    plain.shadow["weight"].zero_()
    for _ in range(3):
        plain.update(model)
    assert plain.shadow["weight"].item() == pytest.approx(1 - 0.999**3, rel=1e-6)


def _labels_seen(label_dropout: float) -> torch.Tensor:
    """Labels the model receives during a short conditional training run."""
    torch.manual_seed(0)
    model = build_model("tiny", num_classes=3)
    seen = []
    model.register_forward_pre_hook(lambda mod, args: seen.append(args[2]["label"].clone()))
    fm.train(model, torch.rand(16, 1, 16, 16) * 2 - 1, steps=4, batch_size=16, seed=2,
             labels=torch.arange(16) % 3, label_dropout=label_dropout)
    return torch.cat(seen)


def test_train_label_dropout_feeds_the_null_label():
    assert (_labels_seen(0.0) < 3).all()
    dropped = (_labels_seen(0.5) == 3).float().mean().item()
    assert 0.3 < dropped < 0.7
    with pytest.raises(ValueError, match="label_dropout"):
        fm.train(build_model("tiny"), torch.zeros(4, 1, 16, 16), steps=1, label_dropout=0.1)
    with pytest.raises(ValueError, match="label_dropout"):
        fm.train(build_model("tiny", num_classes=3), torch.zeros(4, 1, 16, 16), steps=1,
                 labels=torch.zeros(4, dtype=torch.long), label_dropout=1.0)


def test_lazy_imports():
    import subprocess
    import sys

    code = (
        "import sys, otq_kernels.fm, otq_kernels.models, otq_kernels.data, "
        "otq_kernels.metrics.fidelity, otq_kernels.metrics.latent; "
        "bad = [m for m in ('flow_matching', 'torchmetrics', 'sklearn', 'skimage') "
        "if m in sys.modules]; assert not bad, bad"
    )
    root = __file__.rsplit("/tests/", 1)[0]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# ------------------------------------------------ pinned by a mutation campaign (session 70)
def test_intermediates_need_a_fixed_step_method():
    """An adaptive method has no step grid to return: a ValueError, not a [2, ...] pair."""
    with pytest.raises(ValueError, match="return_intermediates needs a fixed-step method"):
        fm.sample(_model(), fm.make_noise((1, 1, 16, 16), seed=0), method="dopri5",
                  return_intermediates=True)


def test_train_calls_back_with_the_mean_loss_of_each_log_window():
    torch.manual_seed(0)
    calls = []
    losses = fm.train(build_model("tiny"), torch.rand(8, 1, 16, 16) * 2 - 1, steps=4,
                      batch_size=2, log_every=2, callback=lambda s, l: calls.append((s, l)))
    assert [s for s, _ in calls] == [2, 4]
    assert calls[0][1] == pytest.approx(sum(losses[:2]) / 2)
    assert calls[1][1] == pytest.approx(sum(losses[2:]) / 2)


def test_an_adaptive_method_integrates_from_t_0():
    """dopri5 (its time grid [0, 1]) lands where 8 rk4 steps over [0, 1] do."""
    model, x0 = _model(), fm.make_noise((1, 1, 16, 16), seed=0)
    torch.testing.assert_close(fm.sample(model, x0, method="dopri5"),
                               fm.sample(model, x0, steps=8, method="rk4"), rtol=0, atol=1e-3)


def test_lr_schedule_warms_up_then_follows_a_half_cosine():
    import math

    cosine = [fm._lr_factor(s, 10, 2, "cosine") for s in range(10)]
    assert cosine[:3] == [0.5, 1.0, 1.0] and cosine[6] == pytest.approx(0.5)
    assert cosine[9] == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert all(a > b for a, b in zip(cosine[2:], cosine[3:], strict=False))
    assert [fm._lr_factor(s, 10, 2, "constant") for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_train_sets_the_scheduled_lr_before_each_step(monkeypatch):
    seen, step = [], torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    fm.train(build_model("tiny"), torch.zeros(4, 1, 16, 16), steps=4, batch_size=2, lr=0.1,
             warmup=2, schedule="cosine")
    assert seen == pytest.approx([0.05, 0.1, 0.1, 0.05])


def test_train_leaves_the_ema_weights_in_the_model():
    """One update at decay 0.5 (no warm-up): the model ends as the mean of its initial
    and its trained weights."""
    data, runs = torch.rand(8, 1, 16, 16) * 2 - 1, []
    for ema_decay in (None, 0.5):
        torch.manual_seed(0)
        model = build_model("tiny")
        fm.train(model, data, steps=1, batch_size=4, seed=1, ema_decay=ema_decay,
                 ema_warmup=False)
        runs.append(model.state_dict())
    torch.manual_seed(0)
    init = build_model("tiny").state_dict()
    name = "out.2.weight"  # (the zero-initialised output conv: the first step's gradient)
    assert not torch.equal(runs[0][name], init[name])
    for name, value in init.items():
        if value.is_floating_point():
            torch.testing.assert_close(runs[1][name], (value + runs[0][name]) / 2)
