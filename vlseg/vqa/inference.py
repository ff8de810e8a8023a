"""``vlseg.answer``: images and questions in, answers with scores and grounding masks out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..inference import PresenceThreshold, presence_cutoff
from ..io import read_image
from .boxes import mask_to_box
from .model import VQAModel, VQAOutput


def _check_model(model: Any) -> VQAModel:
    if not isinstance(model, VQAModel):
        family = getattr(getattr(model, "config", None), "family", type(model).__name__)
        raise TypeError(f"answer() needs a VQA model (a 'vqa' family preset such as 'tiny-test-vqa', "
                        f"'minilm-scratch-vqa', 'biomedclip-vqa', or a VQA checkpoint); got a {family!r} model")
    return model


def _questions(question: str | Sequence[str]) -> list[str]:
    qs = [question] if isinstance(question, str) else list(question)
    if not qs:
        raise ValueError("No question given: pass a question string or a list of them")
    for i, q in enumerate(qs):
        if not isinstance(q, str):
            raise TypeError(f"Question {i} is a {type(q).__name__}, not a string")
        if not q.strip():
            raise ValueError(f"Question {i} is empty; ask something, e.g. 'Is there a grasper?'")
    return qs


def results_from_output(model: VQAModel, out: VQAOutput, index: int, size: tuple[int, int], questions: list[str],
                        top_k: int, threshold: float, cutoff: float | None) -> list[dict[str, Any]]:
    """Turn image ``index`` of a forward pass into one result dict per question (see ``answer``)."""
    labels, probs = out.probs()
    probs = probs[index]  # (K, n)
    region = torch.sigmoid(out.presence[index].float()) if out.presence is not None else None
    maps = model.processor.postprocess(torch.sigmoid(out.logits[index].float()), size) > threshold  # (K, H, W)
    results = []
    k = min(top_k, probs.shape[-1])
    for j, q in enumerate(questions):
        vals, idx = probs[j].topk(k)
        top = [(labels[i], float(v)) for i, v in zip(idx.tolist(), vals.tolist())]
        score = float(region[j]) if region is not None else float(maps[j].any())
        refers = cutoff is None or score >= cutoff
        mask = maps[j].cpu().numpy() if refers else None
        box = mask_to_box(mask, normalized=True) if mask is not None and mask.any() else None
        results.append({"question": q, "answer": top[0][0], "score": top[0][1], "top_k": top, "mask": mask,
                        "region_score": score, "box": box})
    return results


def answer(model: VQAModel, image: Any, question: str | Sequence[str], *, top_k: int = 5,
           candidates: Sequence[str] | None = None, mode: str = "auto", threshold: float = 0.5,
           region_threshold: PresenceThreshold = "model", autocast: bool = False) -> Any:
    """Answer questions about images and show what each answer refers to.

    Args:
        model: a VQA model (``vlseg.create_model("minilm-scratch-vqa")``, ``vlseg.load(vqa_checkpoint)``).
        image: a path, PIL image or numpy array ((H, W) or (H, W, 3)), or a list of them.
        question: one question or a list of them (each image is encoded once for all its questions).
        top_k: how many (answer, score) pairs to list.
        candidates: answers to choose from, scored by the open-vocabulary head (answers the model was never
            trained on work too); default: the model's vocabulary plus ``model.add_answers(...)``.
        mode: "closed" (vocabulary head), "open" (answer-embedding head) or "auto" (closed unless answers were
            added or ``candidates`` given).
        threshold: pixel probability above which the grounding mask is foreground.
        region_threshold: "refers to a region" probability below which ``mask`` is None: "model" (the
            calibrated value in the checkpoint, 0.5 when it has none), a number, or None (always a mask).
        autocast: run under bfloat16 autocast.
    Returns:
        For one image and one question a dict: ``answer`` (str), ``score`` (its probability), ``top_k`` (list of
        (answer, probability)), ``mask`` ((H, W) bool at the image's size, or None when the answer refers to no
        region), ``region_score`` (probability that it refers to a region), ``box`` (normalised (x1, y1, x2, y2)
        around the mask, or None), ``question``. A list of questions or of images gives a list of dicts; a list of
        images and a list of questions gives one list of dicts per image.
    Raises:
        TypeError: not a VQA model.  ValueError: no or empty questions, bad thresholds, unreadable images.
    """
    model = _check_model(model)
    questions = _questions(question)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    cutoff = presence_cutoff(model, region_threshold)
    items = list(image) if isinstance(image, (list, tuple)) else [image]
    if not items:
        raise ValueError("No images given")
    dev = model.device
    was_training = model.training
    model.eval()
    per_image = []
    try:
        for item in items:
            arr = read_image(item)[0]
            with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                pv = model.processor([arr], device=dev)
                out = model(pv, questions, candidates=candidates, mode=mode)  # one image pass, K questions
            per_image.append(results_from_output(model, out, 0, arr.shape[:2], questions, top_k, threshold,
                                                 cutoff))
    finally:
        model.train(was_training)
    one_q = isinstance(question, str)
    if not isinstance(image, (list, tuple)):
        return per_image[0][0] if one_q else per_image[0]
    return [r[0] for r in per_image] if one_q else per_image


def answer_masks_overlay(image: np.ndarray, results: Sequence[dict[str, Any]]) -> np.ndarray:
    """(H, W, 3) uint8 image with each result's grounding mask tinted and outlined (one colour per question)."""
    from ..visualize import overlay_masks

    masks = [r["mask"] if r["mask"] is not None else np.zeros(image.shape[:2], bool) for r in results]
    return overlay_masks(image, masks, alpha=0.4)


__all__ = ["answer", "answer_masks_overlay", "results_from_output"]
