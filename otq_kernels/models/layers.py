"""Building blocks of the ADM-style UNet (written from scratch).

Attribute names follow the ADM / guided-diffusion layout that flow_matching's image
examples also use, so the state-dict keys of their checkpoints match ours
(``in_layers.2``, ``emb_layers.1``, ``out_layers.3``, ``skip_connection``, ``qkv``,
``proj_out``, ``op``, ``conv``). Every convolution is an ``nn.Conv2d``, attention
projections are ``nn.Conv1d(kernel_size=1)`` and dense layers ``nn.Linear``: these
are exactly the module types the quantizer replaces.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back to the input dtype.

    The affine parameters are upcast too, so a model converted with ``.half()`` or
    ``.to(torch.bfloat16)`` still normalises in float32 (torch refuses a float32 input
    with half parameters, on CPU and CUDA alike).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    """32-group norm (fewer groups when ``channels`` is not a multiple of 32)."""
    return GroupNorm32(math.gcd(32, channels), channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of raw times ``t`` [B] (no rescaling) -> [B, dim].

    Layout is ``[cos(t·f), sin(t·f)]`` with ``f_i = max_period^(-i/half)``.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


class TimestepBlock(nn.Module):
    """A module whose forward takes the time embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that passes the embedding [B, E] to its ``TimestepBlock`` children."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


class Upsample(nn.Module):
    """Nearest ×2 upsampling, optionally followed by a 3×3 conv (``self.conv``)."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without conv cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C_out, 2H, 2W]."""
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """Stride-2 3×3 conv (``self.op``) or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool, out_channels: int | None = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without conv cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C_out, H/2, W/2]."""
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with FiLM time conditioning (``use_scale_shift_norm``).

    ``in_layers`` = (norm, SiLU, conv3×3); ``emb_layers`` = (SiLU, Linear);
    ``out_layers`` = (norm, SiLU, Dropout, zero-init conv3×3); ``skip_connection`` is
    Identity or a 1×1 (3×3 with ``use_conv``) conv. ``up``/``down`` resample inside.
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = True,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False), Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False), Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x [B, C, H, W], emb [B, E] -> [B, C_out, H', W']."""
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Spatial self-attention: norm -> ``qkv`` Conv1d(C, 3C, 1) -> attention ->
    zero-init ``proj_out`` Conv1d(C, C, 1), residual.

    ``new_order=True`` splits qkv as (3, heads, ch) (ADM's ``QKVAttention``); False uses
    the legacy (heads, 3, ch) split. Both give the same result for one head.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        new_order: bool = True,
    ):
        super().__init__()
        if num_head_channels == -1:
            if channels % num_heads:
                raise ValueError(f"{channels} channels not divisible by {num_heads} heads")
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(f"{channels} channels not divisible by {num_head_channels}")
            self.num_heads = channels // num_head_channels
        self.new_order = new_order
        self.norm = normalization(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def _split_heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """qkv [B, 3C, T] -> q, k, v each [B, heads, T, ch], channels at stride 1.

        One transposing copy puts the channels last: the fused SDPA kernels (flash,
        memory-efficient) need stride 1 in the last dim, and without it CUDA falls back to
        the math path (two cuBLAS batched GEMMs and the T × T weights in memory).
        """
        b, width, t = qkv.shape
        ch = width // (3 * self.num_heads)
        tokens = qkv.transpose(1, 2).contiguous()  # [B, T, 3C]
        if self.new_order:
            split = tokens.reshape(b, t, 3, self.num_heads, ch).permute(2, 0, 3, 1, 4)
        else:
            split = tokens.reshape(b, t, self.num_heads, 3, ch).permute(3, 0, 2, 1, 4)
        return tuple(split.unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, C, H, W]."""
        b, c, *spatial = x.shape
        flat = x.flatten(2)  # [B, C, T] (reshape(b, c, -1) cannot infer T when B = 0)
        q, k, v = self._split_heads(self.qkv(self.norm(flat)))
        h = F.scaled_dot_product_attention(q, k, v)  # [B, heads, T, ch]
        h = h.transpose(-1, -2).reshape(flat.shape)
        return (flat + self.proj_out(h)).reshape(b, c, *spatial)
