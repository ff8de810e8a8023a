"""``vlseg.segment``: images in, K masks per image out at each image's own size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import os
from typing import Any

import numpy as np
import torch

from .io import read_image
from .model import VLSegModel, normalize_prompts
from .data.clinical import volume_slices
from .volumes import Volume, VolumeMasks, is_volume_source, read_volume


def _is_batch(image: Any) -> bool:
    return isinstance(image, (list, tuple))


def _run(model: VLSegModel, items: list[Any], prompts: list[str], batch_size: int, autocast: bool
         ) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """-> per image: (K, H, W) float32 probabilities at the image's size, (K,) presence probabilities or None."""
    out = []
    dev = model.device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            arrays = [read_image(x)[0] for x in items[start:start + batch_size]]
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                pv = model.processor(arrays, device=dev)
                res = model(pv, prompts)
                for i, arr in enumerate(arrays):
                    # sigmoid at the model's resolution, then resize probabilities (as the upstream pipelines do)
                    probs = model.processor.postprocess(torch.sigmoid(res.logits[i].float()), arr.shape[:2])
                    presence = None if res.presence is None else torch.sigmoid(res.presence[i].float())
                    out.append((probs.cpu().numpy().astype(np.float32),
                                None if presence is None else presence.cpu().numpy()))
    finally:
        model.train(was_training)
    return out


PresenceThreshold = float | None | str


def presence_cutoff(model: VLSegModel, presence_threshold: PresenceThreshold) -> float | None:
    """``"model"`` -> the threshold calibrated into the checkpoint (0.5 when it has none); a number is used as
    given; None disables the presence gate."""
    if presence_threshold == "model":
        t = model.config.presence_threshold
        return 0.5 if t is None else float(t)
    if presence_threshold is not None and not isinstance(presence_threshold, (int, float)):
        raise ValueError(f"presence_threshold must be a number in [0, 1], None or 'model', got {presence_threshold!r}")
    if presence_threshold is not None and not 0.0 <= presence_threshold <= 1.0:
        raise ValueError(f"presence_threshold must be in [0, 1], got {presence_threshold}")
    return presence_threshold


def _gate(probs: np.ndarray, presence: np.ndarray | None, threshold: float,
          presence_threshold: float | None) -> np.ndarray:
    """(K, H, W) probabilities -> bool masks; empty where a presence head says the target is absent."""
    masks = probs > threshold
    if presence is not None and presence_threshold is not None:
        masks &= (presence >= presence_threshold)[:, None, None]
    return masks


@dataclass
class Prediction:
    """What the model says about one image and K prompts.

    Attributes:
        masks: (K, H, W) bool (thresholded, presence-gated when the model has a presence head).
        probs: (K, H, W) float32 pixel probabilities.
        presence: (K,) probability that each prompted structure is present: the presence head when the model
            has one, else the highest pixel probability.
        has_presence_head: which of the two ``presence`` is.
    """

    masks: np.ndarray
    probs: np.ndarray
    presence: np.ndarray
    has_presence_head: bool


def predict(model: VLSegModel, image: Any, prompts: str | Sequence[str], threshold: float = 0.5,
            presence_threshold: PresenceThreshold = "model") -> Prediction:
    """Masks, probabilities and presence scores for one 2D image (path, PIL or array) and K prompts."""
    if isinstance(prompts, str):
        prompts = [prompts]
    normalize_prompts(list(prompts), 1)
    if not isinstance(model, VLSegModel):
        raise TypeError(f"predict() needs a VLSegModel, got {type(model).__name__}")
    probs, presence = _run(model, [image], list(prompts), 1, False)[0]
    masks = _gate(probs, presence, threshold, presence_cutoff(model, presence_threshold))
    head = presence is not None
    score = presence if head else probs.reshape(len(prompts), -1).max(1)
    return Prediction(masks=masks, probs=probs, presence=score, has_presence_head=head)


def segment(model: VLSegModel, image: Any, prompts: str | Sequence[str], threshold: float = 0.5,
            return_probs: bool = False, batch_size: int = 8, presence_threshold: PresenceThreshold = "model",
            autocast: bool = False, volume_axis: int = 2, window: Any = None, allow_empty_prompts: bool = False
            ) -> Any:
    """Segment what the prompts describe.

    Args:
        model: a VLSegModel (``vlseg.create_model`` / ``vlseg.load``).
        image: a path (PNG/JPEG/TIFF, ``.dcm``, a ``.nii``/``.nii.gz`` volume or a DICOM series folder), PIL
            image or numpy array ((H, W), (H, W, 3); uint8, uint16 or float), or a list of them.
        prompts: one string or K strings, applied to every image.
        threshold: probability above which a pixel is foreground.
        return_probs: return float32 probabilities instead of boolean masks.
        batch_size: images per forward pass.
        presence_threshold: for models with a presence head, masks whose presence probability is below this are
            emptied ("target absent"); ``"model"`` uses the threshold calibrated into the checkpoint (0.5 when it
            has none); ``None`` disables the gate. Probabilities are never gated.
        autocast: run under bfloat16 autocast (faster on CPUs with bf16 and on GPUs; tiny numeric differences).
        volume_axis, window: for volumes, the slicing axis and the intensity window (a preset such as
            "abdomen", a (center, width) pair, or None for min-max over the volume).
    Returns:
        For one image a (K, H, W) array (bool masks, or float32 probabilities); for a list, a list of those.
        A volume gives (K, X, Y, Z) in the file's voxel order; ``vlseg.segment_volume`` returns the same masks
        with the geometry to write them back.
    Raises:
        ValueError: empty prompt list, empty prompt string (unless ``allow_empty_prompts``, for ablations),
            unreadable or non-image input.
    """
    if not isinstance(model, VLSegModel):
        raise TypeError(f"segment() needs a VLSegModel (vlseg.create_model / vlseg.load), got {type(model).__name__}")
    if isinstance(prompts, str):
        prompts = [prompts]
    normalize_prompts(list(prompts), 1, allow_empty=allow_empty_prompts)  # validate before any image work
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    items = list(image) if _is_batch(image) else [image]
    if not items:
        raise ValueError("No images given")
    if any(is_volume_source(x) for x in items):
        kw: dict[str, Any] = dict(threshold=threshold, return_probs=return_probs, batch_size=batch_size,
                                  presence_threshold=presence_threshold, autocast=autocast,
                                  allow_empty_prompts=allow_empty_prompts)
        out = [segment_volume(model, x, list(prompts), axis=volume_axis, window=window, **kw).masks
               if is_volume_source(x) else segment(model, x, prompts, **kw) for x in items]
        return out if _is_batch(image) else out[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cutoff = presence_cutoff(model, presence_threshold)
    results = [probs if return_probs else _gate(probs, presence, threshold, cutoff)
               for probs, presence in _run(model, items, list(prompts), batch_size, autocast)]
    return results if _is_batch(image) else results[0]


def segment_volume(model: Any, source: str | os.PathLike[str] | Volume, prompts: str | list[str], axis: int = 2,
                   window: str | tuple[float, float] | None = None, batch_size: int = 8, progress: bool = True,
                   **segment_kwargs: Any) -> VolumeMasks:
    """Segment a 3D volume slice by slice.

    Args:
        model: a VLSegModel.
        source: a ``.nii``/``.nii.gz`` file, a folder of one DICOM series, or a Volume.
        prompts: one string or K strings.
        axis: the slicing axis of the stored array (2: axial for most CT).
        window: intensity window for the slices: a preset (``abdomen``, ``lung``, ...), (center, width), or None
            for a robust min-max over the whole volume (slices share one grey scale).
        batch_size: slices per forward pass.
        progress: show a progress bar for volumes of more than one batch.
        **segment_kwargs: passed to ``vlseg.segment`` (threshold, presence_threshold, return_probs, ...).
    Returns:
        VolumeMasks with masks (K, *volume shape).
    """
    from tqdm.auto import tqdm

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    vol = read_volume(source)
    slices = volume_slices(vol, axis=axis, win=window)
    name = os.path.basename(str(vol.meta.get("source", "volume")))
    out: list[np.ndarray] = []
    for i in tqdm(range(0, len(slices), batch_size), desc=f"segment {name}", leave=False,
                  disable=not progress or len(slices) <= batch_size):
        out += segment(model, slices[i:i + batch_size], prompts, batch_size=batch_size, **segment_kwargs)
    return VolumeMasks(masks=np.stack(out, axis=1 + axis), prompts=prompts, volume=vol, axis=axis)
