"""Per-image segmentation metrics (what medical papers report), with empty targets scored deliberately:

- Dice / IoU: both empty -> 1.0 (a correct "absent"); exactly one empty -> 0.0.
- HD95 (MONAI): both empty -> 0.0; exactly one empty -> the image diagonal (the worst possible distance), so a
  missed or hallucinated structure is not silently dropped from the mean. In mm when ``spacing`` is given.
- NSD (MONAI surface Dice at tolerance ``tau``): both empty -> 1.0; exactly one empty -> 0.0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np


def _b(x: Any) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {a.shape}")
    return a > 0 if a.dtype != bool else a


def dice(pred: Any, target: Any) -> float:
    p, t = _b(pred), _b(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    s = p.sum() + t.sum()
    return 1.0 if s == 0 else float(2 * (p & t).sum() / s)


def iou(pred: Any, target: Any) -> float:
    p, t = _b(pred), _b(target)
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and target {t.shape} differ in shape")
    u = (p | t).sum()
    return 1.0 if u == 0 else float((p & t).sum() / u)


def _spacing(spacing: Sequence[float] | None) -> tuple[float, float]:
    return (1.0, 1.0) if spacing is None else (float(spacing[0]), float(spacing[1]))


def hd95(pred: Any, target: Any, spacing: Sequence[float] | None = None) -> float:
    """95th-percentile symmetric Hausdorff distance (MONAI), in pixels or mm."""
    p, t = _b(pred), _b(target)
    sy, sx = _spacing(spacing)
    if not p.any() and not t.any():
        return 0.0
    if not p.any() or not t.any():
        return float(math.hypot(p.shape[0] * sy, p.shape[1] * sx))
    import warnings

    import torch
    from monai.metrics import compute_hausdorff_distance

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        v = compute_hausdorff_distance(torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float(),
                                       include_background=True, percentile=95, spacing=[sy, sx])
    return float(v.item())


def nsd(pred: Any, target: Any, tau: float = 2.0, spacing: Sequence[float] | None = None) -> float:
    """Normalised surface Dice (MONAI) at tolerance ``tau`` (pixels or mm)."""
    p, t = _b(pred), _b(target)
    if not p.any() and not t.any():
        return 1.0
    if not p.any() or not t.any():
        return 0.0
    import warnings

    import torch
    from monai.metrics import compute_surface_dice

    sy, sx = _spacing(spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        v = compute_surface_dice(torch.from_numpy(p)[None, None].float(), torch.from_numpy(t)[None, None].float(),
                                 class_thresholds=[tau], include_background=True, spacing=[sy, sx])
    return float(v.item())


def all_metrics(pred: Any, target: Any, spacing: Sequence[float] | None = None, tau: float = 2.0) -> dict[str, float]:
    return {"dice": dice(pred, target), "iou": iou(pred, target), "hd95": hd95(pred, target, spacing),
            "nsd": nsd(pred, target, tau, spacing)}


def aggregate(rows: list[dict[str, Any]], by: str | None = None,
              keys: Sequence[str] = ("dice", "iou", "hd95", "nsd")) -> dict[str, dict[str, float]]:
    """Mean (and count) of per-image metric rows, overall ("all") and per value of the ``by`` column."""
    groups: dict[str, list[dict[str, Any]]] = {"all": rows}
    if by is not None:
        for r in rows:
            groups.setdefault(str(r.get(by)), []).append(r)
    out = {}
    for g, rs in groups.items():
        out[g] = {k: float(np.mean([r[k] for r in rs])) for k in keys if rs and k in rs[0]}
        out[g]["n"] = len(rs)
    return out
