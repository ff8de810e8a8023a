"""The one place that turns names, configs and checkpoints into models: ``create_model``, ``load``,
``load_or_create``. Families (``vlseg.families``) build; checkpoints (``vlseg.checkpoint``) are only read here."""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoint import Checkpoint, CheckpointError, read_checkpoint
from .config import ModelConfig
from .families import get_family
from .model import VLSegModel
from .presets import expand, get_model_config


def build_model(config: ModelConfig, load_weights: bool = True) -> VLSegModel:
    """Build a model from a complete config. ``load_weights=False`` builds the same architecture without reading
    upstream weights (a checkpoint that bundles them is loaded over it)."""
    family = get_family(config.family)
    family.validate(config)
    return family.build(config, load_weights=load_weights)


def create_model(name: str | ModelConfig, pretrained: bool | str = True, **overrides: Any) -> VLSegModel:
    """Build a model from a preset name (see ``list_models()``), a JSON file or a ModelConfig.

    Args:
        name: preset name such as ``"biomedclip-film"``, a path to a preset JSON, or a ModelConfig.
        pretrained: ``True`` loads the preset's upstream encoder (and, for native families, decoder) weights from
            the Hub; ``False`` builds the same architecture with random weights (offline); a string is a hub id
            or a local folder in the upstream format (e.g. a folder written by transformers'
            ``CLIPSegForImageSegmentation.save_pretrained`` for ``clipseg-*``).
        **overrides: top-level ModelConfig fields, e.g. ``image_size=352``, ``lora={"r": 8}``,
            ``decoder={"name": "cross-attn"}``, ``image_encoder="clip-b16"`` (an encoder preset name).
    Returns:
        The model in eval mode with frozen encoders.
    Raises:
        KeyError: unknown preset name (with close matches).  ValueError: an invalid config.
        RuntimeError: upstream weights that cannot be fetched (offline), with what to do instead.
    """
    if isinstance(name, ModelConfig):
        config = name
    elif isinstance(name, str):
        config = get_model_config(name)
    else:
        raise TypeError(f"create_model takes a preset name or a ModelConfig, got {type(name).__name__}")
    if overrides:
        config = config.replace(**expand(overrides))
    config = get_family(config.family).with_pretrained(config, pretrained)
    model = build_model(config)
    model.eval()
    return model


def _check_state(model: VLSegModel, ck: Checkpoint, state: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    expected = set(own) if ck.bundled else set(model.checkpoint_keys())
    unexpected = sorted(set(state) - set(own))
    missing = sorted(expected - set(state))
    bad_shape = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    bad_dtype = sorted(k for k in state if k in own and k not in bad_shape and
                       state[k].is_floating_point() != own[k].is_floating_point())
    if unexpected or missing or bad_shape or bad_dtype:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model "
                         f"{tuple(own[k].shape)}")
        if bad_dtype:
            k = bad_dtype[0]
            parts.append(f"{len(bad_dtype)} dtype mismatch(es), e.g. {k}: file {state[k].dtype} vs model {own[k].dtype}")
        raise CheckpointError(f"Weights in {ck.folder} do not fit its config: " + "; ".join(parts))


def load(source: str | os.PathLike[str], revision: str | None = None,
         device: str | torch.device | None = None) -> VLSegModel:
    """Load a vlseg checkpoint: a folder written by ``save_pretrained`` or ``hf-hub:org/repo``.

    Frozen encoders are rebuilt from their sources unless the checkpoint bundles them; checkpoints of earlier
    vlseg versions are migrated. Raises CheckpointError naming the file for anything that is not a loadable
    checkpoint (never unpickles)."""
    ck = read_checkpoint(source, revision)
    try:
        config = ModelConfig.from_dict(ck.model)
        family = get_family(config.family)
    except (TypeError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise CheckpointError(f"{ck.folder}: invalid model config: {msg}") from e
    state = family.migrate_state_dict(ck.state, ck.config_version)
    model = build_model(config, load_weights=not ck.bundled)
    _check_state(model, ck, state)
    model.load_state_dict(state, strict=False)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def load_or_create(name: str, pretrained: bool | str = True) -> VLSegModel:
    """A vlseg checkpoint (a folder or ``hf-hub:org/repo``) is loaded with ``load``; anything else is a preset
    name or JSON file built with ``create_model``. ``pretrained`` may be given as text ("true" / "false" / a
    folder), as command lines and forms pass it."""
    if os.path.isdir(name) or name.startswith("hf-hub:"):
        return load(name)
    if isinstance(pretrained, str):
        pretrained = {"true": True, "false": False}.get(pretrained.strip().lower(), pretrained)
    return create_model(name, pretrained=pretrained)


__all__ = ["build_model", "create_model", "load", "load_or_create"]
