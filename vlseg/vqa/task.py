"""The ``vqa`` training task (``finetune/train.py`` with ``task: vqa``, or any ``vqa`` family model).

Data (``cfg.data``), one entry per source, split into train / validation reproducibly:

* a segmentation source (``{manifest: ...}``, ``{folder: ..., masks: ...}``, ``{hf: ...}``, as for segmentation),
  split by group (subject / video / volume; a source that is one volume or video is split into two contiguous
  blocks, see ``vlseg.data.train_val_split``), then turned into engine questions with
  ``vlseg.vqa.from_segmentation``; per-source engine options go under ``qa`` (``{manifest: m.jsonl, qa:
  {infer_absent: true, absent_pool: [liver]}}``), defaults for every source under ``task_options.engine``;
* a published VQA release, ``{vqa: ROOT, format: endovis18-vqa}`` plus ``from_published`` arguments
  (``vocab``, ``unknown_policy``, ``images``, ``frame_step``, ``on_missing_frame``), split by the authors'
  standard split (jsonl manifests: by image, ``val_fraction``).

Every source takes ``weight`` (sampling weight of its images) and ``name``. The answer vocabulary is the union of
the sources' (engine answers + class names, published vocabularies); the task fits the model's closed head to it
before training starts (``VQAModel.set_vocab``: answers the head knows keep their weights).

Batches are deterministic in (seed, step): ``batch_size`` images, ``task_options.questions_per_image`` questions of
each (the image is encoded once for them). Images are not augmented: flips would make "left of" answers false.

Loss: ``answer_weight`` * closed-vocabulary CE + ``open_weight`` * open-vocabulary CE (over the vocabulary and the
batch's answers) + ``grounding_weight`` * (Dice + BCE of the answer mask + BCE of "refers to a region"), the last
weighted by ``cfg.loss`` like segmentation; questions that say nothing about regions (published classification
sets) get no grounding loss.

Evaluation: ``vlseg.vqa.evaluate`` on the validation split (``eval_max_samples`` questions), with the training
majority answer, per-type majority and the question-blind model as baselines; ``best_metric`` is one of
accuracy, macro_f1, balanced_accuracy, dice, iou (``dice``: the grounding Dice). After training, ``finish`` scores
the best model on the whole validation split and writes ``vqa_eval.json`` / ``vqa_eval.txt`` to the run folder.
"""

from __future__ import annotations

import copy
import json
import random
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..losses import SegmentationLoss
from ..training.tasks import Batch, Evaluation, Task, register_task
from .evaluation import evaluate, has_grounding, image_key, report_lines
from .schema import LoadReport, VQADataset
from .vocab import AnswerVocab, UnknownAnswerError, normalize_answer

#: ``task_options`` of the vqa task and their defaults
TASK_OPTIONS: dict[str, Any] = {
    "questions_per_image": 4,   # K questions of one image per batch (one image pass for them)
    "answer_weight": 1.0,       # closed-vocabulary cross-entropy
    "open_weight": 0.5,         # open-vocabulary (answer-embedding) cross-entropy
    "grounding_weight": 1.0,    # Dice + BCE + region presence (weighted inside by cfg.loss)
    "engine": {"questions_per_image": 10, "max_per_type": 3},  # from_segmentation options, every segmentation source
    "unknown_policy": None,     # the training vocabulary's policy (default: "unknown" if a source uses it)
    "eval_mode": "auto",        # answer head scored in evaluation: auto | closed | open
    "question_blind": True,     # score the question-blind ablation at every evaluation
    "pixel_cache_mb": 1024,     # processed images kept in memory by the batcher
}
METRICS = ("accuracy", "macro_f1", "balanced_accuracy", "dice", "iou")
_PUBLISHED_KEYS = {"vocab", "unknown_policy", "images", "frame_step", "on_missing_frame"}


def task_options(cfg: Any) -> dict[str, Any]:
    """``cfg.task_options`` with defaults; ValueError naming unknown keys or bad values."""
    opts = dict(cfg.task_options or {})
    unknown = sorted(set(opts) - set(TASK_OPTIONS))
    if unknown:
        raise ValueError(f"unknown vqa task_options {unknown}; valid: {sorted(TASK_OPTIONS)}")
    out = {**copy.deepcopy(TASK_OPTIONS), **opts}
    out["engine"] = {**TASK_OPTIONS["engine"], **(opts.get("engine") or {})}
    if not isinstance(out["questions_per_image"], int) or out["questions_per_image"] < 1:
        raise ValueError(f"task_options.questions_per_image must be an integer >= 1, got {out['questions_per_image']}")
    for k in ("answer_weight", "open_weight", "grounding_weight"):
        if not isinstance(out[k], (int, float)) or out[k] < 0:
            raise ValueError(f"task_options.{k} must be a number >= 0, got {out[k]!r}")
    if out["eval_mode"] not in ("auto", "closed", "open"):
        raise ValueError(f"task_options.eval_mode must be auto, closed or open, got {out['eval_mode']!r}")
    if out["unknown_policy"] not in (None, "error", "unknown", "skip"):
        raise ValueError(f"task_options.unknown_policy must be error, unknown or skip, got {out['unknown_policy']!r}")
    return out


# ------------------------------------------------------------------------------------------------ data
class VQAPool(VQADataset):
    """Several VQA datasets as one (records concatenated), with per-source image sampling weights and one vocabulary.

    ``image_key(i)`` and ``has_grounding(i)`` answer for the sample's own source.
    """

    def __init__(self, parts: dict[str, VQADataset], vocab: AnswerVocab | None,
                 weights: dict[str, float] | None = None):
        self.parts = dict(parts)
        self.weights = {n: float((weights or {}).get(n, 1.0)) for n in self.parts}
        self.records, self._src = [], []
        for name, ds in self.parts.items():
            for j, r in enumerate(ds.records):
                self.records.append(r)
                self._src.append((name, j))
        self._owner = {id(r): name for r, (name, _) in zip(self.records, self._src)}
        self.vocab = vocab
        self.name = "+".join(self.parts)
        self.report = LoadReport(format="pool", root=self.name, samples=len(self.records))

    def load(self, record: dict[str, Any]) -> Any:
        return self.parts[self._owner[id(record)]].load(record)

    def source(self, i: int) -> str:
        return self._src[i][0]

    def image_key(self, i: int) -> str:
        name, j = self._src[i]
        return f"{name}|{image_key(self.parts[name], j)}"

    def has_grounding(self, i: int) -> bool:
        name, j = self._src[i]
        return has_grounding(self.parts[name], j)


def _roots() -> list[Path]:
    return [Path.cwd(), Path(__file__).resolve().parents[2]]  # the working directory, then a source checkout


def _resolve(p: str) -> str:
    from ..data.specs import _resolve as resolve

    return resolve(p, _roots())


def _group_split(ds: VQADataset, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices split by image, reproducibly (for sources without a standard split)."""
    keys: dict[str, list[int]] = {}
    for i in range(len(ds)):
        keys.setdefault(image_key(ds, i), []).append(i)
    groups = sorted(keys)
    random.Random(seed).shuffle(groups)
    n_val = max(1, round(val_fraction * len(groups))) if len(groups) > 1 else 0
    val = sorted(i for g in groups[:n_val] for i in keys[g])
    train = sorted(i for g in groups[n_val:] for i in keys[g])
    return train, val


def build_datasets(cfg: Any) -> tuple[VQAPool, VQAPool]:
    """(train, val) VQA pools from ``cfg.data`` (see the module docstring), sharing one answer vocabulary."""
    from ..data import from_spec, train_val_split
    from .loaders import SPLITS, from_published, from_segmentation

    opts = task_options(cfg)
    if not cfg.data:
        raise ValueError("no training data: set `data` (a list of sources) in the config")
    engine_src: list[tuple[str, Any, Any, dict[str, Any]]] = []  # name, train rows, val rows, engine options
    published: list[tuple[str, VQADataset, VQADataset]] = []
    weights: dict[str, float] = {}
    for n, spec in enumerate(cfg.data):
        if not isinstance(spec, dict):
            spec = {"manifest": spec}
        s = dict(spec)
        weight = float(s.pop("weight", 1.0))
        name = str(s.pop("name", None) or f"source{n}")
        if name in weights:
            raise ValueError(f"two data sources are named {name!r}; give each a distinct 'name'")
        weights[name] = weight
        if "vqa" in s:
            root, fmt = _resolve(str(s.pop("vqa"))), s.pop("format", None)
            if fmt is None:
                raise ValueError(f"data source {spec}: a 'vqa' source needs a 'format' (e.g. endovis18-vqa)")
            bad = sorted(set(s) - _PUBLISHED_KEYS)
            if bad:
                raise ValueError(f"data source {spec}: unknown key(s) {bad}; a 'vqa' source takes vqa, format, "
                                 f"weight, name and {sorted(_PUBLISHED_KEYS)}")
            if fmt in SPLITS:
                tr: Any = from_published(root, fmt, split="train", **s)
                va: Any = from_published(root, fmt, split="val", **s)
            else:
                full = from_published(root, fmt, **s)
                ti, vi = _group_split(full, cfg.val_fraction, cfg.data_split_seed)
                tr, va = full.subset(ti), full.subset(vi)
            published.append((name, tr, va))
        else:
            qa = {**opts["engine"], **(s.pop("qa", None) or {})}
            _, seg = from_spec(s, _roots())
            tr, va = train_val_split(seg, cfg.val_fraction, seed=cfg.data_split_seed)
            engine_src.append((name, tr, va, qa))
    vocab = _union_vocab(engine_src, published, opts["unknown_policy"])
    train_parts: dict[str, Any] = {}
    val_parts: dict[str, Any] = {}
    for name, tr, va, qa in engine_src:
        qa = dict(qa)
        seed = int(qa.pop("seed", cfg.seed))
        train_parts[name] = from_segmentation(tr, seed=seed, vocab=vocab, **qa)
        if len(va):
            with warnings.catch_warnings():  # the training split already warned about this source
                warnings.simplefilter("ignore")
                val_parts[name] = from_segmentation(va, seed=seed, vocab=vocab, **qa)
    for name, tr, va in published:
        train_parts[name] = tr
        if len(va):
            val_parts[name] = va
    train = VQAPool({k: v for k, v in train_parts.items() if len(v)}, vocab, weights)
    val = VQAPool({k: v for k, v in val_parts.items() if len(v)}, vocab, weights)
    if not len(train):
        raise ValueError("the vqa task found no training questions in `data`")
    return train, val


def _union_vocab(engine_src: list[Any], published: list[Any], policy: str | None) -> AnswerVocab:
    answers: list[str] = []
    aliases: dict[str, str] = {}
    policies = []
    names = []
    if engine_src:
        base = AnswerVocab.load("engine")
        answers += base.answers
        aliases.update(base.aliases)
        names.append("engine")
        for _, tr, va, qa in engine_src:
            for part in (tr, va):
                for r in part.records:
                    answers.append(str(r.get("class_name", "")))
                    answers += [str(c) for c in (r.get("class_names") or [])]
            answers += [str(c) for c in qa.get("absent_pool") or []]
    for name, tr, va in published:
        names.append(name)
        if tr.vocab is not None:
            answers += tr.vocab.answers
            aliases.update(tr.vocab.aliases)
            policies.append(tr.vocab.unknown_policy)
        else:
            answers += list(tr.answers())
    seen: dict[str, None] = {}
    for a in answers:
        n = normalize_answer(a)
        if n and n != "<unk>":
            seen.setdefault(n, None)
    final = list(seen)
    if policy is None:
        policy = "unknown" if "unknown" in policies else "error"
    aliases = {k: v for k, v in aliases.items() if v in seen and k not in seen}
    return AnswerVocab(name="+".join(names) or "vqa", answers=tuple(final), aliases=aliases,
                       unknown_policy=policy,  # type: ignore[arg-type]
                       source="vlseg.vqa.task: union of the training sources' answers")


# ------------------------------------------------------------------------------------------------ batches
class VQABatcher:
    """Deterministic batches: step s draws its images and their questions from (seed, s) only, so a resumed run sees
    the same batches and every process takes its own slice. Processed images and masks are kept in memory (LRU,
    ``pixel_cache_mb``) so images are decoded once."""

    def __init__(self, ds: VQAPool, cfg: Any, processor: Any, vocab: AnswerVocab, k: int, rank: int, world: int,
                 cache_mb: int = 1024):
        self.ds, self.cfg, self.proc, self.vocab, self.k = ds, cfg, processor, vocab, k
        self.rank, self.world = rank, world
        members: dict[str, list[int]] = {}
        for i in range(len(ds)):
            members.setdefault(ds.image_key(i), []).append(i)
        self.keys = list(members)
        self.members = [members[key] for key in self.keys]
        per_source: dict[str, int] = {}
        for m in self.members:
            per_source[ds.source(m[0])] = per_source.get(ds.source(m[0]), 0) + 1
        w = np.array([ds.weights[ds.source(m[0])] / per_source[ds.source(m[0])] for m in self.members])
        self.p = w / w.sum()
        self._pix: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._pix_bytes, self._max_bytes = 0, int(cache_mb) * 1024**2
        self._masks: dict[int, torch.Tensor | None] = {}

    def _load(self, g: int, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """-> processed pixels (3, S, S) of image group g, mask target (S, S) bool of sample i (None: no region)."""
        key = self.keys[g]
        pix = self._pix.get(key)
        if pix is not None:
            self._pix.move_to_end(key)
        if pix is None or i not in self._masks:
            s = self.ds[i]
            if pix is None:
                pix = self.proc([s.image])[0]
                self._pix[key] = pix
                self._pix_bytes += pix.numel() * pix.element_size()
                while self._pix_bytes > self._max_bytes and len(self._pix) > 1:
                    _, old = self._pix.popitem(last=False)
                    self._pix_bytes -= old.numel() * old.element_size()
            mask = s.mask
            if mask is None and s.box is not None:  # box-only data: the box as a (weak) mask target
                from .boxes import denormalize_box

                h, w = s.image.shape[:2]
                x1, y1, x2, y2 = denormalize_box(s.box, w, h)
                mask = np.zeros((h, w), bool)
                mask[int(y1):int(np.ceil(y2)), int(x1):int(np.ceil(x2))] = True
            self._masks[i] = None if mask is None else self.proc.masks([mask])[0].bool()
        return pix, self._masks[i]

    def __call__(self, step: int, device: torch.device | str) -> Batch:
        cfg, k = self.cfg, self.k
        rng = np.random.default_rng([cfg.seed, step])
        groups = rng.choice(len(self.members), size=cfg.batch_size * self.world, p=self.p)
        groups = groups[self.rank * cfg.batch_size:(self.rank + 1) * cfg.batch_size]
        pixels, keys, questions, answers, types, targets, grounded = [], [], [], [], [], [], []
        size = self.proc.size
        for g in groups.tolist():
            m = self.members[g]
            pick = rng.choice(len(m), size=k, replace=len(m) < k)
            qs = []
            for j in pick.tolist():
                i = m[j]
                r = self.ds.records[i]
                pix, mask = self._load(g, i)
                qs.append(r["question"])
                answers.append(r["answer"])
                types.append(str(r.get("type")))
                targets.append(mask.float() if mask is not None else torch.zeros(size, size))
                grounded.append(self.ds.has_grounding(i))
            pixels.append(pix)
            keys.append(self.keys[g])
            questions.append(qs)
        b = len(pixels)
        return Batch(pixel_values=torch.stack(pixels).to(device), keys=keys, inputs={
            "questions": questions, "answers": answers, "types": types,
            "targets": torch.stack(targets).reshape(b, k, size, size).to(device),
            "grounded": torch.tensor(grounded, dtype=torch.bool, device=device)})


# ------------------------------------------------------------------------------------------------ the task
@register_task
class VQATask(Task):
    name = "vqa"

    def __init__(self) -> None:
        self._state: dict[str, Any] = {}

    def pixels_repeat(self, cfg: Any) -> bool:
        return True  # the vqa task never augments, so frozen image features may be cached

    def datasets(self, cfg: Any) -> tuple[VQAPool, VQAPool]:
        opts = task_options(cfg)
        if cfg.best_metric not in METRICS:
            raise ValueError(f"best_metric {cfg.best_metric!r} is not a vqa metric; choose from {list(METRICS)}")
        train, val = build_datasets(cfg)
        self._state = {"opts": opts, "vocab": train.vocab,
                       "train_answers": (train.answers(), [str(r.get("type")) for r in train.records])}
        return train, val

    def batcher(self, model: Any, train: VQAPool, cfg: Any, rank: int, world: int) -> VQABatcher:
        from .model import VQAModel

        if not isinstance(model, VQAModel):
            raise ValueError(  # noqa: TRY004  (train.py reports ValueErrors as one line)
                f"task 'vqa' needs a VQA model (a 'vqa' family preset such as minilm-scratch-vqa), got a "
                f"{model.config.family!r} model")
        opts = self._state.get("opts") or task_options(cfg)
        if any(v for v in (cfg.augment or {}).values()):
            warnings.warn("the vqa task does not augment images (a flip would make 'left of' answers false); "
                          "`augment` is ignored", stacklevel=2)
        vocab = train.vocab
        assert vocab is not None  # datasets() always builds one
        model.set_vocab(vocab)  # before the optimizer is built: the closed head fits the training answers
        self._state.update(vocab=vocab, loss=SegmentationLoss(**cfg.loss), opts=opts)
        return VQABatcher(train, cfg, model.processor, vocab, opts["questions_per_image"], rank, world,
                          opts["pixel_cache_mb"])

    def loss(self, model: Any, batch: Batch, image_features: Any) -> tuple[torch.Tensor, dict[str, float]]:
        st = self._state
        vocab: AnswerVocab = st["vocab"]
        opts = st["opts"]
        answers = batch.inputs["answers"]
        cands = list(vocab.answers) + sorted(set(answers) - set(vocab.answers))
        out = model(batch.pixel_values, batch.inputs["questions"], image_features=image_features,
                    answers=answers, candidates=cands)
        dev = out.answer_logits.device
        closed_t = torch.tensor([self._index(vocab, a) for a in answers], device=dev)
        pos = {a: i for i, a in enumerate(cands)}
        open_t = torch.tensor([pos[a] for a in answers], device=dev)
        logits_c = out.answer_logits.flatten(0, 1).float()
        zero = logits_c.sum() * 0.0
        ce = F.cross_entropy(logits_c, closed_t, ignore_index=-100) if (closed_t >= 0).any() else zero
        oce = F.cross_entropy(out.open_logits.flatten(0, 1).float(), open_t)
        g = batch.inputs["grounded"]
        parts: dict[str, float] = {}
        ground = zero
        if g.any():
            presence = out.presence.flatten()[g] if out.presence is not None else None
            ground, parts = st["loss"](out.logits.flatten(0, 1)[g], batch.inputs["targets"].flatten(0, 1)[g],
                                       presence)
        total = opts["answer_weight"] * ce + opts["open_weight"] * oce + opts["grounding_weight"] * ground
        ok = closed_t >= 0
        acc = float((logits_c.argmax(-1)[ok] == closed_t[ok]).float().mean()) if ok.any() else 0.0
        return total, {"answer_ce": float(ce.detach()), "open_ce": float(oce.detach()), **parts, "train_acc": acc}

    @staticmethod
    def _index(vocab: AnswerVocab, answer: str) -> int:
        try:
            i = vocab.resolve(answer)
        except UnknownAnswerError:
            return -100
        return -100 if i is None else i

    def _evaluate(self, model: Any, val: Any, cfg: Any, max_samples: int | None) -> dict[str, Any]:
        opts = self._state.get("opts") or task_options(cfg)
        return evaluate(model, val, train_answers=self._state.get("train_answers"), max_samples=max_samples,
                        seed=cfg.seed, mode=opts["eval_mode"], question_blind=opts["question_blind"])

    def evaluate(self, model: Any, val: Any, cfg: Any) -> Evaluation:
        if not len(val):
            raise ValueError("the vqa validation split is empty: lower val_fraction's granularity or add data")
        s = self._evaluate(model, val, cfg, cfg.eval_max_samples)
        value = s["all"].get(cfg.best_metric)
        b = s["baselines"]
        headline = {"accuracy": s["all"]["accuracy"], "macro_f1": s["all"]["macro_f1"],
                    "dice": s["all"]["dice"] if s["all"]["dice"] is not None else 0.0,
                    "majority_accuracy": b["majority"]["all"]["accuracy"]}
        if "question_blind" in b:
            headline["blind_accuracy"] = b["question_blind"]["all"]["accuracy"]
        return Evaluation(score=float(value) if value is not None else 0.0, headline=headline, summary=s)

    def finish(self, model: Any, val: Any, cfg: Any) -> dict[str, Any]:
        """Score the best model on the whole validation split; write vqa_eval.json / vqa_eval.txt."""
        if not len(val):
            return {}
        s = self._evaluate(model, val, cfg, None)
        out = Path(cfg.output_dir)
        lines = report_lines(s)
        (out / "vqa_eval.json").write_text(json.dumps(s, indent=2))
        (out / "vqa_eval.txt").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return {"vqa": s}


__all__ = ["METRICS", "TASK_OPTIONS", "VQABatcher", "VQAPool", "VQATask", "build_datasets", "task_options"]
