"""3D inputs in one place: NIfTI volumes and DICOM series folders read as volumes, and their masks kept with the
geometry needed to write them back (``VolumeMasks.save`` writes NIfTI in RAS with the source's affine).
``vlseg.segment_volume`` (inference.py) segments them slice by slice."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data.clinical import Volume, is_dicom_series, is_volume_path, read_dicom_series, read_nifti, write_nifti


@dataclass
class VolumeMasks:
    """Masks of a volume, one per prompt.

    Attributes:
        masks: (K, *volume.data.shape) bool masks (or float32 probabilities), in the volume's voxel order.
        prompts: the K prompts.
        volume: the source volume (data, affine, spacing, header).
        axis: the axis it was sliced along.
    """

    masks: np.ndarray
    prompts: list[str]
    volume: Volume
    axis: int

    @property
    def affine(self) -> np.ndarray:
        """(4, 4) voxel -> RAS mm, as NIfTI writers need it."""
        return self.volume.ras_affine()

    def save(self, k: int | str, path: str | os.PathLike[str], overwrite: bool = False) -> str:
        """Write mask ``k`` (an index or a prompt) as uint8 NIfTI with the volume's geometry."""
        i = self.prompts.index(k) if isinstance(k, str) else int(k)
        mask = self.masks[i]
        return write_nifti(mask if mask.dtype == bool else (mask > 0.5), self.volume, path, overwrite=overwrite)


def is_volume_source(x: Any) -> bool:
    """A NIfTI file or a DICOM series folder."""
    return isinstance(x, (str, os.PathLike)) and (is_volume_path(x) or is_dicom_series(x))


def read_volume(source: str | os.PathLike[str] | Volume) -> Volume:
    """A NIfTI file or a DICOM series folder -> Volume (modality values; windowed when sliced)."""
    if isinstance(source, Volume):
        return source
    if is_volume_path(source):
        return read_nifti(source)
    if Path(source).is_dir():
        return read_dicom_series(source)
    raise ValueError(f"{source} is neither a NIfTI file (.nii/.nii.gz) nor a folder of DICOM files")


__all__ = ["VolumeMasks", "is_volume_source", "read_volume"]
