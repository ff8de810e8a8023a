"""Data: one sample schema (``Sample``), loaders returning indexable datasets, clinical formats, paired
transforms, composite canvases and validation. Data knows nothing of models."""

from ..features import IMAGENET_MEAN, IMAGENET_STD  # the normalisation vlseg's image encoders use
from .composite import Canvas, CompositeSampler, make_canvas
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
from .groups import GroupCache, ImageGroup, group_by_image, is_absent_image, load_group, reweight_absent_images
from .schema import Sample
from .specs import from_spec, split_sources
from .transforms import PairedAugment
from .validate import DataError, check_splits, read_mask

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Canvas", "CompositeSampler", "DataError", "FileDataset", "GroupCache", "HFDataset",
    "ImageGroup", "PairedAugment", "PooledDataset", "Sample", "SampleDataset", "Subset", "check_splits", "from_folder",
    "from_hf", "from_manifest", "from_spec", "group_by_image", "is_absent_image", "load_group", "make_canvas",
    "read_mask", "reweight_absent_images", "split_sources", "train_val_split",
]
