"""ADM-style UNet, named configs, checkpoint loading and the bundled demo model."""

from __future__ import annotations

import json
from pathlib import Path

from .checkpoint import extract_state_dict, load_fm_checkpoint
from .configs import IMAGE_SIZES, config_names, unet_config
from .unet import UNetModel

DEMO_ASSET = "fm_digits.safetensors"

__all__ = [
    "UNetModel",
    "build_model",
    "config_names",
    "demo_model_path",
    "demo_model_metadata",
    "extract_state_dict",
    "load_demo_model",
    "load_fm_checkpoint",
    "unet_config",
    "IMAGE_SIZES",
]


def build_model(name: str, **overrides) -> UNetModel:
    """UNet for config ``name`` (see :func:`unet_config`) with keyword overrides."""
    return UNetModel(**{**unet_config(name), **overrides})


def demo_model_path() -> Path:
    """Path of the bundled demo checkpoint (``otq_kernels/assets/fm_digits.safetensors``)."""
    from importlib.resources import files

    return Path(str(files("otq_kernels") / "assets" / DEMO_ASSET))


def demo_model_metadata() -> dict:
    """The demo checkpoint's metadata (config, steps, seed, command, final loss, ...)."""
    from safetensors import safe_open

    with safe_open(str(demo_model_path()), framework="pt") as f:
        meta = dict(f.metadata() or {})
    if "config_kwargs" in meta:
        meta["config_kwargs"] = json.loads(meta["config_kwargs"])
    return meta


def load_demo_model() -> UNetModel:
    """The bundled FM UNet trained on 16×16 digits (unconditional, eval mode, CPU, fp32).

    Samples live in [-1, 1] with shape [B, 1, 16, 16].
    """
    path = demo_model_path()
    if not path.exists():
        raise FileNotFoundError(f"demo model missing: {path} (run python/train_demo_model.py)")
    meta = demo_model_metadata()
    kwargs = meta.get("config_kwargs") or unet_config(meta.get("config", "digits"))
    model = UNetModel(**kwargs)
    load_fm_checkpoint(path, model)
    return model.eval()
