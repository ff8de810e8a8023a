"""Fusion decoder registry: name -> nn.Module class with ``from_config(options, image_info, text_info, presence)``."""

from __future__ import annotations

from ..registry import Registry
from .base import DecoderOutput, FusionDecoder

DECODERS: Registry[type[FusionDecoder]] = Registry("decoder")


def list_decoders(pattern: str = "*") -> list[str]:
    """Registered fusion decoder names."""
    return DECODERS.list(pattern)


from . import cross_attn, film, query_mask  # noqa: E402,F401  (register)

__all__ = ["DECODERS", "DecoderOutput", "FusionDecoder", "list_decoders"]
