"""The ``segmentation`` training task: prompts drawn from the prompt library per (seed, step), Dice + BCE
(+ focal) + presence loss, Dice/IoU/HD95/NSD evaluation on the validation split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import PairedAugment, split_sources
from ..evaluation import evaluate_dataset
from ..features import ImageFeatures
from ..losses import SegmentationLoss
from ..prompts import PromptSampler
from .config import TrainConfig
from .tasks import Batch, Evaluation, Task, register_task


class SegmentationBatcher:
    """Deterministic batches: step s draws its samples, prompts and augmentations from (seed, s) only, so an
    interrupted run resumes on exactly the batches it would have seen, and every process takes its own slice."""

    def __init__(self, ds: Any, cfg: TrainConfig, processor: Any, rank: int, world: int):
        self.ds, self.cfg, self.proc, self.rank, self.world = ds, cfg, processor, rank, world
        w = np.asarray(ds.item_weights(), dtype=np.float64)
        self.p = w / w.sum()
        self.classes = sorted({r["class_name"] for r in ds.records})

    def __call__(self, step: int, device: torch.device | str) -> Batch:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(self.ds), size=cfg.batch_size * self.world, p=self.p)
        idx = idx[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        images, masks, prompts, keys = [], [], [], []
        for j, i in enumerate(idx):
            s = self.ds[int(i)]
            item_seed = int(rng.integers(2**31)) ^ j
            flips = (False, False)
            if cfg.augment:
                a = {"hflip": 0.0, "vflip": 0.0, "degrees": 0, "translate": 0, "scale": None, "brightness": 0,
                     "contrast": 0, "saturation": 0, **cfg.augment}
                s = PairedAugment(**a, seed=item_seed)(s)
                flips = s.meta.get("flipped", flips)
            present = set(s.meta.get("class_names") or [s.class_name])
            absent = [c for c in self.classes if c not in present]
            sampler = PromptSampler(tuple(cfg.prompt_levels), negative_rate=cfg.negative_rate, seed=item_seed)
            text, target, _ = sampler.sample(s.mask, s.class_name, absent=absent)
            images.append(s.image)
            masks.append(target)
            prompts.append([text])  # "" is the p0 level: the model must segment without text
            keys.append(f"{s.meta.get('image', i)}|{flips}")
        pv = self.proc(images, device=device)
        targets = self.proc.masks(masks, device=device).unsqueeze(1)  # (B, 1, S, S)
        return Batch(pixel_values=pv, keys=keys, inputs={"prompts": prompts, "targets": targets})


@register_task
class SegmentationTask(Task):
    name = "segmentation"

    def __init__(self) -> None:
        self._loss: dict[str, SegmentationLoss] = {}

    def datasets(self, cfg: TrainConfig) -> tuple[Any, Any]:
        roots = [Path.cwd(), Path(__file__).resolve().parents[2]]  # the working directory, then a source checkout
        return split_sources(cfg.data, cfg.val_fraction, cfg.seed, roots=roots)

    def batcher(self, model: Any, train: Any, cfg: TrainConfig, rank: int, world: int) -> SegmentationBatcher:
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
