"""``TrainConfig``: every option of a fine-tuning run, one typed dataclass. Read from YAML plus ``key=value``
overrides (values parsed as YAML, nested keys with dots), validated with pydantic: wrong types and unknown keys are
errors that name the key (integers and booleans strictly: ``max_steps: true`` or ``overwrite: 'yes'`` are errors,
not 1 and True). The resolved config is saved with the run."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ConfigDict, StrictBool, StrictInt, TypeAdapter, ValidationError


@dataclass
class TrainConfig:
    """Options of ``finetune/train.py``.

    Model: ``model`` (preset, JSON file or checkpoint folder to start from), ``pretrained`` (see
    ``vlseg.create_model``), ``model_overrides`` (ModelConfig fields, e.g. ``{image_size: 160}``), ``train_parts``
    (``decoder``: frozen encoders; ``lora``: adapters per ``lora``; ``full``: everything), ``gradient_checkpointing``.
    Task: ``task`` (``segmentation``, ``vqa``, ...; default: the model family's task) and ``task_options`` (validated
    by the task).
    Data: ``data`` (sources: ``{manifest: path}``, ``{folder: images, masks: masks}``, ``{hf: name}`` with
    ``weight``, ``name`` and the loader's arguments), split into train/val by group with ``val_fraction``.
    Prompts: ``prompt_levels`` drawn in training, ``eval_levels`` scored; language is made necessary by several
    prompts per image (``prompts_per_image``: each annotated class of the image is its own target),
    ``negative_rate`` (prompt slots given to classes known to be absent, with empty targets; look-alikes at
    ``hard_negative_rate``) and ``composite_rate`` (canvases tiling images of different datasets, where only the
    prompt says which tile is meant; ``composite_hard_rate``: tiles whose classes look alike, e.g. a polyp beside a
    skin lesion). ``absent_image_weight``: images annotated without their class (normal scans, every row
    ``negative``/``empty``) are drawn that many times as often as their dataset's other images, the dataset's
    share unchanged (single-image items; canvases draw tiles as before). ``calibrate_presence`` stores a
    validated presence threshold in ``best/``.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")

    # model
    model: str = "minilm-scratch-film"
    pretrained: bool | str = True
    model_overrides: dict[str, Any] = field(default_factory=dict)
    train_parts: Literal["decoder", "lora", "full"] = "decoder"
    lora: dict[str, Any] | None = None
    gradient_checkpointing: StrictBool = False
    # task
    task: str | None = None
    task_options: dict[str, Any] = field(default_factory=dict)
    # data and prompts
    data: list[dict[str, Any]] = field(default_factory=list)
    val_fraction: float = 0.2
    prompt_levels: list[str] = field(default_factory=lambda: [f"p{i}" for i in range(1, 10)])
    eval_levels: list[str] = field(default_factory=lambda: ["p1", "p6"])
    negative_rate: float = 0.1
    prompts_per_image: StrictInt = 1  # K prompts per training image: its classes and negatives (empty targets)
    hard_negative_rate: float = 0.5  # share of negatives drawn from look-alike classes (prompts/hard_negatives.json)
    composite_rate: float = 0.0  # share of training images that are composite canvases of 2-4 images
    composite_tiles: list[StrictInt] = field(default_factory=lambda: [2, 4])  # fewest, most tiles per canvas
    composite_hard_rate: float = 0.0  # chance a later tile's dataset has look-alike classes (polyp / skin lesion)
    absent_image_weight: float = 1.0  # absent-class images (normal scans) drawn this many times as often as the rest
    calibrate_presence: StrictBool = True  # after training, choose the presence threshold on the validation split
    augment: dict[str, Any] | None = field(default_factory=lambda: {"hflip": 0.5})
    # optimisation
    batch_size: StrictInt = 8
    grad_accum: StrictInt = 1
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_steps: StrictInt = 20
    max_steps: StrictInt = 300
    stop_after: StrictInt | None = None  # stop early at this step (the schedule still follows max_steps)
    grad_clip: float = 1.0
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "no"  # auto: bf16 where measured faster
    memory_format: Literal["contiguous", "channels_last", "auto"] = "contiguous"  # auto: channels-last where faster
    seed: StrictInt = 0
    split_seed: StrictInt | None = None  # the train/val split's seed (None: ``seed``); fix it to vary only the training
    loss: dict[str, float] = field(default_factory=lambda: {"dice_weight": 1.0, "bce_weight": 1.0,
                                                             "focal_weight": 0.0, "presence_weight": 0.2})
    # frozen-feature cache: auto (when the image encoder is frozen and inputs repeat) | off | memory | disk
    cache_features: Literal["auto", "off", "memory", "disk"] = "auto"
    # evaluation and checkpoints
    eval_every: StrictInt = 100
    eval_max_samples: StrictInt | None = 200
    best_metric: str = "dice"
    output_dir: str = "runs/train"
    overwrite: StrictBool = False
    resume: str | None = None
    log_tensorboard: StrictBool = False
    threads: StrictInt | None = None  # CPU threads per process (default: the machine's cores / local processes)
    data_workers: StrictInt | None = None  # background processes building batches (default: 1 when >= 2 cores)
    decode_cache_mb: StrictInt = 1024  # decoded training images kept per batch-building process (MiB; 0: none)

    def __post_init__(self) -> None:
        for name in ("batch_size", "grad_accum", "max_steps", "eval_every", "prompts_per_image"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.decode_cache_mb < 0:
            raise ValueError(f"decode_cache_mb must be >= 0, got {self.decode_cache_mb}")
        for name in ("negative_rate", "hard_negative_rate", "composite_rate", "composite_hard_rate"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not self.absent_image_weight > 0:
            raise ValueError(f"absent_image_weight must be > 0, got {self.absent_image_weight}")
        if len(self.composite_tiles) != 2 or not 2 <= self.composite_tiles[0] <= self.composite_tiles[1] <= 4:
            raise ValueError(f"composite_tiles must be [fewest, most] within 2..4, got {self.composite_tiles}")

    @property
    def data_split_seed(self) -> int:
        """The seed of the train/val split: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _yaml_loader() -> Any:
    """A YAML loader with YAML 1.2 booleans: only true/false are booleans, so ``cache_features: off`` stays a
    string (YAML 1.1 would read off/no/yes/on as booleans)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.yaml_implicit_resolvers = {k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"]
                                      for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    return Loader


def parse_overrides(d: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` overrides (value parsed as YAML; ``a.b=1`` sets a nested key) to ``d`` in place."""
    import yaml

    loader = _yaml_loader()
    for ov in overrides:
        if "=" not in ov:
            raise ValueError(f"override {ov!r} is not key=value")
        key, value = ov.split("=", 1)
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {ov!r}: {p!r} is not a mapping")
        node[parts[-1]] = yaml.load(value, Loader=loader)
    return d


def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    """``child`` over ``base``: mappings merge key by key (recursively), anything else (lists too) is replaced."""
    out = dict(base)
    for k, v in child.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _read_yaml(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A config file's keys, over those of its ``base`` file (a path relative to this file; bases may chain)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.load(f, Loader=_yaml_loader()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"Could not read config {path}: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(d).__name__}")
    base = d.pop("base", None)
    if base is None:
        return d
    if not isinstance(base, str) or not base:
        raise ValueError(f"{path}: `base` must be the path of another config file, got {base!r}")
    base_path = (path.parent / base).resolve()
    here = (*chain, path.resolve())
    if base_path in here:
        raise ValueError(f"{path}: `base` chain loops: {' -> '.join(str(p) for p in (*here, base_path))}")
    if not base_path.is_file():
        raise ValueError(f"{path}: its base config {base!r} is not a file (looked for {base_path})")
    return _merge(_read_yaml(base_path, here), d)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:  # type: ignore[assignment]
    """A TrainConfig from a YAML file (optional) plus ``key=value`` overrides.

    A file may start from another: ``base: offline-shared.yaml`` (relative to the file) takes that file's keys, and
    the file's own keys replace them (mappings such as ``loss`` merge key by key; lists such as ``data`` are
    replaced whole). Overrides apply last.

    Raises:
        ValueError: unreadable YAML, a missing or looping ``base``, unknown keys, wrong types or values, no
            training data.
    """
    d: dict[str, Any] = _read_yaml(Path(path), ()) if path else {}
    parse_overrides(d, list(overrides))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown}; valid keys: {sorted(names)}")
    try:
        cfg = TypeAdapter(TrainConfig).validate_python(d)
    except ValidationError as e:
        errs = "; ".join(
            f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})" if err["loc"]
            else str(err["msg"]).removeprefix("Value error, ") for err in e.errors())
        raise ValueError(f"invalid config{f' {path}' if path else ''}: {errs}") from None
    if not cfg.data:
        raise ValueError("no training data: set `data` (a list of sources) in the config")
    return cfg


__all__ = ["TrainConfig", "load_config", "parse_overrides"]
