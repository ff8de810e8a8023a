"""What a model family is. A family is one module under ``vlseg/families/`` that subclasses ``Family`` and registers
an instance with ``@register_family``; it declares what it is through typed fields and methods, so core code
(factory, checkpoints, CLI, training) never asks for a family's name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import ModelConfig

if TYPE_CHECKING:
    from collections.abc import Iterator

    import numpy as np
    import torch

    from ..model import VLSegModel


@dataclass(frozen=True)
class Capabilities:
    """What a family's models can do beyond text-prompted masks.

    Attributes:
        task: the task its models are trained and evaluated on (``segmentation``, ``vqa``).
        boxes: accepts box prompts (``segment(..., boxes=...)``).
        video_tracking: tracks objects across video frames itself (others segment frame by frame).
        instances: returns instance masks, boxes and scores besides the semantic mask.
    """

    task: str = "segmentation"
    boxes: bool = False
    video_tracking: bool = False
    instances: bool = False


class Family:
    """Base class of model families. Subclasses set ``name`` (the registry name, also ``ModelConfig.family``),
    optionally ``capabilities``, and implement ``build``."""

    name: str = ""
    capabilities: Capabilities = Capabilities()
    #: a one-line description for ``vlseg models``
    summary: str = ""
    #: inference precisions its models support (``vlseg.precision``); None: every mode the machine offers
    precision_modes: tuple[str, ...] | None = None

    def validate(self, config: ModelConfig) -> None:
        """Raise ValueError when ``config`` lacks what this family needs."""

    def build(self, config: ModelConfig, load_weights: bool = True) -> VLSegModel:
        """Build the model. ``load_weights=False`` builds the same architecture without reading upstream weights
        (a checkpoint that bundles them is loaded over it)."""
        raise NotImplementedError

    def with_pretrained(self, config: ModelConfig, pretrained: bool | str) -> ModelConfig:
        """Apply ``create_model(..., pretrained=...)`` to the parts that have upstream weights (returns a copy)."""
        return config.replace(pretrained=pretrained)

    def rebuildable(self, config: ModelConfig) -> bool:
        """True when every frozen part can be rebuilt with the same weights from its source, so a checkpoint need
        only hold the trainable tensors."""
        return bool(config.pretrained) and not config.merged_lora

    def describe(self, config: ModelConfig) -> str:
        """What ``vlseg models`` prints about a preset of this family."""
        return f"{config.source or ''}  {self.summary}".strip()

    def track_video(self, model: VLSegModel, frames: Iterator[np.ndarray], prompts: list[str], threshold: float = 0.5,
                    **options: Any) -> Iterator[dict[str, Any]]:
        """Families with ``capabilities.video_tracking``: segment a stream of (H, W, 3) uint8 frames, objects
        tracked from frame to frame, yielding per frame (in order) ``{"index": t, "masks": (K, H, W) bool,
        "objects": [per prompt {"ids", "scores", "boxes", "masks"}]}``. ``vlseg.segment_video`` calls it."""
        raise NotImplementedError(f"the {self.name!r} family does not track objects in videos")

    def migrate_state_dict(self, state: dict[str, torch.Tensor], config_version: int) -> dict[str, torch.Tensor]:
        """Rename tensors of checkpoints written by an older vlseg (``config_version`` of the file)."""
        return state

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def rename_prefixes(state: dict[str, Any], renames: dict[str, str]) -> dict[str, Any]:
    """Checkpoint migration helper: replace key prefixes (first match wins)."""
    out = {}
    for k, v in state.items():
        for old, new in renames.items():
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out
