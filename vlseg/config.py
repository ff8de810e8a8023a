"""Configuration dataclasses: one ``ModelConfig`` per model, saved beside its weights (STYLE P3).

A model is a *family* (``composed`` = registry encoders + a vlseg decoder, ``clipseg`` = upstream CLIPSeg kept whole)
plus its parts. Configs are normalised to dataclasses once, in ``from_dict``; nothing inside handles raw dicts.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 1


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where}. Valid keys: {sorted(names)}")


@dataclass
class EncoderConfig:
    """Which encoder to build and from where.

    Attributes:
        type: encoder registry name (``open_clip``, ``hf-clip``, ``hf-text``, ``scratch``, ...).
        name: model name for that backend (``ViT-B-16``, ``hf-hub:org/repo``, ``openai/clip-vit-base-patch16``).
        pretrained: pretrained tag (open_clip) or ``True``/``False``; a string path/hub id overrides ``name``'s weights.
        revision: hub revision to pin (``None`` = default branch).
        options: backend-specific architecture options (e.g. a tiny config for tests, ``layers`` for ``scratch``).
        frozen: freeze the encoder (``requires_grad_(False)`` + eval); LoRA params stay trainable.
    """

    type: str
    name: str | None = None
    pretrained: bool | str = True
    revision: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    frozen: bool = True

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        _check_keys(cls, d, "encoder config")
        if "type" not in d:
            raise ValueError("encoder config needs a 'type' (an encoder registry name)")
        return cls(**copy.deepcopy(d))

    def key(self) -> tuple[Any, ...]:
        """Identity used to share one loaded backbone between the image and the text encoder."""
        import json

        return (self.type, self.name, self.pretrained, self.revision, json.dumps(self.options, sort_keys=True))


@dataclass
class DecoderConfig:
    """Fusion decoder name (registry) plus its keyword arguments."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        _check_keys(cls, d, "decoder config")
        return cls(**copy.deepcopy(d))


@dataclass
class LoraSpec:
    """LoRA adapters (peft) on the frozen encoders.

    Attributes:
        r, alpha, dropout: the usual LoRA hyper-parameters.
        image, text: put adapters on the image / text encoder.
        image_targets, text_targets: module names; ``None`` = the encoder's own default targets.
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    image: bool = True
    text: bool = False
    image_targets: tuple[str, ...] | None = None
    text_targets: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.r <= 0:
            raise ValueError(f"LoRA rank r must be > 0, got {self.r}")
        if not (0.0 <= self.dropout < 1.0):
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not (self.image or self.text):
            raise ValueError("LoRA spec targets neither the image nor the text encoder (set image=True or text=True)")
        for name in ("image_targets", "text_targets"):
            v = getattr(self, name)
            if v is not None:
                setattr(self, name, tuple(v))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        _check_keys(cls, d, "lora config")
        return cls(**copy.deepcopy(d))


@dataclass
class ModelConfig:
    """Everything needed to rebuild a model.

    Attributes:
        family: ``composed`` or a native family (``clipseg``).
        image_encoder / text_encoder: for ``composed``.
        decoder: for ``composed``.
        source: for native families: upstream hub id or local folder (e.g. ``CIDAS/clipseg-rd64-refined``).
        options: family options (native families: a tiny architecture for tests, extract layers, ...).
        lora: optional LoRA spec.
        image_size: input side the processor resizes to (square).
        presence: decoders predict a per-(image, prompt) presence logit.
        name: preset name this config came from (informational).
    """

    family: str = "composed"
    image_encoder: EncoderConfig | None = None
    text_encoder: EncoderConfig | None = None
    decoder: DecoderConfig | None = None
    source: str | None = None
    pretrained: bool | str = True
    options: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None
    image_size: int | None = None
    presence: bool = True
    name: str | None = None
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        if self.family == "composed":
            missing = [n for n in ("image_encoder", "text_encoder", "decoder") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"A 'composed' model config needs {missing}")

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> ModelConfig:
        d = migrate(copy.deepcopy(d))
        if strict:
            _check_keys(cls, d, "model config")
        else:
            d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for k in ("image_encoder", "text_encoder"):
            if isinstance(d.get(k), dict):
                d[k] = EncoderConfig.from_dict(d[k])
        if isinstance(d.get("decoder"), dict):
            d["decoder"] = DecoderConfig.from_dict(d["decoder"])
        if isinstance(d.get("lora"), dict):
            d["lora"] = LoraSpec.from_dict(d["lora"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if d.get("lora"):
            for k in ("image_targets", "text_targets"):
                if d["lora"][k] is not None:
                    d["lora"][k] = list(d["lora"][k])
        return d

    def replace(self, **overrides: Any) -> ModelConfig:
        """A copy with top-level fields replaced (dict values are normalised like ``from_dict``)."""
        d = self.to_dict()
        d.update(overrides)
        return ModelConfig.from_dict(d)


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """Bring an older config dict up to ``CONFIG_VERSION``; refuse configs from a newer vlseg."""
    version = d.get("config_version", CONFIG_VERSION)
    if not isinstance(version, int):
        raise ValueError(f"config_version must be an integer, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"This checkpoint was written by a newer vlseg (config_version {version}; this vlseg reads up to "
            f"{CONFIG_VERSION}). Upgrade vlseg: pip install -U vlseg"
        )
    # version 1 is the first; future migrations go here, one step per version.
    d["config_version"] = CONFIG_VERSION
    return d
