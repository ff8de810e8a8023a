"""Evaluate a checkpoint (or a preset, zero-shot) on a dataset.

    python finetune/evaluate.py --model runs/x/best --data ../shared/data/manifest_all.jsonl --out runs/x/eval

Writes ``OUT/metrics.json`` (overall, per dataset, per prompt level, and the language-use ablations: empty,
wrong-class and shuffled prompts beside the correct-prompt score), ``OUT/per_image.csv`` and overlay PNGs of the
worst and best cases in ``OUT/overlays/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np

import vlseg
from vlseg.data import PooledDataset, from_folder, from_hf, from_manifest, train_val_split
from vlseg.evaluation import evaluate_dataset


def load_data(spec: str):
    """A manifest (.jsonl/.csv), a ``save_to_disk`` / hub dataset, or ``IMAGES_DIR:MASKS_DIR``."""
    if spec.endswith((".jsonl", ".csv")):
        return from_manifest(spec)
    if ":" in spec and all(os.path.isdir(p) for p in spec.split(":", 1)):
        images, masks = spec.split(":", 1)
        return from_folder(images, masks)
    return from_hf(spec)


def overlay(image: np.ndarray, target: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Green = true positive, red = false positive, blue = missed (false negative)."""
    out = image.astype(np.float32).copy()
    for m, colour in ((pred & target, (0, 255, 0)), (pred & ~target, (255, 0, 0)), (~pred & target, (0, 90, 255))):
        out[m] = 0.45 * out[m] + 0.55 * np.array(colour, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="vlseg checkpoint folder, hf-hub:org/repo, or preset name")
    ap.add_argument("--pretrained", default="true", help="for a preset: true, false, or a local upstream folder")
    ap.add_argument("--data", required=True, help="manifest, HF dataset, or IMAGES:MASKS folders")
    ap.add_argument("--out", required=True)
    ap.add_argument("--levels", nargs="+", default=["p1", "p6"], help="prompt levels (first one for ablations)")
    ap.add_argument("--split", choices=["all", "train", "val"], default="all",
                    help="evaluate on the reproducible group split that finetune/train.py uses")
    ap.add_argument("--val-fraction", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--overlays", type=int, default=4, help="worst and best cases saved as PNG")
    args = ap.parse_args(argv)

    from PIL import Image

    out = Path(args.out)
    try:
        model = vlseg.load_or_create(args.model, args.pretrained)
        ds = load_data(args.data)
    except (ValueError, KeyError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.split != "all":
        tr, va = train_val_split(ds, args.val_fraction, seed=args.seed)
        ds = va if args.split == "val" else tr
    ds = PooledDataset({"data": ds})
    summary, rows = evaluate_dataset(model, ds, args.levels, args.max_samples, args.seed,
                                     ablations=not args.no_ablations, keep_predictions=True, progress=True)
    out.mkdir(parents=True, exist_ok=True)
    summary["model"] = args.model
    summary["data"] = args.data
    summary["levels"] = args.levels
    (out / "metrics.json").write_text(json.dumps(summary, indent=2))
    keys = ["image", "dataset", "class_name", "level", "prompt", "negative", "dice", "iou", "hd95", "nsd"]
    with open(out / "per_image.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    ranked = sorted((r for r in rows if r["level"] == args.levels[0]), key=lambda r: r["dice"])
    (out / "overlays").mkdir(exist_ok=True)
    for tag, group in (("worst", ranked[: args.overlays]), ("best", ranked[::-1][: args.overlays])):
        for n, r in enumerate(group):
            s = r["_sample"]
            img = overlay(s.image, s.mask, r["_pred"])
            Image.fromarray(img).save(out / "overlays" / f"{tag}_{n}_{r['dataset']}_dice{r['dice']:.2f}.png")
    a = summary["all"]
    print(f"{len(rows)} rows: dice {a['dice']:.4f} iou {a['iou']:.4f} hd95 {a['hd95']:.2f} nsd {a['nsd']:.4f}")
    if "ablations" in summary:
        print(" ".join(f"{k}: {v['dice']:.4f}" for k, v in summary["ablations"].items()))
    print(f"wrote {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
