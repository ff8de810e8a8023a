"""Boxes for localized answers (VQLA): from masks, normalised, compared.

Convention (used everywhere in ``vlseg.vqa``): a box is ``(x1, y1, x2, y2)`` in *continuous* image coordinates, the
pixel grid's edges, so a pixel at column ``c`` spans ``[c, c + 1)``. A mask covering columns 3..6 and rows 2..4 has
the box ``(3, 2, 7, 5)``: width ``x2 - x1`` and height ``y2 - y1``, no "+1" anywhere. Normalised boxes divide x by the
image width and y by its height, so they lie in ``[0, 1]``. ``VQASample.box`` is always normalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

Box = tuple[float, float, float, float]


def _as_box(box: Any, name: str = "box") -> Box:
    arr = np.asarray(box, dtype=np.float64)
    if arr.shape != (4,):
        raise ValueError(f"{name} must be 4 numbers (x1, y1, x2, y2), got shape {arr.shape}: {box!r}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has NaN or infinite values: {box!r}")
    x1, y1, x2, y2 = (float(v) for v in arr)
    if x2 < x1 or y2 < y1:
        raise ValueError(f"{name} {box!r} has x2 < x1 or y2 < y1; expected (x1, y1, x2, y2)")
    return x1, y1, x2, y2


def mask_to_box(mask: np.ndarray, normalized: bool = False) -> Box:
    """The tightest box around a mask's foreground.

    Args:
        mask: (H, W) bool (or 0/1, 0/255) array.
        normalized: divide by (W, H) so the box lies in [0, 1].

    Returns:
        (x1, y1, x2, y2), pixel edges (x2 = last foreground column + 1), or normalised edges.

    Raises:
        ValueError: the mask is not 2-D or has no foreground pixel.
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {m.shape}")
    m = m > 0
    if not m.any():
        raise ValueError("mask_to_box: the mask is empty (no foreground pixel), so it has no box")
    rows = np.flatnonzero(m.any(axis=1))
    cols = np.flatnonzero(m.any(axis=0))
    box = (float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1))
    return normalize_box(box, m.shape[1], m.shape[0]) if normalized else box


def normalize_box(box: Sequence[float], width: int, height: int) -> Box:
    """Pixel-edge box -> normalised box: (x1 / W, y1 / H, x2 / W, y2 / H).

    Raises:
        ValueError: non-positive size, or a box reaching outside the (width x height) image.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    x1, y1, x2, y2 = _as_box(box)
    if x1 < 0 or y1 < 0 or x2 > width or y2 > height:
        raise ValueError(f"box {tuple(box)} reaches outside the {width}x{height} (WxH) image")
    return x1 / width, y1 / height, x2 / width, y2 / height


def denormalize_box(box: Sequence[float], width: int, height: int) -> Box:
    """Normalised box -> pixel-edge box (x1 * W, y1 * H, x2 * W, y2 * H)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")
    x1, y1, x2, y2 = _as_box(box)
    return x1 * width, y1 * height, x2 * width, y2 * height


def box_iou(a: Any, b: Any) -> Any:
    """Intersection over union of boxes in one coordinate frame (normalised or pixel edges, not mixed).

    Uses ``torchvision.ops.box_iou``; two empty boxes (zero union) give 0, not NaN.

    Args:
        a: one box (4,) or N boxes (N, 4), as a sequence, numpy array or tensor.
        b: one box (4,) or M boxes (M, 4).

    Returns:
        a float when both are single boxes, else an (N, M) array (a tensor when both inputs are tensors).
    """
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    tensors = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)

    def to_tensor(x: Any, name: str) -> tuple[torch.Tensor, bool]:
        t = torch.as_tensor(np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64))
        single = t.ndim == 1
        t = t.reshape(1, -1) if single else t
        if t.ndim != 2 or t.shape[1] != 4:
            raise ValueError(f"{name} must be a box (4,) or boxes (N, 4), got shape {tuple(t.shape)}")
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has NaN or infinite values")
        if (t[:, 2] < t[:, 0]).any() or (t[:, 3] < t[:, 1]).any():
            raise ValueError(f"{name} has a box with x2 < x1 or y2 < y1; expected (x1, y1, x2, y2)")
        return t, single

    ta, single_a = to_tensor(a, "a")
    tb, single_b = to_tensor(b, "b")
    iou = torch.nan_to_num(tv_box_iou(ta, tb), nan=0.0)
    if single_a and single_b:
        return float(iou[0, 0])
    return iou.to(torch.float32) if tensors else iou.numpy()


__all__ = ["Box", "box_iou", "denormalize_box", "mask_to_box", "normalize_box"]
