"""Quantized layers: ``QuantLinear``, ``QuantConv1d``, ``QuantConv2d``.

They hold a weight in the canonical packed format (DESIGN §2): bit planes as int32 buffers
``plane0, plane1, ...`` and the float32 ``codebook`` buffer, so ``.to(device)``,
``state_dict()`` and ``load_state_dict()`` work as for any module. The bias stays a float
parameter. Forward passes go through :func:`otq_kernels.ops.codebook_linear` /
:func:`~otq_kernels.ops.codebook_conv2d` with the module's ``backend`` ("auto" = the
fastest available). Activations keep their dtype (fp32 on CPU, fp16/bf16 on GPU; under
``torch.autocast`` autocast's, as for nn.Linear); the codebook buffer stays float32 even
after ``model.half()``.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from . import backends, ops
from .backends.dequant import dense_weight
from .format import QuantizedTensor, check_float_dtype, integer_value
from .metrics.weights import weight_error
from .quantizers import check_options, check_weight, fit_codebook
from .sharing import converted, memory_key


def _computed_tensor(hook) -> str | None:
    """The name of the tensor a forward pre-hook computes from others (the legacy
    ``weight_norm``/``spectral_norm`` hooks, ``torch.nn.utils.prune``), else None."""
    if isinstance(hook, (WeightNorm, SpectralNorm)):
        return hook.name
    prune = sys.modules.get("torch.nn.utils.prune")  # (not imported: nothing is pruned)
    if prune and isinstance(hook, prune.BasePruningMethod):
        return hook._tensor_name
    return None


def computed_tensors(module: nn.Module) -> list[str]:
    """The names of the tensors ``module``'s forward pre-hooks compute (pruning, the
    legacy weight/spectral norm)."""
    return [name for hook in module._forward_pre_hooks.values()
            if (name := _computed_tensor(hook))]


def float_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor | None:
    """The ``weight`` (or ``bias``) a float layer computes with, in its original shape.

    ``getattr(module, name)``, which evaluates a ``torch.nn.utils.parametrize``
    parametrization (``parametrizations.weight_norm``, ``spectral_norm``, ...), except
    under the legacy hook-based ``weight_norm``/``spectral_norm`` and under
    ``torch.nn.utils.prune``: there the attribute is only refreshed by a forward call
    (stale after a ``load_state_dict``), so their hook computes it.
    """
    for hook in module._forward_pre_hooks.values():
        if _computed_tensor(hook) != name:
            continue
        if isinstance(hook, WeightNorm):
            return hook.compute_weight(module)
        if isinstance(hook, SpectralNorm):
            return hook.compute_weight(module, do_power_iteration=False)
        return hook.apply_mask(module)
    return getattr(module, name)


# nn.Module's attributes that hold its forward/backward hooks (and how its backward hooks
# were registered).
HOOK_ATTRIBUTES = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
                   "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                   "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook")


STATE_LAYOUT = "otq_layout"  # keys of a quantized layer's state-dict metadata entries
STATE_FIT = "otq_fit"


def _take_hooks(layer: nn.Module, module: nn.Module, share: bool) -> None:
    """Give ``layer`` the forward and backward hooks of ``module``, less the hooks that
    compute the float weight or bias (the quantized layer holds them computed). ``share``
    (``layer`` replaces ``module``): the same dicts, so that their handles still remove
    them (and a hook registered on the discarded ``module`` later reaches ``layer`` too);
    else copies, as for two modules that both live on (a hook added to one stays its)."""
    for attr in HOOK_ATTRIBUTES:
        hooks = getattr(module, attr)  # (a dict, or _is_full_backward_hook's None/bool)
        copy = not share and isinstance(hooks, dict)
        setattr(layer, attr, type(hooks)(hooks) if copy else hooks)
    pre_hooks = module._forward_pre_hooks
    if any(_computed_tensor(hook) for hook in pre_hooks.values()):
        layer._forward_pre_hooks = OrderedDict(
            (key, hook) for key, hook in pre_hooks.items() if not _computed_tensor(hook))


# ----------------------------------------------------------------------------- base
def _normal(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous, as a normal tensor (a copy only of an inference tensor)."""
    return t.clone(memory_format=torch.contiguous_format) if t.is_inference() else t.contiguous()


def _buffer(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` as a buffer of ``dtype``: ``t`` itself where it is one already (so a layer
    sharing another's codes, tied weights, holds the very same tensors, as torch ties
    parameters), else a detached contiguous normal tensor of it."""
    if (type(t) is torch.Tensor and t.dtype == dtype and t.is_contiguous()
            and not (t.requires_grad or t.is_inference())):
        return t
    return _normal(t.detach().to(dtype))


def _kept_dtype(t: torch.Tensor, applied: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``applied`` (a conversion of ``t``) if it is still ``dtype``, else ``t`` moved to
    ``applied``'s device."""
    return applied if applied.dtype == dtype else t.to(applied.device)


def _code_dtype_error(given: torch.Tensor, dtype: torch.dtype, assign: bool) -> str | None:
    """Why a state dict's ``given`` cannot load into a buffer of ``dtype`` (int32 planes,
    the float32 codebook), or None: a copy casts (an integer plane keeps its bits, a float
    one would round codes), ``assign=True`` would keep a dtype no kernel takes."""
    if assign and given.dtype != dtype:
        return (f"load_state_dict(assign=True) takes it as {dtype} only (got {given.dtype}): "
                "convert it, or load without assign")
    if (given.dtype == torch.bool or given.is_complex()
            or given.is_floating_point() != dtype.is_floating_point):
        return f"a {dtype} buffer cannot take {given.dtype} values"
    return None


def _code_shape_error(given: torch.Tensor, own: torch.Tensor | None) -> str | None:
    """Why ``given`` cannot load into the code buffer ``own`` for its shape (the layer then
    loads no code at all: the rest would put one layer's codes on another's codebook)."""
    if own is None or given.shape == own.shape:
        return None
    return (f"size mismatch: copying a buffer of shape {list(given.shape)}, the shape in "
            f"this layer is {list(own.shape)} (no code loaded)")


def _check_finite_codebook(codebook: torch.Tensor) -> None:
    """A NaN/Inf codebook entry would give NaN outputs without an error: refuse it here,
    once per layer (a meta skeleton's codebook has no values to check)."""
    if codebook.device.type != "meta" and not bool(torch.isfinite(codebook).all()):
        bad = int((~torch.isfinite(codebook)).sum())
        raise ValueError(f"the codebook {list(codebook.shape)} has {bad} NaN/Inf entries")


def dense_dtype(layer: _QuantModule, model: nn.Module) -> torch.dtype:
    """The dtype quantized ``layer``'s dense form takes in ``model``: its bias's, else the
    model's first floating-point parameter's, else float32 (what torch's load_state_dict
    keeps, and what dequantize_model gives)."""
    if layer.bias is not None:
        return layer.bias.dtype
    return next((p.dtype for p in model.parameters() if p.is_floating_point()),
                torch.float32)


def check_bias(bias, n: int) -> None:
    """ValueError unless ``bias`` is None or a float tensor [n] that holds values."""
    if bias is not None and not (isinstance(bias, torch.Tensor)
                                 and bias.is_floating_point() and bias.shape == (n,)):
        raise ValueError(f"bias must be None or a float tensor [{n}], got "
                         f"{getattr(bias, 'dtype', type(bias).__name__)} "
                         f"{list(getattr(bias, 'shape', []))}")
    if bias is not None and bias.is_meta:
        raise ValueError("bias is on the meta device (it holds no values): load or "
                         "initialise it before quantizing")


class _QuantModule(nn.Module):
    """Shared storage: planes/codebook buffers, float bias, cached QuantizedTensor views."""

    FLOAT_TYPE: type[nn.Module] = nn.Module

    def _init_storage(self, qt: QuantizedTensor, bias: torch.Tensor | None, backend: str):
        """Buffers and bias of ``qt``: normal tensors even under ``torch.inference_mode``
        (inference tensors could not be loaded into later, nor feed an input gradient)."""
        _check_finite_codebook(qt.codebook)
        check_bias(bias, qt.shape[0] if len(qt.shape) > 1 else 1)
        self.bits, self.granularity, self.method = qt.bits, qt.granularity, qt.method
        self.weight_shape = tuple(qt.shape)
        self.backend = self.check_backend(backend, qt.bits, self._layout(self))
        self.stats: dict = {}
        self.num_planes = len(qt.planes)
        with torch.inference_mode(False):
            for i, plane in enumerate(qt.planes):
                self.register_buffer(f"plane{i}", _buffer(plane, torch.int32))
            self.register_buffer("codebook", _buffer(qt.codebook, torch.float32))
            if bias is None:
                self.register_parameter("bias", None)
            else:
                device = qt.codebook.device
                self.bias = nn.Parameter(bias.detach().clone().to(device), requires_grad=False)
        self._cache: dict = {}
        self._refill_cache()

    def __getattr__(self, name: str):
        if name == "weight":  # what bitsandbytes/torchao layers keep; say where ours is
            raise AttributeError(
                f"{type(self).__name__} has no dense .weight: its weight is stored packed. "
                f".qweight is the QuantizedTensor, .dequantize(dtype) the dense weight "
                f"{list(self.weight_shape)}, .weight_shape its shape")
        return super().__getattr__(name)

    # -- storage views ---------------------------------------------------------------
    def _planes(self) -> list[torch.Tensor]:
        buffers = self._buffers  # (read directly: nn.Module.__getattr__ costs ~0.5 µs a name)
        try:
            return [buffers[f"plane{i}"] for i in range(self.num_planes)]
        except KeyError as err:
            raise self._codes_moved(err.args[0]) from None

    def _codebook(self) -> torch.Tensor:
        try:
            return self._buffers["codebook"]
        except KeyError:
            raise self._codes_moved("codebook") from None

    def _codes_moved(self, name: str) -> RuntimeError:
        """The error for codes no longer in the buffers (torch's parametrize moves what it
        parametrizes into ``parametrizations``; a computed codebook or plane would bypass
        its checks and the cached runtime layouts)."""
        return RuntimeError(f"{type(self).__name__}: its {name!r} is no longer a buffer "
                            "(parametrized, or deleted); the codes must stay buffers: "
                            "torch.nn.utils.parametrize.remove_parametrizations(layer, "
                            f"{name!r}, leave_parametrized=False) restores it")

    def _cached(self, key: str, shape: tuple[int, ...], keep: bool = False) -> QuantizedTensor:
        """QuantizedTensor over the current buffers with ``shape`` (rebuilt when they
        change). It is kept where ``keep`` (:meth:`_refill_cache`: the buffers are the
        layer's own) or where the same tensors were read at the last build too (a buffer
        assigned for good, as accelerate's device moves do); not the tensors of one call
        (``torch.func.functional_call``, an offload hook's copies: they stayed referenced),
        of a trace, vmap's batched ones and tensors that require grad (a layer holding
        those could not be copied or pickled)."""
        tensors = (*self._planes(), self._codebook())
        hit = self._cache.get(key)
        if hit is not None and all(a is b for a, b in zip(hit[0], tensors, strict=True)):
            return hit[1]
        qt = QuantizedTensor(list(tensors[:-1]), tensors[-1], self.bits, shape,
                             self.granularity, self.method)
        self._cache.pop(key, None)
        if (not torch.compiler.is_compiling() and all(map(_keepable, tensors))
                and (keep or _built_before(self, key, tensors))):
            self._cache[key] = (tensors, qt)
        return qt

    def _views(self) -> dict[str, tuple[int, ...]]:
        """{cache key: shape} of the QuantizedTensor views ``forward`` reads."""
        return {"canonical": self.weight_shape}

    def _refill_cache(self) -> None:
        """Drop the views of old buffers and make those of the current ones, so that the
        first call reads the buffers as every later one does (``torch.jit.trace``'s check
        compares two traces of one model: a view made inside the first one read them in
        another order, and the check failed)."""
        self._cache.clear()
        if self._codes_stored():
            for key, shape in self._views().items():
                self._cached(key, shape, keep=True)

    @property
    def qweight(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor of the float layer's weight shape."""
        return self._cached("canonical", self.weight_shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense float weight of the original shape (e.g. [N, C/g, KH, KW]), expanded by a
        native kernel where one runs (bit-exact with ``qweight.dequantize``, whose int64
        temporaries take about 8x the weight's fp32 size)."""
        check_float_dtype(dtype)
        return dense_weight(self.qweight, dtype)

    @property
    def bits_per_weight(self) -> float:
        """Storage bits per weight, codebooks and row padding included (bias excluded)."""
        return self.qweight.bits_per_weight

    @property
    def nbytes(self) -> int:
        """Bytes of the packed weight (planes + fp32 codebook)."""
        return self.qweight.nbytes

    # -- torch plumbing --------------------------------------------------------------
    def __prepare_scriptable__(self):
        """``torch.jit.script`` asks this first: refuse before it half-compiles the class
        (its errors were unclear and changed on a second attempt)."""
        raise RuntimeError(f"torch.jit.script cannot compile {type(self).__name__} (its "
                           "QuantizedTensor views are Python objects); use torch.jit.trace, "
                           "torch.export or torch.compile")

    def _apply(self, fn, recurse=True):
        """Keep the planes int32 and the codebook float32, values unchanged, under
        .half()/.to(dtype) and ``.type(dtype)`` (which casts every buffer: a plane cast to
        a float would lose its codes): such a buffer is kept, moved where ``fn`` put the
        cast one. Codes another layer shares (tied weights) get the same converted tensor
        as there (:func:`~otq_kernels.sharing.converted`), so they stay shared."""
        dtypes = {id(self._buffers[name]): dtype for name, dtype in self._code_dtypes().items()
                  if name in self._buffers}  # (a parametrized one is not)

        def convert(t: torch.Tensor) -> torch.Tensor:
            dtype = dtypes.get(id(t))
            if dtype is None:
                return fn(t)
            return converted(fn, t, lambda t: _kept_dtype(t, fn(t), dtype))

        out = super()._apply(convert, recurse)
        self._refill_cache()
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """The tensors, and in the state dict's per-module metadata (not saved in files) the
        weight's shape, bits and granularity, which the planes cannot show (a K within the
        same 32 columns packs to the same plane shape), and the method and error stats
        that describe these codes."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        metadata = getattr(destination, "_metadata", None)
        if metadata is not None and prefix[:-1] in metadata:
            metadata[prefix[:-1]][STATE_LAYOUT] = self._state_layout()
            metadata[prefix[:-1]][STATE_FIT] = {"method": self.method, "stats": dict(self.stats)}

    def _state_layout(self) -> list:
        return [self.bits, self.granularity, list(self.weight_shape)]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Load as any module does, refusing (one of torch's load errors, this layer left
        as it was) a state dict of a quantized layer of another weight shape, bit width or
        granularity (where its metadata says so: a dict from ``state_dict()``), with a
        NaN/Inf codebook, or codes of a kind the buffers cannot take (see
        :meth:`_code_dtype_error`). Codes loaded with their metadata bring their method
        and error stats (those of the codes they replace were kept, and so reported)."""
        metadata = local_metadata or {}
        theirs = metadata.get(STATE_LAYOUT)
        if theirs is not None and theirs != self._state_layout():
            error_msgs.append(f"{prefix[:-1]}: the state dict holds a quantized layer of bits, "
                              f"granularity, weight shape {theirs}; this one is "
                              f"{self._state_layout()}")
            return
        assign = bool(metadata.get("assign_to_params_buffers", False))
        for name, dtype in self._code_dtypes().items():
            given = state_dict.get(prefix + name)
            error = isinstance(given, torch.Tensor) and (
                _code_dtype_error(given, dtype, assign)
                or _code_shape_error(given, self._buffers.get(name)))
            if error:
                error_msgs.append(f"{prefix}{name}: {error}")
                return
        codebook = state_dict.get(f"{prefix}codebook")
        try:
            if isinstance(codebook, torch.Tensor):
                _check_finite_codebook(codebook)
        except ValueError as err:
            error_msgs.append(f"{prefix}codebook: {err}")
            return
        errors = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        fit = metadata.get(STATE_FIT)
        if (len(error_msgs) == errors and isinstance(fit, dict)
                and isinstance(fit.get("method"), str) and isinstance(fit.get("stats"), dict)):
            self.method, self.stats = fit["method"], dict(fit["stats"])
        self._refill_cache()  # (after the method: .qweight carries it)

    def _code_dtypes(self) -> dict[str, torch.dtype]:
        return {**{f"plane{i}": torch.int32 for i in range(self.num_planes)},
                "codebook": torch.float32}

    def codes_key(self) -> tuple:
        """Equal for two layers exactly when they hold the same codes: the same views of
        the same memory for every plane and the codebook, and one weight shape (tied
        weights); layers sharing only a codebook differ."""
        return (tuple(memory_key(t) for t in (*self._planes(), self._codebook())),
                tuple(self.weight_shape))

    def _codes_stored(self) -> bool:
        """Whether every plane and the codebook are buffers (not parametrized away)."""
        return all(name in self._buffers for name in self._code_dtypes())

    def _storage_repr(self) -> str:
        bpw = f"{self.bits_per_weight:.3f}" if self._codes_stored() else "? (codes moved)"
        return (f"bits={self.bits}, method={self.method!r}, granularity={self.granularity!r}, "
                f"bits_per_weight={bpw}, backend={self.backend!r}")

    @staticmethod
    def _fit(weight: torch.Tensor, bits, method, granularity, module) -> QuantizedTensor:
        try:
            check_options(bits, method, granularity, "rank")
        except ValueError as err:
            raise ValueError(f"{type(module).__name__}: {err}") from None
        if weight.dtype == torch.float64:  # (past float32's range: said so, not "Inf")
            check_weight(weight)
        return fit_codebook(weight.detach().float(), bits, method, granularity)

    def _set_stats(self, weight: torch.Tensor) -> None:
        """The error of the codes against ``weight`` as it is (a float64 weight's own
        values: those float32 cannot hold count)."""
        self.stats = weight_error(weight.detach(), self.dequantize())

    @staticmethod
    def _layout(module: nn.Module) -> dict:
        """Constructor keywords taken from the float layer besides weight and bias (a
        conv's geometry)."""
        return {}

    @classmethod
    def check_backend(cls, backend, bits: int, layout: dict) -> str:
        """``backend`` if it is "auto" or a backend with a kernel for this layer type with
        ``bits``-bit codes and ``layout`` (:meth:`_layout`), else a ValueError: caught when
        the layer is made, not at its first call."""
        return backends.check_name(backend)

    @classmethod
    def replacing(cls, module: nn.Module, qt: QuantizedTensor, bias: torch.Tensor | None,
                  backend: str, share_hooks: bool = True) -> _QuantModule:
        """A layer of ``qt`` to put in place of ``module``: its geometry, train/eval mode
        and hooks (``share_hooks``: its very hook dicts, see :func:`_take_hooks`)."""
        layer = cls(qt, bias, backend, **cls._layout(module)).train(module.training)
        _take_hooks(layer, module, share_hooks)
        return layer

    def to_float(self, dtype: torch.dtype | None = None, share_hooks: bool = False
                 ) -> nn.Module:
        """The ``FLOAT_TYPE`` layer of the dequantized weight (``dtype``: default the bias's,
        float32 without one) and this bias, on this device, in this train/eval mode, with
        these hooks (copies; ``share_hooks``, for a swap: the same dicts): the inverse of
        :meth:`from_float` up to the quantization error."""
        dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
        check_float_dtype(dtype)
        layer = self.float_shell(dtype, self.codebook.device, share_hooks)
        with torch.no_grad():
            layer.weight.copy_(self.dequantize(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    def float_shell(self, dtype: torch.dtype, device, share_hooks: bool = False
                    ) -> nn.Module:
        """The ``FLOAT_TYPE`` layer of this geometry, bias, train/eval mode and hooks, its
        tensors uninitialised on ``device`` (meta: none): what :meth:`to_float` fills, and
        what a checkpoint that kept this layer float loads into."""
        with torch.device("meta"):  # shapes only: the weights come from elsewhere
            layer = self.FLOAT_TYPE(**self._float_layout(), bias=self.bias is not None,
                                    dtype=dtype)
        layer = layer.to_empty(device=device).train(self.training)
        _take_hooks(layer, self, share_hooks)
        return layer

    def _float_layout(self) -> dict:
        """The ``FLOAT_TYPE`` constructor's keywords besides bias (a conv's geometry, read
        from this layer as :meth:`_layout` reads it from the float one)."""
        return self._layout(self)

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 4, method: str = "ot",
                   granularity: str = "channel", backend: str = "auto",
                   share_hooks: bool = False) -> _QuantModule:
        """Quantize a float layer of ``FLOAT_TYPE`` (its weight is fitted once; the module
        is left untouched). The layer takes copies of its hooks (``share_hooks``, for a
        swap: the same dicts, as ``quantize_model`` does)."""
        _check_type(module, cls.FLOAT_TYPE)
        cls.check_backend(backend, check_options(bits, method, granularity, "rank"),
                          cls._layout(module))
        weight = float_tensor(module)
        qt = cls._fit(weight, bits, method, granularity, module)
        layer = cls.replacing(module, qt, float_tensor(module, "bias"), backend, share_hooks)
        layer._set_stats(weight)
        return layer


def _check_type(module: nn.Module, cls: type[nn.Module]) -> None:
    if not isinstance(module, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(module).__name__}")


# ----------------------------------------------------------------------------- linear
class QuantLinear(_QuantModule):
    """Linear layer with a codebook weight [out_features, in_features].

    forward: x [..., in_features] -> [..., out_features] (x.dtype).
    """

    FLOAT_TYPE = nn.Linear

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 backend: str = "auto"):
        super().__init__()
        if len(qt.shape) != 2:
            raise ValueError(f"QuantLinear needs a 2-D weight, got shape {list(qt.shape)}")
        self.out_features, self.in_features = qt.shape
        self._init_storage(qt, bias, backend)

    def _float_layout(self) -> dict:
        return {"in_features": self.in_features, "out_features": self.out_features}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> [..., N]."""
        return ops.codebook_linear(x, self.qweight, self.bias, self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self._storage_repr()}")


# ----------------------------------------------------------------------------- conv
def _tuple(v, n: int) -> tuple[int, ...]:
    """An int or n ints as n ints; ValueError for anything else (2.5 or "2" included)."""
    values = tuple(v) if isinstance(v, (tuple, list)) else (v,) * n
    ints = tuple(integer_value(a) for a in values)
    if len(ints) != n or None in ints:
        raise ValueError(f"expected an integer or {n} integers, got {v!r}")
    return ints


PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _check_geometry(cfg: dict, weight_shape: tuple[int, ...]) -> None:
    """ValueError naming the first conv argument that does not fit the weight [N, C/g, ...]
    or that nn.Conv*d would refuse."""
    n, per_group = weight_shape[:2]
    groups = cfg["groups"]
    if any(s < 1 for s in cfg["stride"]) or any(d < 1 for d in cfg["dilation"]):
        raise ValueError(f"stride {cfg['stride']} and dilation {cfg['dilation']} must be >= 1")
    if not isinstance(cfg["padding"], str) and any(p < 0 for p in cfg["padding"]):
        raise ValueError(f"padding {cfg['padding']} must be >= 0")
    if cfg["padding_mode"] not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got "
                         f"{cfg['padding_mode']!r}")
    if groups < 1 or n % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {n} output channels")
    if (cfg["in_channels"], cfg["out_channels"]) != (per_group * groups, n):
        raise ValueError(f"in_channels={cfg['in_channels']}, out_channels="
                         f"{cfg['out_channels']} do not fit the weight {list(weight_shape)} "
                         f"with groups={groups} (expected {per_group * groups}, {n})")


def _resolve_padding(padding, padding_mode: str, kernel, dilation):
    """(pre_pad for F.pad or None, F.pad mode, conv padding per dim).

    Handles int/tuple padding, "valid", "same" (asymmetric when the kernel extent is even)
    and non-zero padding modes, like nn.Conv*d does.
    """
    dims = len(kernel)
    if padding == "valid":
        pairs = [(0, 0)] * dims
    elif padding == "same":
        pairs = []
        for k, d in zip(kernel, dilation, strict=True):
            total = d * (k - 1)
            pairs.append((total // 2, total - total // 2))
    else:
        pairs = [(p, p) for p in _tuple(padding, dims)]
    symmetric = all(a == b for a, b in pairs)
    if padding_mode == "zeros" and symmetric:
        return None, "constant", tuple(a for a, _ in pairs)
    pre = tuple(v for pair in reversed(pairs) for v in pair)  # F.pad: last dim first
    mode = "constant" if padding_mode == "zeros" else padding_mode
    return pre, mode, (0,) * dims


# The backends with a conv kernel (auto picks among them per call).
CONV_BACKENDS = ("reference", "dequant", "triton", "cuda")


def _pointwise(kernel_size, stride, groups, pre_pad, conv_padding) -> bool:
    """Whether a Conv1d geometry is a plain linear map over channels."""
    return (kernel_size == (1,) and stride == (1,) and groups == 1 and pre_pad is None
            and conv_padding == (0,))


class _QuantConv(_QuantModule):
    """Common conv state: geometry copied from the float conv."""

    def _init_conv(self, module_cfg: dict, weight_shape: tuple[int, ...]) -> None:
        groups = integer_value(module_cfg["groups"])
        if groups is None:
            raise ValueError(f"groups must be an integer, got {module_cfg['groups']!r}")
        module_cfg = {**module_cfg, "groups": groups}
        _check_geometry(module_cfg, weight_shape)
        self.in_channels = module_cfg["in_channels"]
        self.out_channels = module_cfg["out_channels"]
        self.kernel_size = module_cfg["kernel_size"]
        self.stride = module_cfg["stride"]
        self.padding = module_cfg["padding"]
        self.dilation = module_cfg["dilation"]
        self.groups = module_cfg["groups"]
        self.padding_mode = module_cfg["padding_mode"]
        self._pre_pad, self._pad_mode, self._conv_padding = _resolve_padding(
            self.padding, self.padding_mode, self.kernel_size, self.dilation)

    @staticmethod
    def _layout(module) -> dict:
        return {k: getattr(module, k) for k in ("in_channels", "out_channels", "kernel_size",
                                                "stride", "padding", "dilation", "groups",
                                                "padding_mode")}

    @classmethod
    def check_backend(cls, backend, bits: int, layout: dict) -> str:
        """A named backend must have a conv kernel that takes these bits and groups (for
        some activation dtype), unless the conv runs as a linear layer."""
        name = super().check_backend(backend, bits, layout)
        if name in ("auto", "reference") or cls._runs_as_linear(layout):
            return name
        if not hasattr(backends.get(name), "conv2d"):
            raise ValueError(f"backend {name!r} has no conv kernel (it runs Linear layers "
                             f"and pointwise Conv1d only); choose 'auto' or one of "
                             f"{CONV_BACKENDS} for convs")
        dtypes = (torch.float32, torch.float16, torch.bfloat16)
        if not any(ops.conv_kernel_takes(name, d, bits, layout["groups"]) for d in dtypes):
            others = [b for b in CONV_BACKENDS if b != name]
            raise ValueError(f"the conv kernel of backend {name!r} does not take {bits}-bit "
                             f"codes with groups={layout['groups']}; choose 'auto' or one of "
                             f"{others}")
        return name

    @staticmethod
    def _runs_as_linear(layout: dict) -> bool:
        """Whether a conv of this ``layout`` may run as a linear layer (pointwise Conv1d)."""
        return False

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._pre_pad is None else F.pad(x, self._pre_pad, mode=self._pad_mode)

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
             f"stride={self.stride}")
        if self.padding not in (0, (0,), (0, 0)):
            s += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode!r}"
        return s + f", bias={self.bias is not None}, {self._storage_repr()}"


class QuantConv2d(_QuantConv):
    """Conv2d with a codebook weight [out, in/groups, KH, KW].

    forward: x [B, C_in, H, W] -> [B, C_out, OH, OW] (x.dtype).
    """

    FLOAT_TYPE = nn.Conv2d

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 backend: str = "auto", stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", in_channels: int | None = None,
                 out_channels: int | None = None, kernel_size=None):
        super().__init__()
        if len(qt.shape) != 4:
            raise ValueError(f"QuantConv2d needs a 4-D weight, got shape {list(qt.shape)}")
        n, c, kh, kw = qt.shape
        self._init_conv(dict(
            in_channels=in_channels or c * (integer_value(groups) or 1),
            out_channels=out_channels or n,
            kernel_size=(kh, kw), stride=_tuple(stride, 2),
            padding=padding if isinstance(padding, str) else _tuple(padding, 2),
            dilation=_tuple(dilation, 2), groups=groups, padding_mode=padding_mode), qt.shape)
        self._init_storage(qt, bias, backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W] -> [B, N, OH, OW]; unbatched x [C, H, W] -> [N, OH, OW]."""
        if x.dim() == 3:  # as nn.Conv2d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 4:
            raise ValueError(f"QuantConv2d expects x [B, C, H, W] or [C, H, W], got shape "
                             f"{list(x.shape)}")
        return ops.codebook_conv2d(self._pad(x), self.qweight, self.bias, self.stride,
                                   self._conv_padding, self.dilation, self.groups, self.backend)


class QuantConv1d(_QuantConv):
    """Conv1d with a codebook weight [out, in/groups, k].

    forward: x [B, C_in, L] -> [B, C_out, L_out] (x.dtype). Convs run as a 1×k conv2d on
    x.unsqueeze(2) [B, C, 1, L]. Pointwise ones (k = 1, stride 1, no padding, groups 1) run
    as a linear layer on x^T [B, L, C] instead where no conv kernel would run (a linear-only
    backend such as ``cpu``, or one whose conv kernel does not take x's dtype and the
    bits): the conv kernels read x in place, without the transposing copies.
    """

    FLOAT_TYPE = nn.Conv1d

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None,
                 backend: str = "auto", stride=1, padding=0, dilation=1, groups: int = 1,
                 padding_mode: str = "zeros", in_channels: int | None = None,
                 out_channels: int | None = None, kernel_size=None):
        super().__init__()
        if len(qt.shape) != 3:
            raise ValueError(f"QuantConv1d needs a 3-D weight, got shape {list(qt.shape)}")
        n, c, k = qt.shape
        self._init_conv(dict(
            in_channels=in_channels or c * (integer_value(groups) or 1),
            out_channels=out_channels or n,
            kernel_size=(k,), stride=_tuple(stride, 1),
            padding=padding if isinstance(padding, str) else _tuple(padding, 1),
            dilation=_tuple(dilation, 1), groups=groups, padding_mode=padding_mode), qt.shape)
        self._init_storage(qt, bias, backend)

    @property
    def pointwise(self) -> bool:
        """True when the conv is a plain linear map over channels."""
        return _pointwise(self.kernel_size, self.stride, self.groups, self._pre_pad,
                          self._conv_padding)

    @staticmethod
    def _runs_as_linear(layout: dict) -> bool:
        pre_pad, _, conv_padding = _resolve_padding(
            layout["padding"], layout["padding_mode"], _tuple(layout["kernel_size"], 1),
            _tuple(layout["dilation"], 1))
        return _pointwise(_tuple(layout["kernel_size"], 1), _tuple(layout["stride"], 1),
                          layout["groups"], pre_pad, conv_padding)

    def _views(self) -> dict[str, tuple[int, ...]]:
        n, c, k = self.weight_shape
        views = {**super()._views(), "conv2d": (n, c, 1, k)}
        return {**views, "linear": (n, c)} if self.pointwise else views

    def _conv_kernel_runs(self, x: torch.Tensor) -> bool:
        """Whether codebook_conv2d would run a conv kernel on x (not the reference) for
        this pointwise conv: one the backend has and that takes x's dtype and these bits
        (``conv2d_supports``)."""
        name = ops.resolve_backend(self.backend, "conv2d", x.device, x.shape[0] * x.shape[2],
                                   self.bits, kernel=(1, 1))
        if name == "auto":  # traced by torch.export: the conv op picks at run time
            return True
        return ops.conv_kernel_takes(name, ops.compute_dtype(x), self.bits, self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, L] -> [B, N, L_out]; unbatched x [C, L] -> [N, L_out]."""
        if x.dim() == 2:  # as nn.Conv1d takes it
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if x.dim() != 3:
            raise ValueError(f"QuantConv1d expects x [B, C, L] or [C, L], got shape "
                             f"{list(x.shape)}")
        n, c, k = self.weight_shape
        if self.pointwise and not self._conv_kernel_runs(x):
            y = ops.codebook_linear(x.transpose(1, 2), self._cached("linear", (n, c)),
                                    self.bias, self.backend)
            return y.transpose(1, 2)
        y = ops.codebook_conv2d(self._pad(x).unsqueeze(2), self._cached("conv2d", (n, c, 1, k)),
                                self.bias, (1, self.stride[0]), (0, self._conv_padding[0]),
                                (1, self.dilation[0]), self.groups, self.backend)
        return y.squeeze(2)


QUANT_TYPES: dict[type[nn.Module], type[_QuantModule]] = {
    nn.Linear: QuantLinear,
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
}


# The name prefixes those wrappers give a state dict: DataParallel/DDP hold the model as
# ``module``, torch.compile as ``_orig_mod``.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def bare_module(model: nn.Module, what: str, swaps: bool = False) -> nn.Module:
    """The module that ``torch.compile``, ``DataParallel`` and ``DistributedDataParallel``
    wrappers hold (its names carry no ``_orig_mod.`` / ``module.`` prefix), else ``model``
    itself; TypeError naming ``what`` (the caller) unless ``model`` is an nn.Module.

    swaps: ``what`` swaps layers; a warning where DDP wraps them, since DDP registered
    the parameters it synchronizes when it was made (the new layers' gradients would not
    be averaged across ranks, silently).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: the model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    if swaps:
        _check_reserved_names(model, what)
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")  # (none compiled before it)
    if eval_frame is not None and isinstance(model, eval_frame.OptimizedModule):
        return bare_module(model._orig_mod, what, swaps)
    if swaps and isinstance(model, nn.parallel.DistributedDataParallel):
        warnings.warn(f"{what}: the model is wrapped in DistributedDataParallel, which "
                      "synchronizes the parameters it had when it was made: those of the "
                      "swapped layers will not be (their gradients are not averaged across "
                      "ranks). Swap layers in the bare model, then wrap it.", stacklevel=3)
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        return bare_module(model.module, what, swaps)
    return model


# Attributes the swapping functions set on the model (and its wrappers).
RESERVED_ATTRIBUTES = ("otq_summary", "_otq_reasons")


def _check_reserved_names(model: nn.Module, what: str) -> None:
    """ValueError, before anything is swapped, where the model holds a submodule,
    parameter or buffer under a name ``what`` sets (it failed after every swap)."""
    for name in RESERVED_ATTRIBUTES:
        if any(name in held for held in (model._modules, model._parameters, model._buffers)):
            raise ValueError(f"{what}: the model holds a submodule, parameter or buffer named "
                             f"{name!r}, an attribute otq_kernels sets on the model: rename it")


def names_by_identity(named) -> dict[int, list[str]]:
    """id(object) -> its names, in order, from ``(name, object)`` pairs (a module, tensor
    or parameter reached under several names lists them all)."""
    names: dict[int, list[str]] = {}
    for name, obj in named:
        names.setdefault(id(obj), []).append(name)
    return names


# layer -> {view key: weak references to the tensors of the view it last built, not kept}
_LAST_BUILT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _built_before(layer: nn.Module, key: str, tensors: tuple) -> bool:
    """Whether ``layer``'s last build of view ``key`` read these same ``tensors`` (then
    forgotten); else they are remembered (weakly: nothing is kept alive by it)."""
    built = _LAST_BUILT.setdefault(layer, {})
    last = built.pop(key, None)
    if last is not None and all(ref() is t for ref, t in zip(last, tensors, strict=True)):
        return True
    built[key] = tuple(weakref.ref(t) for t in tensors)
    return False


def _keepable(t: torch.Tensor) -> bool:
    """Whether a layer may keep a view of ``t`` past the call: not vmap's (functorch's
    wrapper of a batch), not one that requires grad."""
    return not (t.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(t))


def containing_names(name: str) -> list[str]:
    """The names of the modules containing ``name`` ("a.b.c": "a", "a.b")."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every name under which ``model`` reaches it (``named_modules`` order).

    A module registered in several places (``self.b = self.a``) is one shared layer: it is
    replaced under all its names, or the model would run it quantized in one place and
    float in the others.
    """
    return names_by_identity(model.named_modules(remove_duplicate=False))


def replace_module(model: nn.Module, names: list[str], new: nn.Module) -> None:
    """Put ``new`` in ``model`` under each of ``names`` (a module's aliases), in place."""
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, new)


def quant_class_for(module: nn.Module) -> type[_QuantModule] | None:
    """The Quant* class that replaces ``module`` (None if its type is unsupported)."""
    for float_type, quant_type in QUANT_TYPES.items():
        if isinstance(module, float_type):
            return quant_type
    return None
