"""The one sample schema every loader returns.

A dataset is an indexable sequence of ``Sample``s (``len(ds)``, ``ds[i]``). One sample is one (image, target)
pair for one class:

    image      (H, W, 3) uint8 RGB                       (medical formats are windowed/scaled to uint8 on read)
    mask       (H, W) bool, the binary target for ``class_name`` (all False for a negative / absent class),
               or None when the dataset has no labels
    class_name the target class ("polyp")
    prompts    prompt strings for this target (default: the class name; loaders accept a ``prompt_fn``)
    dataset    dataset name ("kvasir_seg")      modality   "endoscopy", "ct", ...
    spacing    (row, column) pixel spacing in mm, when known
    negative   True when the class is absent (empty target on purpose)
    meta       everything else from the source row (paths, subject / video ids, original sizes, ...)

Class-index masks (one (H, W) integer map per image + a list of class names) are expanded by the loaders into one
binary sample per class (``class_names=`` argument).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Sample:
    image: np.ndarray
    mask: np.ndarray | None
    class_name: str
    prompts: list[str] = field(default_factory=list)
    dataset: str = ""
    modality: str = ""
    spacing: tuple[float, float] | None = None
    negative: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[-1] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"Sample.image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if self.mask is not None:
            if self.mask.shape != self.image.shape[:2]:
                raise ValueError(f"Sample.mask {self.mask.shape} does not match the image {self.image.shape[:2]}")
            if self.mask.dtype != bool:
                self.mask = self.mask > 0
        if not self.prompts:
            self.prompts = [self.class_name]
