"""Datasets named by a spec, as configs and command lines give them: ``{manifest: path}``,
``{folder: images, masks: masks}``, ``{hf: name}`` (plus the loader's keyword arguments), or a string (a manifest
``.jsonl``/``.csv``, ``IMAGES_DIR:MASKS_DIR``, or a Hugging Face dataset name / ``save_to_disk`` folder)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .datasets import PooledDataset, SampleDataset, from_folder, from_hf, from_manifest, train_val_split


def _resolve(p: str, roots: Sequence[str | os.PathLike[str]]) -> str:
    """A relative path as given when it exists, else the first of ``roots``/path that exists (else as given)."""
    if os.path.isabs(p) or os.path.exists(p):
        return p
    for r in roots:
        cand = Path(r) / p
        if cand.exists():
            return str(cand)
    return p


def from_spec(spec: str | dict[str, Any], roots: Sequence[str | os.PathLike[str]] = ()) -> tuple[str | None,
                                                                                             SampleDataset]:
    """-> (the spec's ``name`` or None, dataset). ``roots``: folders relative paths may be relative to."""
    if isinstance(spec, str):
        if spec.endswith((".jsonl", ".csv")):
            return None, from_manifest(_resolve(spec, roots))
        if ":" in spec and all(os.path.isdir(_resolve(p, roots)) for p in spec.split(":", 1)):
            images, masks = spec.split(":", 1)
            return None, from_folder(_resolve(images, roots), _resolve(masks, roots))
        return None, from_hf(spec)
    s = dict(spec)
    s.pop("weight", None)
    name = s.pop("name", None)
    if "manifest" in s:
        return name, from_manifest(_resolve(s.pop("manifest"), roots), **s)
    if "folder" in s:
        return name, from_folder(_resolve(s.pop("folder"), roots), _resolve(s.pop("masks"), roots), **s)
    if "hf" in s:
        return name, from_hf(s.pop("hf"), **s)
    raise ValueError(f"data source {spec} needs one of manifest / folder / hf")


def split_sources(specs: Sequence[dict[str, Any]], val_fraction: float, seed: int,
                  roots: Sequence[str | os.PathLike[str]] = ()) -> tuple[PooledDataset, PooledDataset]:
    """Load every source, split each into train/val by group (subject / video / ... , reproducibly), and pool
    them (training samples drawn by each source's ``weight``)."""
    train: dict[str, SampleDataset] = {}
    val: dict[str, SampleDataset] = {}
    weights: dict[str, float] = {}
    for i, src in enumerate(specs):
        name, ds = from_spec(src, roots)
        key = name or f"source{i}"
        train[key], val[key] = train_val_split(ds, val_fraction, seed=seed)
        weights[key] = float(src.get("weight", 1.0))
    return PooledDataset(train, weights), PooledDataset(val)


__all__ = ["from_spec", "split_sources"]
