"""Model families: ``composed`` (registry encoders + a vlseg decoder) and native upstream models (``clipseg``).
Each family builds a VLSegModel exposing the same stages, so nothing outside its module special-cases it."""

from __future__ import annotations

from typing import Callable

from ..config import ModelConfig
from ..registry import Registry

FAMILIES: Registry[Callable[..., "object"]] = Registry("model family")  # builder(config, load_weights=True)

from . import clipseg, composed  # noqa: E402,F401

__all__ = ["FAMILIES"]
