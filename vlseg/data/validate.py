"""Checks with errors that name the offending file."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """A data problem, with the file it concerns in the message."""


def read_mask(path: str | Path, image_size: tuple[int, int] | None = None, binary: bool = True) -> np.ndarray:
    """Read a mask file -> (H, W) bool (binary) or integer class map.

    Raises DataError naming ``path`` when it is missing or unreadable, its size differs from ``image_size``
    ((H, W)), or a binary mask holds values other than {0, 1} / {0, 255}.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataError(f"Missing mask file: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            arr = np.asarray(im)
    except Image.DecompressionBombError as e:
        raise DataError(f"Mask file {p} is too large to decode safely: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise DataError(f"Unreadable or truncated mask file {p}: {e}") from e
    if arr.ndim == 3:
        if not (arr[..., :3] == arr[..., :1]).all():
            raise DataError(f"Mask {p} is a colour image ({arr.shape}); expected a single-channel mask")
        arr = arr[..., 0]
    if image_size is not None and arr.shape != tuple(image_size):
        raise DataError(f"Mask {p} is {arr.shape[1]}x{arr.shape[0]} (WxH) but its image is "
                        f"{image_size[1]}x{image_size[0]}")
    if binary:
        values = np.unique(arr)
        if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
            raise DataError(f"Mask {p} has unexpected values {values[:10].tolist()}"
                            f"{'...' if len(values) > 10 else ''}; a binary mask holds {{0, 255}} or {{0, 1}}. "
                            "For class-index masks pass class_names=[...]")
        return arr > 0
    return arr.astype(np.int64)


def check_splits(**splits: Iterable[str]) -> None:
    """Each split is an iterable of keys (image paths or group ids); raises DataError naming any key that appears
    in more than one split."""
    seen: dict[str, str] = {}
    clashes = []
    for name, keys in splits.items():
        for k in set(keys):
            if k in seen and seen[k] != name:
                clashes.append(f"{k} ({seen[k]} and {name})")
            seen.setdefault(k, name)
    if clashes:
        raise DataError(f"{len(clashes)} item(s) appear in more than one split, e.g. {clashes[:3]}")
