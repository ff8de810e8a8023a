"""Configuration dataclasses: one ``ModelConfig`` per model, saved beside its weights (STYLE P3).

A model is a *family* (registered in ``vlseg.families``: ``composed`` = registry encoders + a vlseg decoder,
``clipseg`` = upstream CLIPSeg kept whole, ...) plus its parts. Configs are normalised to dataclasses once, in
``from_dict``; nothing inside handles raw dicts. Older configs are brought up to date by ``migrate`` (one step per
``config_version``), so checkpoints written by earlier vlseg releases keep loading.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = 2


def _check_keys(cls: type, d: dict[str, Any], where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"Unknown key(s) {unknown} in {where}. Valid keys: {sorted(names)}")


def _check_type(where: str, value: Any, types: tuple[type, ...]) -> None:
    if value is not None and (not isinstance(value, types) or (isinstance(value, bool) and bool not in types)):
        names = " or ".join(t.__name__ for t in types)
        raise ValueError(f"{where} must be {names}, got {type(value).__name__} {value!r}")


@dataclass
class EncoderConfig:
    """Which encoder to build and from where.

    Attributes:
        type: encoder registry name (``open_clip``, ``hf-clip``, ``hf-text``, ``scratch``, ...).
        name: the model's source: an open_clip name (``ViT-B-16``), a hub id (``openai/clip-vit-base-patch16``,
            ``hf-hub:org/repo``) or a local folder (see ``vlseg.sources``).
        pretrained: ``True`` loads weights from ``name``; ``False`` builds the architecture with random weights;
            a string is another source of weights (an open_clip tag such as ``openai``, a hub id or a folder).
        revision: hub revision to pin (``None`` = default branch).
        arch: the backend's architecture description, used whenever weights are not loaded from ``name``: an
            inline model (tests, custom models; ``name`` empty) or a named model built offline with random weights.
        options: backend options (pooling, projection width, max length, tokenizer, preprocessing overrides, ...).
    """

    type: str
    name: str | None = None
    pretrained: bool | str = True
    revision: str | None = None
    arch: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_type("encoder 'type'", self.type, (str,))
        _check_type("encoder 'name'", self.name, (str,))
        _check_type("encoder 'pretrained'", self.pretrained, (bool, str))
        _check_type("encoder 'arch'", self.arch, (dict,))
        _check_type("encoder 'options'", self.options, (dict,))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EncoderConfig:
        if isinstance(d, str):
            raise ValueError(f"Encoder preset {d!r} must be resolved first: use vlseg.get_model_config / "
                             "vlseg.create_model, which expand encoder preset names")
        _check_keys(cls, d, "encoder config")
        if "type" not in d:
            raise ValueError("encoder config needs a 'type' (an encoder registry name)")
        return cls(**copy.deepcopy(d))

    @property
    def weights_source(self) -> str | None:
        """Where pretrained weights come from (None: random weights)."""
        if not self.pretrained:
            return None
        return self.pretrained if isinstance(self.pretrained, str) else self.name

    def builds_from_arch(self, load_weights: bool) -> bool:
        """Whether the architecture comes from ``arch`` alone (no files read): no weights are loaded and ``arch``
        describes ``name`` (not another source given as ``pretrained``)."""
        if self.arch is None:
            return False
        if self.weights_source is None:
            return True
        return not load_weights and not isinstance(self.pretrained, str)

    def key(self) -> tuple[Any, ...]:
        """Identity used to share one loaded backbone between the image and the text encoder."""
        return (self.type, self.name, self.pretrained, self.revision, json.dumps(self.arch, sort_keys=True),
                json.dumps(self.options, sort_keys=True))


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
    """Everything needed to rebuild a model. Which fields a family needs is the family's business
    (``vlseg.families.Family.validate``).

    Attributes:
        family: registered family name (``composed``, ``clipseg``, ...).
        name: preset name this config came from (informational).
        image_encoder, text_encoder, decoder: the parts of a composed model.
        source: native families: the upstream model (hub id or local folder, e.g. ``CIDAS/clipseg-rd64-refined``).
        revision: hub revision of ``source`` to pin.
        arch: native families: the upstream architecture, for random-weight builds without the hub.
        pretrained: native families: ``True`` loads ``source``'s weights, ``False`` random weights, a string
            another upstream folder / hub id.
        family_options: options of the family's own parts (validated by the family).
        lora: LoRA adapters on the encoders, or None.
        merged_lora: LoRA was folded into the encoder weights (they are then saved with the checkpoint).
        freeze_image, freeze_text: keep the image / text encoder frozen (LoRA adapters still train).
        image_size: input side the processor resizes to (square).
        presence: the decoder predicts a per-(image, prompt) presence logit.
        presence_threshold: calibrated presence probability below which masks are emptied (None: 0.5).
        flip_tta: ``segment``/``predict`` average each image with its left-right mirror by default (test-time
            augmentation; set before the presence calibration, so the threshold is calibrated on averaged scores).
    """

    family: str = "composed"
    name: str | None = None
    image_encoder: EncoderConfig | None = None
    text_encoder: EncoderConfig | None = None
    decoder: DecoderConfig | None = None
    source: str | None = None
    revision: str | None = None
    arch: dict[str, Any] | None = None
    pretrained: bool | str = True
    family_options: dict[str, Any] = field(default_factory=dict)
    lora: LoraSpec | None = None
    merged_lora: bool = False
    freeze_image: bool = True
    freeze_text: bool = True
    image_size: int | None = None
    presence: bool = True
    presence_threshold: float | None = None
    flip_tta: bool = False
    config_version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        _check_type("'family'", self.family, (str,))
        _check_type("'image_size'", self.image_size, (int,))
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(f"'image_size' must be > 0, got {self.image_size}")
        _check_type("'presence_threshold'", self.presence_threshold, (float, int))
        if self.presence_threshold is not None and not 0.0 <= self.presence_threshold <= 1.0:
            raise ValueError(f"'presence_threshold' must be in [0, 1], got {self.presence_threshold}")
        for name in ("merged_lora", "freeze_image", "freeze_text", "presence", "flip_tta"):
            _check_type(f"'{name}'", getattr(self, name), (bool,))

    @classmethod
    def from_dict(cls, d: dict[str, Any], strict: bool = True) -> ModelConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a model config is a JSON object, got {type(d).__name__}")
        d = migrate(copy.deepcopy(d))
        if strict:
            _check_keys(cls, d, "model config")
        else:
            d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        for k in ("image_encoder", "text_encoder"):
            if d.get(k) is not None:
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


# ----------------------------------------------------------------------------- migration
def _v1_to_v2(d: dict[str, Any]) -> dict[str, Any]:
    """0.1.0 kept five unrelated things in ``options`` and the frozen flags on the encoders (composed) or in
    ``options`` (native); inline and offline architectures were encoder options."""
    opts = dict(d.pop("options", None) or {})
    if opts.pop("pad_to_square", False):
        warnings.warn("config option pad_to_square is no longer supported and was dropped", stacklevel=3)
    if "merged_lora" in opts:
        d["merged_lora"] = bool(opts.pop("merged_lora"))
    for which in ("image", "text"):
        if f"{which}_frozen" in opts:
            d[f"freeze_{which}"] = bool(opts.pop(f"{which}_frozen"))
        enc = d.get(f"{which}_encoder")
        if isinstance(enc, dict):
            if "frozen" in enc:
                d[f"freeze_{which}"] = bool(enc.pop("frozen"))
            eopts = dict(enc.get("options") or {})
            for key, wrap in (("model_cfg", "model_cfg"), ("config", "config")):
                if key in eopts:  # an inline architecture
                    enc["arch"] = {wrap: eopts.pop(key)}
            if "offline_arch" in eopts:
                enc["arch"] = eopts.pop("offline_arch")
            enc["options"] = eopts
    for key in ("arch", "revision"):
        if key in opts:
            d[key] = opts.pop(key)
    if opts:
        raise ValueError(f"Unknown 0.1.0 config option(s) {sorted(opts)}")
    d["config_version"] = 2
    return d


_MIGRATIONS = {1: _v1_to_v2}


def migrate(d: dict[str, Any]) -> dict[str, Any]:
    """Bring a config dict up to ``CONFIG_VERSION``, one step per version; refuse configs from a newer vlseg.

    A dict without ``config_version`` is read as current, unless it has 0.1.0's ``options`` block, encoder
    ``frozen`` flags or architectures among encoder options (hand-written 0.1.0 presets)."""
    if "config_version" not in d:
        encs = [d.get(k) for k in ("image_encoder", "text_encoder")]
        old = "options" in d or any(isinstance(e, dict) and ("frozen" in e or set(e.get("options") or {}) &
                                                             {"model_cfg", "config", "offline_arch"}) for e in encs)
        d["config_version"] = 1 if old else CONFIG_VERSION
    version = d["config_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"config_version must be an integer, got {version!r}")
    if version > CONFIG_VERSION:
        raise ValueError(
            f"This checkpoint was written by a newer vlseg (config_version {version}; this vlseg reads up to "
            f"{CONFIG_VERSION}). Upgrade vlseg: pip install -U vlseg"
        )
    while version < CONFIG_VERSION:
        d = _MIGRATIONS[version](d)
        version = d["config_version"]
    return d
