"""What a VQA dataset yields: ``VQASample``, the indexable lazy datasets, and the ``LoadReport`` of a load.

One sample is one (image, question, answer)::

    image        (H, W, 3) uint8 RGB, read when the sample is accessed (``ds[i]``), never at load time
    question     the question text
    answer       the normalised answer (``vocab.normalize``; lower case, ``_``/``-`` -> space)
    raw_answer   the answer exactly as the source wrote it
    answer_index its index in the dataset's ``AnswerVocab`` (the ``<unk>`` index for unknown answers), or None
    type         question type ("existence", "counting", "location", "relative position", "size comparison",
                 "attribute" for generated questions; the published datasets' own categories otherwise)
    mask         (H, W) bool region the answer refers to, or None
    box          (x1, y1, x2, y2) normalised to [0, 1] by the image width/height (see ``vlseg.vqa.boxes``), or None
    dataset      dataset name         meta   source file and line, sequence/frame ids, raw fields
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .boxes import normalize_box
from .vocab import AnswerVocab


class VQADataError(ValueError):
    """A problem in VQA source data; the message names the file (and line) it concerns."""


class VQADataWarning(UserWarning):
    """Something was left out of a load (missing frames, answers outside the vocabulary); see ``dataset.report``."""


@dataclass
class VQASample:
    image: np.ndarray
    question: str
    answer: str
    raw_answer: str = ""
    type: str | None = None
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None
    dataset: str = ""
    answer_index: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.image.ndim != 3 or self.image.shape[-1] != 3 or self.image.dtype != np.uint8:
            raise ValueError(f"VQASample.image must be (H, W, 3) uint8, got {self.image.shape} {self.image.dtype}")
        if self.mask is not None:
            if self.mask.shape != self.image.shape[:2]:
                raise ValueError(f"VQASample.mask {self.mask.shape} does not match the image {self.image.shape[:2]}")
            if self.mask.dtype != bool:
                self.mask = self.mask > 0
        if self.box is not None:
            b = tuple(float(v) for v in self.box)
            if len(b) != 4 or not (0.0 <= b[0] <= b[2] <= 1.0 and 0.0 <= b[1] <= b[3] <= 1.0):
                raise ValueError(f"VQASample.box must be normalised (x1, y1, x2, y2) in [0, 1], got {self.box}")
            self.box = b  # type: ignore[assignment]
        if not self.raw_answer:
            self.raw_answer = self.answer


@dataclass
class LoadReport:
    """What a load read and what it left out, with counts and file names.

    Attributes:
        format: source format ("endovis18-vqa", ..., "segmentation").
        root: where it was read from.
        split: the split asked for (None = all).
        files: QA files read.        lines: QA lines (questions) read.        samples: samples kept.
        missing_frames: frame image path -> number of questions dropped because it is missing.
        unknown_answers: normalised answer outside the vocabulary -> count.
        unknown_where: that answer -> "file:line" places (first 20).
        unknown_policy: the vocabulary's policy when the load ran.
        skipped_unknown: questions dropped for an unknown answer (policy "skip").
        missing_sequences: sequence/video folders of the asked split that are not under root.
        notes: other remarks (e.g. frames filtered by ``frame_step``).
    """

    format: str
    root: str
    split: str | None = None
    files: int = 0
    lines: int = 0
    samples: int = 0
    missing_frames: dict[str, int] = field(default_factory=dict)
    unknown_answers: Counter[str] = field(default_factory=Counter)
    unknown_where: dict[str, list[str]] = field(default_factory=dict)
    unknown_policy: str | None = None
    skipped_unknown: int = 0
    missing_sequences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add_unknown(self, answer: str, where: str) -> None:
        self.unknown_answers[answer] += 1
        places = self.unknown_where.setdefault(answer, [])
        if len(places) < 20:
            places.append(where)

    @property
    def skipped_missing_frames(self) -> int:
        return sum(self.missing_frames.values())

    @property
    def has_problems(self) -> bool:
        return bool(self.missing_frames or self.unknown_answers or self.missing_sequences)

    def summary(self, max_items: int = 5) -> str:
        parts = [(f"{self.format} at {self.root} (split={self.split}): {self.files} files, {self.lines} questions "
                  f"read, {self.samples} samples kept")]
        if self.missing_sequences:
            parts.append(f"{len(self.missing_sequences)} folders of the split not found: "
                         f"{self.missing_sequences[:max_items]}")
        if self.missing_frames:
            names = list(self.missing_frames)[:max_items]
            more = f" (+{len(self.missing_frames) - max_items} more)" if len(self.missing_frames) > max_items else ""
            parts.append(f"{len(self.missing_frames)} missing frame images, {self.skipped_missing_frames} questions "
                         f"dropped: {names}{more}")
        if self.unknown_answers:
            items = [f"{a!r} x{n} ({', '.join(self.unknown_where.get(a, [])[:2])})"
                     for a, n in self.unknown_answers.most_common(max_items)]
            what = {"skip": f"{self.skipped_unknown} questions dropped", "unknown": "mapped to <unk>",
                    "error": "rejected"}.get(self.unknown_policy or "", "")
            parts.append(f"{sum(self.unknown_answers.values())} answers outside the vocabulary "
                         f"({len(self.unknown_answers)} distinct; policy {self.unknown_policy!r}: {what}): "
                         f"{'; '.join(items)}")
        parts.extend(self.notes)
        return "; ".join(parts)


class VQADataset(Sequence):
    """Base: ``len(ds)``, ``ds[i] -> VQASample`` (the image is read then); ``records`` hold what samples are made of.

    Attributes:
        records: one dict per sample (question, answer, raw_answer, type, answer_index, meta, source fields).
        vocab: the answer vocabulary, or None (answers only normalised).
        report: the ``LoadReport`` of the load that made this dataset.
        name: dataset name.
    """

    records: list[dict[str, Any]]
    vocab: AnswerVocab | None = None
    report: LoadReport
    name: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> VQASample:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("use .subset(indices) to take several samples")
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        return self.load(self.records[i])

    def load(self, record: dict[str, Any]) -> VQASample:
        raise NotImplementedError

    def answers(self) -> list[str]:
        """Normalised answers of all samples, without reading any image."""
        return [r["answer"] for r in self.records]

    def types(self) -> Counter[str]:
        """Question-type counts, without reading any image."""
        return Counter(str(r.get("type")) for r in self.records)

    def subset(self, indices: Sequence[int]) -> VQASubset:
        return VQASubset(self, list(indices))

    def _sample(self, r: dict[str, Any], image: np.ndarray, mask: np.ndarray | None,
                box: tuple[float, float, float, float] | None) -> VQASample:
        return VQASample(image=image, question=r["question"], answer=r["answer"], raw_answer=r["raw_answer"],
                         type=r.get("type"), mask=mask, box=box, dataset=r.get("dataset", self.name),
                         answer_index=r.get("answer_index"), meta=dict(r.get("meta", {})))


class VQASubset(VQADataset):
    def __init__(self, parent: VQADataset, indices: list[int]):
        self.parent, self.indices = parent, indices
        self.records = [parent.records[i] for i in indices]
        self.vocab, self.report, self.name = parent.vocab, parent.report, parent.name

    def load(self, record: dict[str, Any]) -> VQASample:
        return self.parent.load(record)


class FileVQADataset(VQADataset):
    """Samples whose image (and optional mask) are files: the published VQA datasets and JSONL manifests.

    A record holds ``image`` (path), optional ``mask`` (path), optional ``box_pixels`` (pixel-edge box, see
    ``vlseg.vqa.boxes``) or ``box`` (already normalised), plus the common fields.
    """

    def __init__(self, records: list[dict[str, Any]], vocab: AnswerVocab | None, report: LoadReport, name: str):
        self.records, self.vocab, self.report, self.name = records, vocab, report, name

    def load(self, r: dict[str, Any]) -> VQASample:
        from ..data.validate import DataError, read_mask
        from ..io import read_image

        where = r.get("meta", {}).get("where", r["image"])
        try:
            image, _ = read_image(r["image"])
        except ValueError as e:
            raise VQADataError(f"{where}: {e}") from e
        h, w = image.shape[:2]
        mask = None
        if r.get("mask"):
            try:
                mask = read_mask(r["mask"], (h, w), binary=True)
            except DataError as e:
                raise VQADataError(f"{where}: {e}") from e
        box = r.get("box")
        if r.get("box_pixels") is not None:
            try:
                box = normalize_box(r["box_pixels"], w, h)
            except ValueError as e:
                raise VQADataError(f"{where}: {e} (frame {r['image']})") from e
        return self._sample(r, image, mask, box)


class SegmentationVQADataset(VQADataset):
    """Questions generated from a segmentation dataset (``from_segmentation``).

    Each record keeps the source row (``source_index``) its image is read from, and the answer mask packed with
    ``np.packbits`` (``mask_bits``, ``mask_shape``) or None.
    """

    def __init__(self, records: list[dict[str, Any]], source: Any, vocab: AnswerVocab | None, report: LoadReport,
                 name: str, read: Callable[[Any, int], np.ndarray] | None = None):
        self.records, self.source, self.vocab, self.report, self.name = records, source, vocab, report, name
        self._read = read

    def load(self, r: dict[str, Any]) -> VQASample:
        image = self._read(self.source, r["source_index"]) if self._read else self.source[r["source_index"]].image
        mask = None
        if r.get("mask_bits") is not None:
            shape = tuple(r["mask_shape"])
            mask = np.unpackbits(r["mask_bits"], count=shape[0] * shape[1]).reshape(shape).astype(bool)
            if mask.shape != image.shape[:2]:
                raise VQADataError(f"{r['meta'].get('image_key')}: image is {image.shape[:2]} but the mask the "
                                   f"questions were generated from is {mask.shape}; the source changed since loading")
        return self._sample(r, image, mask, None)


__all__ = ["FileVQADataset", "LoadReport", "SegmentationVQADataset", "VQADataError", "VQADataWarning", "VQADataset",
           "VQASample", "VQASubset"]
