"""ADM-style UNet for Flow Matching velocity fields (written from scratch).

The module tree and parameter names match the ADM layout used by flow_matching's image
examples (``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``,
``output_blocks``, ``out``), so their checkpoints load with
:func:`otq_kernels.models.load_fm_checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..format import integer_value, is_number
from .layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    normalization,
    timestep_embedding,
    zero_module,
)


class UNetModel(nn.Module):
    """Velocity network v(x, t) on images.

    Args:
        in_channels / out_channels: image channels.
        model_channels: base width ``mc``; level ``i`` has ``mc·channel_mult[i]`` channels.
        num_res_blocks: ResBlocks per level in the encoder (decoder has one more).
        attention_resolutions: downsampling factors (1, 2, 4, ...) that get attention.
        dropout: dropout inside ResBlocks.
        channel_mult: width multipliers per level.
        conv_resample: learnable convs in Down/Upsample (else avg-pool / nearest).
        num_classes: class count for ``label_emb`` (an extra row, index ``num_classes``,
            is the null label for classifier-free guidance: a zero-initialised
            ``padding_idx`` row, also used when no label is passed); None = unconditional.
        num_heads / num_head_channels / num_heads_upsample: attention heads (a fixed
            head width wins when ``num_head_channels`` != -1).
        use_scale_shift_norm: FiLM conditioning in ResBlocks.
        resblock_updown: resample with ResBlocks instead of Down/Upsample.
        use_new_attention_order: qkv split order, see :class:`AttentionBlock`.
        image_size / dims / use_checkpoint / with_fourier_features: accepted so that the
            flow_matching examples' config dicts can be passed as they are; only 2-D,
            no Fourier features is built (``image_size`` and ``use_checkpoint`` are unused).
    """

    def __init__(
        self,
        in_channels: int = 1,
        model_channels: int = 32,
        out_channels: int = 1,
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (2,),
        dropout: float = 0.0,
        channel_mult: Sequence[float] = (1, 2),
        conv_resample: bool = True,
        num_classes: int | None = None,
        num_heads: int = 1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = True,
        resblock_updown: bool = False,
        use_new_attention_order: bool = True,
        image_size: int | None = None,
        dims: int = 2,
        use_checkpoint: bool = False,
        with_fourier_features: bool = False,
    ):
        super().__init__()
        if dims != 2 or with_fourier_features:
            raise ValueError("UNetModel builds 2-D models without Fourier features only "
                             f"(got dims={dims}, with_fourier_features={with_fourier_features})")
        _check_arguments(in_channels=in_channels, model_channels=model_channels,
                         out_channels=out_channels, num_res_blocks=num_res_blocks,
                         attention_resolutions=attention_resolutions,
                         channel_mult=channel_mult, num_classes=num_classes,
                         num_heads=num_heads, num_head_channels=num_head_channels,
                         num_heads_upsample=num_heads_upsample)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.model_channels = model_channels
        self.num_classes = num_classes
        self.channel_mult = tuple(channel_mult)
        self._attn = dict(num_head_channels=num_head_channels, new_order=use_new_attention_order)
        self._res = dict(dropout=dropout, use_scale_shift_norm=use_scale_shift_norm)
        self._heads_up = num_heads if num_heads_upsample == -1 else num_heads_upsample
        attention_resolutions = set(attention_resolutions)

        emb_dim = 4 * model_channels
        self.time_embed = nn.Sequential(
            nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes + 1, emb_dim, padding_idx=num_classes)

        ch = int(channel_mult[0] * model_channels)
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, ch, 3, padding=1))]
        )
        skip_chans, ds = [ch], 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                out_ch = int(mult * model_channels)
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, out_channels=out_ch, **self._res)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, num_heads, **self._attn))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_dim, out_channels=ch, down=True, **self._res)
                    if resblock_updown
                    else Downsample(ch, conv_resample, out_channels=ch)
                )
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, **self._res),
            AttentionBlock(ch, num_heads, **self._attn),
            ResBlock(ch, emb_dim, **self._res),
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks + 1):
                out_ch = int(mult * model_channels)
                skip = skip_chans.pop()
                layers = [ResBlock(ch + skip, emb_dim, out_channels=out_ch, **self._res)]
                ch = out_ch
                if ds in attention_resolutions:
                    layers.append(AttentionBlock(ch, self._heads_up, **self._attn))
                if level and i == num_res_blocks:
                    layers.append(
                        ResBlock(ch, emb_dim, out_channels=ch, up=True, **self._res)
                        if resblock_updown
                        else Upsample(ch, conv_resample, out_channels=ch)
                    )
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)),
        )

    def embed(
        self,
        t: torch.Tensor,
        label: torch.Tensor | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Time (and class) embedding: t [B] in [0, 1], label [B] int -> [B, 4·mc].

        The sinusoid is cast to ``dtype`` (the input's) before ``time_embed``. A
        class-conditional model given no label uses the null label ``num_classes``
        (the unconditional branch of classifier-free guidance). ValueError for a label
        that is not integer class indices [B], or one given to an unconditional model, and
        for a CPU label outside 0..num_classes (a GPU label's values are not read here:
        ``fm.sample`` checks them once per call).
        """
        emb = self.time_embed(timestep_embedding(t, self.model_channels).to(dtype))
        if self.num_classes is None:
            if label is not None:
                raise ValueError("a label was given to an unconditional model (num_classes "
                                 "is None)")
            return emb
        if label is None:
            label = torch.full((t.shape[0],), self.num_classes, device=t.device)
        elif not is_class_indices(label, t.shape[0]):
            raise ValueError(f"label must be an integer tensor [B] of class indices 0.."
                             f"{self.num_classes} with B = {t.shape[0]}, got "
                             f"{describe_value(label)}")
        elif label.is_cpu and not _tracing():  # (on a GPU the check would sync each call)
            check_label_range(label, self.num_classes)
        return emb + self.label_emb(label.long())

    def _check_input(self, x: torch.Tensor) -> None:
        """ValueError unless x is [B, in_channels, H, W] with H, W divisible by the depth."""
        factor = 2 ** (len(self.channel_mult) - 1)
        if (x.dim() != 4 or x.shape[1] != self.in_channels
                or x.shape[2] % factor or x.shape[3] % factor):
            raise ValueError(
                f"UNetModel expects images [B, {self.in_channels}, H, W] with H and W divisible "
                f"by {factor}, got {list(x.shape)}")

    def forward(
        self, x: torch.Tensor, t: torch.Tensor | float, extra: dict | None = None
    ) -> torch.Tensor:
        """Velocity: x [B, C, H, W], t [B] or scalar in [0, 1] -> [B, C_out, H, W].

        ``t`` may also be [1] or [B, 1, ...] (the layout of a time broadcast over images).

        ``extra`` may hold ``"label"`` [B] (int64) for class-conditional models; without
        it they use the null label.
        H and W must be divisible by ``2 ** (len(channel_mult) - 1)``.
        """
        self._check_input(x)
        extra = extra or {}
        emb = self.embed(_times(t, x.shape[0], x.device), extra.get("label"), x.dtype)
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h.type(x.dtype))


def is_class_indices(label, batch: int) -> bool:
    """Whether ``label`` is an integer tensor [batch] (class indices; bools are not)."""
    return (isinstance(label, torch.Tensor) and label.ndim == 1 and label.shape[0] == batch
            and not label.is_floating_point() and not label.is_complex()
            and label.dtype != torch.bool)


def check_label_range(label: torch.Tensor, num_classes: int) -> None:
    """ValueError unless class indices ``label`` [B] lie in 0..num_classes (the last, the
    null class of guidance): nn.Embedding would raise an IndexError, or on a GPU a
    device-side assert that leaves the CUDA context unusable. Reads the values (on a GPU,
    a sync)."""
    if label.numel() == 0:
        return
    low, high = int(label.min()), int(label.max())
    if low < 0 or high > num_classes:
        raise ValueError(f"label values must be class indices 0..{num_classes} "
                         f"({num_classes}: the null class), got {low}..{high}")


def _tracing() -> bool:
    """Whether torch.compile/export, torch.jit.trace or a functorch transform (vmap, grad,
    ...) sees the call: values are not read then (vmap has no rule for it)."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._functorch.get_dynamic_layer_stack_depth() > 0)


def _times(t, batch: int, device: torch.device) -> torch.Tensor:
    """t as float32 [B]: from a scalar, [1], [B] or [B, 1, ...]; ValueError else."""
    t = torch.as_tensor(t, device=device, dtype=torch.float32)
    if t.ndim == 0:
        return t.expand(batch)
    if any(size != 1 for size in t.shape[1:]) or t.shape[0] not in (batch, 1):
        raise ValueError(f"t must be a scalar, [1], [B] or [B, 1, ...] with B = {batch}, got "
                         f"{list(t.shape)}")
    return t.reshape(t.shape[0]).expand(batch)


def describe_value(value) -> str:
    """A tensor's dtype and shape, else the value's type and repr (for error messages)."""
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} {list(value.shape)}"
    return f"{type(value).__name__} {value!r}"[:80]


def _check_arguments(**args) -> None:
    """ValueError naming the first UNetModel argument that builds no working network."""
    def fail(name: str, want: str):
        raise ValueError(f"UNetModel: {name} must be {want}, got {args[name]!r}")

    def at_least(name: str, least: int, *allowed) -> None:
        value = integer_value(args[name])
        if args[name] not in allowed and (value is None or value < least):
            fail(name, " or ".join([*map(repr, allowed), f"an integer >= {least}"]))

    for name in ("in_channels", "model_channels", "out_channels"):
        at_least(name, 1)
    at_least("num_res_blocks", 0)
    at_least("num_head_channels", 1, -1)
    if args["num_head_channels"] == -1:  # (else the head width sets the head count)
        at_least("num_heads", 1)
        at_least("num_heads_upsample", 1, -1)
    at_least("num_classes", 1, None)
    mults = args["channel_mult"]
    if (isinstance(mults, (str, bytes)) or not isinstance(mults, Sequence) or not mults
            or not all(is_number(m) and int(m * args["model_channels"]) >= 1 for m in mults)):
        fail("channel_mult", "a non-empty sequence of numbers each giving >= 1 channel "
                             "(times model_channels)")
    factors = args["attention_resolutions"]
    if isinstance(factors, (str, bytes)) or not all(
            integer_value(f) is not None for f in _iterable(factors)):
        fail("attention_resolutions", "a collection of downsampling factors (1, 2, 4, ...)")


def _iterable(value) -> list:
    try:
        return list(value)
    except TypeError:
        return [None]
