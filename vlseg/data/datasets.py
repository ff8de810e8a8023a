"""Loaders: manifest (JSONL/CSV), folder of images + masks, Hugging Face ``datasets``; class-index expansion,
group-aware train/val splits, pooled multi-dataset sampling. Every loader returns an indexable dataset of
``Sample``s (see schema.py); files are read lazily, one sample at a time."""

from __future__ import annotations

import csv
import json
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..io import read_image
from .schema import Sample
from .validate import DataError, read_mask

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".dcm")
MASK_SUFFIXES = ("_mask", "_seg", "_label", "_gt", "-mask", "_segmentation")
GROUP_KEYS = ("subject", "patient", "video", "sequence", "volume", "case")
PromptFn = Callable[[Sample], list[str]]


class SampleDataset(Sequence):
    """Base: ``len(ds)``, ``ds[i] -> Sample``; ``records`` hold what each sample is made from."""

    records: list[dict[str, Any]]
    prompt_fn: PromptFn | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        if isinstance(i, slice):
            raise TypeError("use .subset(indices) to take several samples")
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for {len(self)} samples")
        s = self.load(self.records[i])
        if self.prompt_fn is not None:
            s.prompts = list(self.prompt_fn(s))
        return s

    def load(self, record: dict[str, Any]) -> Sample:
        raise NotImplementedError

    def group_of(self, i: int) -> str:
        """The key that must not straddle splits: subject/video/... when the source has one, else the image."""
        r = self.records[i]
        for k in GROUP_KEYS:
            if r.get(k) not in (None, ""):
                return f"{r.get('dataset', '')}:{k}:{r[k]}"
        return f"{r.get('dataset', '')}:image:{r.get('image', r.get('row', i))}"

    def subset(self, indices: Sequence[int]) -> Subset:
        return Subset(self, list(indices))


class Subset(SampleDataset):
    def __init__(self, parent: SampleDataset, indices: list[int]):
        self.parent, self.indices = parent, indices
        self.records = [parent.records[i] for i in indices]
        self.prompt_fn = parent.prompt_fn

    def load(self, record: dict[str, Any]) -> Sample:
        return self.parent.load(record)


class FileDataset(SampleDataset):
    """Samples from records holding file paths (manifests and folders)."""

    def __init__(self, records: list[dict[str, Any]], prompt_fn: PromptFn | None = None):
        self.records = records
        self.prompt_fn = prompt_fn

    def load(self, r: dict[str, Any]) -> Sample:
        try:
            image, meta = read_image(r["image"])
        except ValueError as e:
            raise DataError(str(e)) from e
        mask = None
        if r.get("mask"):
            idx = r.get("class_index")
            m = read_mask(r["mask"], image.shape[:2], binary=idx is None)
            mask = m if idx is None else (m == idx)
        extra = {k: v for k, v in r.items() if k not in ("image", "mask", "class_name", "dataset", "modality",
                                                          "negative", "spacing")}
        extra["original_size"] = meta.original_size
        extra["image"] = r["image"]
        extra.update(meta.extra)
        spacing = r.get("spacing") or meta.extra.get("spacing")
        negative = bool(r.get("negative")) or (mask is not None and not mask.any())
        return Sample(image=image, mask=mask, class_name=r["class_name"], dataset=r.get("dataset", ""),
                      modality=r.get("modality", ""), spacing=tuple(spacing) if spacing else None,
                      negative=negative, meta=extra)


def _expand(records: list[dict[str, Any]], class_names: Sequence[str] | dict[int, str] | None) -> list[dict[str, Any]]:
    if class_names is None:
        return records
    names = dict(enumerate(class_names)) if not isinstance(class_names, dict) else dict(class_names)
    out = []
    for r in records:
        for idx, name in names.items():
            if name.lower() in ("background", "bg", "") or (idx == 0 and not isinstance(class_names, dict)):
                continue
            out.append({**r, "class_name": name, "class_index": int(idx)})
    return out


def from_manifest(path: str | Path, root: str | Path | None = None, split: str | None = None,
                  datasets: Sequence[str] | None = None, class_names: Sequence[str] | None = None,
                  prompt_fn: PromptFn | None = None, check_files: bool = True) -> FileDataset:
    """Rows of a JSONL or CSV manifest, one per (image, class): ``image``, ``mask`` (paths relative to ``root``,
    default the manifest's folder), ``class_name``, optional ``dataset``, ``modality``, ``split``, ``negative``,
    ``subject``/``video``/... group ids. Like ``../shared/data/*/manifest.jsonl``.

    Raises DataError naming the manifest line or file: unparsable rows, missing columns, missing files,
    duplicate (image, class) rows.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"Manifest not found: {p}")
    base = Path(root) if root is not None else p.parent
    rows: list[dict[str, Any]] = []
    try:  # utf-8-sig: a byte-order mark (spreadsheet exports) is read, not taken for data
        if p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8-sig") as f:
                for row in csv.DictReader(f):
                    rows.append({k: _csv_value(v) for k, v in row.items()})
        else:
            with open(p, encoding="utf-8-sig") as f:
                for n, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{p}:{n}: not valid JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise DataError(f"{p} is not UTF-8 text ({e}); save the manifest as UTF-8") from e
    if not rows:
        raise DataError(f"Manifest {p} has no rows")
    records: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise DataError(f"{p}: row {n} is a JSON {type(row).__name__}, not an object with an 'image' key")
        if "image" not in row:
            raise DataError(f"{p}: row {n} has no 'image' column")
        for k in ("image", "mask", "class_name"):
            v = row.get(k)
            if (k == "image" or v is not None) and not (isinstance(v, str) and (v or k == "mask")):
                raise DataError(f"{p}: row {n}: {k!r} must be a non-empty string, got {v!r}")
        names, spacing = row.get("class_names"), row.get("spacing")
        if names is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
            raise DataError(f"{p}: row {n}: 'class_names' must be a list of strings, got {names!r}")
        if spacing not in (None, "") and not (isinstance(spacing, list) and len(spacing) in (2, 3) and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 for x in spacing)):
            raise DataError(f"{p}: row {n}: 'spacing' must be 2 or 3 positive numbers (mm), got {spacing!r}")
        if split is not None and row.get("split") != split:
            continue
        if datasets is not None and row.get("dataset") not in datasets:
            continue
        r = dict(row)
        r["image"] = str(base / row["image"])
        r["mask"] = str(base / row["mask"]) if row.get("mask") else None
        r.setdefault("class_name", (row.get("class_names") or ["object"])[0] if class_names is None else "object")
        key = (r["image"], r["class_name"])
        if key in seen and class_names is None:
            raise DataError(f"{p}: duplicate entry for image {row['image']} and class {r['class_name']!r} "
                            f"(rows {seen[key]} and {n})")
        seen[key] = n
        if check_files:
            for k in ("image", "mask"):
                if r[k] and not Path(r[k]).is_file():
                    raise DataError(f"{p}: row {n}: {k} file not found: {r[k]}")
        records.append(r)
    return FileDataset(_expand(records, class_names), prompt_fn)


def _csv_value(v: str) -> Any:
    if v in ("true", "True"):
        return True
    if v in ("false", "False"):
        return False
    return v


def _stem(path: Path) -> str:
    s = path.name
    for ext in (".nii.gz",) + IMAGE_EXTS:
        if s.lower().endswith(ext):
            s = s[: -len(ext)]
            break
    return s


def from_folder(images: str | Path, masks: str | Path | None = None, class_name: str = "object",
                class_names: Sequence[str] | dict[int, str] | None = None, dataset: str = "", modality: str = "",
                prompt_fn: PromptFn | None = None) -> FileDataset:
    """Images in one folder, masks in another, paired by file stem (``a.jpg`` <-> ``a.png`` or ``a_mask.png``).

    Binary masks give one sample per image for ``class_name``; with ``class_names`` the masks are class-index maps
    and each image gives one binary sample per class. Raises DataError naming images without a mask.
    """
    img_dir = Path(images)
    if not img_dir.is_dir():
        raise DataError(f"Image folder not found: {img_dir}")
    files = sorted(f for f in img_dir.iterdir() if f.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise DataError(f"No images ({', '.join(IMAGE_EXTS)}) in {img_dir}")
    stems: dict[str, Path] = {}
    for f in files:
        s = _stem(f)
        if s in stems:
            raise DataError(f"Two images share the stem {s!r}: {stems[s].name} and {f.name}")
        stems[s] = f
    mask_by_stem: dict[str, Path] = {}
    if masks is not None:
        mdir = Path(masks)
        if not mdir.is_dir():
            raise DataError(f"Mask folder not found: {mdir}")
        for f in sorted(mdir.iterdir()):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            s = _stem(f)
            for suf in MASK_SUFFIXES:
                if s.endswith(suf) and s[: -len(suf)] in stems:
                    s = s[: -len(suf)]
                    break
            mask_by_stem[s] = f
        missing = [stems[s].name for s in stems if s not in mask_by_stem]
        if missing:
            raise DataError(f"{len(missing)} image(s) in {img_dir} have no mask in {mdir}, e.g. {missing[:3]}")
    records = [{"image": str(f), "mask": str(mask_by_stem[s]) if masks is not None else None,
                "class_name": class_name, "dataset": dataset or img_dir.parent.name, "modality": modality}
               for s, f in stems.items()]
    return FileDataset(_expand(records, class_names), prompt_fn)


class HFDataset(SampleDataset):
    """Samples from a Hugging Face ``datasets.Dataset`` (hub name or local ``save_to_disk`` folder)."""

    def __init__(self, ds: Any, image_column: str, mask_column: str | None, class_column: str | None,
                 prompt_column: str | None, class_name: str, class_names: Sequence[str] | None, dataset: str,
                 modality: str, prompt_fn: PromptFn | None):
        cols = list(ds.column_names)
        for c in (image_column, mask_column, class_column, prompt_column):
            if c is not None and c not in cols:
                raise DataError(f"Column {c!r} not in dataset {dataset!r}; columns: {cols}")
        self.ds = ds
        self.cols = (image_column, mask_column, class_column, prompt_column)
        self.dataset, self.modality = dataset, modality
        self.prompt_fn = prompt_fn
        base = [{"row": i, "class_name": class_name, "dataset": dataset} for i in range(len(ds))]
        self.records = _expand(base, class_names)

    def load(self, r: dict[str, Any]) -> Sample:
        image_col, mask_col, class_col, prompt_col = self.cols
        row = self.ds[r["row"]]
        where = f"{self.dataset} row {r['row']}"
        try:
            image, _ = read_image(row[image_col])
        except ValueError as e:
            raise DataError(f"{where}: {e}") from e
        mask = None
        if mask_col is not None:
            m = np.asarray(row[mask_col])
            if m.ndim == 3:
                m = m[..., 0]
            if m.shape != image.shape[:2]:
                raise DataError(f"{where}: mask {m.shape} does not match image {image.shape[:2]}")
            idx = r.get("class_index")
            if idx is None:
                vals = set(np.unique(m).tolist())
                if not (vals <= {0, 1} or vals <= {0, 255}):
                    raise DataError(f"{where}: mask has unexpected values {sorted(vals)[:10]}; pass class_names")
                mask = m > 0
            else:
                mask = m == idx
        cls = str(row[class_col]) if class_col else r["class_name"]
        prompts = row[prompt_col] if prompt_col else None
        prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
        return Sample(image=image, mask=mask, class_name=cls, prompts=prompts, dataset=self.dataset,
                      modality=self.modality, negative=mask is not None and not mask.any(),
                      meta={"row": r["row"], "image": f"{self.dataset}#{r['row']}"})


def from_hf(name_or_path: str | Path, split: str = "train", image_column: str = "image",
            mask_column: str | None = "mask", class_column: str | None = None, prompt_column: str | None = None,
            class_name: str = "object", class_names: Sequence[str] | None = None, modality: str = "",
            prompt_fn: PromptFn | None = None, **load_kwargs: Any) -> HFDataset:
    """A Hugging Face dataset: a hub name (``datasets.load_dataset(name, split=...)``) or a local folder written
    by ``save_to_disk``. Column names are configurable; class-index mask columns expand with ``class_names``."""
    try:
        import datasets as hfds
    except ImportError as e:
        raise ImportError("from_hf needs the 'datasets' package: pip install 'vlseg[train]'") from e
    p = Path(str(name_or_path))
    if p.is_dir() and any((p / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        ds = hfds.load_from_disk(str(p))
        if isinstance(ds, hfds.DatasetDict):
            if split not in ds:
                raise DataError(f"Split {split!r} not in {p}; splits: {list(ds)}")
            ds = ds[split]
        name = p.name
    else:
        try:
            ds = hfds.load_dataset(str(name_or_path), split=split, **load_kwargs)
        except Exception as e:
            raise DataError(f"Could not load dataset {name_or_path!r} (split {split!r}): {e}") from e
        name = str(name_or_path)
    return HFDataset(ds, image_column, mask_column, class_column, prompt_column, class_name, class_names, name,
                     modality, prompt_fn)


def train_val_split(ds: SampleDataset, val_fraction: float = 0.2, seed: int = 0,
                    single_group: str = "block") -> tuple[Subset, Subset]:
    """Reproducible split by group (subject / video / sequence / volume where the source has one, else image), so
    near-duplicate frames and the several classes of one image never straddle it. Each dataset is split on its own
    so every dataset appears on both sides when it has at least two groups, and its split depends only on
    (seed, dataset name, its own groups): the same images are held out whether the dataset is loaded alone (one
    training source per dataset) or inside a pooled manifest (``vlseg evaluate --data manifest_all.jsonl``).

    Args:
        single_group: a dataset that is one group (one volume, one video) is split into two contiguous blocks of
            images in file-name (slice / frame) order, the last ``val_fraction`` of its images for validation, so
            only the slices at the block boundary are neighbours (``"block"``, the default); ``"train"`` keeps it
            whole in training (then it cannot be validated).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if single_group not in ("block", "train"):
        raise ValueError(f"single_group must be 'block' or 'train', got {single_group!r}")
    by_ds: dict[str, dict[str, list[int]]] = {}
    for i, r in enumerate(ds.records):
        by_ds.setdefault(str(r.get("dataset", "")), {}).setdefault(ds.group_of(i), []).append(i)
    train: list[int] = []
    val: list[int] = []
    for name in sorted(by_ds):
        rng = random.Random(f"{seed}:{name}")  # a dataset's split never depends on what it is pooled with
        groups = sorted(by_ds[name])
        if len(groups) == 1 and single_group == "block":
            idx = by_ds[name][groups[0]]
            images = sorted({str(ds.records[i].get("image", ds.records[i].get("row", i))) for i in idx})
            cut = len(images) - max(1, round(val_fraction * len(images))) if len(images) > 1 else len(images)
            held = set(images[cut:])
            for i in idx:
                (val if str(ds.records[i].get("image", ds.records[i].get("row", i))) in held else train).append(i)
            continue
        rng.shuffle(groups)
        total = sum(len(by_ds[name][g]) for g in groups)
        taken = 0
        for j, g in enumerate(groups):
            gi = by_ds[name][g]
            if len(groups) > 1 and j < len(groups) - 1 and taken < val_fraction * total:
                val += gi
                taken += len(gi)
            else:
                train += gi
    return ds.subset(sorted(train)), ds.subset(sorted(val))


class PooledDataset(SampleDataset):
    """Several datasets as one, with per-dataset sampling weights (``item_weights`` for a weighted sampler)."""

    def __init__(self, datasets: dict[str, SampleDataset] | Sequence[SampleDataset],
                 weights: dict[str, float] | Sequence[float] | None = None):
        items = dict(datasets) if isinstance(datasets, dict) else {f"ds{i}": d for i, d in enumerate(datasets)}
        if not items:
            raise ValueError("PooledDataset needs at least one dataset")
        if weights is None:
            w = {k: 1.0 for k in items}
        elif isinstance(weights, dict):
            unknown = set(weights) - set(items)
            if unknown:
                raise ValueError(f"weights for unknown datasets {sorted(unknown)}; datasets: {sorted(items)}")
            w = {k: float(weights.get(k, 1.0)) for k in items}
        else:
            w = dict(zip(items, map(float, weights)))
        self.parts = items
        self.weights = w
        self.locations = [(k, i) for k, d in items.items() for i in range(len(d))]  # (part, index in part)
        self.records = [{**items[k].records[i], "_part": k} for k, i in self.locations]
        self.prompt_fn = None

    def __getitem__(self, i: int) -> Sample:  # type: ignore[override]
        k, j = self.locations[i]
        return self.parts[k][j]

    def load(self, record: dict[str, Any]) -> Sample:
        raise NotImplementedError  # __getitem__ delegates to the parts

    def item_weights(self) -> list[float]:
        """Per-sample weights so dataset d is drawn with probability weight_d / sum(weights)."""
        total = sum(self.weights.values())
        return [self.weights[k] / total / len(self.parts[k]) for k, _ in self.locations]
