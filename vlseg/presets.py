"""Presets: models and encoders by name, as JSON data (kept apart like open_clip's architectures and pretrained
tags).

- ``model_configs/encoders/<name>.json``: an encoder preset, the architecture and where its weights come from
  (``{"type": "open_clip", "name": "hf-hub:...", "arch": {...}}``).
- ``model_configs/<name>.json``: a model preset naming a family, encoders (by preset name, or a full encoder
  config) and a decoder, in a few lines:

      {"family": "composed", "image_size": 224, "image_encoder": "biomedclip", "text_encoder": "biomedclip",
       "decoder": {"name": "film", "options": {"layers": [3, 6, 9]}}}

Users add their own with ``add_model_config(path)`` / ``add_encoder_config(path)``. Names resolve to fresh
``ModelConfig`` objects (deep copies: callers never change the registry).
"""

from __future__ import annotations

import copy
import fnmatch
import json
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .registry import unknown_name_error

_ENCODER_KEYS = ("image_encoder", "text_encoder")


def _read_dir(*parts: str) -> dict[str, dict[str, Any]]:
    folder = resources.files("vlseg").joinpath(*parts)
    return {e.name[:-5]: json.loads(e.read_text(encoding="utf-8"))
            for e in folder.iterdir() if e.name.endswith(".json")}


_MODELS = _read_dir("model_configs")
_ENCODERS = _read_dir("model_configs", "encoders")


def _read_json(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"Could not read preset {p}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"Preset {p} must hold a JSON object")
    return d


def list_models(pattern: str = "*") -> list[str]:
    """Model preset names, optionally filtered with a glob (``vlseg.list_models("biomed*")``)."""
    return sorted(n for n in _MODELS if fnmatch.fnmatch(n, pattern))


def list_encoder_presets(pattern: str = "*") -> list[str]:
    """Encoder preset names (``biomedclip``, ``clip-b16``, ...)."""
    return sorted(n for n in _ENCODERS if fnmatch.fnmatch(n, pattern))


def add_model_config(path: str | Path) -> str:
    """Register a model preset from a JSON file (its stem is the name); returns the name."""
    p = Path(path)
    _MODELS[p.stem] = _read_json(p)
    return p.stem


def add_encoder_config(path: str | Path) -> str:
    """Register an encoder preset from a JSON file (its stem is the name); returns the name."""
    p = Path(path)
    _ENCODERS[p.stem] = _read_json(p)
    return p.stem


def encoder_preset(name: str) -> dict[str, Any]:
    """A deep copy of an encoder preset's dict."""
    if name not in _ENCODERS:
        raise unknown_name_error("encoder preset", name, list(_ENCODERS))
    return copy.deepcopy(_ENCODERS[name])


def expand(d: dict[str, Any]) -> dict[str, Any]:
    """Replace encoder preset names (strings) in a model config dict by their full encoder configs."""
    d = copy.deepcopy(d)
    for k in _ENCODER_KEYS:
        if isinstance(d.get(k), str):
            d[k] = encoder_preset(d[k])
    return d


def get_model_config(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset name or a JSON file path."""
    if name.endswith(".json") and Path(name).is_file():
        d = _read_json(name)
        d.setdefault("name", Path(name).stem)
    elif name in _MODELS:
        d = copy.deepcopy(_MODELS[name])
        d.setdefault("name", name)
    else:
        raise unknown_name_error("model", name, list(_MODELS))
    return ModelConfig.from_dict(expand(d))


__all__ = ["add_encoder_config", "add_model_config", "encoder_preset", "expand", "get_model_config",
           "list_encoder_presets", "list_models"]
