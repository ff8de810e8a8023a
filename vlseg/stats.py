"""Standard errors for evaluation figures whose rows are not independent (prompts of one image, tiles of one canvas).

Small and numpy-only: the language-use report uses them; any per-image evaluation can."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_RESAMPLES = 200  # for the standard error of a figure that is not a mean (an AUROC, a spread)


def cluster_se(values: Sequence[float | None], clusters: Sequence[Any]) -> float | None:
    """Standard error of the mean of ``values`` (None and NaN skipped) when rows of one cluster (an image, a canvas)
    are not independent: the cluster-robust (CR1) estimate, sqrt(C / (C - 1) * sum_c (sum_{i in c} (y_i - mean))^2)
    / N. ``values`` and ``clusters`` run in step (one cluster per value). None with fewer than two clusters."""
    return multiway_se(values, [(c,) for c in clusters])


def multiway_se(values: Sequence[float | None], memberships: Sequence[Sequence[Any]]) -> float | None:
    """Standard error of the mean of ``values`` (None and NaN skipped) when each row belongs to several clusters at
    once: a canvas row to every image on its canvas, so rows that share any image are correlated. The cluster-robust
    sum over clusters g of (sum of the residuals of g's rows)^2, each row's own square counted once (a row in k
    clusters would count it k times), times G / (G - 1), over N^2; with one cluster per row it is ``cluster_se``.
    Rows sharing two clusters (the same pair of images) have their cross term counted twice: an estimate that
    leans high rather than low. None with fewer than two clusters."""
    rows = [(float(v), set(m)) for v, m in zip(values, memberships, strict=True)
            if v is not None and not math.isnan(float(v))]
    if not rows:
        return None
    mean = float(np.mean([v for v, _ in rows]))
    by: dict[Any, float] = {}
    own = 0.0
    for v, clusters in rows:
        e = v - mean
        for c in clusters:
            by[c] = by.get(c, 0.0) + e
        own += (len(clusters) - 1) * e * e
    n_c = len(by)
    if n_c < 2:
        return None
    var = n_c / (n_c - 1) * max(sum(d * d for d in by.values()) - own, 0.0) / len(rows) ** 2
    return float(math.sqrt(var))


def cluster_bootstrap_se(rows: Sequence[dict[str, Any]], stat: Callable[[list[dict[str, Any]]], float | None],
                         cluster: str = "image", resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
                         ) -> float | None:
    """Standard error of ``stat(rows)`` by the cluster bootstrap: the clusters (``row[cluster]``, e.g. images) drawn
    with replacement, in their order of first appearance in ``rows``, from a fixed seed; the sd of ``stat`` over
    the resamples. A resample where ``stat`` is undefined (None: an AUROC of a resample with one label) is left
    out, so the figure is conditional on both labels being drawn. None with fewer than two clusters or fewer than
    two defined resamples."""
    by: dict[Any, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r[cluster], []).append(r)
    groups = list(by.values())
    if len(groups) < 2:
        return None
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(resamples):
        v = stat([r for k in rng.integers(len(groups), size=len(groups)) for r in groups[int(k)]])
        if v is not None:
            vals.append(v)
    return float(np.std(vals, ddof=1)) if len(vals) >= 2 else None
