"""Reading images into one form: an (H, W, 3) uint8 RGB array plus metadata. Data and prompts know nothing of
models; models know nothing of files (this is the only place that reads them)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ImageInput = Any  # str | os.PathLike | PIL.Image.Image | np.ndarray


@dataclass
class ImageMeta:
    """Where an image came from and what to keep to write results back (spacing, affine for volumes)."""

    source: str | None = None
    original_size: tuple[int, int] = (0, 0)  # (H, W)
    extra: dict[str, Any] = field(default_factory=dict)


def to_uint8_rgb(arr: np.ndarray, name: str = "image") -> np.ndarray:
    """HxW or HxWxC (C in 1, 3, 4), uint8/uint16/int/float/bool -> (H, W, 3) uint8.

    uint8 is kept; other integer types and floats outside [0, 1] are min-max scaled; floats in [0, 1] are x255.
    """
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(arr).__name__}")
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{name}: shape {arr.shape} looks channel-first; pass (H, W, C), e.g. arr.transpose(1, 2, 0)")
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)):
        raise ValueError(f"{name}: expected an (H, W) or (H, W, 1|3|4) image, got shape {arr.shape}")
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise ValueError(f"{name}: image is too small ({arr.shape[0]}x{arr.shape[1]})")
    if not (arr.dtype == bool or np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise TypeError(f"{name}: pixel type {arr.dtype} is not an image type (bool, integer or float)")
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype != np.uint8:
        a = arr.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError(f"{name}: image contains NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if np.issubdtype(arr.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
            a = a * 255.0
        elif hi > lo:
            a = (a - lo) / (hi - lo) * 255.0
        else:
            a = np.zeros_like(a)
        arr = np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    elif arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    arr = np.ascontiguousarray(arr)
    return arr if arr.flags.writeable else arr.copy()


def read_image(image: ImageInput) -> tuple[np.ndarray, ImageMeta]:
    """Path / PIL image / numpy array -> ((H, W, 3) uint8, meta). Raises ValueError naming the bad input (a
    missing, unreadable, truncated or oversized file, a bad shape, NaN/inf values), TypeError for arrays whose
    pixel type is not bool, integer or float."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.exists():
            raise ValueError(f"Image file not found: {path}")
        if path.is_dir():
            raise ValueError(f"Expected an image file, got a folder: {path}")
        if path.suffix.lower() == ".dcm":
            from .data.clinical import read_dicom

            arr, info = read_dicom(path)
            out = to_uint8_rgb(arr, str(path))
            return out, ImageMeta(source=str(path), original_size=out.shape[:2], extra=info)
        if str(path).lower().endswith((".nii", ".nii.gz")):
            raise ValueError(f"{path} is a NIfTI volume: read it with vlseg.data.clinical.read_nifti, or pass it to "
                             "vlseg.segment, which segments it slice by slice")
        try:
            with Image.open(path) as im:
                im.load()
                arr = _pil_to_array(im)
        except Image.DecompressionBombError as e:  # a header claiming more pixels than PIL's limit
            raise ValueError(f"Image file {path} is too large to decode safely: {e} Raise PIL.Image.MAX_IMAGE_PIXELS "
                             "if the file is trusted.") from e
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:  # what PIL raises
            raise ValueError(f"Unreadable or truncated image file {path}: {e}") from e
        out = to_uint8_rgb(arr, str(path))
        return out, ImageMeta(source=str(path), original_size=out.shape[:2])
    if isinstance(image, Image.Image):
        out = to_uint8_rgb(_pil_to_array(image), "PIL image")
        return out, ImageMeta(original_size=out.shape[:2])
    if isinstance(image, np.ndarray):
        out = to_uint8_rgb(image, "array")
        return out, ImageMeta(original_size=out.shape[:2])
    raise ValueError(
        f"Not an image: got {type(image).__name__}. Pass a file path, a PIL image or a numpy array (H, W[, C])."
    )


def _pil_to_array(im: Any) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return np.asarray(im)  # 16-bit PNG/TIFF: scaled to uint8 by to_uint8_rgb
    if im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    return np.asarray(im)


IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".dcm")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class InputItem:
    """One input found by ``find_inputs``: ``kind`` is ``image``, ``volume`` (NIfTI file or DICOM series
    folder) or ``video`` (a video file); ``stem`` is a file-name-safe name for its outputs, unique within the
    search."""

    kind: str
    path: Path
    stem: str


def _safe_stem(parts: tuple[str, ...]) -> str:
    import re

    s = "__".join(re.sub(r"[^A-Za-z0-9._-]+", "_", p) for p in parts)
    return s.lstrip(".") or "input"


def _strip_ext(name: str) -> str:
    low = name.lower()
    for ext in (".nii.gz", ".nii") + IMAGE_EXTS + VIDEO_EXTS:
        if low.endswith(ext):
            return name[: -len(ext)]
    return name


def find_inputs(paths: list[str | os.PathLike[str]]) -> list[InputItem]:
    """Images, videos, NIfTI volumes and DICOM series under ``paths`` (files or folders, searched recursively), in a stable
    order. Raises FileNotFoundError for a missing path and ValueError for a folder with nothing to segment or two
    inputs that would write the same output names."""
    from .data.clinical import is_dicom_series, is_volume_path

    out: list[InputItem] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise FileNotFoundError(f"input not found: {p}")
        if p.is_dir():
            if is_dicom_series(p):
                out.append(InputItem("volume", p, _safe_stem((p.name,))))
                continue
            found = [f for f in sorted(p.rglob("*")) if f.is_file() and (
                is_volume_path(f) or f.suffix.lower() in IMAGE_EXTS + VIDEO_EXTS)]
            if not found:
                raise ValueError(f"no images, videos, DICOM or NIfTI files in {p}")
            for f in found:
                rel = f.relative_to(p)
                kind = "volume" if is_volume_path(f) else "video" if f.suffix.lower() in VIDEO_EXTS else "image"
                out.append(InputItem(kind, f, _safe_stem(rel.parts[:-1] + (_strip_ext(rel.name),))))
        elif is_volume_path(p):
            out.append(InputItem("volume", p, _safe_stem((_strip_ext(p.name),))))
        elif p.suffix.lower() in IMAGE_EXTS:
            out.append(InputItem("image", p, _safe_stem((_strip_ext(p.name),))))
        elif p.suffix.lower() in VIDEO_EXTS:
            out.append(InputItem("video", p, _safe_stem((_strip_ext(p.name),))))
        else:
            raise ValueError(f"unsupported input {p} (images: {', '.join(IMAGE_EXTS)}, videos: "
                             f"{', '.join(VIDEO_EXTS)}, NIfTI .nii/.nii.gz, DICOM series folders)")
    stems = [i.stem.lower() for i in out]  # case-insensitive: 'A.png' and 'a.png' clash on macOS/Windows disks
    dup = sorted({s for s in stems if stems.count(s) > 1})
    if dup:
        raise ValueError(f"two inputs would write the same output names ({dup[0]!r}); give them different names")
    return out


def iter_images(paths: list[str | os.PathLike[str]], workers: int = 0) -> Any:
    """Yield ``(index, (H, W, 3) uint8)`` for image files, decoded by ``workers`` background processes (a torch
    DataLoader) so reading overlaps with the model's compute; in order."""
    if workers <= 0:
        for i, p in enumerate(paths):
            yield i, read_image(p)[0]
        return
    from torch.utils.data import DataLoader, Dataset

    class _Files(Dataset):  # type: ignore[type-arg]
        def __len__(self) -> int:
            return len(paths)

        def __getitem__(self, i: int) -> tuple[int, np.ndarray | Exception]:
            try:
                return i, read_image(paths[i])[0]
            except (ValueError, TypeError) as e:  # raised in the caller's process, message intact (see below)
                return i, e

    loader = DataLoader(_Files(), batch_size=None, num_workers=workers, collate_fn=lambda x: x,
                        prefetch_factor=4)
    for i, arr in loader:
        if isinstance(arr, Exception):  # DataLoader would replace the message naming the file with its own
            raise arr
        yield i, arr
