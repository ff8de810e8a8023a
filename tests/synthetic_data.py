"""Small in-memory datasets for composite-canvas and language-use tests: every class is a square of its own pure
colour on a grey background, so an oracle can read the answer off the image and hand-checked numbers are exact."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from vlseg import Prediction
from vlseg.data.datasets import SampleDataset
from vlseg.data.schema import Sample

BACKGROUND = 60
COLOURS = {
    "polyp": (230, 30, 30), "skin lesion": (30, 220, 30), "breast tumor": (230, 120, 0),
    "grasper": (30, 30, 230), "hook": (230, 230, 30),
    "mitochondria": (230, 30, 230), "cell membranes": (30, 230, 230),
}
PARTS = {"surgical instrument": ("grasper", "hook")}


class ArrayDataset(SampleDataset):
    """Rows hold their arrays (``_image``, ``_mask``) next to the usual ``image``/``dataset``/``class_name``."""

    def __init__(self, records: list[dict[str, Any]]):
        self.records = records
        self.prompt_fn = None

    def load(self, r: dict[str, Any]) -> Sample:
        return Sample(image=r["_image"], mask=r["_mask"], class_name=r["class_name"], dataset=r["dataset"],
                      negative=not r["_mask"].any(), meta={"image": r["image"]})


def square(h: int, w: int, y: int, x: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y:y + side, x:x + side] = True
    return m


def image_of(h: int, w: int, masks: dict[str, np.ndarray]) -> np.ndarray:
    img = np.full((h, w, 3), BACKGROUND, np.uint8)
    for c, m in masks.items():
        if c in COLOURS:
            img[m] = COLOURS[c]
    return img


def rows_for(dataset: str, key: str, h: int, w: int, masks: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """One row per class of one image; ``surgical instrument`` is derived as the union of its parts."""
    masks = dict(masks)
    for parent, parts in PARTS.items():
        if any(p in masks for p in parts):
            masks[parent] = np.logical_or.reduce([masks.get(p, np.zeros((h, w), bool)) for p in parts])
    img = image_of(h, w, masks)
    return [{"image": key, "dataset": dataset, "class_name": c, "_image": img, "_mask": m} for c, m in masks.items()]


def make_dataset(n: int = 2, single_only: bool = False) -> ArrayDataset:
    """``n`` images per dataset: polyps, skin lesions (same size and square, 32x32 images), a tools dataset with
    grasper/hook/surgical instrument (one frame without a hook: a negative row) and an EM-like two-class set."""
    rows: list[dict[str, Any]] = []
    for i in range(n):
        rows += rows_for("polyps", f"p{i}", 32, 32, {"polyp": square(32, 32, 8 + i, 8, 12)})
        rows += rows_for("skins", f"s{i}", 32, 32, {"skin lesion": square(32, 32, 10, 6 + i, 12)})
        if single_only:
            continue
        hook = square(40, 48, 24, 30, 10) if i % 2 == 0 else np.zeros((40, 48), bool)
        rows += rows_for("tools", f"t{i}", 40, 48, {"grasper": square(40, 48, 4, 4 + i, 14), "hook": hook})
        rows += rows_for("em", f"e{i}", 36, 36, {"mitochondria": square(36, 36, 2, 2, 10 + i),
                                                 "cell membranes": square(36, 36, 20, 18, 12)})
    return ArrayDataset(rows)


def _colour_mask(image: np.ndarray, colour: tuple[int, int, int], tol: int = 40) -> np.ndarray:
    return (np.abs(image.astype(int) - np.array(colour)).max(-1) <= tol)


def oracle(image: np.ndarray, prompts: list[str]) -> Prediction:
    """Segments exactly the prompted class (read from the colours), empty for "" and unknown classes."""
    names = sorted([*COLOURS, *PARTS], key=len, reverse=True)
    masks = []
    for text in prompts:
        cls = next((c for c in names if re.search(rf"\b{c}", text.lower())), None)  # not "electrosurgical ..."
        parts = PARTS.get(cls, (cls,)) if cls else ()
        m = np.zeros(image.shape[:2], bool)
        for p in parts:
            m |= _colour_mask(image, COLOURS[p])
        masks.append(m)
    masks_a = np.stack(masks)
    return Prediction(masks=masks_a, probs=masks_a.astype(np.float32),
                      presence=masks_a.reshape(len(prompts), -1).any(1).astype(np.float32), has_presence_head=True)


def ignores_prompt(image: np.ndarray, prompts: list[str]) -> Prediction:
    """Segments every coloured thing whatever the prompt says (the failure the checks must catch)."""
    rgb = image.astype(int)
    m = (rgb.max(-1) - rgb.min(-1)) > 100
    masks = np.stack([m] * len(prompts))
    return Prediction(masks=masks, probs=masks.astype(np.float32), presence=np.full(len(prompts), 0.9, np.float32),
                      has_presence_head=True)
