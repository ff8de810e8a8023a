"""Clinical formats (extra ``medical``): DICOM via pydicom, NIfTI via nibabel.

DICOM: rescale slope/intercept to modality units (HU for CT), window (presets or the file's own VOI window),
MONOCHROME1 inversion, series folders -> volumes with spacing. NIfTI: volumes with their affine, slices along an
axis, and writing a predicted mask volume back with the same affine so it overlays in 3D Slicer.
"""

from __future__ import annotations

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
        raise ValueError(f"{p} is a multi-frame DICOM ({raw.shape[0]} frames); read it with read_dicom_series")
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


def read_dicom_series(folder: str | Path, win: str | tuple[float, float] | None = None) -> Volume:
    """A folder of single-slice DICOM files -> Volume (rows, cols, slices) of modality values, sorted along the
    slice normal, with (row, col, slice) spacing and an affine built from the DICOM geometry."""
    pydicom = _need("pydicom")
    files = sorted(Path(folder).glob("*"))
    slices = []
    for f in files:
        if f.is_file():
            try:
                slices.append(pydicom.dcmread(str(f)))
            except Exception:
                continue
    if not slices:
        raise ValueError(f"No readable DICOM files in {folder}")
    orient = np.array(getattr(slices[0], "ImageOrientationPatient", [1, 0, 0, 0, 1, 0]), dtype=float)
    normal = np.cross(orient[:3], orient[3:])
    pos = lambda s: float(np.dot(normal, np.array(getattr(s, "ImagePositionPatient", [0, 0, 0]), float)))  # noqa: E731
    slices.sort(key=lambda s: (pos(s), int(getattr(s, "InstanceNumber", 0))))
    data = np.stack([modality_values(s, s.pixel_array) for s in slices], axis=-1)
    ps = [float(x) for x in getattr(slices[0], "PixelSpacing", [1, 1])]
    dz = abs(pos(slices[1]) - pos(slices[0])) if len(slices) > 1 else float(getattr(slices[0], "SliceThickness", 1))
    affine = np.eye(4)
    affine[:3, 0] = orient[3:] * ps[0]  # rows advance along the column direction cosine
    affine[:3, 1] = orient[:3] * ps[1]
    affine[:3, 2] = normal * (dz or 1.0)
    affine[:3, 3] = np.array(getattr(slices[0], "ImagePositionPatient", [0, 0, 0]), float)
    if win is not None:
        data = to_uint8(data, win)
    return Volume(data=data, affine=affine, spacing=(ps[0], ps[1], dz or 1.0),
                  meta={"modality": str(getattr(slices[0], "Modality", "")), "source": str(folder)}, space="LPS")


def read_nifti(path: str | Path) -> Volume:
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


def write_nifti(mask: np.ndarray, like: Volume | np.ndarray, path: str | Path, overwrite: bool = False) -> str:
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
