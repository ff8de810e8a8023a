"""Segmentation losses (explicit ``from_logits``; empty targets handled on purpose).

Shapes: logits and targets (B, K, H, W) (any leading dims); presence logits and targets (B, K).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F


class DiceLoss(nn.Module):
    """Soft Dice per (image, prompt) map, averaged. With ``smooth`` > 0 an empty target and an empty prediction
    give loss 0 while any predicted foreground on an empty target is penalised (no division by zero)."""

    def __init__(self, from_logits: bool = True, smooth: float = 1.0):
        super().__init__()
        self.from_logits, self.smooth = from_logits, smooth

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        p = torch.sigmoid(pred) if self.from_logits else pred
        p, t = p.flatten(-2).float(), target.flatten(-2).float()
        inter = (p * t).sum(-1)
        dice = (2 * inter + self.smooth) / (p.sum(-1) + t.sum(-1) + self.smooth)
        return (1 - dice).mean()


class FocalLoss(nn.Module):
    """Binary focal loss (Lin et al.) on logits: mean over pixels."""

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25):
        super().__init__()
        self.gamma, self.alpha = gamma, alpha

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        t = target.float()
        ce = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
        p = torch.sigmoid(logits.float())
        pt = p * t + (1 - p) * (1 - t)
        loss = ce * (1 - pt) ** self.gamma
        if self.alpha is not None:
            loss = loss * (self.alpha * t + (1 - self.alpha) * (1 - t))
        return loss.mean()


def balanced_bce(logits: Tensor, target: Tensor, balance: float) -> Tensor:
    """Pixel BCE on logits whose positive pixels weigh ``(negatives / positives) ** balance`` in each map.

    The class balancing of HED (Xie & Tu, 2015), made partial: ``balance`` 0 is plain BCE, 1 gives a map's foreground
    as much weight in all as its background, so a thin structure (vessels covering 10% of an image) is not outweighed
    by its background the way a large lesion is not. Maps with no foreground (negative prompts) are plain BCE.
    Shapes: logits, target (..., H, W) -> scalar (mean over every pixel).
    """
    t = target.float()
    if not balance:
        return F.binary_cross_entropy_with_logits(logits, t)
    pos = t.flatten(-2).sum(-1)
    neg = t.shape[-2] * t.shape[-1] - pos
    ratio = (neg / pos.clamp_min(1.0)).clamp_min(1.0) ** balance  # never below 1: mostly-foreground maps stay plain
    weight = 1.0 + t * (ratio[..., None, None] - 1.0)
    return F.binary_cross_entropy_with_logits(logits, t, weight=weight)


class SegmentationLoss(nn.Module):
    """``dice_weight * Dice + bce_weight * BCE (+ focal_weight * Focal) + presence_weight * BCE(presence)``.

    ``bce_balance`` > 0 weighs each map's foreground pixels in the BCE by (background / foreground) ** bce_balance
    (:func:`balanced_bce`). The presence target is 1 where the target mask has any foreground (0 for negative
    prompts). Returns (total, parts dict of floats for logging).
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0, focal_weight: float = 0.0,
                 presence_weight: float = 0.2, bce_balance: float = 0.0):
        super().__init__()
        if not 0.0 <= bce_balance <= 1.0:
            raise ValueError(f"loss.bce_balance must be in [0, 1], got {bce_balance}")
        self.bce_balance = bce_balance
        self.w = dict(dice=dice_weight, bce=bce_weight, focal=focal_weight, presence=presence_weight)
        self.dice = DiceLoss()
        self.focal = FocalLoss()

    def forward(self, logits: Tensor, target: Tensor, presence: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
        logits = logits.float()
        parts: dict[str, Tensor] = {}
        if self.w["dice"]:
            parts["dice"] = self.dice(logits, target)
        if self.w["bce"]:
            parts["bce"] = balanced_bce(logits, target, self.bce_balance)
        if self.w["focal"]:
            parts["focal"] = self.focal(logits, target)
        if presence is not None and self.w["presence"]:
            present = (target.flatten(-2).amax(-1) > 0).float()
            parts["presence"] = F.binary_cross_entropy_with_logits(presence.float(), present)
        total = torch.stack([self.w[k] * v for k, v in parts.items()]).sum() if parts else logits.sum() * 0
        return total, {k: float(v.detach()) for k, v in parts.items()}
