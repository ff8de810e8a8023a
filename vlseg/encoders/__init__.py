"""Encoder registry: ``type`` name -> builder(EncoderConfig) -> EncoderPair (image and/or text tower)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..config import EncoderConfig
from ..registry import Registry
from ..features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures
from .base import EncoderPair, ImageEncoder, TextEncoder

ENCODERS: Registry[Callable[..., EncoderPair]] = Registry("encoder type")  # builder(cfg, load_weights=True)


def list_encoders(pattern: str = "*") -> list[str]:
    """Registered encoder types (``open_clip``, ``hf-clip``, ``hf-text``, ``scratch``, ...)."""
    return ENCODERS.list(pattern)


def build_encoders(image: EncoderConfig, text: EncoderConfig, load_weights: bool = True
                   ) -> tuple[ImageEncoder, TextEncoder]:
    """Build the image and text towers, loading a shared backbone (e.g. one CLIP) only once.

    ``load_weights=False`` builds the same architectures (configs and tokenizers still come from the named
    sources) without reading upstream weights: used when a checkpoint bundles them."""
    cache: dict[Any, EncoderPair] = {}

    def pair(cfg: EncoderConfig) -> EncoderPair:
        key = cfg.key()
        if key not in cache:
            cache[key] = ENCODERS.get(cfg.type)(cfg, load_weights=load_weights)
        return cache[key]

    img = pair(image).image
    txt = pair(text).text
    if img is None:
        raise ValueError(f"Encoder type {image.type!r} ({image.name}) has no image tower")
    if txt is None:
        raise ValueError(f"Encoder type {text.type!r} ({text.name}) has no text tower")
    return img, txt


# Register the backends (import for side effects).
from . import hf, open_clip_backend, scratch, timm_cnn  # noqa: E402,F401

__all__ = [
    "ENCODERS",
    "EncoderPair",
    "ImageEncoder",
    "ImageEncoderInfo",
    "ImageFeatures",
    "TextEncoder",
    "TextEncoderInfo",
    "TextFeatures",
    "build_encoders",
    "list_encoders",
]
