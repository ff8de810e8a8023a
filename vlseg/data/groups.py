"""Images with several annotated classes: a dataset row is one (image, class) pair; ``group_by_image`` gathers the
rows of each image so every class of it can be asked about (multi-class training targets, language-use checks,
VQA question generation)."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .schema import Sample


@dataclass(frozen=True)
class ImageGroup:
    """The rows of one image.

    Attributes:
        key: the image's identity (its file path, or ``dataset#row`` for in-memory datasets).
        dataset: dataset name.
        indices: dataset indices of its (image, class) rows, in dataset order.
        classes: class name of each row (same order as ``indices``).
    """

    key: str
    dataset: str
    indices: tuple[int, ...]
    classes: tuple[str, ...] = field(default=())


def _image_key(record: dict[str, Any], i: int) -> str:
    for k in ("image", "row"):
        if record.get(k) not in (None, ""):
            return f"{record.get('dataset', '')}#{record[k]}"
    return f"{record.get('dataset', '')}#index{i}"


def group_by_image(dataset: Any) -> list[ImageGroup]:
    """Group a dataset's rows (``dataset.records``) by image, in order of first appearance."""
    order: dict[str, list[int]] = {}
    for i, r in enumerate(dataset.records):
        order.setdefault(_image_key(r, i), []).append(i)
    out = []
    for key, idx in order.items():
        r0 = dataset.records[idx[0]]
        out.append(ImageGroup(key=key, dataset=str(r0.get("dataset", "")), indices=tuple(idx),
                              classes=tuple(str(dataset.records[i].get("class_name", "")) for i in idx)))
    return out


def pixel_digest(image: np.ndarray) -> str:
    """A short hex digest of an array's shape and bytes: the same pixels give the same digest wherever they came
    from."""
    a = np.ascontiguousarray(image)
    return hashlib.sha256(repr(a.shape).encode() + a.tobytes()).hexdigest()[:16]


def image_key(dataset_name: str, image: np.ndarray | None = None, digest: str | None = None) -> str:
    """``dataset:digest``, the one spelling of an image's content key: ``digest`` as given (e.g. of a file's bytes)
    or ``pixel_digest(image)``."""
    if digest is None:
        if image is None:
            raise ValueError("image_key needs an image or a digest")
        digest = pixel_digest(image)
    return f"{dataset_name}:{digest}"


def content_key(dataset: Any, index: int) -> str:
    """Row ``index``'s image by content: ``dataset:digest``, the digest of its file's bytes (rows read from files) or
    of its pixels (in-memory rows). The same however the path is spelt (relative, absolute, moved) and wherever the
    row stands in the manifest; rows of one image share it."""
    r = dataset.records[index]
    path = r.get("image")
    if isinstance(path, str) and os.path.isfile(path):
        with open(path, "rb") as f:
            return image_key(str(r.get("dataset", "")), digest=hashlib.sha256(f.read()).hexdigest()[:16])
    return image_key(str(r.get("dataset", "")), dataset[index].image)


def content_order(dataset: Any) -> list[int]:
    """Row indices sorted by (image content, class name): an order that depends on what the rows hold, not on how
    the manifest lists them or spells their paths. Seeded draws over this order (which images to evaluate, which
    prompt to ask) are then the same for the same data. Reads every image file once (bytes, no decoding)."""
    records = getattr(dataset, "records", None)
    if records is None:  # a plain sequence of Samples (in memory)
        samples = [dataset[i] for i in range(len(dataset))]
        return sorted(range(len(samples)), key=lambda i: (
            image_key(samples[i].dataset, samples[i].image), samples[i].class_name, i))
    by_image: dict[str, str] = {}  # rows of one image (one "image" value) are read once

    def key(i: int) -> str:
        image = records[i].get("image")
        if not isinstance(image, str):
            return content_key(dataset, i)
        if image not in by_image:
            by_image[image] = content_key(dataset, i)
        return by_image[image]

    return sorted(range(len(records)), key=lambda i: (key(i), str(records[i].get("class_name", "")), i))


def is_absent_image(dataset: Any, group: ImageGroup) -> bool:
    """True when every row of the image says its class is absent (``negative`` or ``empty`` in the manifest): a
    normal scan, annotated without the structure its dataset is about. Read from the records, no decoding."""
    return all(bool(dataset.records[i].get("negative") or dataset.records[i].get("empty")) for i in group.indices)


def reweight_absent_images(weights: Sequence[float] | np.ndarray, dataset: Any, groups: Sequence[ImageGroup],
                           factor: float) -> np.ndarray:
    """Per-row sampling weights with the rows of absent-class images (``is_absent_image``) ``factor`` times as
    likely as the other rows of their dataset, each dataset's total unchanged (so its share of the batches holds).

    Args:
        weights: (N,) per-row weights (e.g. ``PooledDataset.item_weights()``), N = len(dataset.records).
        groups: ``group_by_image(dataset)``.
        factor: > 0; 1 returns the weights unchanged.
    Returns:
        (N,) float64 weights.
    """
    w = np.asarray(weights, dtype=np.float64)
    if not factor > 0:
        raise ValueError(f"absent-image weight factor must be > 0, got {factor}")
    if len(w) != len(dataset.records):
        raise ValueError(f"{len(w)} weights for {len(dataset.records)} rows")
    scaled = w.copy()
    if factor == 1.0:
        return scaled
    for g in groups:
        if is_absent_image(dataset, g):
            scaled[list(g.indices)] *= factor
    for d in {g.dataset for g in groups}:
        rows = [i for g in groups if g.dataset == d for i in g.indices]
        before, after = w[rows].sum(), scaled[rows].sum()
        if after > 0:
            scaled[rows] *= before / after
    return scaled


def load_group(dataset: Any, group: ImageGroup) -> tuple[np.ndarray, dict[str, np.ndarray], list[Sample]]:
    """-> (image (H, W, 3) uint8, {class name: (H, W) bool mask}, the samples). Negative rows give empty masks.

    Raises ValueError when the rows of one image disagree on its size (a broken manifest)."""
    samples: Sequence[Sample] = [dataset[i] for i in group.indices]
    image = samples[0].image
    masks: dict[str, np.ndarray] = {}
    for s in samples:
        if s.image.shape != image.shape:
            raise ValueError(f"rows of image {group.key} have different image sizes: {image.shape} vs {s.image.shape}")
        m = s.mask if s.mask is not None else np.zeros(image.shape[:2], bool)
        masks[s.class_name] = masks[s.class_name] | m if s.class_name in masks else m
    return image, masks, list(samples)


def _nbytes(item: tuple[np.ndarray, dict[str, np.ndarray]]) -> int:
    image, masks = item
    return image.nbytes + sum(m.nbytes for m in masks.values())


class GroupCache:
    """``load_group`` that keeps the decoded arrays of the images it read last, up to ``max_bytes`` (the least
    recently used go first; 0 keeps nothing). Training draws the same images again and again, alone and as canvas
    tiles, and decoding them was ~40% of building a batch. Callers get copies: nothing they do reaches the cache.

    Shapes: ``cache(dataset, group)`` -> (image (H, W, 3) uint8, {class name: (H, W) bool mask}).
    """

    def __init__(self, max_bytes: int = 1 << 30):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self.hits = self.misses = 0
        self._items: OrderedDict[tuple[str, tuple[int, ...]], tuple[np.ndarray, dict[str, np.ndarray]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def __call__(self, dataset: Any, group: ImageGroup) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        key = (group.key, group.indices)
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            image, masks, _ = load_group(dataset, group)
            item = (image, masks)
            size = _nbytes(item)
            if size <= self.max_bytes:
                self._items[key] = item
                self.bytes += size
                while self.bytes > self.max_bytes:
                    self.bytes -= _nbytes(self._items.popitem(last=False)[1])
        else:
            self.hits += 1
            self._items.move_to_end(key)
        image, masks = item
        return image.copy(), {c: m.copy() for c, m in masks.items()}


__all__ = ["GroupCache", "ImageGroup", "group_by_image", "is_absent_image", "load_group", "reweight_absent_images"]
