"""Presets by name (JSON files in model_configs/) and the one place that turns names into models."""

from __future__ import annotations

import copy
import fnmatch
import json
from importlib import resources
from pathlib import Path
from typing import Any

from .config import ModelConfig
from .registry import unknown_name_error

_USER_PRESETS: dict[str, dict[str, Any]] = {}


def _builtin_presets() -> dict[str, dict[str, Any]]:
    out = {}
    for entry in resources.files("vlseg").joinpath("model_configs").iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[:-5]] = json.loads(entry.read_text(encoding="utf-8"))
    return out


_PRESETS = _builtin_presets()


def list_models(pattern: str = "*") -> list[str]:
    """Preset names, optionally filtered with a glob (``vlseg.list_models("biomed*")``)."""
    return sorted(n for n in {**_PRESETS, **_USER_PRESETS} if fnmatch.fnmatch(n, pattern))


def add_model_config(path: str | Path) -> str:
    """Register a preset from a JSON file (its stem is the name); returns the name."""
    p = Path(path)
    _USER_PRESETS[p.stem] = json.loads(p.read_text(encoding="utf-8"))
    return p.stem


def get_model_config(name: str) -> ModelConfig:
    """A fresh ModelConfig for a preset (never the registry's own dict)."""
    presets = {**_PRESETS, **_USER_PRESETS}
    if name not in presets:
        raise unknown_name_error("model", name, list(presets))
    d = copy.deepcopy(presets[name])
    d.setdefault("name", name)
    return ModelConfig.from_dict(d)


def _with_pretrained(config: ModelConfig, pretrained: bool | str) -> ModelConfig:
    """Apply ``create_model``'s ``pretrained`` to every part that has upstream weights."""
    config = ModelConfig.from_dict(config.to_dict())
    if config.family == "composed":
        for enc in (config.image_encoder, config.text_encoder):
            assert enc is not None
            if enc.name or "model_cfg" in enc.options or "config" in enc.options:
                enc.pretrained = pretrained if (enc.name or not pretrained) else enc.pretrained
    else:
        config.pretrained = pretrained
    return config


def build_model(config: ModelConfig, load_weights: bool = True) -> Any:
    """Build a VLSegModel from a config. ``load_weights=False`` builds the same architecture without reading
    upstream weights (a bundled checkpoint is loaded over it)."""
    from .families import FAMILIES

    return FAMILIES.get(config.family)(config, load_weights=load_weights)


def load_or_create(name: str, pretrained: bool | str = True) -> Any:
    """A vlseg checkpoint (a folder or ``hf-hub:org/repo``) is loaded with ``load``; anything else is a preset
    name or JSON file built with ``create_model``. ``pretrained`` may be given as text ("true" / "false" / a
    folder), as command lines and forms pass it."""
    import os

    from .checkpoint import load_model

    if os.path.isdir(name) or name.startswith("hf-hub:"):
        return load_model(name)
    if isinstance(pretrained, str):
        pretrained = {"true": True, "false": False}.get(pretrained.strip().lower(), pretrained)
    return create_model(name, pretrained=pretrained)


def create_model(name: str | ModelConfig, pretrained: bool | str = True, **overrides: Any) -> Any:
    """Build a model from a preset name (see ``list_models()``), a JSON file or a ModelConfig.

    Args:
        name: preset name such as ``"biomedclip-film"``.
        pretrained: ``True`` loads the preset's upstream encoder (and, for ``clipseg-*``, decoder) weights from the
            hub; ``False`` builds the same architecture with random weights (offline); a string is a hub id or a
            local folder in the upstream format (for ``clipseg-*`` a folder written by transformers'
            ``CLIPSegForImageSegmentation.save_pretrained``).
        **overrides: top-level ModelConfig fields, e.g. ``image_size=352``, ``lora={"r": 8}``,
            ``decoder={"name": "cross-attn"}``.
    Returns:
        VLSegModel in eval mode with frozen encoders.
    """
    if isinstance(name, ModelConfig):
        config = name
    elif isinstance(name, str) and name.endswith(".json") and Path(name).is_file():
        d = json.loads(Path(name).read_text(encoding="utf-8"))
        d.setdefault("name", Path(name).stem)
        config = ModelConfig.from_dict(d)
    elif isinstance(name, str):
        config = get_model_config(name)
    else:
        raise TypeError(f"create_model takes a preset name or a ModelConfig, got {type(name).__name__}")
    if overrides:
        config = config.replace(**overrides)
    config = _with_pretrained(config, pretrained)
    model = build_model(config)
    model.eval()
    return model
