"""Loaders: published surgical VQA releases read as they lie on disk, JSONL manifests, and question generation
from any vlseg segmentation dataset. Every loader returns a lazy, indexable dataset (``ds[i] -> VQASample``) with
a ``LoadReport`` attached (``ds.report``).

Published layouts (what ``root`` points at), as read by the authors' own loaders:

``endovis18-vqa`` (EndoVis-18-VQA, Surgical-VQA, MICCAI 2022; lalithjets/Surgical_VQA, lalithjets/SurgicalGPT)::

    root/seq_N/vqa/Classification/frameNNN_QA.txt   lines "question|answer" (some re-releases join several
                                                      questions, and answers, with '&' on one line)
    root/seq_N/left_frames/frameNNN.png             the EndoVis18 frames (downloaded separately)
    split: train = seq 2,3,4,6,7,9,10,11,12,14,15; val = seq 1,5,16

``endovis18-vqla`` (EndoVis-18-VQLA, Surgical-VQLA, ICRA 2023; longbai1006/Surgical-VQLA)::

    root/seq_N/vqla/label/frameNNN_QA.txt            lines "question|answer|x1,y1,x2,y2"
    root/seq_N/left_frames/frameNNN.png              (same split as endovis18-vqa)
    or, for the EndoVis-17-VQLA external set: root/vqla/label/*.txt + root/left_frames/ (split=None only)

    Boxes are pixel coordinates of the 1280 x 1024 frames and 1-based: the official loader subtracts 1 from all four
    numbers. We read them as 1-based inclusive pixel indices, i.e. pixel edges (x1 - 1, y1 - 1, x2, y2) (kept in
    ``meta["box_pixels"]``; the raw numbers in ``meta["raw_box"]``), and ``VQASample.box`` divides by the frame's
    width/height, so it is normalised to [0, 1].

``cholec80-vqa`` (Cholec80-VQA, Surgical-VQA)::

    root/Classification/<video 1..40>/<frame>_*.txt   lines "question|answer"
    root/cropped_image/<video>/<frame>.png            (``cropped_images`` in the README; both are accepted)
    split: val = videos 5,11,12,17,19,26,27,31; train = the other 32 of 1..40
    The published loaders keep only frames whose number is a multiple of 100: pass ``frame_step=100`` for that.

``psi-ava-vqa`` (PSI-AVA-VQA, SurgicalGPT, MICCAI 2023; lalithjets/SurgicalGPT)::

    root/Train/C1_location.txt, C2_action.txt, C3_phase.txt, C4_step.txt; root/Val/... (same names)
        lines "keyframe|question|answer"; the file name gives the question type
    root/keyframes/<keyframe>                          (keyframe is a path relative to keyframes/)
    split: train = Train/, val = Val/

``ssg-vqa`` (SSG-VQA, CAMMA-public/SSG-VQA)::

    root/qa_txt/VIDxx/<frame>.txt (or root/VIDxx/<frame>.txt): the first two lines are a header
        ("Which anatomical structures are present?|...", "Which tools are present?|..."), skipped like the official
        loader (kept in ``meta["header"]``); then "question|answer" (triplet / action questions),
        "question|answer|[x, y]" (a location question with its object's centre in the 430 x 240 scene-graph frame),
        or "question|answer|template.json|type|extra" (e.g. "...|1|zero_hop.json|count|NA")
    frames are not part of the release (CholecT45 / CholecT50 videos): images/VIDxx/%06d.png under ``images``
    (default root/images)
    split: the train / val / test video lists of the official train.py

``jsonl``: a .jsonl file, one object per line: ``image``, ``question``, ``answer`` (required); ``mask`` (binary mask
path), ``box`` (pixel edges x1, y1, x2, y2) or ``box_normalized`` ([0, 1]), ``type``, ``split``, ``dataset``
(optional). Paths are relative to the file's folder. ``split=`` needs rows with a ``split`` field.

Problems are never dropped silently: malformed lines raise ``VQADataError`` naming file and line; missing frames
and answers outside the vocabulary are counted, with file names, in ``ds.report`` and summarised in one
``VQADataWarning``.
"""

from __future__ import annotations

import json
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .engine import TYPES, generate_qa
from .schema import FileVQADataset, LoadReport, SegmentationVQADataset, VQADataError, VQADataWarning
from .vocab import AnswerVocab, UnknownPolicy, normalize_answer

FORMATS: tuple[str, ...] = ("endovis18-vqa", "endovis18-vqla", "cholec80-vqa", "psi-ava-vqa", "ssg-vqa", "jsonl")
_ENDOVIS_SPLIT = {"train": (2, 3, 4, 6, 7, 9, 10, 11, 12, 14, 15), "val": (1, 5, 16)}
_CHOLEC_VAL = (5, 11, 12, 17, 19, 26, 27, 31)
SPLITS: dict[str, dict[str, tuple[Any, ...]]] = {
    "endovis18-vqa": _ENDOVIS_SPLIT,
    "endovis18-vqla": _ENDOVIS_SPLIT,
    "cholec80-vqa": {"train": tuple(v for v in range(1, 41) if v not in _CHOLEC_VAL), "val": _CHOLEC_VAL},
    "psi-ava-vqa": {"train": ("Train",), "val": ("Val",)},
    "ssg-vqa": {
        "train": ("VID73", "VID40", "VID62", "VID42", "VID29", "VID56", "VID50", "VID78", "VID66", "VID13", "VID52",
                  "VID06", "VID36", "VID05", "VID12", "VID26", "VID68", "VID32", "VID49", "VID65", "VID47", "VID04",
                  "VID23", "VID79", "VID51", "VID10", "VID57", "VID75", "VID25", "VID14", "VID15", "VID08", "VID80",
                  "VID27", "VID70"),
        "val": ("VID18", "VID48", "VID01", "VID35", "VID31"),
        "test": ("VID22", "VID74", "VID60", "VID02", "VID43"),
    },
}
DEFAULT_VOCAB: dict[str, str | None] = {"endovis18-vqa": "endovis18-vqa", "endovis18-vqla": "endovis18-vqa",
                                        "cholec80-vqa": "cholec80-vqa", "psi-ava-vqa": "psi-ava-vqa",
                                        "ssg-vqa": "ssg-vqa", "jsonl": None}
SSG_TYPES = {"exist": "existence", "count": "counting", "query_color": "attribute", "query_type": "attribute",
             "query_location": "location", "query_component": "query component"}
FRAME_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
MissingFramePolicy = Literal["skip", "error"]


# ---- line reading ---------------------------------------------------------------------------------------------------
def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines of a UTF-8 text file."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise VQADataError(f"{path}: not UTF-8 text ({e})") from e
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield n, line.strip()


def _fields(path: Path, n: int, line: str, counts: Sequence[int], expected: str) -> list[str]:
    parts = [p.strip() for p in line.split("|")]
    if len(parts) not in counts or not all(parts[:2]) or (len(parts) > 2 and not all(parts)):
        raise VQADataError(f"{path}:{n}: malformed line, expected {expected}, got {len(parts)} field(s) "
                           f"separated by '|': {line!r}")
    return parts


def _frame(folder: Path, names: Sequence[str]) -> Path:
    """The first existing ``folder/name.ext`` (names x FRAME_EXTS), else the first candidate (reported missing)."""
    for name in names:
        for ext in FRAME_EXTS:
            p = folder / f"{name}{ext}"
            if p.is_file():
                return p
    return folder / f"{names[0]}{FRAME_EXTS[0]}"


def _num_key(p: Path) -> tuple[int, str]:
    digits = re.findall(r"\d+", p.name)
    return (int(digits[-1]) if digits else -1, p.name)


def _entry(path: Path, n: int, image: Path, question: str, answer: str, qtype: str | None, **meta: Any) -> dict:
    return {"image": str(image), "question": question, "raw_answer": answer, "type": qtype,
            "meta": {"where": f"{path}:{n}", "file": str(path), "line": n, **meta}}


def _sequence_dirs(root: Path, prefix: str, ids: Sequence[Any] | None, report: LoadReport) -> list[tuple[Any, Path]]:
    if ids is None:
        found = [(p.name[len(prefix):], p) for p in root.iterdir() if p.is_dir() and p.name.startswith(prefix)]
        return sorted(found, key=lambda t: _num_key(t[1]))
    out = []
    for i in ids:
        p = root / f"{prefix}{i}"
        if p.is_dir():
            out.append((str(i), p))
        else:
            report.missing_sequences.append(str(p))
    return out


# ---- the published formats ------------------------------------------------------------------------------------------
def _endovis_type(question: str) -> str:
    q = question.lower()
    if "organ" in q:
        return "organ"
    if "state" in q:
        return "tool state"
    if q.startswith("where") or "located" in q:
        return "location"
    return "other"


def _read_endovis(root: Path, ids: Sequence[Any] | None, report: LoadReport, vqla: bool) -> list[dict]:
    sub = Path("vqla", "label") if vqla else Path("vqa", "Classification")
    if vqla and (root / sub).is_dir() and not any(root.glob("seq_*")):
        if ids is not None:
            raise VQADataError(f"{root} holds one EndoVis-17-VQLA-style set (vqla/label, no seq_N folders): it has no "
                               "standard split, pass split=None")
        seqs: list[tuple[Any, Path]] = [("", root)]
    else:
        seqs = _sequence_dirs(root, "seq_", ids, report)
        if not seqs:
            which = f"none of the split's folders seq_{list(ids)}" if ids is not None else "no seq_N folders"
            raise VQADataError(f"{which} under {root}; expected the {'EndoVis-18-VQLA' if vqla else 'EndoVis-18-VQA'}"
                               f" layout root/seq_N/{sub.as_posix()}/*.txt")
    entries: list[dict] = []
    for seq, folder in seqs:
        qa_dir = folder / sub
        files = sorted(qa_dir.glob("*.txt"), key=_num_key)
        if not files:
            report.notes.append(f"no QA files in {qa_dir}")
        for path in files:
            report.files += 1
            stem = path.stem
            image = _frame(folder / "left_frames", list(dict.fromkeys([stem.split("_")[0], stem])))
            ids_meta = {"sequence": seq, "frame": stem.split("_")[0]}
            for n, line in _lines(path):
                if vqla:
                    q, a, box = _fields(path, n, line, (3,), "'question|answer|x1,y1,x2,y2'")
                    nums = [p.strip() for p in box.strip("[]() ").split(",")]
                    try:
                        raw = [float(v) for v in nums]
                    except ValueError:
                        raw = []
                    if len(raw) != 4 or raw[2] < raw[0] or raw[3] < raw[1] or min(raw) < 0:
                        raise VQADataError(f"{path}:{n}: malformed box {box!r}, expected 'x1,y1,x2,y2' pixel numbers "
                                           f"with x1 <= x2 and y1 <= y2: {line!r}")
                    report.lines += 1
                    e = _entry(path, n, image, q, a, _endovis_type(q), raw_box=raw, **ids_meta)
                    e["box_pixels"] = (max(raw[0] - 1, 0.0), max(raw[1] - 1, 0.0), raw[2], raw[3])
                    e["meta"]["box_pixels"] = e["box_pixels"]
                    entries.append(e)
                    continue
                q, a = _fields(path, n, line, (2,), "'question|answer'")
                qs, ans = [s.strip() for s in q.split("&")], [s.strip() for s in a.split("&")]
                if len(ans) == 1:
                    ans = ans * len(qs)
                if len(ans) != len(qs) or not all(qs) or not all(ans):
                    raise VQADataError(f"{path}:{n}: {len(qs)} questions joined by '&' but {len(ans)} answers: "
                                       f"{line!r}")
                for qi, ai in zip(qs, ans):
                    report.lines += 1
                    entries.append(_entry(path, n, image, qi, ai, _endovis_type(qi), **ids_meta))
    return entries


def _cholec_type(question: str, answer: str) -> str:
    q = question.lower()
    if q.startswith("how many"):
        return "counting"
    if "phase" in q:
        return "phase"
    if answer.strip().lower() in ("yes", "no"):
        return "existence"
    return "other"


def _read_cholec80(root: Path, ids: Sequence[Any] | None, report: LoadReport, frame_step: int | None) -> list[dict]:
    qa_root = root / "Classification"
    if not qa_root.is_dir():
        raise VQADataError(f"{qa_root} not found; expected the Cholec80-VQA layout root/Classification/<video>/*.txt")
    image_root = next((root / d for d in ("cropped_image", "cropped_images") if (root / d).is_dir()),
                      root / "cropped_image")
    entries: list[dict] = []
    skipped = 0
    for video, folder in _sequence_dirs(qa_root, "", ids, report):
        for path in sorted(folder.glob("*.txt"), key=_num_key):
            head = path.stem.split("_")[0]
            if not head.isdigit():
                raise VQADataError(f"{path}: Cholec80-VQA file names start with the frame number "
                                   "('<frame>.txt' or '<frame>_*.txt')")
            if frame_step and int(head) % frame_step:
                skipped += 1
                continue
            report.files += 1
            image = _frame(image_root / video, [head])
            for n, line in _lines(path):
                q, a = _fields(path, n, line, (2,), "'question|answer'")
                report.lines += 1
                entries.append(_entry(path, n, image, q, a, _cholec_type(q, a), video=video, frame=int(head)))
    if frame_step:
        report.notes.append(f"frame_step={frame_step}: {skipped} QA files of other frames not read")
    return entries


def _read_psi(root: Path, ids: Sequence[Any] | None, report: LoadReport) -> list[dict]:
    folders = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    wanted = ids if ids is not None else ("Train", "Val")
    split_dirs = []
    for name in wanted:
        if name.lower() in folders:
            split_dirs.append(folders[name.lower()])
        elif ids is not None:
            report.missing_sequences.append(str(root / name))
    if not split_dirs:
        raise VQADataError(f"no Train/ or Val/ folder under {root}; expected the PSI-AVA-VQA layout "
                           "root/{Train,Val}/C*_*.txt with lines 'keyframe|question|answer'")
    entries: list[dict] = []
    for folder in split_dirs:
        for path in sorted(folder.glob("*.txt")):
            report.files += 1
            m = re.match(r"C\d+_(.+)", path.stem)
            qtype = m.group(1).lower() if m else path.stem
            for n, line in _lines(path):
                key, q, a = _fields(path, n, line, (3,), "'keyframe|question|answer'")
                report.lines += 1
                entries.append(_entry(path, n, root / "keyframes" / key, q, a, qtype, keyframe=key,
                                      split_folder=folder.name))
    return entries


def _read_ssg(root: Path, ids: Sequence[Any] | None, report: LoadReport, images: Path | None) -> list[dict]:
    qa_root = root / "qa_txt" if (root / "qa_txt").is_dir() else root
    image_root = images if images is not None else root / "images"
    videos = _sequence_dirs(qa_root, "VID", [str(i)[3:] if str(i).startswith("VID") else i for i in ids]
                            if ids is not None else None, report)
    if not videos:
        which = f"none of the split's videos {list(ids)}" if ids is not None else "no VIDxx folders"
        raise VQADataError(f"{which} under {qa_root}; expected the SSG-VQA layout root/qa_txt/VIDxx/<frame>.txt")
    entries: list[dict] = []
    for vid, folder in videos:
        video = f"VID{vid}"
        for path in sorted(folder.glob("*.txt"), key=_num_key):
            if not path.stem.isdigit():
                raise VQADataError(f"{path}: SSG-VQA file names are frame numbers ('<frame>.txt')")
            report.files += 1
            image = _frame(image_root / video, [f"{int(path.stem):06d}"])
            lines = list(_lines(path))
            header = [line for _, line in lines[:2]]
            for n, line in lines[2:]:
                parts = _fields(path, n, line, (2, 3, 4, 5), "'question|answer', 'question|answer|[x, y]' or "
                                "'question|answer|template|type[|extra]'")
                q, a = parts[:2]
                meta: dict[str, Any] = {"video": video, "frame": int(path.stem), "header": header}
                if len(parts) == 2:
                    qtype = "action"
                elif len(parts) == 3:
                    try:
                        point = [float(v) for v in parts[2].strip("[] ").split(",")]
                    except ValueError:
                        point = []
                    if len(point) != 2:
                        raise VQADataError(f"{path}:{n}: malformed point {parts[2]!r}, expected '[x, y]': {line!r}")
                    qtype, meta["point"] = "location", tuple(point)
                else:
                    meta["template"], meta["raw_type"] = parts[2], parts[3]
                    if len(parts) == 5:
                        meta["extra"] = parts[4]
                    qtype = SSG_TYPES.get(parts[3], parts[3])
                report.lines += 1
                entries.append(_entry(path, n, image, q, a, qtype, **meta))
    return entries


def _read_jsonl(root: Path, split: str | None, report: LoadReport) -> list[dict]:
    if not root.is_file():
        raise VQADataError(f"jsonl format: {root} is not a file; pass the path of the .jsonl manifest")
    base = root.parent
    rows = []
    for n, line in _lines(root):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise VQADataError(f"{root}:{n}: not valid JSON ({err})") from err
        if not isinstance(row, dict):
            raise VQADataError(f"{root}:{n}: expected a JSON object, got {type(row).__name__}")
        missing = [k for k in ("image", "question", "answer") if not row.get(k) and row.get(k) != 0]
        if missing:
            raise VQADataError(f"{root}:{n}: missing {missing} (required: image, question, answer)")
        rows.append((n, row))
    report.files = 1
    if split is not None:
        if not any("split" in r for _, r in rows):
            raise VQADataError(f"{root}: split={split!r} asked but no row has a 'split' field; pass split=None")
        rows = [(n, r) for n, r in rows if r.get("split") == split]
    entries = []
    for n, r in rows:
        report.lines += 1
        e = _entry(root, n, base / str(r["image"]), str(r["question"]), str(r["answer"]), r.get("type"),
                   **{k: v for k, v in r.items() if k not in ("image", "question", "answer", "type", "mask", "box",
                                                              "box_normalized")})
        if r.get("mask"):
            e["mask"] = str(base / str(r["mask"]))
        for key in ("box", "box_normalized"):
            if r.get(key) is not None:
                b = r[key]
                if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)
                        and b[0] <= b[2] and b[1] <= b[3]):
                    raise VQADataError(f"{root}:{n}: {key} must be [x1, y1, x2, y2] numbers with x1 <= x2, y1 <= y2, "
                                       f"got {b!r}")
                if key == "box_normalized" and not (0 <= min(b) and max(b) <= 1):
                    raise VQADataError(f"{root}:{n}: box_normalized must lie in [0, 1], got {b!r}")
                e["box_pixels" if key == "box" else "box"] = tuple(float(v) for v in b)
        if r.get("dataset"):
            e["dataset"] = str(r["dataset"])
        entries.append(e)
    return entries


# ---- public API -----------------------------------------------------------------------------------------------------
def _vocab(vocab: AnswerVocab | str | None, fmt: str, unknown_policy: UnknownPolicy | None) -> AnswerVocab | None:
    if vocab is None and DEFAULT_VOCAB.get(fmt):
        vocab = AnswerVocab.load(str(DEFAULT_VOCAB[fmt]))
    elif isinstance(vocab, str):
        vocab = AnswerVocab.from_json(vocab) if vocab.endswith(".json") else AnswerVocab.load(vocab)
    if vocab is not None and unknown_policy is not None:
        vocab = vocab.with_policy(unknown_policy)
    elif vocab is None and unknown_policy is not None:
        raise ValueError(f"unknown_policy={unknown_policy!r} needs a vocabulary; format {fmt!r} has no default one, "
                         "pass vocab=")
    return vocab


def _resolve_split(fmt: str, split: str | None) -> tuple[Any, ...] | None:
    if split is None or fmt == "jsonl":
        return None
    if fmt not in SPLITS:
        raise ValueError(f"format {fmt!r} has no standard split; pass split=None")
    if split not in SPLITS[fmt]:
        raise ValueError(f"unknown split {split!r} for {fmt!r}; standard splits: {sorted(SPLITS[fmt])}, or None for all")
    return SPLITS[fmt][split]


def from_published(root: str | Path, format: str, split: str | None = None, vocab: AnswerVocab | str | None = None,
                   *, unknown_policy: UnknownPolicy | None = None, on_missing_frame: MissingFramePolicy = "skip",
                   images: str | Path | None = None, frame_step: int | None = None,
                   warn: bool = True) -> FileVQADataset:
    """A published surgical VQA dataset, read exactly as it lies on disk (layouts in the module docstring).

    Args:
        root: the dataset folder (``EndoVis-18-VQA/``, ``Cholec80-VQA/``, ...), or the .jsonl file for "jsonl".
        format: one of ``FORMATS``.
        split: None (everything), or "train" / "val" ("test" for ssg-vqa) by the authors' standard split.
        vocab: an ``AnswerVocab``, a packaged vocabulary name or a .json path; default: the format's packaged one
            (none for "jsonl": answers are then only normalised and ``answer_index`` is None).
        unknown_policy: override the vocabulary's policy for answers outside it ("error", "unknown", "skip").
        on_missing_frame: "skip" (drop the questions of a missing frame image, reported) or "error".
        images: frame folder for "ssg-vqa" (``VIDxx/%06d.png`` inside; default root/images).
        frame_step: cholec80-vqa only: read frames whose number is a multiple of this (the published loaders use 100).
        warn: emit one ``VQADataWarning`` summarising missing frames / unknown answers.

    Returns:
        A lazy ``FileVQADataset`` (images read on ``ds[i]``) with ``ds.report`` (``LoadReport``).

    Raises:
        VQADataError: malformed lines (file and line named), a wrong layout, answers outside the vocabulary under
            policy "error" (all of them listed), missing frames under on_missing_frame="error".
        ValueError: unknown format, split or policy.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown VQA format {format!r}; choose from {list(FORMATS)}")
    if on_missing_frame not in ("skip", "error"):
        raise ValueError(f"on_missing_frame must be 'skip' or 'error', got {on_missing_frame!r}")
    if frame_step is not None and (format != "cholec80-vqa" or frame_step < 1):
        raise ValueError("frame_step is a positive integer and only applies to format='cholec80-vqa'")
    root = Path(root)
    if not root.exists():
        raise VQADataError(f"{format}: {root} does not exist")
    ids = _resolve_split(format, split)
    voc = _vocab(vocab, format, unknown_policy)
    report = LoadReport(format=format, root=str(root), split=split,
                        unknown_policy=voc.unknown_policy if voc is not None else None)
    if format in ("endovis18-vqa", "endovis18-vqla"):
        entries = _read_endovis(root, ids, report, vqla=format == "endovis18-vqla")
    elif format == "cholec80-vqa":
        entries = _read_cholec80(root, ids, report, frame_step)
    elif format == "psi-ava-vqa":
        entries = _read_psi(root, ids, report)
    elif format == "ssg-vqa":
        entries = _read_ssg(root, ids, report, Path(images) if images is not None else None)
    else:
        entries = _read_jsonl(root, split, report)
    return _finish(entries, format, voc, report, on_missing_frame, warn)


def _finish(entries: list[dict], fmt: str, vocab: AnswerVocab | None, report: LoadReport,
            on_missing_frame: MissingFramePolicy, warn: bool) -> FileVQADataset:
    exists: dict[str, bool] = {}
    records = []
    for e in entries:
        raw = e["raw_answer"]
        e["answer"] = vocab.normalize(raw) if vocab is not None else normalize_answer(raw)
        e.setdefault("dataset", fmt)
        e["answer_index"] = None
        if vocab is not None:
            if raw in vocab:
                e["answer_index"] = vocab.index(raw)
            else:
                report.add_unknown(e["answer"], e["meta"]["where"])
                if vocab.unknown_policy != "unknown":  # "skip": dropped, counted; "error": raised below, all listed
                    report.skipped_unknown += vocab.unknown_policy == "skip"
                    continue
                e["answer_index"] = vocab.unk_index
        if e["image"] not in exists:
            exists[e["image"]] = Path(e["image"]).is_file()
        if not exists[e["image"]]:
            report.missing_frames[e["image"]] = report.missing_frames.get(e["image"], 0) + 1
            continue
        records.append(e)
    report.samples = len(records)
    if vocab is not None and vocab.unknown_policy == "error" and report.unknown_answers:
        raise VQADataError(f"answers outside vocabulary {vocab.name!r} (unknown_policy='error'): {report.summary()}")
    if on_missing_frame == "error" and report.missing_frames:
        raise VQADataError(f"missing frame images (on_missing_frame='error'): {report.summary()}")
    if warn and report.has_problems:
        warnings.warn(report.summary(), VQADataWarning, stacklevel=3)
    return FileVQADataset(records, vocab, report, name=fmt)


def _reader(dataset: Any) -> Any:
    from ..io import read_image

    def read(ds: Any, i: int) -> np.ndarray:
        path = ds.records[i].get("image")
        if isinstance(path, str) and Path(path).is_file():
            return read_image(path)[0]
        return ds[i].image

    return read


def from_segmentation(dataset: Any, seed: int = 0, questions_per_image: int = 8, types: Sequence[str] | None = None,
                      *, absent_pool: Sequence[str] | None = None, infer_absent: bool = False,
                      parts: Mapping[str, Sequence[str]] | None = None, max_per_type: int | None = None,
                      vocab: AnswerVocab | None = None, warn: bool = True, **engine_options: Any,
                      ) -> SegmentationVQADataset:
    """Generated VQA over a vlseg segmentation dataset: rows grouped per image, ``generate_qa`` on each image.

    Absent classes (for "is there a X?" -> "no" and "how many X?" -> "0") come from rows marked ``negative`` (their
    masks are empty), from ``absent_pool`` (names of classes that cannot be in these images, e.g. other datasets'
    classes for a single-class set), and, with ``infer_absent=True``, from the dataset's own class names that have no
    row for an image: only correct when a manifest lists every class present (as epfl_em_multiclass's does), not
    when images come from differently labelled sources. Union classes (rows with ``derived_from``, e.g. cholec's
    "surgical instrument" = grasper + hook) are never compared with their own parts; ``parts`` adds such links.

    Args:
        dataset: a ``vlseg.data`` ``SampleDataset`` (``from_manifest``, ``from_folder``, ``PooledDataset``, ...).
        seed: each image's questions are seeded from (seed, image key), so they do not depend on row order.
        questions_per_image: at most this many questions per image.
        types: question types (default all of ``vlseg.vqa.engine.TYPES``).
        absent_pool: class names to ask about as absent where an image has no row for them.
        infer_absent: treat the dataset's class names missing from an image's rows as absent.
        parts: union class -> part classes, added to those read from ``derived_from``.
        max_per_type: at most this many questions of one type per image (default ``questions_per_image``).
        vocab: answer vocabulary (default: the packaged "engine" one plus the dataset's class names).
        warn: warn when every existence answer is "yes" (no absent classes to ask about).
        engine_options: passed to ``generate_qa`` (``min_area_fraction``, ``connectivity``, ``margin``,
            ``max_count``, ``templates``).

    Returns:
        A lazy ``SegmentationVQADataset``: ``ds[i]`` reads the image; answer masks are stored packed.
    """
    from ..data.groups import group_by_image, load_group

    if questions_per_image < 1:
        raise ValueError(f"questions_per_image must be >= 1, got {questions_per_image}")
    groups = group_by_image(dataset)
    if not groups:
        raise ValueError("from_segmentation: the dataset has no rows")
    known: dict[str, set[str]] = {}
    for r in dataset.records:
        names = known.setdefault(str(r.get("dataset", "")), set())
        names.add(str(r.get("class_name", "")))
        names.update(str(c) for c in (r.get("class_names") or []))
    all_names = set().union(*known.values()) | set(absent_pool or ())
    voc = vocab if vocab is not None else AnswerVocab.load("engine").with_answers(
        sorted(all_names), name="engine+" + "+".join(sorted(k for k in known if k)))
    report = LoadReport(format="segmentation", root=str(getattr(dataset, "name", type(dataset).__name__)),
                        unknown_policy=voc.unknown_policy)
    records: list[dict[str, Any]] = []
    for g in groups:
        _, masks, samples = load_group(dataset, g)
        report.files += 1
        part_map = {s.class_name: tuple(s.meta["derived_from"]) for s in samples if s.meta.get("derived_from")}
        part_map.update({k: tuple(v) for k, v in (parts or {}).items()})
        absent = {c for c in (absent_pool or ()) if c not in masks}
        if infer_absent:
            absent |= known.get(g.dataset, set()) - set(masks)
        image_seed = zlib.crc32(f"{seed}\0{g.key}".encode())
        qa = generate_qa(masks, seed=image_seed, absent=sorted(absent), parts=part_map, types=types,
                         max_per_type=max_per_type or questions_per_image, max_questions=questions_per_image,
                         **engine_options)
        for rec in qa:
            report.lines += 1
            answer = voc.normalize(rec.answer)
            index = voc.index(rec.answer) if rec.answer in voc else voc.unk_index
            if rec.answer not in voc:
                report.add_unknown(answer, f"{g.key}: {rec.question}")
                if voc.unknown_policy != "unknown":
                    report.skipped_unknown += voc.unknown_policy == "skip"
                    continue
            bits = None if rec.mask is None else np.packbits(rec.mask.ravel())
            records.append({
                "question": rec.question, "answer": answer, "raw_answer": rec.answer, "type": rec.type,
                "answer_index": index,
                "dataset": g.dataset, "source_index": g.indices[0], "mask_bits": bits,
                "mask_shape": None if rec.mask is None else rec.mask.shape,
                "meta": {"image_key": g.key, "classes": rec.classes, "kind": rec.kind, "rows": g.indices,
                         "seed": image_seed, "image": dataset.records[g.indices[0]].get("image")},
            })
    report.samples = len(records)
    if voc.unknown_policy == "error" and report.unknown_answers:
        raise VQADataError(f"generated answers outside vocabulary {voc.name!r} (unknown_policy='error'): "
                           f"{report.summary()}")
    counts = Counter(r["type"] for r in records)
    report.notes.append("types: " + ", ".join(f"{t} {counts[t]}" for t in TYPES if counts[t]))
    exist = [r["answer"] for r in records if r["type"] == "existence"]
    if warn and exist and all(a == "yes" for a in exist):
        warnings.warn(f"from_segmentation: all {len(exist)} existence answers are 'yes' (no absent class to ask "
                      "about); pass absent_pool=[...] (classes that cannot be in these images) or infer_absent=True",
                      VQADataWarning, stacklevel=2)
    if warn and report.has_problems:
        warnings.warn(report.summary(), VQADataWarning, stacklevel=2)
    return SegmentationVQADataset(records, dataset, voc, report, name=report.root, read=_reader(dataset))


__all__ = ["DEFAULT_VOCAB", "FORMATS", "SPLITS", "from_published", "from_segmentation"]
