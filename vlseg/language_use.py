"""Language use: does the prompt decide the mask?

A segmentation model trained on single-class datasets can reach a good Dice while ignoring its prompt: it learns
"the salient thing in this kind of image". Plain Dice cannot see that, so every evaluation report carries these
checks (``language_use_report``), each with a target (module constants):

- wrong class: a class from another dataset (a look-alike when there is one) must give an empty mask;
- presence: the presence score must separate true prompts from wrong-class and annotated-absent ones (AUROC);
- composite canvases: two images side by side (from datasets that cannot show each other's classes); the class
  prompt must segment its own tile (Dice), beat the empty prompt, and not leak onto the other tile;
- multi-class images: each class's mask must match its own ground truth, not the other classes' (parents and parts,
  e.g. "surgical instrument" / "grasper", are not "other");
- prompt levels p1..p9 (``vlseg.prompts.generate``): richer prompts about the same target must not change Dice much.

``calibrate_presence`` picks the presence-gate threshold on a validation split.

A "model" here is a ``VLSegModel`` (run through ``vlseg.predict``, K prompts per image, the empty one included, in
one call) or any callable ``(image (H, W, 3) uint8, prompts: list[str]) -> vlseg.Prediction`` (baselines, stubs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .data.composite import CompositeSampler
from .data.groups import ImageGroup, content_key, group_by_image, image_key, load_group
from .data.negatives import hard_subset, is_relative, negative_candidates
from .metrics import dice
from .prompts import class_names as library_classes
from .prompts import generate, hard_negatives
from .stats import cluster_bootstrap_se, cluster_se, multiway_se

if TYPE_CHECKING:
    from . import Prediction

# Targets (measured on the main job's validation split).
WRONG_CLASS_EMPTY_MIN = 0.95  # wrong-class prompts -> empty mask on at least this share of them
PRESENCE_AUROC_MIN = 0.97  # present vs (wrong-class + annotated-absent) prompts
CANVAS_GAIN_MIN = 0.10  # composite canvases: class-prompt Dice minus empty-prompt Dice
CANVAS_LEAK_MAX = 0.05  # composite canvases: share of the predicted area on other tiles
OWN_OTHER_RATIO_MIN = 2.0  # multi-class images: own-class Dice / other-class Dice, on every multi-class dataset
LEVEL_SPREAD_MAX = 0.03  # max - min mean Dice over prompt levels p1..p9 (3 Dice points)
TARGETS = {"wrong_class_empty_min": WRONG_CLASS_EMPTY_MIN, "presence_auroc_min": PRESENCE_AUROC_MIN,
           "canvas_gain_min": CANVAS_GAIN_MIN, "canvas_leak_max": CANVAS_LEAK_MAX,
           "own_other_ratio_min": OWN_OTHER_RATIO_MIN, "level_spread_max": LEVEL_SPREAD_MAX}
LEVELS = tuple(f"p{i}" for i in range(1, 10))
OTHER_DICE_FLOOR = 1e-3  # own/other ratio = own / max(other, floor): finite (JSON) when other classes get nothing

PredictFn = Callable[[np.ndarray, list[str]], "Prediction"]


# ----------------------------------------------------------------------------- running a model
def as_predict_fn(model: Any, predict_kwargs: Mapping[str, Any] | None = None) -> PredictFn:
    """A ``(image, prompts) -> Prediction`` function for a VLSegModel or a callable of that shape.

    For a VLSegModel, all the prompts, the empty prompt "" (p0) included, go through one ``vlseg.predict`` call (one
    forward pass: the image is encoded once). ``predict_kwargs`` (e.g. ``presence_threshold``, ``threshold``) are
    passed to it; unset ones keep their defaults (the checkpoint's calibrated presence threshold, once stored there).

    Raises:
        TypeError: ``model`` is neither a VLSegModel nor callable.
    """
    from . import Prediction, VLSegModel, predict  # the public API (resolved at call time)

    kw = dict(predict_kwargs or {})
    if not isinstance(model, VLSegModel):
        if callable(model) and not kw:
            return model
        if callable(model):
            raise TypeError("predict_kwargs apply to VLSegModels only; bake them into your callable")
        raise TypeError(f"expected a VLSegModel or a callable (image, prompts) -> Prediction, "
                        f"got {type(model).__name__}")

    def run(image: np.ndarray, prompts: list[str]) -> Prediction:
        return predict(model, image, prompts, **{**kw, "allow_empty_prompts": True})

    return run


@dataclass
class _Out:
    mask: np.ndarray  # (H, W) bool, as the model outputs it (presence-gated)
    presence: float
    max_prob: float
    ungated: np.ndarray  # (H, W) bool, pixel probabilities above the pixel threshold, whatever the presence says


def _pixel_threshold(predict_kwargs: Mapping[str, Any] | None) -> float:
    """The pixel threshold ``predict`` applies with these kwargs (its default, 0.5, unless they set one)."""
    return float(dict(predict_kwargs or {}).get("threshold", 0.5))


def _call(fn: PredictFn, image: np.ndarray, prompts: Sequence[str], pixel_threshold: float = 0.5
          ) -> tuple[dict[str, _Out], bool]:
    """One model call for the unique prompts -> (prompt -> output, has_presence_head)."""
    unique = list(dict.fromkeys(prompts))
    p = fn(image, unique)
    if p.masks.shape[0] != len(unique):
        raise ValueError(f"the model returned {p.masks.shape[0]} masks for {len(unique)} prompts")
    out = {t: _Out(mask=np.asarray(p.masks[k], bool), presence=float(p.presence[k]),
                   max_prob=float(np.max(p.probs[k])) if p.probs[k].size else 0.0,
                   ungated=np.asarray(p.probs[k]) > pixel_threshold) for k, t in enumerate(unique)}
    return out, bool(p.has_presence_head)


# ----------------------------------------------------------------------------- evaluation images
@dataclass
class _Item:
    key: str
    dataset: str
    image: np.ndarray
    masks: dict[str, np.ndarray]
    present: list[str]
    absent: list[str]
    context: list[str]  # every class the item's dataset annotates
    wrong: list[tuple[str, str]] = field(default_factory=list)  # (class, "hard" | "random")


def _dataset_classes(dataset: Any) -> dict[str, list[str]]:
    out: dict[str, dict[str, None]] = {}
    for r in dataset.records:
        out.setdefault(str(r.get("dataset", "")), {})[str(r.get("class_name", ""))] = None
    return {d: list(cs) for d, cs in out.items()}


def select_groups(dataset: Any, max_images: int | None = None, seed: int = 0) -> list[ImageGroup]:
    """Up to ``max_images`` image groups, taken round-robin over datasets (each in a seeded order), so small
    datasets are represented. Deterministic in the images (their content: ``content_key``), ``max_images`` and
    ``seed``: the same selection, in the same order (and so the same canvases), whatever the order of the
    manifest's rows or how its paths are spelt."""
    by: dict[str, list[tuple[tuple[str, ...], ImageGroup]]] = {}
    for g in group_by_image(dataset):
        by.setdefault(g.dataset, []).append(((content_key(dataset, g.indices[0]), *sorted(g.classes)), g))
    rng = np.random.default_rng(seed)
    queues = {}
    for d, keyed in sorted(by.items()):
        # by content, then classes; byte-identical images with the same classes keep their (stable) order
        gs = [g for _, g in sorted(keyed, key=lambda kg: kg[0])]
        queues[d] = [gs[i] for i in rng.permutation(len(gs))]
    out: list[ImageGroup] = []
    limit = sum(len(q) for q in queues.values()) if max_images is None else max_images
    while len(out) < limit and any(queues.values()):
        for d in sorted(queues):
            if queues[d] and len(out) < limit:
                out.append(queues[d].pop(0))
    return out


WRONG_PER_KIND = 2  # wrong-class prompts per image: up to this many look-alikes and this many other classes


def draw_key(dataset: str, image: np.ndarray) -> str:
    """The key that seeds an image's wrong-class draw: its dataset and a hash of its pixels, so the draw (and every
    figure it feeds) is the same however the manifest or image paths are spelt (relative or absolute, moved)."""
    return image_key(dataset, image)


def _wrong_classes(item: _Item, others: list[str], seed: int, per_kind: int = WRONG_PER_KIND
                   ) -> list[tuple[str, str]]:
    """Up to ``per_kind`` look-alikes (when valid ones exist) and ``per_kind`` other classes, from other datasets'
    classes (the library's when the evaluation set has one dataset), never a relative or a possibly-present class,
    no class twice. Drawn without replacement from the sorted candidates, seeded by ``seed`` and the image's
    ``draw_key``: the same classes whatever the order of the manifest's rows or how its paths are spelt."""
    rng = random.Random(f"{seed}:{draw_key(item.dataset, item.image)}")
    valid = negative_candidates(others, item.present, (), item.context, hard_first=False)
    hard = hard_subset(valid, item.present)
    if not hard:  # look-alikes the evaluation set lacks (e.g. "foot ulcer" for a polyp)
        lib = [h for p in item.present for h in hard_negatives(p)]
        hard = negative_candidates(lib, item.present, (), item.context, hard_first=False)
    out = [(c, "hard") for c in rng.sample(sorted(hard), min(per_kind, len(hard)))]
    rest = [c for c in valid if not any(is_relative(c, h) for h, _ in out)]
    out += [(c, "random") for c in rng.sample(sorted(rest), min(per_kind, len(rest)))]
    return out


def _items(dataset: Any, groups: Sequence[ImageGroup], seed: int, progress: bool,
           wrong_per_kind: int = WRONG_PER_KIND) -> Iterable[_Item]:
    if wrong_per_kind < 1:
        raise ValueError(f"wrong_per_kind must be at least 1, got {wrong_per_kind}")
    classes = _dataset_classes(dataset)
    multi = len(classes) > 1
    for g in _progress(groups, progress, "language use"):
        image, masks, samples = load_group(dataset, g)
        if any(s.mask is None for s in samples):
            continue  # unlabelled rows: nothing to score
        present = [c for c, m in masks.items() if m.any()]
        absent = [c for c, m in masks.items() if not m.any()]
        item = _Item(key=g.key, dataset=g.dataset, image=image, masks=masks, present=present, absent=absent,
                     context=classes.get(g.dataset, list(masks)))
        others = ([c for d, cs in classes.items() if d != g.dataset for c in cs] if multi else library_classes())
        item.wrong = _wrong_classes(item, others, seed, wrong_per_kind)
        yield item


def _progress(it: Sequence[Any], on: bool, desc: str) -> Iterable[Any]:
    if not on:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc)


def _p1(class_name: str, mask: np.ndarray | None = None, shape: tuple[int, int] = (1, 1)) -> str:
    return generate(np.zeros(shape, bool) if mask is None else mask, class_name, "p1") or class_name


# ----------------------------------------------------------------------------- AUROC and calibration
def auroc(labels: Sequence[bool] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score`` when scikit-learn is installed, else the
    equivalent Mann-Whitney rank formula with ties averaged). None when only one class is present."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    if y.shape != s.shape:
        raise ValueError(f"labels {y.shape} and scores {s.shape} differ in shape")
    if y.all() or not y.any():
        return None
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        from scipy.stats import rankdata

        ranks = rankdata(s)
        n_pos, n_neg = int(y.sum()), int((~y).sum())
        return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(roc_auc_score(y, s))


def _check_minimums(min_specificity: float, min_sensitivity: float) -> None:
    for name, v in (("min_specificity", min_specificity), ("min_sensitivity", min_sensitivity)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v}")


def choose_presence_threshold(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray,
                              pixel_nonempty: Sequence[bool] | np.ndarray | None = None,
                              min_specificity: float = WRONG_CLASS_EMPTY_MIN, min_sensitivity: float = 0.9
                              ) -> dict[str, Any]:
    """Pick the presence threshold t (masks kept where presence >= t).

    Criterion: the lowest-cost gate that meets the language-use target. Among thresholds that empty at least
    ``min_specificity`` of the negative prompts (wrong-class and annotated-absent), take the one that keeps the
    most true prompts (then the most negatives emptied), placed mid-way between the neighbouring scores. Why:
    the target is stated on negatives (>= 95% empty); any stricter gate only deletes true masks, and each deleted
    true mask costs a whole image's Dice. If that leaves fewer than ``min_sensitivity`` of the true prompts
    non-empty, the model cannot separate the two well enough for that target, and the threshold maximising
    balanced accuracy ((TPR + TNR) / 2) is returned instead (``criterion`` says which).

    Args:
        scores: (N,) presence probabilities.
        labels: (N,) True for prompts of present classes.
        pixel_nonempty: (N,) whether the ungated mask has any pixel above the pixel threshold; prompts without
            one are empty whatever t is (default: all True).
    Returns:
        {"threshold", "criterion", "tpr", "tnr", "curve": {"threshold": [...], "tpr": [...], "tnr": [...]}}
        where TPR/TNR count the masks left non-empty / emptied at that threshold.
    Raises:
        ValueError: mismatched lengths, no positives or no negatives, or a minimum outside [0, 1].
    """
    _check_minimums(min_specificity, min_sensitivity)
    s = np.asarray(scores, np.float64)
    y = np.asarray(labels, bool)
    ne = np.ones_like(y) if pixel_nonempty is None else np.asarray(pixel_nonempty, bool)
    if not s.shape == y.shape == ne.shape:
        raise ValueError(f"scores {s.shape}, labels {y.shape} and pixel_nonempty {ne.shape} differ in shape")
    if y.all() or not y.any():
        raise ValueError("calibration needs both present and absent/wrong-class prompts")
    eff = np.where(ne & np.isfinite(s), np.clip(s, 0.0, 1.0), -np.inf)
    u = np.unique(eff[np.isfinite(eff)])
    edges = np.concatenate([[0.0], u, [1.0]])  # threshold intervals (edges[k], edges[k+1]]
    ts = (edges[:-1] + edges[1:]) / 2  # one threshold per interval, mid-way: the widest margin to both sides
    tpr = np.array([float((eff[y] >= t).mean()) for t in ts])
    tnr = np.array([float((eff[~y] < t).mean()) for t in ts])
    feasible = np.flatnonzero(tnr >= min_specificity)
    k = int(max(feasible, key=lambda i: (tpr[i], tnr[i], -i))) if len(feasible) else -1
    criterion = f"max TPR with >= {min_specificity:.0%} of negatives empty"
    if k < 0 or tpr[k] < min_sensitivity:
        bal = (tpr + tnr) / 2
        k = int(max(range(len(ts)), key=lambda i: (bal[i], -i)))
        criterion = (f"max balanced accuracy (emptying {min_specificity:.0%} of negatives would keep under "
                     f"{min_sensitivity:.0%} of true masks)")
    return {"threshold": float(ts[k]), "criterion": criterion, "tpr": float(tpr[k]), "tnr": float(tnr[k]),
            "curve": {"threshold": ts.tolist(), "tpr": tpr.tolist(), "tnr": tnr.tolist()}}


def crossfit_gate(presence_rows: Sequence[Mapping[str, Any]], halves: Sequence[Iterable[str]],
                  min_specificity: float = WRONG_CLASS_EMPTY_MIN, min_sensitivity: float = 0.9
                  ) -> dict[str, float | None]:
    """The presence gate calibrated on one half of the images and applied to the other, both ways.

    The threshold the finish step stores is chosen on the validation images to empty ``min_specificity`` of their
    negative prompts, so the wrong-class figure measured on those same images is met nearly by construction. This is
    the figure on images the calibration did not see. For each split in ``halves`` (the images of its first half),
    ``choose_presence_threshold`` runs on one half's rows (present, absent and wrong-class prompts, as
    ``presence_calibration`` does) and its threshold gates the other half's; the two directions are pooled and the
    splits averaged.

    Args:
        presence_rows: the report's presence rows (``image``, ``label``, ``kind``, ``score``, ``nonempty``).
        halves: per split, the ``image`` keys of its first half (the rest form the second).
    Returns:
        {"empty_rate": wrong-class prompts emptied, "true_kept_rate": true prompts keeping a mask, "splits": splits
        used}; rates are None when no split could be calibrated (a half without positives or negatives).
    """
    emptied: list[float] = []
    kept: list[float] = []
    for first in halves:
        a = set(first)
        parts = ([r for r in presence_rows if r["image"] in a], [r for r in presence_rows if r["image"] not in a])
        outcome: list[tuple[Mapping[str, Any], bool]] = []  # (row, mask left non-empty)
        try:
            for fit, score in (parts, parts[::-1]):
                t = choose_presence_threshold([r["score"] for r in fit], [r["label"] for r in fit],
                                              [r["nonempty"] for r in fit], min_specificity, min_sensitivity)
                outcome += [(r, bool(r["nonempty"] and r["score"] >= t["threshold"])) for r in score]
        except ValueError:  # a half with no positives or no negatives: this split cannot be calibrated
            continue
        wrong = [not shown for r, shown in outcome if str(r["kind"]).startswith("wrong_")]
        true = [shown for r, shown in outcome if r["label"]]
        if wrong and true:
            emptied.append(float(np.mean(wrong)))
            kept.append(float(np.mean(true)))
    return {"empty_rate": _mean(emptied), "true_kept_rate": _mean(kept), "splits": len(emptied)}


def _random_halves(images: Iterable[str], seed: int, n: int) -> list[list[str]]:
    """``n`` seeded random halves of the (sorted, unique) image keys."""
    keys = sorted(set(images))
    return [[keys[i] for i in np.random.default_rng([seed, k]).permutation(len(keys))[: len(keys) // 2]]
            for k in range(n)]


CROSSFIT_SPLITS = 20  # random halvings averaged for the out-of-sample wrong-class figure


# ----------------------------------------------------------------------------- the checks
def _presence_row(base: dict[str, Any], class_name: str, label: bool, kind: str, o: _Out) -> dict[str, Any]:
    """One prompt's presence row: its score, and whether its mask has pixels before (``nonempty``) and after
    (not ``empty``) the presence gate."""
    return {**base, "class": class_name, "label": label, "kind": kind, "score": o.presence, "max_prob": o.max_prob,
            "nonempty": bool(o.ungated.any()), "empty": not o.mask.any()}


def _first_of_each_kind(wrong: Sequence[tuple[str, str]]) -> list[str]:
    """The first look-alike and the first other class drawn: the ones also asked at every prompt level (all of them
    are asked as class names; nine levels of each would double the report's prompts)."""
    firsts: dict[str, str] = {}
    for c, kind in wrong:
        firsts.setdefault(kind, c)
    return list(firsts.values())


def _image_rows(fn: PredictFn, items: Iterable[_Item], levels: bool, empty_prompt: bool,
                pixel_threshold: float = 0.5) -> tuple[dict[str, list[dict[str, Any]]], bool]:
    """One model call per image for every per-image check -> rows per check, has_presence_head."""
    rows: dict[str, list[dict[str, Any]]] = {"presence": [], "levels": [], "levels_wrong": [], "own_other": [],
                                             "class_vs_empty": []}
    head = False
    for it in items:
        hw = it.image.shape[:2]
        p1 = {c: _p1(c, m) for c, m in it.masks.items()}
        lv = {(c, lvl): (generate(it.masks[c], c, lvl) or c) for c in it.present for lvl in LEVELS} if levels else {}
        wrong = {c: _p1(c, shape=hw) for c, _ in it.wrong}
        lvw = {(c, lvl): (generate(np.zeros(hw, bool), c, lvl) or c) for c in _first_of_each_kind(it.wrong)
               for lvl in LEVELS} if levels else {}
        prompts = [*p1.values(), *lv.values(), *wrong.values(), *lvw.values()] + ([""] if empty_prompt else [])
        out, h = _call(fn, it.image, prompts, pixel_threshold)
        head = head or h
        base = {"dataset": it.dataset, "image": it.key}
        for c in it.masks:
            rows["presence"].append(_presence_row(base, c, c in it.present,
                                                  "present" if c in it.present else "absent", out[p1[c]]))
        for c, kind in it.wrong:
            rows["presence"].append(_presence_row(base, c, False, f"wrong_{kind}", out[wrong[c]]))
        for (c, lvl), text in lv.items():
            o = out[text]
            rows["levels"].append({**base, "class": c, "level": lvl, "dice": dice(o.mask, it.masks[c]),
                                   "dice_ungated": dice(o.ungated, it.masks[c]),
                                   "gated_away": bool(o.ungated.any() and not o.mask.any())})
        for (c, lvl), text in lvw.items():
            rows["levels_wrong"].append({**base, "class": c, "level": lvl, "empty": not out[text].mask.any()})
        for c in it.present:
            others = [o for o in it.present if not is_relative(o, c)]
            if others:
                pred = out[p1[c]].mask
                rows["own_other"].append({**base, "class": c, "own": dice(pred, it.masks[c]),
                                          "other": float(np.mean([dice(pred, it.masks[o]) for o in others]))})
            if empty_prompt:
                rows["class_vs_empty"].append({**base, "class": c, "dice_class": dice(out[p1[c]].mask, it.masks[c]),
                                               "dice_empty": dice(out[""].mask, it.masks[c])})
    return rows, head


def _canvas_rows(fn: PredictFn, dataset: Any, groups: Sequence[ImageGroup], seed: int, n_canvases: int,
                 tiles: tuple[int, int], size: int, progress: bool, n_examples: int = 0
                 ) -> tuple[list[dict[str, Any]], str | None, list[dict[str, Any]]]:
    """Score each prompted class of ``n_canvases`` canvases -> (rows, note, examples): ``examples`` holds the
    first ``n_examples`` (canvas, class) pairs with the canvas image, the class's target and the predicted mask."""
    try:
        sampler = CompositeSampler(dataset, seed=seed, tiles=tiles, size=size, groups=groups)
    except ValueError as e:
        return [], str(e), []
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    for i in _progress(range(n_canvases), progress, "language use: canvases"):
        cv = sampler.canvas(i, place=False)
        shown = [c for c, t in cv.targets.items() if t.any()]
        text = {c: _p1(c, cv.targets[c]) for c in shown}
        out, _ = _call(fn, cv.image, [*text.values(), ""])
        empty = out[""].mask
        for c in shown:
            pred = out[text[c]].mask
            area = int(pred.sum())
            leak = float((pred & cv.other_tiles_mask(c)).sum() / area) if area else None
            if len(examples) < n_examples:
                examples.append({"canvas": i, "class": c, "image": cv.image, "target": cv.targets[c], "pred": pred,
                                 "leak": leak})
            rows.append({"canvas": i, "class": c, "datasets": [t.dataset for t in cv.tiles], "tiles": len(cv.tiles),
                         "sources": [t.source for t in cv.tiles],  # the images on it: standard errors by image
                         "dice_class": dice(pred, cv.targets[c]), "dice_empty": dice(empty, cv.targets[c]),
                         "leak": leak, "pred_empty": area == 0})
    return rows, None, examples


def _mean(xs: Iterable[float | None]) -> float | None:
    v = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(v)) if v else None


def _per_level(rows: Iterable[dict[str, Any]], key: str) -> dict[str, float | None]:
    """Mean of ``key`` over the rows of each prompt level p1..p9."""
    rows = list(rows)
    return {lv: _mean(float(r[key]) for r in rows if r["level"] == lv) for lv in LEVELS}


def _spread(per: Mapping[str, float | None]) -> float | None:
    """Highest minus lowest of the defined per-level figures (None when none is defined)."""
    vals = [v for v in per.values() if v is not None]
    return float(max(vals) - min(vals)) if vals else None


def _by(rows: Iterable[dict[str, Any]], key: str) -> dict[str, list[dict[str, Any]]]:
    """Rows grouped by ``row[key]``, the groups in sorted key order (each in the rows' order)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        out.setdefault(r[key], []).append(r)
    return dict(sorted(out.items()))


def _canvas_by_class(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per prompted class of the canvas rows: its rows, the share of them with an empty mask, its Dice, its leak
    (over its non-empty masks, like the pooled leak) and ``leak_share``: its part of the pooled leak (the shares add
    up to 1; a class with few non-empty masks can leak much and weigh little)."""
    total = sum(r["leak"] for r in rows if r["leak"] is not None)
    out: dict[str, dict[str, Any]] = {}
    for c, own in _by(rows, "class").items():
        leaks = [r["leak"] for r in own if r["leak"] is not None]
        out[c] = {"n": len(own), "empty_prediction_rate": _mean(float(r["pred_empty"]) for r in own),
                  "dice_class": _mean(r["dice_class"] for r in own), "leak": _mean(leaks),
                  "leak_share": float(sum(leaks) / total) if total > 0 else None}
    return out


def _levels_by_dataset(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per dataset of the level rows: its per-level Dice (after the gate), their spread, the share of its masks
    the presence gate empties per level, its rows, and ``spread_without``: the pooled spread with this dataset left
    out (a spread one dataset makes drops well below the bar without it)."""
    out: dict[str, dict[str, Any]] = {}
    for d, own in _by(rows, "dataset").items():
        per = _per_level(own, "dice")
        out[d] = {"per_level": per, "spread": _spread(per), "gated_away_per_level": _per_level(own, "gated_away"),
                  "n": len(own), "spread_without": _spread(_per_level([r for r in rows if r["dataset"] != d], "dice"))}
    return out


def _summaries(rows: dict[str, list[dict[str, Any]]], canvas: list[dict[str, Any]], canvas_note: str | None,
               head: bool, seed: int = 0) -> dict[str, Any]:
    pres = rows["presence"]
    wrong = [r for r in pres if r["kind"].startswith("wrong_")]
    rate = _mean(float(r["empty"]) for r in wrong)
    kept = _mean(float(not r["empty"]) for r in pres if r["label"])  # an always-empty model also empties wrong ones
    wc = {"empty_rate": rate,
          "empty_rate_se": cluster_se([float(r["empty"]) for r in wrong], [r["image"] for r in wrong]),
          "n": len(wrong), "true_kept_rate": kept,
          "hard": {"empty_rate": _mean(float(r["empty"]) for r in wrong if r["kind"] == "wrong_hard"),
                   "n": sum(r["kind"] == "wrong_hard" for r in wrong)},
          "random": {"empty_rate": _mean(float(r["empty"]) for r in wrong if r["kind"] == "wrong_random"),
                     "n": sum(r["kind"] == "wrong_random" for r in wrong)},
          "per_dataset": {d: {"empty_rate": _mean(float(r["empty"]) for r in rs), "n": len(rs)}
                          for d, rs in _by(wrong, "dataset").items()},
          "target": WRONG_CLASS_EMPTY_MIN, "pass": None if rate is None else rate >= WRONG_CLASS_EMPTY_MIN}
    if head and wrong:  # the same figures with the gate calibrated on the other half of the images
        wc["out_of_sample"] = crossfit_gate(pres, _random_halves((r["image"] for r in pres), seed, CROSSFIT_SPLITS))

    def au(kinds: tuple[str, ...], rs: Sequence[dict[str, Any]] = pres) -> float | None:
        sel = [r for r in rs if r["label"] or r["kind"] in kinds]
        return auroc([r["label"] for r in sel], [r["score"] for r in sel])

    every = ("absent", "wrong_hard", "wrong_random")
    a = au(every)
    presence = {"auroc": a, "auroc_se": cluster_bootstrap_se(pres, lambda rs: au(every, rs)),
                "auroc_wrong_class": au(("wrong_hard", "wrong_random")), "auroc_absent": au(("absent",)),
                "n_positive": sum(r["label"] for r in pres), "n_negative": sum(not r["label"] for r in pres),
                "has_presence_head": head, "target": PRESENCE_AUROC_MIN,
                "pass": None if a is None else a >= PRESENCE_AUROC_MIN}

    dc, de = _mean(r["dice_class"] for r in canvas), _mean(r["dice_empty"] for r in canvas)
    gain = None if dc is None or de is None else dc - de
    leak = _mean(r["leak"] for r in canvas)
    on = [r["canvas"] for r in canvas]
    images = [r["sources"] for r in canvas]  # canvases drawn from the same images are not independent
    gains, leaks = [r["dice_class"] - r["dice_empty"] for r in canvas], [r["leak"] for r in canvas]
    comp: dict[str, Any] = {
        "n_canvases": len(set(on)), "n_images": len({s for ss in images for s in ss}), "n": len(canvas),
        "dice_class": dc, "dice_empty": de, "gain": gain, "gain_se": multiway_se(gains, images), "leak": leak,
        "leak_se": multiway_se(leaks, images),
        # the canvas draw's own noise (another draw from the same images would move the figure by about this)
        "gain_se_canvas": cluster_se(gains, on), "leak_se_canvas": cluster_se(leaks, on),
        "empty_prediction_rate": _mean(float(r["pred_empty"]) for r in canvas),
        "per_class": _canvas_by_class(canvas),  # where the leak and the empty masks come from
        "target": {"gain_min": CANVAS_GAIN_MIN, "leak_max": CANVAS_LEAK_MAX},
        "pass": None if gain is None else bool(gain >= CANVAS_GAIN_MIN and (leak or 0.0) <= CANVAS_LEAK_MAX)}
    if canvas_note:
        comp["note"] = canvas_note

    per: dict[str, dict[str, Any]] = {}
    for d, rs in _by(rows["own_other"], "dataset").items():
        own, other = _mean(r["own"] for r in rs), _mean(r["other"] for r in rs)
        ratio = own / max(other, OTHER_DICE_FLOOR)  # type: ignore[operator,type-var]
        per[d] = {"own": own, "other": other, "ratio": ratio, "n": len(rs), "pass": ratio >= OWN_OTHER_RATIO_MIN}
    own_other = {"per_dataset": per, "target": OWN_OTHER_RATIO_MIN,
                 "pass": None if not per else all(v["pass"] for v in per.values())}

    per_level, ungated = _per_level(rows["levels"], "dice"), _per_level(rows["levels"], "dice_ungated")
    spread = _spread(per_level)
    # The same masks before the presence gate: tells a spread made by the gate (long prompts scoring lower
    # presence) from one made by the masks themselves.
    levels = {"per_level": per_level, "spread": spread,
              "spread_se": cluster_bootstrap_se(rows["levels"], lambda rs: _spread(_per_level(rs, "dice"))),
              "per_level_ungated": ungated, "spread_ungated": _spread(ungated),
              "gated_away_per_level": _per_level(rows["levels"], "gated_away"),
              # the gate must still empty wrong-class prompts phrased at every level, not only class names
              "wrong_class_empty_per_level": _per_level(rows["levels_wrong"], "empty"),
              # where the spread comes from: each dataset's own levels, and the spread with that dataset left out
              "per_dataset": _levels_by_dataset(rows["levels"]),
              "n": len(rows["levels"]), "target": LEVEL_SPREAD_MAX,
              "pass": None if spread is None else spread <= LEVEL_SPREAD_MAX}

    ce = rows["class_vs_empty"]
    c1, c0 = _mean(r["dice_class"] for r in ce), _mean(r["dice_empty"] for r in ce)
    class_vs_empty = {"dice_class": c1, "dice_empty": c0, "gain": None if c1 is None or c0 is None else c1 - c0,
                      "n": len(ce)}
    return {"wrong_class": wc, "presence": presence, "composite": comp, "own_other": own_other, "levels": levels,
            "class_vs_empty": class_vs_empty}


def _clean(x: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, (np.bool_, bool)):
        return bool(x)
    if isinstance(x, (np.integer, int)):
        return int(x)
    if isinstance(x, (np.floating, float)):
        return float(x) if math.isfinite(float(x)) else None
    return x


CHECKS = ("wrong_class", "presence", "composite", "own_other", "levels")


def language_use_report(model: Any, dataset: Any, seed: int = 0, max_images: int | None = 200,
                        n_canvases: int | None = None, canvas_tiles: tuple[int, int] = (2, 2),
                        canvas_size: int = 512, levels: bool = True, progress: bool = False,
                        predict_kwargs: Mapping[str, Any] | None = None, keep_rows: bool = False,
                        canvas_examples: int = 0, wrong_per_kind: int = WRONG_PER_KIND) -> dict[str, Any]:
    """All language-use checks on a dataset, as a JSON-serialisable dict (``metrics.json["language_use"]``).

    Args:
        model: a VLSegModel, or a callable (image (H, W, 3) uint8, prompts) -> ``vlseg.Prediction``.
        dataset: a vlseg dataset (``records`` + ``__getitem__``), e.g. the validation split of a pooled set.
        seed: picks the images, the wrong classes and the canvases (the report is deterministic given it).
        max_images: images (all the classes of each) to score, round-robin over datasets; None for all.
        n_canvases: composite canvases to score (default: twice the number of images, at most 256: on the main
            job's validation split a 64-canvas leak figure had a standard error of 1.5-1.9 points, 256 canvases
            0.7-0.9).
        canvas_tiles: (fewest, most) tiles per canvas; (2, 2) is "two images side by side".
        canvas_size: canvas side in pixels.
        levels: score prompt levels p1..p9 (9 prompts per present class; turn off to save time).
        progress: show progress bars.
        predict_kwargs: passed to ``vlseg.predict`` (e.g. ``presence_threshold``).
        keep_rows: also return the per-prompt rows under ``"rows"``.
        canvas_examples: also return that many scored (canvas, class) pairs under ``"canvas_examples"``: dicts with
            ``image`` (S, S, 3) uint8, ``target`` and ``pred`` (S, S) bool, ``class``, ``canvas``, ``leak`` (for
            pictures; not JSON).
        wrong_per_kind: wrong-class prompts asked of each image: up to this many look-alikes and as many other
            classes, drawn without replacement (seeded by ``seed`` and each image's pixels, not its path).
    Returns:
        {"wrong_class", "presence", "composite", "own_other", "levels", "class_vs_empty", "n_images",
        "images_per_dataset", "targets", "pass", "n_pass", "n_checks"[, "rows"]}; each check has its numbers,
        its ``target`` and ``pass`` (None when the data cannot run it, e.g. no multi-class images). With a presence
        head, ``wrong_class["out_of_sample"]`` gives the wrong-class empty rate and the true masks kept when the gate
        is calibrated on half the images and scored on the other half (``crossfit_gate``, 20 seeded halvings): on the
        images the stored threshold was calibrated on (the finish step, ``vlseg evaluate --split val``),
        ``empty_rate`` is an in-sample figure. The wrong-class empty rate, the canvas gain and leak, the presence
        AUROC and the level spread carry their standard errors over images (``empty_rate_se``: cluster-robust by
        image; ``gain_se``, ``leak_se``: by every image on the canvas, ``vlseg.stats.multiway_se``, since canvases
        reuse images; ``auroc_se``, ``spread_se``: cluster bootstrap by image, 200 resamples, fixed seed), so a
        figure near its bar reads as such; pass/fail compares the point estimate with the bar.
        ``gain_se_canvas`` / ``leak_se_canvas`` are the canvas draw's own noise (by canvas, the images held fixed):
        what more canvases from the same images can shrink. ``levels`` also
        gives the same prompts' Dice before the presence gate (``per_level_ungated``, ``spread_ungated``) and the
        share of their masks the gate empties (``gated_away_per_level``), so a spread made by the gate shows, and
        the share of wrong-class prompts phrased at each level that give an empty mask
        (``wrong_class_empty_per_level``, over the first look-alike and the first other class of each image; the
        wrong-class check itself asks all the drawn classes, as class names only). Two breakdowns locate a miss:
        ``composite["per_class"]`` (per prompted class: rows, empty-mask share, Dice, leak, ``leak_share``) and
        ``levels["per_dataset"]`` (per dataset: per-level Dice, spread, gated-away share, ``spread_without``).
    """
    fn = as_predict_fn(model, predict_kwargs)
    groups = select_groups(dataset, max_images, seed)
    items = list(_items(dataset, groups, seed, False, wrong_per_kind))
    rows, head = _image_rows(fn, _progress(items, progress, "language use: images"), levels, True,
                             _pixel_threshold(predict_kwargs))
    n_canvases = min(256, max(1, 2 * len(items))) if n_canvases is None else n_canvases
    canvas, note, examples = _canvas_rows(fn, dataset, groups, seed, n_canvases, canvas_tiles, canvas_size, progress,
                                          canvas_examples)
    report = _summaries(rows, canvas, note, head, seed)
    passes = [report[k]["pass"] for k in CHECKS if report[k]["pass"] is not None]
    per_ds: dict[str, int] = {}
    for it in items:
        per_ds[it.dataset] = per_ds.get(it.dataset, 0) + 1
    report.update(n_images=len(items), images_per_dataset=per_ds, targets=dict(TARGETS), seed=seed,
                  wrong_per_kind=wrong_per_kind,
                  n_pass=sum(passes), n_checks=len(passes), **{"pass": bool(passes) and all(passes)})
    if keep_rows:
        report["rows"] = {**rows, "composite": canvas}
    report = _clean(report)
    if canvas_examples:
        report["canvas_examples"] = examples
    return report


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _se_text(se: float | None, scale: float = 100, digits: int = 1, lead: bool = False) -> str:
    """The standard error in the figure's unit: " (se X)" after a figure, or "se X; " opening a parenthesis
    (``lead``); "" when the report has none (reports written before standard errors)."""
    if se is None:
        return ""
    return f"se {scale * se:.{digits}f}; " if lead else f" (se {scale * se:.{digits}f})"


def _ok(p: bool | None) -> str:
    return "n/a" if p is None else ("ok" if p else "FAIL")


def summary_line(report: Mapping[str, Any]) -> str:
    """One line: the headline numbers and pass/fail against the targets, starting with "language use: "."""
    wc, pr, cp, oo, lv = (report[k] for k in CHECKS)
    auc = "n/a" if pr["auroc"] is None else f"{pr['auroc']:.3f}{_se_text(pr.get('auroc_se'), 1, 3)}"
    gain = "n/a" if cp["gain"] is None else f"{cp['gain']:+.3f}{_se_text(cp.get('gain_se'), 1, 3)}"
    leak = f"{_pct(cp['leak'])}{_se_text(cp.get('leak_se'))}"
    ratios = ", ".join(f"{d} {v['ratio']:.1f}x" for d, v in oo["per_dataset"].items()) or "n/a"
    spread = "n/a" if lv["spread"] is None else f"{100 * lv['spread']:.1f} pts"
    p1 = lv["per_level"].get("p1")
    ug = lv.get("spread_ungated")  # absent from reports written before it was added
    notes = "" if ug is None or not pr.get("has_presence_head") else f"; {100 * ug:.1f} before the presence gate"
    wl = [v for v in (lv.get("wrong_class_empty_per_level") or {}).values() if v is not None]  # idem
    if wl:
        notes += f"; wrong class emptied {100 * min(wl):.0f}-{100 * max(wl):.0f}% over the levels"
    without = {d: v["spread_without"] for d, v in (lv.get("per_dataset") or {}).items()  # idem
               if v.get("spread_without") is not None}
    if len(without) > 1 and lv["spread"] is not None:  # the dataset whose absence narrows the spread most
        d = min(without, key=lambda k: (without[k], k))
        notes += f"; {100 * without[d]:.1f} without {d}"
    oos = wc.get("out_of_sample") or {}  # absent from reports written before it, and without a presence head
    oos_text = "" if oos.get("empty_rate") is None else \
        f"; gate fit on other images: {_pct(oos['empty_rate'])} / kept {_pct(oos['true_kept_rate'])}"
    return (f"language use: wrong-class empty {_pct(wc['empty_rate'])}"
            f" ({_se_text(wc.get('empty_rate_se'), lead=True)}true kept {_pct(wc.get('true_kept_rate'))}{oos_text})"
            f" [>={WRONG_CLASS_EMPTY_MIN:.0%} {_ok(wc['pass'])}]"
            f" | presence AUROC {auc} [>={PRESENCE_AUROC_MIN} {_ok(pr['pass'])}]"
            f" | canvas gain {gain}, leak {leak} [>=+{CANVAS_GAIN_MIN}, <={CANVAS_LEAK_MAX:.0%} {_ok(cp['pass'])}]"
            f" | own/other {ratios} [>={OWN_OTHER_RATIO_MIN:g}x {_ok(oo['pass'])}]"
            f" | p1-p9 spread {spread} ({_se_text(lv.get('spread_se'), lead=True)}p1 Dice"
            f" {'n/a' if p1 is None else f'{p1:.3f}'}{notes}) [<={100 * LEVEL_SPREAD_MAX:g} pts {_ok(lv['pass'])}]"
            f" | {report['n_pass']}/{report['n_checks']} pass")


def presence_calibration(model: Any, dataset: Any, seed: int = 0, max_images: int | None = 200,
                         min_specificity: float = WRONG_CLASS_EMPTY_MIN, min_sensitivity: float = 0.9,
                         predict_kwargs: Mapping[str, Any] | None = None, progress: bool = False,
                         wrong_per_kind: int = WRONG_PER_KIND) -> dict[str, Any]:
    """Presence scores of true, annotated-absent and wrong-class prompts on (validation) images, and the
    threshold ``choose_presence_threshold`` picks from them. Returns its dict plus ``has_presence_head``,
    ``auroc``, ``n_positive``, ``n_negative``. Only a presence head is gated by the threshold in
    ``segment``/``predict``; without one the number is reported but has no effect."""
    _check_minimums(min_specificity, min_sensitivity)  # before any image is run
    kw = dict(predict_kwargs or {})
    pixel_threshold = _pixel_threshold(kw)
    fn = as_predict_fn(model, kw)
    items = _items(dataset, select_groups(dataset, max_images, seed), seed, progress, wrong_per_kind)
    rows, head = _image_rows(fn, items, levels=False, empty_prompt=False, pixel_threshold=pixel_threshold)
    pres = rows["presence"]
    labels = [r["label"] for r in pres]
    scores = [r["score"] for r in pres]
    out = choose_presence_threshold(scores, labels, [r["nonempty"] for r in pres],
                                    min_specificity, min_sensitivity)
    out.update(has_presence_head=head, auroc=auroc(labels, scores), n_positive=int(sum(labels)),
               n_negative=int(len(labels) - sum(labels)))
    return _clean(out)


def calibrate_presence(model: Any, dataset: Any, seed: int = 0, max_images: int | None = 200,
                       min_specificity: float = WRONG_CLASS_EMPTY_MIN, min_sensitivity: float = 0.9,
                       predict_kwargs: Mapping[str, Any] | None = None, progress: bool = False,
                       wrong_per_kind: int = WRONG_PER_KIND) -> float:
    """The presence threshold to store in the checkpoint (``presence_calibration(...)["threshold"]``; see
    ``choose_presence_threshold`` for the criterion). Run it on a validation split, never on test data."""
    return float(presence_calibration(model, dataset, seed, max_images, min_specificity, min_sensitivity,
                                      predict_kwargs, progress, wrong_per_kind)["threshold"])


__all__ = [
    "CANVAS_GAIN_MIN", "CANVAS_LEAK_MAX", "CHECKS", "CROSSFIT_SPLITS", "LEVELS", "LEVEL_SPREAD_MAX",
    "OWN_OTHER_RATIO_MIN", "PRESENCE_AUROC_MIN", "TARGETS", "WRONG_CLASS_EMPTY_MIN", "WRONG_PER_KIND", "as_predict_fn",
    "auroc", "calibrate_presence", "choose_presence_threshold", "crossfit_gate", "draw_key", "language_use_report",
    "presence_calibration", "select_groups", "summary_line",
]
