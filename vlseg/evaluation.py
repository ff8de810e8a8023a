"""Evaluate a model on a dataset: per-image metrics with fixed prompts, aggregated per dataset and prompt level,
language-use ablations (empty, wrong-class and shuffled prompts scored against the true mask), the language-use
report (``vlseg.language_use``), and ``evaluate`` writing all of it to a folder (what ``vlseg evaluate`` and
``finetune/evaluate.py`` run)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import metrics as M
from .data.groups import content_order
from .inference import segment
from .naming import slug
from .prompts import class_names as library_classes
from .prompts import generate, lookup


def evaluate_dataset(model: Any, dataset: Any, levels: Sequence[str] = ("p1",), max_samples: int | None = None,
                     seed: int = 0, ablations: bool = False, keep_predictions: bool = False,
                     progress: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Returns (summary, rows). ``rows`` hold one entry per (image, level[, ablation]) with Dice, IoU, HD95, NSD;
    ``summary`` has ``all``, ``per_dataset``, ``per_dataset_present`` (only the images where the prompted class is
    present: BUSI's normal scans, say, are left out; an image annotated without its class scores 1 for an empty
    mask and 0 for any other, which ``per_dataset`` averages in), ``per_level`` and (with ``ablations``)
    ``ablations`` means. The samples (when ``max_samples`` is below the dataset's size) and the ablations' draws
    are seeded over the rows in ``content_order``: the same for the same data, whatever the manifest's row order
    or path spelling."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    rows_by_content = content_order(dataset)
    order = [rows_by_content[k] for k in np.random.default_rng(seed).permutation(len(dataset))[:n]]
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
    summary["per_dataset_present"] = M.aggregate([r for r in rows if not r["negative"]], "dataset")
    for key in ("per_dataset", "per_dataset_present", "per_level"):
        summary[key].pop("all", None)
    if ablations:
        correct = [r for r in rows if r["level"] == levels[0]]
        summary["ablations"] = {"correct": M.aggregate(correct)["all"]}
        for name in ("empty", "wrong_class", "shuffled"):
            summary["ablations"][name] = M.aggregate([r for r in abl if r["ablation"] == name])["all"]
    return summary, rows


PER_IMAGE_COLUMNS = ["image", "dataset", "class_name", "level", "prompt", "negative", "dice", "iou", "hd95", "nsd"]


def evaluate(model: Any, dataset: Any, out: str | Path, levels: Sequence[str] = ("p1", "p6"),
             max_samples: int | None = None, seed: int = 0, ablations: bool = True, language_use: bool = True,
             language_use_images: int | None = 200, overlays: int = 4, progress: bool = True,
             precision: str = "fp32") -> dict[str, Any]:
    """Evaluate and write ``out/metrics.json`` (overall, per dataset, per prompt level, ablations and
    ``language_use``), ``out/per_image.csv`` and overlay PNGs (``out/overlays/``): the ``overlays`` worst and
    best cases, and the first ``overlays`` prompted classes on composite canvases (``canvas_*``: green hits on the
    prompted tile's target, red predicted pixels off it (e.g. on the other tile), blue missed target).

    Args:
        model: a VLSegModel.  dataset: a vlseg dataset (e.g. ``vlseg.data.from_spec(...)[1]``).
        levels: prompt levels scored (the first one for the ablations and overlays).
        language_use: add the language-use report (wrong-class -> empty, presence AUROC, composite canvases,
            own vs other class, level spread); ``language_use_images`` caps its images.
        precision: the precision mode to evaluate in (``vlseg.precision``): ``fp32`` measures the model as trained;
            ``auto`` measures what ``segment(..., precision="auto")`` gives on this machine. Recorded in
            metrics.json under ``precision``.
    Returns:
        The summary written to metrics.json.
    """
    import csv
    import json

    from PIL import Image

    from .data import PooledDataset
    from .inference import with_precision
    from .visualize import error_overlay

    out = Path(out)
    ds = dataset if isinstance(dataset, PooledDataset) else PooledDataset({"data": dataset})
    if precision != "fp32":  # auto calibrates on a few of the images evaluated, with their class names
        first = [ds[i] for i in range(min(3, len(ds)))]
        model = with_precision(model, precision, [x.image for x in first], [x.class_name for x in first])
    summary, rows = evaluate_dataset(model, ds, levels, max_samples, seed, ablations=ablations,
                                     keep_predictions=True, progress=progress)
    summary["levels"] = list(levels)
    summary["precision"] = getattr(model, "precision", "fp32")
    summary["flip_tta"] = bool(getattr(model.config, "flip_tta", False))  # the checkpoint's test-time flip
    canvas_examples: list[dict[str, Any]] = []
    if language_use:
        from .language_use import language_use_report, summary_line

        report = language_use_report(model, ds, seed=seed, max_images=language_use_images, progress=progress,
                                     canvas_examples=overlays)
        canvas_examples = report.pop("canvas_examples", [])
        report["summary_line"] = summary_line(report)
        summary["language_use"] = report
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(summary, indent=2, default=float))
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=PER_IMAGE_COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ranked = sorted((r for r in rows if r["level"] == levels[0]), key=lambda r: r["dice"])
    (out / "overlays").mkdir(exist_ok=True)
    for tag, group in (("worst", ranked[:overlays]), ("best", ranked[::-1][:overlays])):
        for n, r in enumerate(group):
            s = r["_sample"]
            name = f"{tag}_{n}_{slug(r['dataset'])}_dice{r['dice']:.2f}.png"
            Image.fromarray(error_overlay(s.image, s.mask, r["_pred"])).save(out / "overlays" / name)
    for ex in canvas_examples:  # two images side by side, one class prompted: where it leaks
        leak = "empty" if ex["leak"] is None else f"leak{ex['leak']:.2f}"
        name = f"canvas_{ex['canvas']}_{slug(ex['class'])}_{leak}.png"
        Image.fromarray(error_overlay(ex["image"], ex["target"], ex["pred"])).save(out / "overlays" / name)
    return summary


def report_lines(summary: dict[str, Any]) -> list[str]:
    """A short human summary of ``evaluate``'s result (the language-use line last)."""
    a = summary["all"]
    lines = [f"{a['n']} rows: dice {a['dice']:.4f} iou {a['iou']:.4f} hd95 {a['hd95']:.2f} nsd {a['nsd']:.4f}"]
    if "ablations" in summary:
        lines.append(" ".join(f"{k}: {v['dice']:.4f}" for k, v in summary["ablations"].items()))
    if "language_use" in summary:
        lines.append(summary["language_use"]["summary_line"])
    return lines
