"""Flow Matching glue: velocity wrapper, ODE sampling and a small training loop.

Uses ``flow_matching`` (imported lazily, so the package imports without it):
``flow_matching.solver.ODESolver`` for sampling and ``flow_matching.path.CondOTProbPath``
(x_t = t·x1 + (1 − t)·x0, target dx_t = x1 − x0) for training. Noise x0 ~ N(0, I) at
t = 0, data x1 in [-1, 1] at t = 1.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

from .format import integer_value
from .graphs import CudaGraphed
from .models.unet import check_label_range, describe_value, is_class_indices

FIXED_STEP_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


# id(model) -> [blocks of evaluating(model) open, its modules' modes before the first]
_EVALUATING: dict[int, list] = {}
_EVALUATING_LOCK = threading.RLock()  # (re-entered where a module's eval() opens a block)


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; each submodule's own train/eval flag is
    restored after it (``model.train(flag)`` would give them all the top module's).
    Blocks on one model that overlap (nested, or threads sampling it) share one eval
    period: the first saves the modes, the last restores them (a thread's block ending
    put another's model back in train mode, dropout on, mid-sampling)."""
    with _EVALUATING_LOCK:
        entry = _EVALUATING.get(id(model)) or [0, [(m, m.training) for m in model.modules()]]
        try:
            model.eval()  # (in every block: a model set to train inside the first too)
        except BaseException:
            if not entry[0]:
                _restore_modes(entry[1])
            raise
        entry[0] += 1
        _EVALUATING[id(model)] = entry
    try:
        yield model
    finally:
        with _EVALUATING_LOCK:
            entry[0] -= 1
            if entry[0] == 0:
                del _EVALUATING[id(model)]
                _restore_modes(entry[1])


def _restore_modes(modes: list) -> None:
    for module, training in modes:
        module.training = training


def leaves_modes(fn: Callable) -> Callable:
    """Decorate ``fn(model, ...)`` to run the model in eval mode and leave its modes as
    they were (:func:`evaluating`)."""
    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        with evaluating(model):
            return fn(model, *args, **kwargs)
    return wrapper


class VelocityWrapper(nn.Module):
    """Adapt a ``model(x, t, extra)`` network to the solver's ``(x, t, **extras)`` call.

    The scalar solver time is broadcast to [B]; extras (e.g. ``label``) are passed in
    the ``extra`` dict. With ``cfg_scale`` w != 0 and a label, returns the
    classifier-free-guided velocity ``(1 + w)·v(x|label) − w·v(x|null)`` where the null
    label is ``model.num_classes``.
    """

    def __init__(self, model: nn.Module, cfg_scale: float = 0.0):
        super().__init__()
        self.model = model
        self.cfg_scale = cfg_scale

    def forward(self, x: torch.Tensor, t: torch.Tensor | float, **extras) -> torch.Tensor:
        """x [B, C, H, W], t scalar or [B] -> velocity [B, C, H, W]."""
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        label = extras.get("label")
        if self.cfg_scale == 0.0 or label is None:
            return self.model(x, t, extras)
        null = torch.full_like(label, self.model.num_classes)
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), {"label": torch.cat([label, null])})
        v_cond, v_null = v.chunk(2)
        return (1 + self.cfg_scale) * v_cond - self.cfg_scale * v_null


def make_noise(
    shape: Iterable[int],
    seed: int,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Reproducible x0 ~ N(0, I) of ``shape`` (drawn on CPU, then moved): same seed,
    same tensor on every device, for paired FP-vs-quantized comparisons."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32).to(device, dtype)


@torch.no_grad()
def sample(
    model: nn.Module,
    x0: torch.Tensor,
    steps: int = 50,
    method: str = "euler",
    atol: float = 1e-5,
    rtol: float = 1e-5,
    label: torch.Tensor | None = None,
    cfg_scale: float = 0.0,
    return_intermediates: bool = False,
    cuda_graph: bool = False,
) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from t = 0 (noise ``x0`` [B, C, H, W]) to t = 1.

    Fixed-step methods (euler, midpoint, heun2, ...) use ``step_size = 1 / steps``
    (NFE = steps × stages); adaptive ones (dopri5, ...) use ``atol``/``rtol``. The model
    is run in eval mode (restored afterwards). Returns x1 [B, C, H, W] (unclamped), or
    [steps + 1, B, C, H, W] with ``return_intermediates`` (fixed-step methods only).
    ``cuda_graph``: replay the velocity call from a CUDA graph (x0 on a GPU;
    :class:`otq_kernels.graphs.CudaGraphed`): at small batch the eager step is host-bound.
    """
    from flow_matching.solver import ODESolver

    check_solver(method, x0.dtype)
    fixed = method in FIXED_STEP_METHODS
    if fixed and not (integer_value(steps) or 0) >= 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    _check_label(model, x0, label, cfg_scale)
    extras = {} if label is None else {"label": label.to(x0.device)}
    if return_intermediates and not fixed:
        raise ValueError("return_intermediates needs a fixed-step method")
    # A fixed-step method steps through the grid itself: given step_size=1/steps,
    # torchdiffeq made ceil(1/float32(1/steps) + 1) points, one step too many for 67 of
    # the step counts 1..1000 (61, 109, ...).
    time_grid = (torch.linspace(0.0, 1.0, steps + 1, device=x0.device) if fixed
                 else torch.tensor([0.0, 1.0], device=x0.device))
    with evaluating(model):
        velocity = VelocityWrapper(model, cfg_scale)
        if cuda_graph:
            velocity = CudaGraphed(velocity)
        solver = ODESolver(velocity_model=velocity)
        return solver.sample(
            x_init=x0,
            step_size=None,
            method=method,
            atol=atol,
            rtol=rtol,
            time_grid=time_grid,
            return_intermediates=return_intermediates,
            **extras,
        )


def check_solver(method: str, dtype) -> None:
    """ValueError for an unknown method, or an adaptive one in float16/bfloat16 (``dtype``:
    a torch.dtype or its name): its tolerances (1e-5) are below their resolution, and the
    step size shrinks to zero (torchdiffeq's 'underflow in dt')."""
    if method not in FIXED_STEP_METHODS + ADAPTIVE_METHODS:
        raise ValueError(f"unknown method {method!r}; fixed-step: {FIXED_STEP_METHODS}, "
                         f"adaptive: {ADAPTIVE_METHODS}")
    name = str(dtype).removeprefix("torch.")
    if method in ADAPTIVE_METHODS and name in ("float16", "bfloat16"):
        raise ValueError(f"the adaptive method {method!r} needs float32 (its tolerances are "
                         f"below {name}'s resolution); use a fixed-step method in {name}")


def _check_label(model: nn.Module, x0: torch.Tensor, label, cfg_scale: float) -> None:
    """ValueError unless ``label`` is None or integer class indices [B] for x0's batch
    (0..num_classes where the model has ``num_classes``), and ``cfg_scale`` is 0 or comes
    with a label for a class-conditional model."""
    if label is not None and not is_class_indices(label, x0.shape[0]):
        raise ValueError(f"label must be an integer tensor [B] with B = {x0.shape[0]}, got "
                         f"{describe_value(label)}")
    classes = integer_value(getattr(model, "num_classes", None))
    if label is not None and classes is not None:  # (once here, not once per step)
        check_label_range(label, classes)
    if cfg_scale and (label is None or classes is None):
        raise ValueError("cfg_scale needs a label and a class-conditional model (num_classes): "
                         "guidance mixes in the velocity of the null class num_classes")


class EMA:
    """Exponential moving average of a model's floating-point state (weights + buffers).

    With ``warmup``, update n (from 0) uses the decay min(decay, (1 + n) / (10 + n)):
    without it the initial weights keep a share decay**n, 61% after 500 updates at 0.999.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.updates = 0
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.decay
        if self.warmup:
            decay = min(decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].lerp_(v, 1.0 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> None:
        model.load_state_dict(self.shadow)


def _lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def _null_label(model: nn.Module, labels: torch.Tensor | None, label_dropout: float) -> int:
    """The index dropped labels become (``model.num_classes``); checks ``label_dropout``."""
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
    if label_dropout == 0:
        return -1
    if labels is None or getattr(model, "num_classes", None) is None:
        raise ValueError("label_dropout needs labels and a class-conditional model "
                         "(model.num_classes)")
    return int(model.num_classes)


def train(
    model: nn.Module,
    data: torch.Tensor,
    steps: int,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    labels: torch.Tensor | None = None,
    weight_decay: float = 0.0,
    ema_decay: float | None = None,
    warmup: int = 0,
    schedule: str = "constant",
    grad_clip: float | None = 1.0,
    log_every: int = 0,
    callback: Callable[[int, float], None] | None = None,
    label_dropout: float = 0.0,
    ema_warmup: bool = True,
) -> list[float]:
    """Conditional-OT flow matching: minimise ||v(x_t, t) − (x1 − x0)||² with AdamW.

    ``data`` [N, C, H, W] in [-1, 1] (optionally ``labels`` [N] for conditional models).
    Each step draws a batch with replacement, t ~ U(0, 1) and x0 ~ N(0, I) from a
    generator seeded with ``seed`` (model init is the caller's). ``schedule``:
    'constant' or 'cosine' (after ``warmup`` linear steps). With ``ema_decay`` an EMA
    of the weights (with a warm-up of its decay unless ``ema_warmup`` is False,
    :class:`EMA`) is kept and copied into ``model`` at the end. Leaves the model in
    eval mode. With ``label_dropout`` p > 0 each label is replaced by the null label
    ``model.num_classes`` with probability p, so that classifier-free guidance has a
    trained unconditional branch. Returns the per-step losses.
    """
    from flow_matching.path import CondOTProbPath

    if schedule not in ("constant", "cosine"):
        raise ValueError("schedule must be 'constant' or 'cosine'")
    null_label = _null_label(model, labels, label_dropout)
    classes = integer_value(getattr(model, "num_classes", None))
    if classes is not None and is_class_indices(labels, len(data)):  # (once, not per step
        check_label_range(labels, classes)  # on a GPU, where the model reads no values)
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(int(seed))
    path = CondOTProbPath()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    ema = EMA(model, ema_decay, ema_warmup) if ema_decay else None
    model.train()
    losses: list[float] = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(step, steps, warmup, schedule)
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x1 = data[idx].to(device)
        x0 = torch.randn(x1.shape, generator=g).to(device)
        t = torch.rand(batch_size, generator=g).to(device)
        ps = path.sample(x_0=x0, x_1=x1, t=t)
        extra = {}
        if labels is not None:
            label = labels[idx].to(device)
            if label_dropout > 0:
                drop = torch.rand(batch_size, generator=g) < label_dropout
                label = label.masked_fill(drop.to(device), null_label)
            extra = {"label": label}
        loss = torch.mean((model(ps.x_t, ps.t, extra) - ps.dx_t) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        losses.append(loss.item())
        if callback is not None and log_every and (step + 1) % log_every == 0:
            callback(step + 1, sum(losses[-log_every:]) / log_every)
    if ema is not None:
        ema.copy_to(model)
    model.eval()
    return losses
