"""Evaluate a VQA model on a VQA dataset: answers (accuracy, macro F1, balanced accuracy; overall and per question
type), beside the baselines that tell whether the model learnt anything (the training set's majority answer, the
majority answer per question type, and the same model asked an empty question, "question-blind"), and the
grounding (Dice / IoU of the answer masks, region-presence accuracy, box IoU).

    summary = vlseg.vqa.evaluate(model, val_ds, train_answers=train_ds)
    print("\\n".join(vlseg.vqa.report_lines(summary)))

    python -m vlseg.vqa.evaluation --model runs/vqa/best --config finetune/configs/vqa-offline-shared.yaml --out ev/

Metrics follow scikit-learn: macro F1 averages per-answer F1 over every answer that occurs as a truth or a
prediction (``zero_division=0``); balanced accuracy averages recall over the answers that occur as truths.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import metrics as M
from .boxes import box_iou, mask_to_box
from .model import VQAModel


# ------------------------------------------------------------------------------------------------ metrics
def _same_length(y_true: Sequence[str], y_pred: Sequence[str]) -> None:
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} truths but {len(y_pred)} predictions")


def accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    _same_length(y_true, y_pred)
    return float(np.mean([t == p for t, p in zip(y_true, y_pred)])) if y_true else 0.0


def macro_f1(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """sklearn ``f1_score(average="macro", zero_division=0)``: labels = truths and predictions."""
    _same_length(y_true, y_pred)
    if not y_true:
        return 0.0
    tp: Counter[str] = Counter()
    fp: Counter[str] = Counter()
    fn: Counter[str] = Counter()
    for t, p in zip(y_true, y_pred):
        if t == p:
            tp[t] += 1
        else:
            fp[p] += 1
            fn[t] += 1
    labels = set(y_true) | set(y_pred)
    return float(np.mean([2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in labels]))


def balanced_accuracy(y_true: Sequence[str], y_pred: Sequence[str]) -> float:
    """sklearn ``balanced_accuracy_score``: mean recall over the answers that occur as truths."""
    _same_length(y_true, y_pred)
    if not y_true:
        return 0.0
    hit: Counter[str] = Counter()
    n: Counter[str] = Counter(y_true)
    for t, p in zip(y_true, y_pred):
        hit[t] += t == p
    return float(np.mean([hit[c] / n[c] for c in n]))


def answer_metrics(y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, float]:
    return {"accuracy": accuracy(y_true, y_pred), "macro_f1": macro_f1(y_true, y_pred),
            "balanced_accuracy": balanced_accuracy(y_true, y_pred), "n": len(y_true)}


def _by_type(types: Sequence[str], y_true: Sequence[str], y_pred: Sequence[str]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, t in enumerate(types):
        groups[t].append(i)
    return {t: answer_metrics([y_true[i] for i in idx], [y_pred[i] for i in idx]) for t, idx in sorted(groups.items())}


# ------------------------------------------------------------------------------------------------ helpers
def image_key(dataset: Any, i: int) -> str:
    """Which image sample ``i`` is about, without reading it (questions of one image are answered together)."""
    if hasattr(dataset, "image_key"):
        return str(dataset.image_key(i))
    r = dataset.records[i]
    return str((r.get("meta") or {}).get("image_key") or r.get("image") or f"#{i}")


def has_grounding(dataset: Any, i: int) -> bool:
    """Whether sample ``i`` says what its answer refers to (a mask, a box, or "no region"): engine questions always
    do; published questions only with a mask or box."""
    if hasattr(dataset, "has_grounding"):
        return bool(dataset.has_grounding(i))
    from .schema import SegmentationVQADataset, VQASubset

    parent = dataset.parent if isinstance(dataset, VQASubset) else dataset
    if isinstance(parent, SegmentationVQADataset):
        return True
    r = dataset.records[i]
    return any(r.get(k) is not None for k in ("mask", "box", "box_pixels"))


def majority_answers(answers: Sequence[str], types: Sequence[str] | None = None) -> tuple[str, dict[str, str]]:
    """-> (the most frequent answer, the most frequent answer per question type). Ties: alphabetical."""
    def top(xs: Sequence[str]) -> str:
        c = Counter(xs)
        return min(c, key=lambda a: (-c[a], a))

    if not answers:
        raise ValueError("majority_answers: no answers")
    per_type: dict[str, list[str]] = defaultdict(list)
    for a, t in zip(answers, types or ["all"] * len(answers)):
        per_type[str(t)].append(a)
    return top(answers), {t: top(v) for t, v in per_type.items()}


def _gt_box(sample: Any) -> tuple[float, float, float, float] | None:
    if sample.box is not None:
        return sample.box
    if sample.mask is not None and sample.mask.any():
        return mask_to_box(sample.mask, normalized=True)
    return None


# ------------------------------------------------------------------------------------------------ evaluate
def evaluate(model: VQAModel, dataset: Any, *, train_answers: Any = None, max_samples: int | None = None,
             seed: int = 0, mode: str = "auto", question_blind: bool = True, threshold: float = 0.5,
             region_threshold: float | None | str = "model", progress: bool = False,
             keep_predictions: bool = False) -> dict[str, Any]:
    """Score ``model`` on a VQA dataset (``ds[i] -> VQASample``).

    Args:
        model: a VQA model.
        dataset: a VQA dataset (``from_segmentation``, ``from_published``, a task's validation pool, ...).
        train_answers: what the majority baselines are learnt from: a training VQA dataset, or a list of answers,
            or (answers, types); default: the evaluated dataset itself (an optimistic baseline, flagged in the
            summary as ``majority_source: "evaluated set"``).
        max_samples: score a seeded random subset of this many questions.
        seed: the subset's seed.
        mode: the answer head ("auto", "closed", "open"); both heads are also reported under ``heads``.
        question_blind: also score the model with an empty question (one pass per image).
        threshold: pixel probability for grounding masks.
        region_threshold: "refers to a region" cut-off ("model": the checkpoint's, else 0.5; None: always).
        progress: show a progress bar.
        keep_predictions: add a ``predictions`` list (one dict per question) to the summary.
    Returns:
        A JSON-serialisable dict: ``all`` and ``per_type`` (accuracy, macro_f1, balanced_accuracy, n, plus
        grounding dice, iou, region_accuracy, box_iou, n_grounded), ``heads`` (closed / open accuracy),
        ``baselines`` (majority, type_majority, question_blind: each with ``all`` and ``per_type``), and counts.
    """
    from ..inference import presence_cutoff

    if not isinstance(model, VQAModel):
        raise TypeError(f"evaluate() needs a VQA model, got {type(model).__name__}")
    n_all = len(dataset)
    if n_all == 0:
        raise ValueError("evaluate: the dataset has no questions")
    order = np.arange(n_all) if max_samples is None or max_samples >= n_all else \
        np.sort(np.random.default_rng(seed).permutation(n_all)[:max_samples])
    groups: dict[str, list[int]] = {}
    for i in order.tolist():
        groups.setdefault(image_key(dataset, i), []).append(i)
    cutoff = presence_cutoff(model, region_threshold)
    resolved = model.resolve_mode(mode, None)
    truth, types, pred, closed_pred, open_pred, blind = [], [], [], [], [], []
    dice, iou, region_hits, box_ious, rows = [], [], [], [], []
    dice_t: dict[str, list[float]] = defaultdict(list)
    iou_t: dict[str, list[float]] = defaultdict(list)
    items = list(groups.values())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="evaluate vqa")
    dev = model.device
    was_training = model.training
    model.eval()
    try:
        for idx in items:
            samples = [dataset[i] for i in idx]
            image = samples[0].image
            with torch.no_grad():
                pv = model.processor([image], device=dev)
                feats = model.encode_image(pv)
                out = model(pv, [s.question for s in samples], image_features=feats, mode=resolved)
                if question_blind:
                    b_out = model(pv, [""], image_features=feats, mode=resolved)
                    b_labels, b_probs = b_out.probs()
                    b_answer = b_labels[int(b_probs[0, 0].argmax())]
            labels, probs = out.probs()
            maps = model.processor.postprocess(torch.sigmoid(out.logits[0].float()), image.shape[:2]) > threshold
            region = torch.sigmoid(out.presence[0].float()) if out.presence is not None else maps.flatten(1).any(1)
            c_idx = out.answer_logits[0].argmax(-1).tolist()
            o_idx = out.open_logits[0].argmax(-1).tolist()
            for j, (i, s) in enumerate(zip(idx, samples)):
                p = labels[int(probs[0, j].argmax())]
                truth.append(s.answer)
                types.append(str(s.type))
                pred.append(p)
                closed_pred.append(out.closed_labels[c_idx[j]])
                open_pred.append(out.candidates[o_idx[j]])
                if question_blind:
                    blind.append(b_answer)
                row: dict[str, Any] = {"question": s.question, "answer": s.answer, "prediction": p,
                                       "type": str(s.type), "image": image_key(dataset, i)}
                if has_grounding(dataset, i):
                    refers = cutoff is None or float(region[j]) >= cutoff
                    m = maps[j].cpu().numpy() if refers else np.zeros(image.shape[:2], bool)
                    region_hits.append(refers == (s.mask is not None or s.box is not None))
                    if s.mask is not None:
                        d, u = M.dice(m, s.mask), M.iou(m, s.mask)
                        dice.append(d)
                        iou.append(u)
                        dice_t[str(s.type)].append(d)
                        iou_t[str(s.type)].append(u)
                        row.update(dice=d, iou=u)
                    gbox = _gt_box(s)
                    if gbox is not None:
                        pbox = mask_to_box(m, normalized=True) if m.any() else None
                        box_ious.append(0.0 if pbox is None else float(box_iou(pbox, gbox)))
                rows.append(row)
    finally:
        model.train(was_training)

    def mean(xs: list[float]) -> float | None:
        return float(np.mean(xs)) if xs else None

    summary: dict[str, Any] = {"n": len(truth), "images": len(groups), "mode": resolved}
    summary["all"] = {**answer_metrics(truth, pred), "dice": mean(dice), "iou": mean(iou),
                      "region_accuracy": mean([float(h) for h in region_hits]), "box_iou": mean(box_ious),
                      "n_grounded": len(dice)}
    summary["per_type"] = _by_type(types, truth, pred)
    for t, v in summary["per_type"].items():
        v.update(dice=mean(dice_t.get(t, [])), iou=mean(iou_t.get(t, [])))
    summary["heads"] = {"closed": answer_metrics(truth, closed_pred), "open": answer_metrics(truth, open_pred)}
    if train_answers is None:
        src_answers, src_types, source = truth, types, "evaluated set"
    elif isinstance(train_answers, tuple):
        src_answers, src_types, source = list(train_answers[0]), [str(t) for t in train_answers[1]], "train"
    elif hasattr(train_answers, "records"):
        src_answers = list(train_answers.answers())
        src_types = [str(r.get("type")) for r in train_answers.records]
        source = "train"
    else:
        src_answers, src_types, source = list(train_answers), None, "train"
    top, per_type_top = majority_answers(src_answers, src_types)
    baselines: dict[str, Any] = {"majority": {"answer": top, "all": answer_metrics(truth, [top] * len(truth)),
                                              "per_type": _by_type(types, truth, [top] * len(truth))}}
    if src_types is not None:
        tm = [per_type_top.get(t, top) for t in types]
        baselines["type_majority"] = {"answers": per_type_top, "all": answer_metrics(truth, tm),
                                      "per_type": _by_type(types, truth, tm)}
    if question_blind:
        baselines["question_blind"] = {"all": answer_metrics(truth, blind), "per_type": _by_type(types, truth, blind)}
    summary["baselines"] = baselines
    summary["majority_source"] = source
    if keep_predictions:
        summary["predictions"] = rows
    return summary


def _fmt(v: Any) -> str:
    return "   -  " if v is None else f"{v:6.3f}"


def report_lines(summary: dict[str, Any]) -> list[str]:
    """A readable table: per question type, the model beside its baselines (accuracy / macro F1) and grounding."""
    b = summary["baselines"]
    head = (f"{'type':<18}{'n':>5}  {'acc':>6} {'F1':>6} {'bal':>6} | {'major':>6} {'typeMj':>6} {'blind':>6} | "
            f"{'dice':>6} {'iou':>6}")
    title = (f"VQA: {summary['n']} questions on {summary['images']} images, head {summary['mode']}, majority "
             f"answer {b['majority']['answer']!r} (from the {summary['majority_source']})")
    lines = [title, head, "-" * len(head)]

    def base(kind: str, key: str) -> Any:
        if kind not in b:
            return None
        return (b[kind]["all"] if key == "all" else b[kind]["per_type"].get(key, {})).get("accuracy")

    rows = [("all", summary["all"])] + list(summary["per_type"].items())
    for name, v in rows:
        lines.append(f"{name:<18}{v['n']:>5}  {_fmt(v['accuracy'])} {_fmt(v['macro_f1'])} "
                     f"{_fmt(v['balanced_accuracy'])} | {_fmt(base('majority', name))} "
                     f"{_fmt(base('type_majority', name))} {_fmt(base('question_blind', name))} | "
                     f"{_fmt(v.get('dice'))} {_fmt(v.get('iou'))}")
    a = summary["all"]
    lines.append(f"macro F1: model {a['macro_f1']:.3f}, majority {b['majority']['all']['macro_f1']:.3f}"
                 + (f", question-blind {b['question_blind']['all']['macro_f1']:.3f}" if "question_blind" in b else "")
                 + f"; heads: closed acc {summary['heads']['closed']['accuracy']:.3f}, open acc "
                 f"{summary['heads']['open']['accuracy']:.3f}; region accuracy {_fmt(a['region_accuracy']).strip()}, "
                 f"box IoU {_fmt(a['box_iou']).strip()}")
    return lines


# ------------------------------------------------------------------------------------------------ command line
def main(argv: list[str] | None = None) -> int:
    """``python -m vlseg.vqa.evaluation``: score a VQA checkpoint on the validation split of a training config
    (``--config``, the same group split and answers as ``finetune/train.py``), or on engine questions generated
    from a segmentation manifest (``--data``). Writes ``vqa_metrics.json`` and prints the table."""
    ap = argparse.ArgumentParser(prog="python -m vlseg.vqa.evaluation", description=(main.__doc__ or '').splitlines()[0])
    ap.add_argument("--model", required=True, help="VQA checkpoint folder, hf-hub:org/repo, or a vqa preset")
    ap.add_argument("--pretrained", default="true", help="for a preset: true, false or a local folder")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="training YAML: evaluate on its validation (or --split train) split")
    src.add_argument("--data", help="segmentation manifest (.jsonl/.csv): engine questions on all its images")
    ap.add_argument("--split", choices=["val", "train"], default="val")
    ap.add_argument("--max-samples", type=int, default=None)
    ap.add_argument("--mode", choices=["auto", "closed", "open"], default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for vqa_metrics.json")
    args = ap.parse_args(argv)
    try:
        import vlseg

        model = vlseg.load_or_create(args.model, args.pretrained)
        if not isinstance(model, VQAModel):
            raise ValueError(f"{args.model} is not a VQA model (family {model.config.family!r})")  # noqa: TRY004
        train_answers = None
        if args.config:
            from ..training import load_config
            from .task import build_datasets

            cfg = load_config(args.config)
            train, val = build_datasets(cfg)
            ds = val if args.split == "val" else train
            train_answers = train
        else:
            from ..data import from_spec
            from .loaders import from_segmentation

            ds = from_segmentation(from_spec(args.data)[1], seed=args.seed,  # type: ignore[assignment]
                                   vocab=model.vocab.with_policy("unknown"))
        summary = evaluate(model, ds, train_answers=train_answers, max_samples=args.max_samples, seed=args.seed,
                           mode=args.mode, progress=True)
    except (ValueError, KeyError, TypeError, FileNotFoundError, OSError, RuntimeError, ImportError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {str(msg).splitlines()[0] if msg else type(e).__name__}", file=sys.stderr)
        return 2
    print("\n".join(report_lines(summary)))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "vqa_metrics.json").write_text(json.dumps(summary, indent=2))
        print(f"wrote {Path(args.out) / 'vqa_metrics.json'}")
    return 0


__all__ = ["accuracy", "answer_metrics", "balanced_accuracy", "evaluate", "has_grounding", "image_key", "macro_f1",
           "majority_answers", "report_lines"]

if __name__ == "__main__":
    sys.exit(main())
