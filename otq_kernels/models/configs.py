"""Named UNet configurations (constructor kwargs for :class:`UNetModel`).

``cifar10`` and ``imagenet64`` (alias ``imagenet``) are the ``cifar10`` and ``imagenet``
configs of flow_matching's image examples (55,676,419 and 295,900,035 parameters).
``mnist`` is not an examples config: it is the ``cifar10`` architecture with one input
and output channel (55,667,201 parameters). ``tiny`` is for CPU tests and ``digits`` is
the bundled demo model (16×16, 1 channel, unconditional).
"""

from __future__ import annotations

import copy

_ADM_SMALL = dict(
    model_channels=128,
    num_res_blocks=4,
    attention_resolutions=[2],
    dropout=0.3,
    channel_mult=[2, 2, 2],
    conv_resample=False,
    num_classes=None,
    num_heads=1,
    num_head_channels=-1,
    num_heads_upsample=-1,
    use_scale_shift_norm=True,
    resblock_updown=False,
    use_new_attention_order=True,
)

_CPU_SMALL = dict(
    _ADM_SMALL, in_channels=1, out_channels=1, model_channels=32, attention_resolutions=[2],
    dropout=0.0, conv_resample=True,
)

CONFIGS: dict[str, dict] = {
    "mnist": dict(_ADM_SMALL, in_channels=1, out_channels=1),
    "cifar10": dict(_ADM_SMALL, in_channels=3, out_channels=3),
    "imagenet64": dict(
        in_channels=3,
        out_channels=3,
        model_channels=192,
        num_res_blocks=3,
        attention_resolutions=[2, 4, 8],
        dropout=0.1,
        channel_mult=[1, 2, 3, 4],
        conv_resample=True,
        num_classes=1000,
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=True,
    ),
    "tiny": dict(_CPU_SMALL, num_res_blocks=1, channel_mult=[1, 2]),
    "digits": dict(_CPU_SMALL, num_res_blocks=2, channel_mult=[1, 2, 2]),
}
CONFIGS["imagenet"] = CONFIGS["imagenet64"]  # the examples' own name

IMAGE_SIZES = {
    "mnist": 28,
    "cifar10": 32,
    "imagenet64": 64,
    "imagenet": 64,
    "tiny": 16,
    "digits": 16,
}


def config_names() -> list[str]:
    """Valid config names."""
    return sorted(CONFIGS)


def unet_config(name: str) -> dict:
    """Constructor kwargs for :class:`UNetModel` (a fresh copy) for config ``name``."""
    if name not in CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; valid: {', '.join(config_names())}")
    return copy.deepcopy(CONFIGS[name])
