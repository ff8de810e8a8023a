"""Data: one sample schema (``Sample``), loaders returning indexable datasets, clinical formats, paired
transforms, composite canvases and validation. Data knows nothing of models (it re-exports the ImageNet
normalisation constants of ``vlseg.features`` for code that prepares images by hand)."""

from ..features import IMAGENET_MEAN, IMAGENET_STD  # the CNN trunks' and CLIPSeg's (CLIP's differ)
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
    "Canvas", "CompositeSampler", "DataError", "FileDataset", "GroupCache", "HFDataset", "IMAGENET_MEAN",
    "IMAGENET_STD", "ImageGroup", "PairedAugment", "PooledDataset", "Sample", "SampleDataset", "Subset", "check_splits",
    "from_folder", "from_hf", "from_manifest", "from_spec", "group_by_image", "is_absent_image", "load_group",
    "make_canvas", "read_mask", "reweight_absent_images", "split_sources", "train_val_split",
]
