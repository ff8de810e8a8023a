"""Clinical formats (extra ``medical``): DICOM via pydicom, NIfTI via nibabel.

DICOM: rescale slope/intercept to modality units (HU for CT), window (presets or the file's own VOI window),
MONOCHROME1 inversion, series folders -> volumes with spacing. NIfTI: volumes with their affine, slices along an
axis, and writing a predicted mask volume back with the same affine so it overlays in 3D Slicer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# (center, width) in HU
WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0), "soft_tissue": (50.0, 350.0), "liver": (60.0, 160.0), "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0), "brain": (40.0, 80.0), "mediastinum": (50.0, 350.0),
}


#: DICOM patient coordinates (LPS) -> NIfTI world coordinates (RAS): flip x and y
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Volume:
    """A 3D image: ``data`` (X, Y, Z) as stored (NIfTI) or (rows, cols, slices) for DICOM series, the 4x4
    ``affine`` voxel -> world mm in ``space`` (``"RAS"`` for NIfTI, ``"LPS"`` for DICOM), ``spacing`` per axis,
    ``meta``."""

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, ...]
    meta: dict[str, Any] = field(default_factory=dict)
    space: str = "RAS"

    def ras_affine(self) -> np.ndarray:
        """The voxel -> RAS affine NIfTI files (and 3D Slicer) expect."""
        return LPS_TO_RAS @ self.affine if self.space == "LPS" else np.asarray(self.affine, float)


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"Reading this file needs {module}: pip install 'vlseg[medical]'") from e


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map [center - width/2, center + width/2] to [0, 255] uint8 (clipped)."""
    if width <= 0:
        raise ValueError(f"window width must be > 0, got {width}")
    lo = center - width / 2.0
    out = (values.astype(np.float32) - lo) / width * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_uint8(values: np.ndarray, win: str | tuple[float, float] | None = None) -> np.ndarray:
    """Modality values -> uint8 with a named window, an explicit (center, width), or robust min-max (1..99 pct)."""
    if isinstance(win, str):
        if win not in WINDOWS:
            raise ValueError(f"Unknown window {win!r}; presets: {sorted(WINDOWS)}")
        win = WINDOWS[win]
    if win is not None:
        return window(values, *win)
    v = values.astype(np.float32)
    lo, hi = np.percentile(v, [1, 99]) if v.size > 100 else (v.min(), v.max())
    if hi <= lo:
        lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, np.uint8)
    return np.clip(np.rint((v - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def read_dicom(path: str | Path, win: str | tuple[float, float] | None = "auto") -> tuple[np.ndarray, dict[str, Any]]:
    """One DICOM file -> ((H, W) uint8, meta with spacing, modality, raw value range).

    ``win``: "auto" uses the file's own WindowCenter/Width when present (else min-max); a preset name
    (``WINDOWS``), a (center, width) pair, or None for min-max. MONOCHROME1 images are inverted.
    """
    pydicom = _need("pydicom")
    p = Path(path)
    try:
        ds = pydicom.dcmread(str(p))
        raw = ds.pixel_array
    except Exception as e:
        raise ValueError(f"Unreadable DICOM file {p}: {e}") from e
    values = modality_values(ds, raw)
    if raw.ndim == 3 and getattr(ds, "SamplesPerPixel", 1) == 1:
        raise ValueError(f"{p} is a multi-frame DICOM ({raw.shape[0]} frames), which vlseg does not read; "
                         "export it as one file per slice (a series folder, read with read_dicom_series)")
    if raw.ndim == 3:  # RGB (e.g. endoscopy stored as DICOM)
        img = raw.astype(np.uint8) if raw.dtype == np.uint8 else to_uint8(values)
    else:
        w = win
        if win == "auto":
            w = _file_window(ds)
        img = to_uint8(values, w)
        if str(getattr(ds, "PhotometricInterpretation", "")).upper() == "MONOCHROME1":
            img = 255 - img
    spacing = tuple(float(x) for x in getattr(ds, "PixelSpacing", []) or []) or None
    meta = {"spacing": spacing, "modality": str(getattr(ds, "Modality", "")), "source": str(p),
            "value_range": (float(values.min()), float(values.max()))}
    return img, meta


def modality_values(ds: Any, raw: np.ndarray) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1) or 1)
    intercept = float(getattr(ds, "RescaleIntercept", 0) or 0)
    return raw.astype(np.float32) * slope + intercept


def _file_window(ds: Any) -> tuple[float, float] | None:
    c, w = getattr(ds, "WindowCenter", None), getattr(ds, "WindowWidth", None)
    if c is None or w is None:
        return None
    first = lambda v: float(v[0]) if hasattr(v, "__len__") and not isinstance(v, str) else float(v)  # noqa: E731
    return first(c), first(w)


def read_dicom_series(folder: str | os.PathLike[str], win: str | tuple[float, float] | None = None, bad_slices: str = "raise",
                      spacing_tolerance: float = 0.01) -> Volume:
    """A folder of single-slice DICOM files (at any depth; hidden files ignored) -> Volume (rows, cols, slices) of
    modality values, sorted along the slice normal, with (row, col, slice) spacing and an affine built from the
    DICOM geometry.

    The geometry is checked, never guessed: the files must be slices of one series (one SeriesInstanceUID,
    orientation and slice size) at evenly spaced positions, so no slice can land at the wrong place.

    Args:
        folder: the series folder.
        win: window the values to uint8 (a preset name or (center, width)); None keeps modality values.
        bad_slices: ``"raise"`` (default): an unreadable or corrupt file, or a missing slice (a gap of a whole
            number of spacings), raises DataError naming the file(s). ``"fill"``: such slices become blank slices
            (the volume's minimum) at their positions, with a warning, so every other slice keeps its true
            position; their indices are in ``meta["filled_slices"]`` (masks there mean nothing). A file whose
            header cannot be read has no known position: it is dropped, and the gap it leaves is filled.
        spacing_tolerance: positions may deviate from the regular grid by this fraction of the spacing.
    Returns:
        Volume with ``meta["files"]`` (the file of each slice, None for filled ones) and ``meta["filled_slices"]``.
    Raises:
        DataError: no readable slices; mixed series, orientations or sizes; two slices at one position; uneven
            spacing that is not a whole number of missing slices; a bad or missing slice (``bad_slices="raise"``).
    """
    import warnings

    from .validate import DataError

    if bad_slices not in ("raise", "fill"):
        raise ValueError(f"bad_slices must be 'raise' or 'fill', got {bad_slices!r}")
    pydicom = _need("pydicom")
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"DICOM series folder not found: {root}")
    files = sorted(f for f in root.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(root).parts))
    good: list[tuple[Path, Any, np.ndarray]] = []
    broken: list[tuple[Path, Any, str]] = []  # (file, header or None, why)
    for f in files:
        ds = None
        try:
            ds = pydicom.dcmread(str(f))
            raw = ds.pixel_array
        except Exception as e:  # pydicom raises many types (InvalidDicomError, AttributeError, ValueError, ...)
            broken.append((f, ds, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        if raw.ndim != 2:
            raise DataError(f"{f} is not a single-slice greyscale DICOM (pixel array {raw.shape}); a series folder "
                            "holds one file per slice")
        good.append((f, ds, raw))
    if broken and bad_slices == "raise":
        f, _, why = broken[0]
        raise DataError(f"{f} is not a readable DICOM slice ({why}); {len(broken)} such file(s) in {root}. Remove "
                        "them, or pass bad_slices='fill' to put blank slices in their place")
    if not good:
        raise DataError(f"No readable DICOM slices in {root}")
    f0, ref, raw0 = good[0]
    uids = sorted({str(getattr(ds, "SeriesInstanceUID", "")) for _, ds, _ in good})  # "": no UID
    if len(uids) > 1:
        raise DataError(f"{root} mixes {len(uids)} DICOM series (SeriesInstanceUID {uids[:3]}); put each series "
                        "in its own folder")
    orient = np.array(getattr(ref, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    for f, ds, raw in good[1:]:
        if raw.shape != raw0.shape:
            raise DataError(f"{f} is {raw.shape[1]}x{raw.shape[0]} pixels but {f0} is {raw0.shape[1]}x{raw0.shape[0]}; "
                            "a series has one slice size")
        o = np.array(getattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
        if not np.allclose(o, orient, atol=1e-4):
            raise DataError(f"{f} has ImageOrientationPatient {o.tolist()} but {f0} has {orient.tolist()}")
    normal = np.cross(orient[:3], orient[3:])
    has_pos = [hasattr(ds, "ImagePositionPatient") for _, ds, _ in good]
    by_position = len(good) == 1 or all(has_pos)
    if not by_position:
        if any(has_pos):
            f = next(g[0] for g, h in zip(good, has_pos) if not h)
            raise DataError(f"{f} has no ImagePositionPatient while other slices of {root} do; its place is unknown")
        nums = [getattr(ds, "InstanceNumber", None) for _, ds, _ in good]
        if None in nums or len(set(nums)) != len(nums):
            raise DataError(f"The slices in {root} have neither ImagePositionPatient nor distinct InstanceNumbers; "
                            "their order is unknown")
        dz0 = float(getattr(ref, "SpacingBetweenSlices", 0) or getattr(ref, "SliceThickness", 0) or 1.0)
        warnings.warn(f"{root}: no ImagePositionPatient; slices ordered by InstanceNumber, spacing {dz0} mm from "
                      "SpacingBetweenSlices/SliceThickness (gaps cannot be detected)", stacklevel=2)
        positions = {id(ds): float(n) * dz0 for (_, ds, _), n in zip(good, nums)}  # type: ignore[arg-type]
        pos = lambda s: positions[id(s)]  # noqa: E731
    else:
        pos = lambda s: float(np.dot(normal, np.array(getattr(s, "ImagePositionPatient", [0, 0, 0]), float)))  # noqa: E731
    # slices whose pixels are unreadable but whose header gives a position are filled where they belong
    entries: list[tuple[float, Path, Any, np.ndarray | None]] = [(pos(ds), f, ds, raw) for f, ds, raw in good]
    entries += [(pos(ds), f, ds, None) for f, ds, _ in broken
                if by_position and ds is not None and hasattr(ds, "ImagePositionPatient")]
    entries.sort(key=lambda e: e[0])
    zs = np.array([e[0] for e in entries])
    layout: list[tuple[Path | None, Any, np.ndarray | None]] = [(entries[0][1], entries[0][2], entries[0][3])]
    if len(entries) > 1:
        d = np.diff(zs)
        step = float(d.min())
        if step <= 1e-6:
            i = int(np.argmin(d))
            raise DataError(f"{entries[i][1]} and {entries[i + 1][1]} are at the same position ({zs[i]:.3f} mm); "
                            "a series has one slice per position")
        n = np.rint(d / step)
        off = np.abs(d - n * step)
        if (off > spacing_tolerance * step).any():
            i = int(np.argmax(off))
            gaps = sorted({round(float(x), 4) for x in d})
            raise DataError(f"Uneven slice spacing in {root}: {entries[i][1].name} -> {entries[i + 1][1].name} is "
                            f"{d[i]:.4g} mm, the spacing is {step:.4g} mm (gaps {gaps}); such a series has no regular "
                            "grid. Resample it to even spacing first")
        if (n > 1).any() and bad_slices == "raise":
            i = int(np.argmax(n > 1))
            raise DataError(f"{int((n - 1).sum())} missing slice(s) in {root}: {entries[i][1].name} "
                            f"({zs[i]:.4g} mm) is followed by {entries[i + 1][1].name} ({zs[i + 1]:.4g} mm), "
                            f"{d[i]:.4g} mm apart; the spacing is {step:.4g} mm. Pass bad_slices='fill' to put blank "
                            "slices in the gaps")
        for (_, f, ds, raw), gap in zip(entries[1:], n):
            layout += [(None, None, None)] * (int(gap) - 1) + [(f, ds, raw)]
    else:
        step = float(getattr(ref, "SpacingBetweenSlices", 0) or getattr(ref, "SliceThickness", 0) or 1.0)
    values = [None if raw is None else modality_values(ds, raw) for _, ds, raw in layout]
    fill = min(float(v.min()) for v in values if v is not None)
    filled = [i for i, v in enumerate(values) if v is None]
    if filled or broken:
        parts = [f"{len(filled)} blank slice(s) at indices {filled[:20]} stand in for unreadable or missing slices"
                 ] if filled else []
        if broken:
            parts.append(f"unreadable file(s) skipped: {', '.join(str(f) for f, _, _ in broken[:10])}")
        warnings.warn(f"{root} (bad_slices='fill'): " + "; ".join(parts), stacklevel=2)
    data = np.stack([np.full(raw0.shape, fill, np.float32) if v is None else v for v in values], axis=-1)
    ps = [float(x) for x in getattr(ref, "PixelSpacing", [1, 1])]
    first = layout[0][1]
    affine = np.eye(4)
    affine[:3, 0] = orient[3:] * ps[0]  # rows advance along the column direction cosine
    affine[:3, 1] = orient[:3] * ps[1]
    affine[:3, 2] = normal * step
    affine[:3, 3] = np.array(getattr(first, "ImagePositionPatient", [0, 0, 0]), float)
    if win is not None:
        data = to_uint8(data, win)
    return Volume(data=data, affine=affine, spacing=(ps[0], ps[1], step),
                  meta={"modality": str(getattr(ref, "Modality", "")), "source": str(folder),
                        "files": [None if f is None else str(f) for f, _, _ in layout], "filled_slices": filled},
                  space="LPS")


def read_nifti(path: str | os.PathLike[str]) -> Volume:
    """A NIfTI file (.nii / .nii.gz) -> Volume with the file's affine and voxel spacing (data as stored)."""
    nib = _need("nibabel")
    p = Path(path)
    try:
        img = nib.load(str(p))
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise ValueError(f"Unreadable NIfTI file {p}: {e}") from e
    if data.ndim == 4 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim not in (2, 3):
        raise ValueError(f"{p}: expected a 2D or 3D volume, got shape {data.shape}")
    if data.ndim == 2:
        data = data[..., None]
    zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    return Volume(data=data, affine=np.asarray(img.affine, dtype=float), spacing=zooms,
                  meta={"source": str(p), "header": img.header})


def volume_slices(volume: Volume, axis: int = 2, win: str | tuple[float, float] | None = None) -> list[np.ndarray]:
    """2D uint8 slices along ``axis`` (windowed once over the whole volume so slices share a grey scale)."""
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    data = volume.data if volume.data.dtype == np.uint8 else to_uint8(volume.data, win)
    return [np.take(data, i, axis=axis) for i in range(data.shape[axis])]


def write_nifti(mask: np.ndarray, like: Volume | np.ndarray, path: str | os.PathLike[str],
                overwrite: bool = False) -> str:
    """Write a mask volume (same shape as the source volume's data) as uint8 NIfTI with the source's affine (in
    RAS, converted from DICOM's LPS for series) and header (when it came from NIfTI), so it overlays on the image
    in 3D Slicer. Never overwrites unless asked."""
    nib = _need("nibabel")
    p = Path(path)
    if p.exists() and not overwrite:
        raise FileExistsError(f"{p} exists; pass overwrite=True to replace it")
    affine = like.ras_affine() if isinstance(like, Volume) else np.asarray(like)
    if isinstance(like, Volume) and mask.shape != like.data.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume {like.data.shape}")
    header = like.meta.get("header") if isinstance(like, Volume) else None
    img = nib.Nifti1Image(np.asarray(mask).astype(np.uint8), affine, header=header.copy() if header is not None else None)
    img.set_data_dtype(np.uint8)
    p.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(p))
    return str(p)


def is_volume_path(path: Any) -> bool:
    """A NIfTI file name (.nii / .nii.gz)."""
    s = str(path).lower()
    return s.endswith((".nii", ".nii.gz"))


def is_dicom_series(path: Any) -> bool:
    """A folder whose files (at any depth) are all DICOM (``.dcm``), at least two of them."""
    p = Path(path)
    if not p.is_dir():
        return False
    files = [f for f in p.rglob("*") if f.is_file() and not f.name.startswith(".")]
    return len(files) > 1 and all(f.suffix.lower() == ".dcm" for f in files)
