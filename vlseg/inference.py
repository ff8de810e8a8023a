"""``vlseg.segment``: images in, K masks per image out at each image's own size."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
import os
import warnings
from typing import Any

import numpy as np
import torch

from .io import read_image
from .features import BoxPrompts, QueryOutputs
from .model import VLSegModel, normalize_prompts
from .data.clinical import volume_slices
from .volumes import Volume, VolumeMasks, is_volume_source, read_volume


FlipSetting = bool | str  # True / False, or "model": the checkpoint's ``flip_tta``


def _is_batch(image: Any) -> bool:
    return isinstance(image, (list, tuple))


@dataclass
class Instances:
    """The instances one prompt found in an image (families with ``capabilities.instances``, e.g. SAM 3).

    Attributes:
        masks: (N, H, W) bool, at the image's size.
        boxes: (N, 4) float32 (x0, y0, x1, y1) in pixels of the image.
        scores: (N,) float32 instance probabilities (the presence score included).
    """

    masks: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray


def _run(model: VLSegModel, items: list[Any], prompts: list[str], batch_size: int, autocast: bool,
         flip: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """-> per image: (K, H, W) float32 probabilities at the image's size, (K,) presence probabilities or None."""
    return [(probs, presence) for probs, presence, _ in
            _run_detailed(model, items, prompts, batch_size, autocast, flip=flip)]


def flip_enabled(model: VLSegModel, flip: FlipSetting) -> bool:
    """``"model"`` -> the checkpoint's ``flip_tta``; a bool is used as given.

    Raises:
        ValueError: ``flip`` is neither, or it is on for a family that detects instances (SAM 3)."""
    if flip == "model":
        flip = bool(getattr(model.config, "flip_tta", False))
    if not isinstance(flip, bool):
        raise ValueError(f"flip must be True, False or 'model', got {flip!r}")
    if flip and model.family.capabilities.instances:
        raise ValueError(f"flip test-time augmentation averages semantic maps; the {model.config.family!r} family "
                         f"detects instances: pass flip=False")
    return flip


def _run_detailed(model: VLSegModel, items: list[Any], prompts: list[str], batch_size: int, autocast: bool,
                  boxes: BoxPrompts | None = None, threshold: float | None = None, flip: bool = False
                  ) -> list[tuple[np.ndarray, np.ndarray | None, list[Instances] | None]]:
    """``_run`` plus box prompts (rows for one image) and, for families that detect instances, each prompt's
    instances (masks cut at ``threshold``). Their semantic probability is the highest kept instance probability,
    so the mask is the union of the instance masks (as SAM 3's post-processing).

    ``flip`` (test-time augmentation, resolved by the caller with ``flip_enabled``): also run each image mirrored
    left-right, in the same forward pass, and average the two views' pixel probabilities (the mirrored one mirrored
    back) and presence probabilities."""
    out = []
    dev = model.device
    if flip and boxes is not None:
        raise ValueError("flip test-time augmentation does not take box prompts: pass flip=False with boxes")
    was_training = model.training
    if was_training:  # (toggling walks every submodule: skipped when the model is already in eval mode)
        model.eval()
    try:
        for start in range(0, len(items), batch_size):
            arrays = [read_image(x)[0] for x in items[start:start + batch_size]]
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                pv = model.processor(arrays, device=dev)
                n = len(arrays)
                if flip:  # both views in one batch: images 0..n-1 as given, n..2n-1 mirrored (B, 3, S, S)
                    pv = torch.cat([pv, pv.flip(-1)])
                res = model(pv, prompts) if boxes is None else model(pv, prompts, boxes=boxes)
                for i, arr in enumerate(arrays):
                    presence = None if res.presence is None else torch.sigmoid(res.presence[i].float())
                    inst = None
                    if res.instances is not None:
                        probs, inst = _instance_probs(model, res.instances, i, arr.shape[:2], threshold)
                    else:  # sigmoid at the model's resolution, then resize probabilities (as upstream pipelines do)
                        low = torch.sigmoid(res.logits[i].float())  # (K, h, w)
                        if flip:
                            low = (low + torch.sigmoid(res.logits[n + i].float()).flip(-1)) / 2
                            if presence is not None:
                                presence = (presence + torch.sigmoid(res.presence[n + i].float())) / 2
                        probs = model.processor.postprocess(low, arr.shape[:2])
                    out.append((probs.cpu().numpy().astype(np.float32),
                                None if presence is None else presence.cpu().numpy(), inst))
    finally:
        if was_training:
            model.train()
    return out


def _instance_probs(model: VLSegModel, q: QueryOutputs, i: int, size: tuple[int, int], threshold: float | None
                    ) -> tuple[torch.Tensor, list[Instances] | None]:
    """Image ``i``'s kept queries -> (K, H, W) semantic probabilities (max over instances, resized first as
    transformers' post_process_instance_segmentation does) and, with a threshold, the instances."""
    h, w = int(size[0]), int(size[1])
    scale = torch.tensor([w, h, w, h], dtype=torch.float32)
    sem, found = [], []
    for k in range(q.keep.shape[1]):
        keep = q.keep[i, k]
        logits = q.mask_logits[i, k][keep].float()
        probs = model.processor.postprocess(torch.sigmoid(logits), (h, w)) if len(logits) else \
            logits.new_zeros(0, h, w)
        sem.append(probs.amax(0) if len(probs) else probs.new_zeros(h, w))
        if threshold is not None:
            found.append(Instances(masks=(probs > threshold).cpu().numpy(),
                                   boxes=(q.boxes[i, k][keep].float().cpu() * scale).numpy(),
                                   scores=q.scores[i, k][keep].float().cpu().numpy()))
    return torch.stack(sem), (found if threshold is not None else None)


def box_prompts(boxes: Sequence[Any], box_labels: Sequence[Any] | None, k: int, size: tuple[int, int]
                ) -> BoxPrompts:
    """``segment``'s ``boxes`` (per prompt: None or a list of (x0, y0, x1, y1) pixel boxes) and ``box_labels``
    (per prompt: None or 1 positive / 0 negative per box) -> BoxPrompts normalised by the image's (W, H)."""
    if isinstance(boxes, (str, bytes)) or len(boxes) != k:
        raise ValueError(f"boxes needs one entry per prompt ({k}): None or a list of (x0, y0, x1, y1) pixel boxes")
    if box_labels is not None and len(box_labels) != k:
        raise ValueError(f"box_labels needs one entry per prompt ({k}), like boxes")
    h, w = size
    rows: list[list[tuple[list[float], int]]] = []
    for j, bl in enumerate(boxes):
        row: list[tuple[list[float], int]] = []
        labels = None if box_labels is None else box_labels[j]
        if bl is not None:
            bl = [bl] if len(bl) == 4 and all(isinstance(v, (int, float, np.number)) for v in bl) else list(bl)
            if labels is not None and len(labels) != len(bl):
                raise ValueError(f"prompt {j}: {len(bl)} boxes but {len(labels)} box labels")
            for n, b in enumerate(bl):
                if len(b) != 4:
                    raise ValueError(f"prompt {j}: a box is (x0, y0, x1, y1), got {b!r}")
                x0, y0, x1, y1 = (float(v) for v in b)
                if not (x1 > x0 and y1 > y0):
                    raise ValueError(f"prompt {j}: box {b!r} has no area (needs x1 > x0 and y1 > y0)")
                lab = 1 if labels is None else int(labels[n])
                if lab not in (0, 1):
                    raise ValueError(f"prompt {j}: box labels are 1 (positive) or 0 (negative), got {lab!r}")
                row.append(([x0 / w, y0 / h, x1 / w, y1 / h], lab))
        rows.append(row)
    n = max(1, max(len(r) for r in rows))
    t = torch.zeros(k, n, 4)
    lab_t = torch.full((k, n), -1, dtype=torch.long)
    for j, row in enumerate(rows):
        for m, (b, lab) in enumerate(row):
            t[j, m] = torch.tensor(b)
            lab_t[j, m] = lab
    return BoxPrompts(boxes=t, labels=lab_t)


def _check_boxes(model: VLSegModel, boxes: Any) -> None:
    if boxes is not None and not model.family.capabilities.boxes:
        raise ValueError(f"{model.family.name!r} models take no box prompts (boxes=...); SAM 3 models do")


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
        instances: for families that detect instances (SAM 3), per prompt the Instances it found (the masks are
            their union); None for the others.
    """

    masks: np.ndarray
    probs: np.ndarray
    presence: np.ndarray
    has_presence_head: bool
    instances: list[Instances] | None = None


def _prompt_list(prompts: Any) -> list[str]:
    """One string or a list/tuple of K strings -> the K strings (checked before any image work)."""
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        shown = type(prompts).__name__ if not isinstance(prompts, (list, tuple)) else \
            f"a list holding {sorted({type(p).__name__ for p in prompts if not isinstance(p, str)})}"
        raise TypeError(f"prompts must be a string or a list of strings, got {shown}")
    return list(prompts)


def predict(model: VLSegModel, image: Any, prompts: str | Sequence[str], threshold: float = 0.5,
            presence_threshold: PresenceThreshold = "model", boxes: Sequence[Any] | None = None,
            box_labels: Sequence[Any] | None = None, precision: str = "fp32", flip: FlipSetting = "model",
            allow_empty_prompts: bool = False) -> Prediction:
    """Masks, probabilities, presence scores (and instances, for families that detect them) for one 2D image
    (path, PIL or array) and K prompts, in one forward pass (the image is encoded once).

    ``threshold``, ``presence_threshold``, ``boxes``/``box_labels``, ``precision`` and ``flip`` are as in ``segment``;
    ``allow_empty_prompts`` lets the empty prompt "" through (ablations: it is scored, and gated by its presence,
    like any other prompt).

    Raises:
        ValueError: an empty prompt list, an empty prompt string without ``allow_empty_prompts``, unreadable input,
            box prompts for a model that takes none.
        TypeError: prompts that are not strings, or ``model`` is not a VLSegModel.
    """
    prompts = _prompt_list(prompts)
    normalize_prompts(prompts, 1, allow_empty=allow_empty_prompts)
    if not isinstance(model, VLSegModel):
        raise TypeError(f"predict() needs a VLSegModel, got {type(model).__name__}")
    _check_boxes(model, boxes)
    bp = None
    if boxes is not None:
        arr = read_image(image)[0]
        image, bp = arr, box_prompts(boxes, box_labels, len(prompts), arr.shape[:2])
    run = with_precision(model, precision, [image], prompts)
    probs, presence, inst = _run_detailed(run, [image], list(prompts), 1, False, boxes=bp, threshold=threshold,
                                          flip=flip_enabled(model, flip))[0]
    masks = _gate(probs, presence, threshold, presence_cutoff(model, presence_threshold))
    head = presence is not None
    score: np.ndarray = presence if presence is not None else probs.reshape(len(prompts), -1).max(1)
    return Prediction(masks=masks, probs=probs, presence=score, has_presence_head=head, instances=inst)


def with_precision(model: VLSegModel, precision: str, images: Sequence[Any] | None = None,
                   prompts: Sequence[str] | None = None) -> VLSegModel:
    """The model to run for ``precision`` (``fp32``: the model itself; ``bf16``/``int8``: converted copies of its
    encoders, built once; ``auto``: the fastest mode that passes the fidelity bar on this machine, see
    ``vlseg.precision``)."""
    if precision == "fp32":
        return model
    from .precision import resolve, variant

    allowed = model.family.precision_modes
    if allowed is not None and precision not in ("auto", *allowed):
        raise ValueError(f"{model.config.family!r} models run in {list(allowed)}, not {precision!r}")
    mode = resolve(model, precision, images=images, prompts=prompts)
    return model if mode == "fp32" or (allowed is not None and mode not in allowed) else variant(model, mode)


def segment(model: VLSegModel, image: Any, prompts: str | Sequence[str], threshold: float = 0.5,
            return_probs: bool = False, batch_size: int = 8, presence_threshold: PresenceThreshold = "model",
            autocast: bool = False, volume_axis: int = 2, window: Any = None, allow_empty_prompts: bool = False,
            boxes: Sequence[Any] | None = None, box_labels: Sequence[Any] | None = None,
            precision: str = "fp32", flip: FlipSetting = "model") -> Any:
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
        precision: ``fp32`` (exact), ``bf16`` or ``int8`` (converted copies of the encoders), or ``auto``: the
            fastest mode whose masks pass the fidelity bar on this machine (measured once, cached; fp32 when none
            does). See ``vlseg.precision`` and the benchmark for the measured speed and fidelity per CPU.
        autocast: deprecated, use ``precision="bf16"``: bf16 autocast re-casts weights every call and changed
            probabilities by up to 0.9 on random CLIPSeg weights in the benchmark; it is also slower than fp32 on
            CPUs without native bf16.
        volume_axis, window: for volumes, the slicing axis and the intensity window (a preset such as
            "abdomen", a (center, width) pair, or None for min-max over the volume).
        boxes: box prompts for one 2D image, for families whose ``capabilities.boxes`` is True (SAM 3): one entry
            per prompt, None or a list of (x0, y0, x1, y1) boxes in the image's pixels. A prompt with boxes and
            the text "visual" is a box-only prompt (SAM 3's convention).
        box_labels: per prompt, None (all positive) or one label per box: 1 positive, 0 negative (exclude this).
        flip: test-time augmentation: also run each image mirrored left-right and average the two views' pixel
            and presence probabilities (twice the image work); ``"model"`` (default) uses the checkpoint's
            ``flip_tta`` (its presence threshold was calibrated with the same setting). Not for box prompts or
            families that detect instances (SAM 3).
    Returns:
        For one image a (K, H, W) array (bool masks, or float32 probabilities); for a list, a list of those.
        A volume gives (K, X, Y, Z) in the file's voxel order; ``vlseg.segment_volume`` returns the same masks
        with the geometry to write them back.
    Raises:
        ValueError: empty prompt list, empty prompt string (unless ``allow_empty_prompts``, for ablations),
            unreadable or non-image input, box prompts for a model that takes none or for several images.
    """
    if not isinstance(model, VLSegModel):
        raise TypeError(f"segment() needs a VLSegModel (vlseg.create_model / vlseg.load), got {type(model).__name__}")
    prompts = _prompt_list(prompts)
    normalize_prompts(prompts, 1, allow_empty=allow_empty_prompts)  # validate before any image work
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    _check_boxes(model, boxes)
    use_flip = flip_enabled(model, flip)  # a bad value fails here, before any image work
    if autocast:
        warnings.warn("segment(autocast=True) is deprecated: use precision='bf16' (converted weights, checked "
                      "against fp32) or precision='auto'", DeprecationWarning, stacklevel=2)
    sample = None  # auto calibrates on the first 2D images asked for (only read if it has to calibrate)
    if precision != "fp32":
        sample = [x for x in (list(image) if _is_batch(image) else [image]) if not is_volume_source(x)][:3]
    run = with_precision(model, precision, sample, prompts)
    if boxes is not None:
        if _is_batch(image) or is_volume_source(image):
            raise ValueError("box prompts are in one image's pixels: pass a single 2D image with boxes=")
        arr = read_image(image)[0]
        bp = box_prompts(boxes, box_labels, len(prompts), arr.shape[:2])
        probs, presence, _ = _run_detailed(run, [arr], list(prompts), 1, autocast, boxes=bp, flip=use_flip)[0]
        return probs if return_probs else _gate(probs, presence, threshold, presence_cutoff(model,
                                                                                            presence_threshold))
    items = list(image) if _is_batch(image) else [image]
    if not items:
        raise ValueError("No images given")
    if any(is_volume_source(x) for x in items):
        kw: dict[str, Any] = dict(threshold=threshold, return_probs=return_probs, batch_size=batch_size,
                                  presence_threshold=presence_threshold, autocast=autocast,
                                  allow_empty_prompts=allow_empty_prompts, precision=precision, flip=flip)
        out = [segment_volume(model, x, list(prompts), axis=volume_axis, window=window, **kw).masks
               if is_volume_source(x) else segment(model, x, prompts, **kw) for x in items]
        return out if _is_batch(image) else out[0]
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    cutoff = presence_cutoff(model, presence_threshold)
    results = [probs if return_probs else _gate(probs, presence, threshold, cutoff)
               for probs, presence in _run(run, items, list(prompts), batch_size, autocast, use_flip)]
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
