"""The image-only U-Net reference of the language issue, measured on the main job's own split, beside vlseg's Dice.

    python benchmarks/unet_reference.py [--config finetune/configs/offline-shared.yaml] [--minutes 12]
        [--against EVAL_DIR] [--out runs/unet-reference]

The issue's bar: per dataset, the main job's class-name Dice must reach that of an image-only U-Net (resnet18
encoder from scratch, pooled over the same data, 256 px, 12 CPU-minutes on 2 cores). Its figures in the issue were
measured on other images. This trains that reference (``segmentation_models_pytorch.Unet("resnet18",
encoder_weights=None)``) on the single-class datasets of the main job's training split (sampled by the config's
weights, the same paired augmentation), for ``--minutes`` of wall-clock training on this machine's cores, and scores
it on the same validation images as ``vlseg evaluate ... --split val`` (every row, normal scans included: an empty
mask on an image annotated without its class scores 1, any other 0). ``--against`` reads a ``vlseg evaluate``
folder's ``per_image.csv`` (class-name rows, the first level) and prints vlseg / U-Net per dataset, from one run of
this script. Writes ``unet_reference.json`` and ``curve.png`` (the training loss) to ``--out``.

The training budget is wall-clock on this machine: a slower CPU gives the U-Net fewer steps (``steps`` in the JSON,
the CPU named beside it), as it gives the main job fewer per minute. bf16 autocast is used where bf16 is native and
two timed steps show it faster, as the main job does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
#: the issue's figures for this reference, "on images like the validation split, roughly" (not these images)
ISSUE_FIGURES = {"busi": 0.43, "ph2": 0.85, "drive": 0.15, "chase_db1": 0.18, "isbi2012_em": 0.43,
                 "cvc_clinicdb": 0.54}


def single_class_parts(pooled: Any) -> list[str]:
    """The parts of a PooledDataset whose rows all name one class (an image-only model can learn those)."""
    return [k for k, d in pooled.parts.items() if len({str(r["class_name"]) for r in d.records}) == 1]


def _resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (size, size, 3) uint8, bilinear (a writable copy: augmentation works in place)."""
    from PIL import Image

    return np.array(Image.fromarray(image).resize((size, size), Image.BILINEAR))


def _resize(image: np.ndarray, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(H, W, 3) uint8, (H, W) bool -> (size, size, 3) uint8 (bilinear), (size, size) bool (nearest)."""
    from PIL import Image

    m = np.array(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 127
    return _resize_image(image, size), m


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(B, S, S, 3) uint8 -> (B, 3, S, S) float32, normalised with the ImageNet statistics (as the main job's
    resnet18 trunk is)."""
    from vlseg.data import IMAGENET_MEAN, IMAGENET_STD

    mean, std = np.asarray(IMAGENET_MEAN, np.float32), np.asarray(IMAGENET_STD, np.float32)
    x = (images.astype(np.float32) / 255.0 - mean) / std
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def reference_loss(weights: dict[str, float] | None = None) -> Any:
    """The main job's segmentation loss (``vlseg.training.SegmentationLoss`` with the config's ``loss`` weights)
    without its presence term: the U-Net has no presence head. Called as ``loss(logits, target)`` on (B, 1, S, S),
    it returns (total, parts)."""
    from vlseg.training import SegmentationLoss

    return SegmentationLoss(**{**(weights or {}), "presence_weight": 0.0})


def lr_at(step: int, warm: int, progress: float) -> float:
    """The learning-rate scale: linear warm-up over the first ``warm`` steps, then a cosine that reaches 0 as the
    wall-clock ``progress`` (the share of the budget after the timing steps, 0 -> 1) runs out. Following the clock
    rather than a step count planned from the first steps uses the whole budget however the step time drifts."""
    if step < warm:
        return (step + 1) / warm
    return float(0.5 * (1 + np.cos(np.pi * min(max(progress, 0.0), 1.0))))


def build_unet(encoder: str = "resnet18") -> torch.nn.Module:
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise SystemExit("the U-Net reference needs segmentation-models-pytorch: "
                         "pip install segmentation-models-pytorch (or the dev extra)") from e
    return smp.Unet(encoder, encoder_weights=None, in_channels=3, classes=1)


def train_reference(train_images: list[np.ndarray], train_masks: list[np.ndarray], weights: np.ndarray,
                    minutes: float, augment: dict[str, Any] | None, batch_size: int = 12, seed: int = 0,
                    encoder: str = "resnet18", progress: bool = True,
                    loss_weights: dict[str, float] | None = None) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train the U-Net for ``minutes`` of wall-clock on (S, S, 3) uint8 images and (S, S) bool masks, drawn with
    ``weights`` (per image) and weighed by the main job's loss (``reference_loss(loss_weights)``). The learning rate's
    cosine follows the clock (``lr_at``), and no step starts after the budget (the last may end one step past it).
    Returns (model in eval mode, {"steps", "expected_steps", "step_s", "bf16", "train_s", "last_start_s", "losses"}):
    ``last_start_s`` is when the last step began, ``train_s`` when it ended (seconds from the start)."""
    from tqdm.auto import tqdm

    from vlseg.data import PairedAugment
    from vlseg.precision import machine_info
    from vlseg.training import MIN_SPEEDUP

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    aug = PairedAugment(**augment, seed=seed) if augment else None
    model = build_unet(encoder).train()
    loss_fn = reference_loss(loss_weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    p = weights / weights.sum()

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = rng.choice(len(train_images), size=batch_size, p=p)
        ims, ms = [], []
        for i in idx:
            im, m = train_images[i], train_masks[i]
            if aug is not None:
                im, out, _ = aug.apply(im, {"m": m})
                m = out["m"]
            ims.append(im)
            ms.append(m)
        return to_tensor(np.stack(ims)), torch.from_numpy(np.stack(ms)[:, None].astype(np.float32))

    def step(x: torch.Tensor, y: torch.Tensor, bf16: bool, lr_scale: float = 1.0) -> float:
        for g in opt.param_groups:
            g["lr"] = 1e-3 * lr_scale
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss, _ = loss_fn(logits.float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    budget = minutes * 60.0
    t0 = time.perf_counter()
    losses: list[float] = []
    bf16 = False
    timed: dict[bool, list[float]] = {False: [], True: []}
    probe = [False, True, False, True] if machine_info("cpu").cpu_bf16 else [False, False]
    for flag in probe:  # warm-up and timing steps: they train too (short warm-up lr)
        x, y = batch()
        t = time.perf_counter()
        losses.append(step(x, y, flag, 0.1))
        timed[flag].append(time.perf_counter() - t)
    if timed[True]:
        bf16 = min(timed[False]) / min(timed[True]) >= MIN_SPEEDUP
    step_s = min(timed[bf16])
    start = time.perf_counter() - t0
    expected = max(1, int((budget - start) / step_s))  # for the progress bar only: the clock ends the run
    bar = tqdm(total=expected, desc="U-Net reference", disable=not progress)
    warm = min(30, expected // 10)
    s, last_start = 0, 0.0
    while (now := time.perf_counter() - t0) < budget:
        last_start = now
        lr_scale = lr_at(s, warm, (now - start) / max(budget - start, 1e-9))
        x, y = batch()
        losses.append(step(x, y, bf16, lr_scale))
        s += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    return model.eval(), {"steps": len(losses), "expected_steps": expected + len(probe), "step_s": round(step_s, 3),
                          "bf16": bf16, "train_s": time.perf_counter() - t0, "last_start_s": last_start,
                          "losses": losses}


@torch.no_grad()
def predict(model: torch.nn.Module, image: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) bool: the U-Net at ``size``, logits resized back, threshold 0.5."""
    logits = model(to_tensor(_resize_image(image, size)[None]))
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return (logits[0, 0] > 0).numpy()


def vlseg_dice(eval_dir: str | Path) -> dict[str, dict[str, float]]:
    """Per dataset, vlseg's mean Dice over the first prompt level's rows of a ``vlseg evaluate`` per_image.csv."""
    rows = list(csv.DictReader(open(Path(eval_dir) / "per_image.csv")))
    if not rows:
        raise SystemExit(f"{eval_dir}/per_image.csv has no rows")
    first = rows[0]["level"]
    by: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        if r["level"] == first:
            by[r["dataset"]].append(float(r["dice"]))
    return {d: {"dice": float(np.mean(v)), "n": len(v), "level": first} for d, v in by.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "finetune/configs/offline-shared.yaml"),
                    help="the training config whose data, split and augmentation to use")
    ap.add_argument("--minutes", type=float, default=12.0, help="wall-clock training budget")
    ap.add_argument("--against", help="a `vlseg evaluate ... --split val` folder (its per_image.csv)")
    ap.add_argument("--out", default="runs/unet-reference")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    ap.add_argument("--max-train", type=int, default=None, help="use at most this many training images (tests)")
    args = ap.parse_args(argv)

    from vlseg import training as T
    from vlseg.data import split_sources
    from vlseg import metrics
    from vlseg.precision import machine_info

    torch.set_num_threads(args.threads or len(os.sched_getaffinity(0)))
    cfg = T.load_config(args.config, [])
    train, val = split_sources(cfg.data, cfg.val_fraction, cfg.data_split_seed, roots=[Path.cwd(), ROOT])
    parts = single_class_parts(train)
    item_w = np.asarray(train.item_weights(), np.float64)
    images, masks, weights = [], [], []
    keep = [i for i, (k, _) in enumerate(train.locations) if k in parts][: args.max_train]
    for i in keep:
        s = train[i]
        mask = s.mask if s.mask is not None else np.zeros(s.image.shape[:2], bool)
        im, m = _resize(s.image, mask, args.image_size)
        images.append(im)
        masks.append(m)
        weights.append(item_w[i])
    info = machine_info("cpu")
    print(f"machine: {info.describe('cpu')}")
    print(f"training images: {len(images)} from {', '.join(parts)}; {args.minutes:g} min budget")
    model, log = train_reference(images, masks, np.asarray(weights), args.minutes, cfg.augment, cfg.batch_size,
                                 args.seed, args.encoder, loss_weights=cfg.loss)
    per: dict[str, list[float]] = defaultdict(list)
    val_parts = set(parts)
    for i, (k, _) in enumerate(val.locations):
        if k not in val_parts:
            continue
        s = val[i]
        truth = s.mask if s.mask is not None else np.zeros(s.image.shape[:2], bool)
        per[s.dataset].append(metrics.dice(predict(model, s.image, args.image_size), truth))
    result: dict[str, Any] = {
        "machine": info.to_dict(), "machine_line": info.describe("cpu"), "config": args.config,
        "minutes": args.minutes, "image_size": args.image_size, "encoder": args.encoder, "seed": args.seed,
        "train_images": len(images), **{k: v for k, v in log.items() if k != "losses"},
        "per_dataset": {d: {"dice": float(np.mean(v)), "n": len(v)} for d, v in sorted(per.items())},
    }
    lines = [f"U-Net reference ({args.encoder} from scratch, {args.image_size} px, {log['steps']} steps in "
             f"{log['train_s']:.0f} s, {'bf16' if log['bf16'] else 'fp32'}) on {info.describe('cpu')}"]
    header = "| dataset | n | U-Net | issue's U-Net figure |"
    if args.against:
        ours = vlseg_dice(args.against)
        result["against"] = {"dir": args.against, "per_dataset": ours}
        header += " vlseg | vlseg / U-Net |"
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for d, v in result["per_dataset"].items():
        issue = ISSUE_FIGURES.get(d)
        row = f"| {d} | {v['n']} | {v['dice']:.3f} | {'-' if issue is None else f'{issue:.2f}'} |"
        if args.against:
            o = result["against"]["per_dataset"].get(d)
            if o is None:
                row += " n/a | n/a |"
            else:
                ratio = o["dice"] / v["dice"] if v["dice"] > 0 else None  # None: the U-Net found nothing
                v["vlseg_dice"], v["ratio"] = o["dice"], ratio
                row += f" {o['dice']:.3f} | {'U-Net 0' if ratio is None else f'{ratio:.2f}x'} |"
        lines.append(row)
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "unet_reference.json").write_text(json.dumps(result, indent=2, default=float))
    _plot(log["losses"], out / "curve.png")
    return result


def _plot(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, lw=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (the main job's, no presence term)")
    ax.set_title("U-Net reference: training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
