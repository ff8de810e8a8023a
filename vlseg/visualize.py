"""Overlays: masks drawn over images, one colour per prompt (CLI, demo, evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (255, 225, 25), (145, 30, 180), (245, 130, 48),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def colour(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def overlay_masks(image: np.ndarray, masks: Sequence[np.ndarray] | np.ndarray, alpha: float = 0.5,
                  outline: bool = True) -> np.ndarray:
    """(H, W, 3) uint8 image + K (H, W) bool masks -> (H, W, 3) uint8 with mask k tinted ``colour(k)`` and
    outlined."""
    out = image.astype(np.float32).copy()
    for k, m in enumerate(masks):
        m = np.asarray(m, bool)
        if m.shape != image.shape[:2]:
            raise ValueError(f"mask {k} has shape {m.shape}, the image {image.shape[:2]}")
        c = np.array(colour(k), np.float32)
        out[m] = (1 - alpha) * out[m] + alpha * c
        if outline and m.any():
            edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
            out[edge] = c
    return out.clip(0, 255).astype(np.uint8)


def error_overlay(image: np.ndarray, target: np.ndarray, pred: np.ndarray, alpha: float = 0.55) -> np.ndarray:
    """(H, W, 3) uint8 image with a prediction scored against the truth: green = true positive, red = false
    positive, blue = missed (false negative)."""
    out = image.astype(np.float32).copy()
    target, pred = np.asarray(target, bool), np.asarray(pred, bool)
    for m, c in ((pred & target, (0, 255, 0)), (pred & ~target, (255, 0, 0)), (~pred & target, (0, 90, 255))):
        out[m] = (1 - alpha) * out[m] + alpha * np.array(c, np.float32)
    return out.clip(0, 255).astype(np.uint8)
