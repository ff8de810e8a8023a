"""Data: one sample schema (``Sample``), loaders returning indexable datasets, clinical formats, paired
transforms and validation. Data knows nothing of models."""

from .datasets import (
    FileDataset,
    HFDataset,
    PooledDataset,
    SampleDataset,
    Subset,
    from_folder,
    from_hf,
    from_manifest,
    train_val_split,
)
from .composite import Canvas, CompositeSampler, make_canvas
from .groups import ImageGroup, group_by_image, load_group
from .schema import Sample
from .transforms import PairedAugment
from .validate import DataError, check_splits, read_mask

__all__ = [
    "Canvas", "CompositeSampler", "make_canvas",
    "DataError", "FileDataset", "ImageGroup", "group_by_image", "load_group", "PairedAugment", "HFDataset", "PooledDataset", "Sample", "SampleDataset", "Subset", "check_splits",
    "from_folder", "from_hf", "from_manifest", "read_mask", "train_val_split",
]
