"""Fine-tuning SAM 3 (the ``sam3-segmentation`` training task): semantic masks -> instances (connected components,
with boxes) -> Hungarian matching (``scipy.optimize.linear_sum_assignment``) -> SAM 3's losses.

transformers provides no loss for ``Sam3Model``; matcher and losses follow facebookresearch/sam3
(``sam3/train/matcher.py``, ``sam3/train/loss/loss_fns.py`` and its full fine-tuning configs):

    matcher  cost = 2 * focal class cost (alpha 0.25, gamma 2) + 5 * L1 (cx, cy, w, h) + 2 * (-GIoU); no mask term
    losses   boxes 5 * L1 + 2 * GIoU; classification (IABCE) 20 * BCE against a soft target p^0.25 * IoU^0.75 for
             matched queries (pos_weight 10), unmatched queries weighted by p^2, only where the concept is present;
             presence 20 * BCE / 2; masks 200 * focal (0.25, 2) + 10 * dice; semantic head 20 * focal (0.6, 2) +
             30 * dice; every instance term divided by the number of target instances.
    not done SAM 3's auxiliary losses on every decoder layer and its one-to-many branch (transformers returns
             only the last layer's queries).

With the Perception Encoder frozen (``train_parts: decoder``, the MedSAM-3 recipe) the detector and mask decoder
train; the box encoder stays frozen (text prompts give it no gradient). ``train_parts: lora`` adds LoRA on the ViT
(and the text tower with ``lora: {text: true}``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..features import ImageFeatures

try:  # the task needs the [train] extra (pydantic, ...); a base install still gets the loss functions
    from ..training.config import TrainConfig
    from ..training.segmentation import SegmentationBatcher, SegmentationTask
    from ..training.tasks import Batch, register_task
except ImportError:  # pragma: no cover - exercised only without the [train] extra
    SegmentationTask = None  # type: ignore[assignment,misc]

#: loss weights of SAM 3's fine-tuning configs
LOSS_WEIGHTS = {"ce": 20.0, "presence": 20.0, "bbox": 5.0, "giou": 2.0, "mask": 200.0, "dice": 10.0,
                "semantic": 20.0, "semantic_dice": 30.0}
#: matching costs (BinaryHungarianMatcherV2, focal); ``dice`` > 0 adds a Mask2Former-style mask term
MATCH_COSTS = {"class": 2.0, "bbox": 5.0, "giou": 2.0, "dice": 0.0}
TASK_OPTIONS = {"weights", "costs", "pos_weight", "semantic_head", "max_instances", "min_area"}


# ----------------------------------------------------------------------------- targets
def semantic_to_instances(mask: np.ndarray, max_instances: int | None = None, min_area: int = 1
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) bool semantic mask -> (N, H, W) bool instance masks (8-connected components, largest first, specks
    under ``min_area`` pixels dropped) and (N, 4) boxes (x0, y0, x1, y1) normalised to [0, 1], pixel edges
    (x1 = (last column + 1) / W)."""
    from scipy import ndimage

    h, w = mask.shape
    lab, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros((0, h, w), bool), np.zeros((0, 4), np.float32)
    areas = ndimage.sum_labels(np.ones_like(lab), lab, index=np.arange(1, n + 1))
    order = [i for i in np.argsort(-areas, kind="stable") if areas[i] >= min_area][:max_instances]
    slices = ndimage.find_objects(lab)
    masks = np.stack([lab == i + 1 for i in order]) if order else np.zeros((0, h, w), bool)
    boxes = np.asarray([[slices[i][1].start / w, slices[i][0].start / h, slices[i][1].stop / w,
                         slices[i][0].stop / h] for i in order], np.float32).reshape(-1, 4)
    return masks, boxes


def make_targets(targets: Tensor, mask_size: int, max_instances: int | None = None, min_area: int = 1
                 ) -> list[dict[str, Tensor]]:
    """(R, S, S) semantic targets (one per image-prompt row, at the model input size: the image is squashed, not
    padded, so normalised coordinates are the original image's) -> per row ``{"masks": (N, m, m), "boxes": (N, 4)
    xyxy in [0, 1], "semantic": (m, m)}`` at the mask resolution m."""
    out = []
    dev = targets.device
    for t in targets.detach().float().cpu():
        sem = t.numpy() > 0.5
        inst, boxes = semantic_to_instances(sem, max_instances, min_area)
        small = torch.from_numpy(inst).float()[:, None]
        if len(small):
            small = F.interpolate(small, size=(mask_size, mask_size), mode="area")[:, 0]
        else:
            small = small.new_zeros(0, mask_size, mask_size)
        sem_small = F.interpolate(t[None, None], size=(mask_size, mask_size), mode="area")[0, 0]
        out.append({"masks": (small > 0.5).float().to(dev), "boxes": torch.from_numpy(boxes).to(dev),
                    "semantic": (sem_small > 0.5).float().to(dev)})
    return out


# ----------------------------------------------------------------------------- matching and losses
def _cxcywh(b: Tensor) -> Tensor:
    x0, y0, x1, y1 = b.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)


@torch.no_grad()
def hungarian_match(logits: Tensor, boxes: Tensor, masks: Tensor, tgt: dict[str, Tensor],
                    costs: dict[str, float] = MATCH_COSTS, alpha: float = 0.25, gamma: float = 2.0
                    ) -> tuple[Tensor, Tensor]:
    """One (image, prompt) row: logits (Q,), boxes (Q, 4) xyxy in [0, 1], masks (Q, m, m) logits -> (query
    indices, target indices), the assignment of least cost (``scipy.optimize.linear_sum_assignment``)."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import generalized_box_iou

    n = len(tgt["boxes"])
    if n == 0:
        empty = torch.zeros(0, dtype=torch.long, device=logits.device)
        return empty, empty
    p = logits.sigmoid()
    neg = (1 - alpha) * p**gamma * -(1 - p + 1e-8).log()
    pos = alpha * (1 - p) ** gamma * -(p + 1e-8).log()
    cost = costs["class"] * (pos - neg)[:, None].expand(-1, n)
    cost = cost + costs["bbox"] * torch.cdist(_cxcywh(boxes), _cxcywh(tgt["boxes"]), p=1)
    cost = cost - costs["giou"] * generalized_box_iou(boxes, tgt["boxes"])
    if costs.get("dice", 0.0):
        pm, tm = masks.flatten(1).sigmoid(), tgt["masks"].flatten(1)
        dice = 1 - (2 * pm @ tm.T + 1) / (pm.sum(-1)[:, None] + tm.sum(-1)[None] + 1)
        cost = cost + costs["dice"] * dice
    qi, ti = linear_sum_assignment(cost.float().cpu().numpy())
    dev = logits.device
    return torch.as_tensor(qi, dtype=torch.long, device=dev), torch.as_tensor(ti, dtype=torch.long, device=dev)


def sigmoid_focal(x: Tensor, t: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise focal loss on logits ``x`` against targets ``t`` (alpha < 0: no class weighting)."""
    p = x.sigmoid()
    loss = F.binary_cross_entropy_with_logits(x, t, reduction="none") * (1 - (p * t + (1 - p) * (1 - t))) ** gamma
    return loss * (alpha * t + (1 - alpha) * (1 - t)) if alpha >= 0 else loss


def dice_loss(x: Tensor, t: Tensor) -> Tensor:
    """(N, P) logits and targets -> (N,) soft Dice loss."""
    p = x.sigmoid()
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


class Sam3Loss:
    """SAM 3's detection + segmentation loss on ``QueryOutputs.raw`` of R (image, prompt) rows.

    Args:
        weights: per-term weights (defaults ``LOSS_WEIGHTS``).  costs: matching costs (``MATCH_COSTS``).
        pos_weight: weight of matched queries in the classification loss.  semantic_head: train SAM 3's
            semantic-segmentation head too.
    """

    def __init__(self, weights: dict[str, float] | None = None, costs: dict[str, float] | None = None,
                 pos_weight: float = 10.0, semantic_head: bool = True):
        self.weights = {**LOSS_WEIGHTS, **(weights or {})}
        self.costs = {**MATCH_COSTS, **(costs or {})}
        bad = (set(self.weights) - set(LOSS_WEIGHTS)) | (set(self.costs) - set(MATCH_COSTS))
        if bad:
            raise ValueError(f"Unknown SAM 3 loss/cost name(s) {sorted(bad)}; weights: {sorted(LOSS_WEIGHTS)}, "
                             f"costs: {sorted(MATCH_COSTS)}")
        self.pos_weight = float(pos_weight)
        self.semantic_head = bool(semantic_head)

    def __call__(self, raw: dict[str, Tensor], targets: list[dict[str, Tensor]]) -> tuple[Tensor, dict[str, float]]:
        from torchvision.ops import generalized_box_iou

        logits_all = raw["pred_logits"].float()  # (R, Q)
        boxes_all, masks_all = raw["pred_boxes"].float(), raw["pred_masks"].float()
        presence_all, sem_all = raw["presence_logits"].float()[:, 0], raw["semantic_seg"].float()[:, 0]
        r, q = logits_all.shape
        if len(targets) != r:
            raise ValueError(f"{len(targets)} targets for {r} (image, prompt) rows")
        num = max(sum(len(t["boxes"]) for t in targets), 1)
        zero = logits_all.new_zeros(())
        parts = dict.fromkeys(LOSS_WEIGHTS, zero)
        ce_rows = []
        for b, tgt in enumerate(targets):
            logits, boxes, masks = logits_all[b], boxes_all[b], masks_all[b]
            qi, ti = hungarian_match(logits, boxes, masks, tgt, self.costs)
            present = float(len(tgt["boxes"]) > 0)
            # presence head: target "at least one instance"; focal(alpha 0.5, gamma 0) = BCE / 2
            parts["presence"] = parts["presence"] + sigmoid_focal(presence_all[b], presence_all.new_tensor(present),
                                                                  0.5, 0.0) / r
            matched = torch.zeros(q, device=logits.device)
            matched[qi] = 1.0
            soft = matched.clone()
            if len(qi):
                iou = torch.diag(generalized_box_iou(boxes[qi], tgt["boxes"][ti])).detach().clamp(min=0)
                soft[qi] = (logits[qi].sigmoid().detach() ** 0.25 * iou ** 0.75).clamp(min=0.01)
            # BCE(x, soft) - H(soft): SAM 3's gradient, but a minimum of 0 (the soft target's entropy would lift
            # the printed loss as the boxes improve)
            entropy = F.binary_cross_entropy(soft, soft, reduction="none")
            pos = (F.binary_cross_entropy_with_logits(logits, soft, reduction="none") - entropy) * matched
            neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none") * \
                (1 - matched) * logits.sigmoid().detach() ** 2
            ce_rows.append((pos * self.pos_weight + neg) * present)  # no query loss where the concept is absent
            if len(qi):
                pb, tb = boxes[qi], tgt["boxes"][ti]
                parts["bbox"] = parts["bbox"] + F.l1_loss(_cxcywh(pb), _cxcywh(tb), reduction="sum") / num
                parts["giou"] = parts["giou"] + (1 - torch.diag(generalized_box_iou(pb, tb))).sum() / num
                pm, tm = masks[qi].flatten(1), tgt["masks"][ti].flatten(1)
                parts["mask"] = parts["mask"] + sigmoid_focal(pm, tm, 0.25, 2.0).mean(1).sum() / num
                parts["dice"] = parts["dice"] + dice_loss(pm, tm).sum() / num
            if self.semantic_head:
                s, ts = sem_all[b].flatten(), tgt["semantic"].flatten()
                parts["semantic"] = parts["semantic"] + sigmoid_focal(s, ts, 0.6, 2.0).mean() / r
                parts["semantic_dice"] = parts["semantic_dice"] + dice_loss(s[None], ts[None]).sum() / r
        parts["ce"] = torch.stack(ce_rows).mean()
        total = sum(self.weights[k] * v for k, v in parts.items())
        assert isinstance(total, Tensor)
        return total, {k: float(v.detach()) for k, v in parts.items()}


# ----------------------------------------------------------------------------- the task
class InstanceBatcher:
    """The segmentation task's deterministic batches plus instance targets for SAM 3's matcher."""

    def __init__(self, base: Any, mask_size: int, max_instances: int | None, min_area: int):
        self.base, self.mask_size, self.max_instances, self.min_area = base, mask_size, max_instances, min_area

    def __call__(self, step: int, device: torch.device | str) -> Batch:
        batch = self.base(step, device)
        t = batch.inputs["targets"]  # (B, K, S, S)
        batch.inputs["instances"] = make_targets(t.reshape(-1, *t.shape[-2:]), self.mask_size, self.max_instances,
                                                 self.min_area)
        return batch


if SegmentationTask is not None:

    @register_task
    class Sam3SegmentationTask(SegmentationTask):
        """The segmentation task (data, prompts, evaluation) with SAM 3's matching loss. ``task_options``: ``weights``
        and ``costs`` (override ``LOSS_WEIGHTS`` / ``MATCH_COSTS``), ``pos_weight``, ``semantic_head``,
        ``max_instances`` (default: the model's query count), ``min_area`` (pixels at the input size)."""

        name = "sam3-segmentation"

        def batcher(self, model: Any, train: Any, cfg: TrainConfig, rank: int, world: int) -> InstanceBatcher:
            opts = dict(cfg.task_options)
            unknown = set(opts) - TASK_OPTIONS
            if unknown:
                raise ValueError(f"Unknown task_options {sorted(unknown)} for {self.name}; valid: {sorted(TASK_OPTIONS)}")
            queries = getattr(getattr(getattr(model, "decoder", None), "detr_decoder", None), "config", None)
            if queries is None:
                raise ValueError(f"the {self.name} task trains SAM 3 models (family sam3), got a "
                                 f"{getattr(getattr(model, 'family', None), 'name', type(model).__name__)!r} model")
            self._sam3_loss = Sam3Loss(opts.get("weights"), opts.get("costs"), opts.get("pos_weight", 10.0),
                                       opts.get("semantic_head", True))
            mask_size = 4 * model.processor.size // model.image_encoder.info.patch_size
            base = SegmentationBatcher(train, cfg, model.processor, rank, world)
            return InstanceBatcher(base, mask_size, int(opts.get("max_instances", queries.num_queries)),
                                   int(opts.get("min_area", 1)))

        def loss(self, model: Any, batch: Batch, image_features: ImageFeatures | None) -> tuple[Tensor,
                                                                                             dict[str, float]]:
            out = model(batch.pixel_values, batch.inputs["prompts"], image_features=image_features)
            if out.instances is None:
                raise ValueError(f"the {self.name} task needs a model that returns instances (SAM 3)")
            return self._sam3_loss(out.instances.raw, batch.inputs["instances"])

__all__ = ["LOSS_WEIGHTS", "MATCH_COSTS", "InstanceBatcher", "Sam3Loss", "hungarian_match", "make_targets",
           "semantic_to_instances"]
