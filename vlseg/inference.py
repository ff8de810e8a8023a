"""``vlseg.segment``: images in, K masks per image out at each image's own size."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .io import read_image
from .model import VLSegModel, normalize_prompts


def _is_batch(image: Any) -> bool:
    return isinstance(image, (list, tuple))


def segment(model: VLSegModel, image: Any, prompts: str | Sequence[str], threshold: float = 0.5,
            return_probs: bool = False, batch_size: int = 8, presence_threshold: float | None = 0.5,
            autocast: bool = False) -> Any:
    """Segment what the prompts describe.

    Args:
        model: a VLSegModel (``vlseg.create_model`` / ``vlseg.load``).
        image: a path, PIL image or numpy array ((H, W), (H, W, 3); uint8, uint16 or float), or a list of them.
        prompts: one string or K strings, applied to every image.
        threshold: probability above which a pixel is foreground.
        return_probs: return float32 probabilities instead of boolean masks.
        batch_size: images per forward pass.
        presence_threshold: for models with a presence head, masks whose presence probability is below this are
            emptied ("target absent"); ``None`` disables the gate. Probabilities are never gated.
        autocast: run under bfloat16 autocast (faster on CPUs with bf16 and on GPUs; tiny numeric differences).
    Returns:
        For one image a (K, H, W) array (bool masks, or float32 probabilities); for a list, a list of those.
    Raises:
        ValueError: empty prompt list, empty prompt string, unreadable or non-image input.
    """
    if not isinstance(model, VLSegModel):
        raise TypeError(f"segment() needs a VLSegModel (vlseg.create_model / vlseg.load), got {type(model).__name__}")
    if isinstance(prompts, str):
        prompts = [prompts]
    normalize_prompts(list(prompts), 1)  # validate once, before any image work
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    items = list(image) if _is_batch(image) else [image]
    if not items:
        raise ValueError("No images given")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results = []
    dev = model.device
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(items), batch_size):
            arrays = [read_image(x)[0] for x in items[start:start + batch_size]]
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                pv = model.processor(arrays, device=dev)
                out = model(pv, list(prompts))
                for i, arr in enumerate(arrays):
                    # sigmoid at the model's resolution, then resize probabilities (as the upstream pipelines do)
                    probs = model.processor.postprocess(torch.sigmoid(out.logits[i].float()), arr.shape[:2])
                    if return_probs:
                        results.append(probs.cpu().numpy().astype(np.float32))
                        continue
                    masks = probs > threshold
                    if out.presence is not None and presence_threshold is not None:
                        present = torch.sigmoid(out.presence[i].float()) >= presence_threshold
                        masks &= present.view(-1, 1, 1)
                    results.append(masks.cpu().numpy())
    finally:
        model.train(was_training)
    return results if _is_batch(image) else results[0]
