"""The ``segmentation`` training task: prompts drawn from the prompt library per (seed, step), Dice + BCE
(+ focal) + presence loss, Dice/IoU/HD95/NSD evaluation on the validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import CompositeSampler, GroupCache, PairedAugment, group_by_image, reweight_absent_images, split_sources
from ..data.negatives import hard_subset, negative_candidates
from ..evaluation import evaluate_dataset
from ..features import ImageFeatures
from ..losses import SegmentationLoss
from ..prompts import generate
from .config import TrainConfig
from .tasks import Batch, Evaluation, Task, register_task


class SegmentationBatcher:
    """Deterministic batches: step s draws its images, canvases, prompts and augmentations from (seed, s) only, so
    an interrupted run resumes on exactly the batches it would have seen, and every process takes its own slice.

    Each batch item is one image (all its annotated classes, ``vlseg.data.load_group``; decoded images are kept up
    to ``cfg.decode_cache_mb``; absent-class images are ``cfg.absent_image_weight`` times as likely as their
    dataset's others) or, at ``cfg.composite_rate``, a composite canvas of images from different datasets;
    it gets ``cfg.prompts_per_image`` prompts: its present classes (each with its own mask as target, at a random prompt level) and, at
    ``cfg.negative_rate`` per slot, classes known to be absent (``vlseg.data.negatives``; at ``cfg.hard_negative_rate``
    the hard ones: look-alikes of the present classes and the classes the image is annotated without) with empty
    targets. Items without a present class get only negatives.
    """

    def __init__(self, ds: Any, cfg: TrainConfig, processor: Any, rank: int, world: int):
        self.ds, self.cfg, self.proc, self.rank, self.world = ds, cfg, processor, rank, world
        self.groups = group_by_image(ds)
        w = reweight_absent_images(ds.item_weights(), ds, self.groups, cfg.absent_image_weight)
        self.p = w / w.sum()
        self.group_of = {i: g for g in self.groups for i in g.indices}
        self.pool = sorted({str(r["class_name"]) for r in ds.records})
        self.context: dict[str, tuple[str, ...]] = {}  # every class each dataset annotates
        for r in ds.records:
            d = str(r.get("dataset", ""))
            if r["class_name"] not in self.context.get(d, ()):
                self.context[d] = (*self.context.get(d, ()), str(r["class_name"]))
        self.load = GroupCache(cfg.decode_cache_mb << 20)  # decoded images, shared by single items and canvas tiles
        self.canvases = None
        if cfg.composite_rate > 0:
            self.canvases = CompositeSampler(ds, seed=cfg.seed, tiles=tuple(cfg.composite_tiles),  # type: ignore[arg-type]
                                             size=processor.size, hard_rate=cfg.composite_hard_rate, loader=self.load)

    def _fit(self, image: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Resize an image (bilinear, antialiased) and its masks (nearest) to the processor's square input, as the
        processor itself would, so the model sees the same pixels and augmentation works on fewer of them."""
        size = self.proc.size
        if image.shape[:2] == (size, size):
            return image, masks
        t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        from torchvision.transforms.v2 import functional as tvF

        image = tvF.resize(t, [size, size], antialias=True).permute(1, 2, 0).contiguous().numpy()
        out = {}
        for c, m in masks.items():
            mt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.uint8))[None, None].float()
            out[c] = torch.nn.functional.interpolate(mt, size=(size, size), mode="nearest-exact")[0, 0].numpy() > 0.5
        return image, out

    def _prompts(self, rng: np.random.Generator, masks: dict[str, np.ndarray], negatives: list[str],
                 hard: list[str]) -> tuple[list[str], list[np.ndarray]]:
        """K (prompt, target) pairs for one item."""
        cfg = self.cfg
        present = [c for c, m in masks.items() if m.any()]
        order = [present[i] for i in rng.permutation(len(present))]
        empty = np.zeros(next(iter(masks.values())).shape if masks else (1, 1), bool)
        texts, targets = [], []
        for k in range(cfg.prompts_per_image):
            negative = not order or (negatives and rng.random() < cfg.negative_rate)
            if negative and negatives:
                pool = hard if hard and rng.random() < cfg.hard_negative_rate else negatives
                cls, target = pool[int(rng.integers(len(pool)))], empty
            elif order:
                cls = order[k % len(order)]
                target = masks[cls]
            else:  # nothing present and no known negative: the image's own (empty) classes
                cls, target = next(iter(masks)) if masks else "object", empty
            level = cfg.prompt_levels[int(rng.integers(len(cfg.prompt_levels)))]
            texts.append(generate(target, cls, level, seed=int(rng.integers(2**31))) or cls)
            targets.append(target)
        return texts, targets

    def __call__(self, step: int, device: torch.device | str) -> Batch:
        cfg = self.cfg
        images, prompts, targets, keys = [], [], [], []
        for j in range(self.rank * cfg.batch_size, (self.rank + 1) * cfg.batch_size):
            rng = np.random.default_rng([cfg.seed, step, j])
            key: str | None
            if self.canvases is not None and rng.random() < cfg.composite_rate:
                canvas = self.canvases.canvas(step, item=j)
                image, masks = canvas.image, dict(canvas.targets)
                negatives = self.canvases.negatives(canvas)
                present, absent = canvas.present, canvas.absent
                key = None  # never repeats: not cached
            else:
                g = self.group_of[int(rng.choice(len(self.ds), p=self.p))]
                image, masks = self.load(self.ds, g)
                image, masks = self._fit(image, masks)  # to the model's input size first: augmenting is cheaper
                present = [c for c, m in masks.items() if m.any()]
                absent = [c for c, m in masks.items() if not m.any()]
                flips = (False, False)
                if cfg.augment:
                    a = {"hflip": 0.0, "vflip": 0.0, "degrees": 0, "translate": 0, "scale": None, "brightness": 0,
                         "contrast": 0, "saturation": 0, **cfg.augment}
                    image, shown, flips = PairedAugment(**a, seed=int(rng.integers(2**31))).apply(
                        image, {c: masks[c] for c in present})  # empty masks stay empty
                    masks.update(shown)
                negatives = negative_candidates(self.pool, present, absent, self.context.get(g.dataset, ()))
                key = f"{g.key}|{flips}"
            hard = hard_subset(negatives, present, absent)
            texts, tg = self._prompts(rng, masks, negatives, hard)
            images.append(image)
            prompts.append(texts)
            targets.append(tg)
            keys.append(key)
        pv = self.proc(images, device=device)
        t = torch.stack([self.proc.masks(tg, device=device) for tg in targets])  # (B, K, S, S)
        return Batch(pixel_values=pv, keys=keys, inputs={"prompts": prompts, "targets": t})


@register_task
class SegmentationTask(Task):
    name = "segmentation"

    def __init__(self) -> None:
        self._loss: dict[str, SegmentationLoss] = {}

    def datasets(self, cfg: TrainConfig) -> tuple[Any, Any]:
        roots = [Path.cwd(), Path(__file__).resolve().parents[2]]  # the working directory, then a source checkout
        return split_sources(cfg.data, cfg.val_fraction, cfg.data_split_seed, roots=roots)

    def batcher(self, model: Any, train: Any, cfg: TrainConfig, rank: int, world: int) -> Any:
        self._loss["fn"] = SegmentationLoss(**cfg.loss)
        return SegmentationBatcher(train, cfg, model.processor, rank, world)

    def loss(self, model: Any, batch: Batch, image_features: ImageFeatures | None) -> tuple[torch.Tensor,
                                                                                         dict[str, float]]:
        out = model(batch.pixel_values, batch.inputs["prompts"], image_features=image_features)
        return self._loss["fn"](out.logits, batch.inputs["targets"], out.presence)

    def evaluate(self, model: Any, val: Any, cfg: TrainConfig) -> Evaluation:
        summary, _ = evaluate_dataset(model, val, cfg.eval_levels, cfg.eval_max_samples, cfg.seed)
        value = float(summary["all"][cfg.best_metric])
        score = -value if cfg.best_metric == "hd95" else value  # lower is better for distances
        return Evaluation(score=score, headline={"dice": float(summary["all"]["dice"])}, summary=summary)

    def finish(self, model: Any, val: Any, cfg: TrainConfig) -> dict[str, Any]:
        """Calibrate the presence threshold on the validation split (stored in the model's config, so segment,
        predict, the CLI and the demo use it) and report language use there."""
        from ..language_use import language_use_report, presence_calibration, summary_line

        report: dict[str, Any] = {}
        if cfg.calibrate_presence and model.config.presence:
            cal = presence_calibration(model, val, seed=cfg.seed)
            model.config.presence_threshold = float(cal["threshold"])
            report["presence_calibration"] = {k: v for k, v in cal.items() if k != "curve"}
        lu = language_use_report(model, val, seed=cfg.seed, max_images=cfg.eval_max_samples or 200)
        lu["summary_line"] = summary_line(lu)
        report["language_use"] = lu
        return report
