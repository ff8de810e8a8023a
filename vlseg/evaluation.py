"""Evaluate a model on a dataset: per-image metrics with fixed prompts, aggregated per dataset and prompt level,
plus language-use ablations (empty, wrong-class and shuffled prompts scored against the true mask)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import metrics as M
from .inference import segment
from .prompts import generate, lookup, class_names as library_classes


def evaluate_dataset(model: Any, dataset: Any, levels: Sequence[str] = ("p1",), max_samples: int | None = None,
                     seed: int = 0, ablations: bool = False, keep_predictions: bool = False,
                     progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Returns (summary, rows). ``rows`` hold one entry per (image, level[, ablation]) with Dice, IoU, HD95, NSD;
    ``summary`` has ``all``, ``per_dataset``, ``per_level`` and (with ``ablations``) ``ablations`` means."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    order = np.random.default_rng(seed).permutation(len(dataset))[:n]
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    abl: list[dict[str, Any]] = []
    items = []
    level_prompts: list[dict[str, str]] = []  # per sample: level -> prompt (the first level feeds "shuffled")
    for i in order:
        s = dataset[int(i)]
        items.append((int(i), s))
        level_prompts.append({lv: (generate(s.mask, s.class_name, lv) or s.class_name) for lv in levels})
    iterator = items
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(items, desc="evaluate")
    family = {c: lookup(c).family for c in library_classes()}
    for j, (i, s) in enumerate(iterator):
        base = {"dataset": s.dataset, "class_name": s.class_name, "image": s.meta.get("image", str(i)),
                "negative": bool(s.negative)}
        prompts = level_prompts[j]
        if ablations:
            fam = lookup(s.class_name).family
            others = [c for c, f in family.items() if f != fam] or ["object"]
            wrong = rng.choice(others)
            shuffled = "object"
            if len(items) > 1:  # another image's prompt
                shuffled = level_prompts[(j + 1 + rng.randrange(len(items) - 1)) % len(items)][levels[0]]
            prompts_abl = {"empty": "", "wrong_class": wrong, "shuffled": shuffled}
        else:
            prompts_abl = {}
        texts = list(prompts.values()) + list(prompts_abl.values())
        masks = segment(model, s.image, texts, allow_empty_prompts=True)
        for k, (lv, text) in enumerate(prompts.items()):
            row = {**base, "level": lv, "prompt": text, **M.all_metrics(masks[k], s.mask, s.spacing)}
            if keep_predictions:
                row["_pred"], row["_sample"] = masks[k], s
            rows.append(row)
        for k, (name, text) in enumerate(prompts_abl.items(), start=len(prompts)):
            abl.append({**base, "ablation": name, "prompt": text, **M.all_metrics(masks[k], s.mask, s.spacing)})
    summary: dict[str, Any] = {"all": M.aggregate(rows)["all"], "per_dataset": M.aggregate(rows, "dataset"),
                               "per_level": M.aggregate(rows, "level")}
    summary["per_dataset"].pop("all", None)
    summary["per_level"].pop("all", None)
    if ablations:
        correct = [r for r in rows if r["level"] == levels[0]]
        summary["ablations"] = {"correct": M.aggregate(correct)["all"]}
        for name in ("empty", "wrong_class", "shuffled"):
            summary["ablations"][name] = M.aggregate([r for r in abl if r["ablation"] == name])["all"]
    return summary, rows
