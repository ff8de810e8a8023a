"""Paired image/mask augmentation with torchvision v2 (masks stay aligned; nearest for masks), with prompt
position words kept true under flips. Resizing to the model's input, normalising with the encoder's mean/std and
mapping back to the original size is the model's ``processor`` (vlseg/processing.py)."""

from __future__ import annotations

import random
from dataclasses import replace

import numpy as np
import torch

from ..prompts import flip_prompt
from .schema import Sample


class PairedAugment:
    """Random flips, affine (rotation, scale, translation) and colour jitter applied to a Sample.

    Flips are applied to image and mask together and rewrite position words in the prompts ("left" <-> "right");
    rotation/scale/translation are small by default so computed position prompts stay true (regenerate prompts
    from the augmented mask when in doubt: ``vlseg.prompts.generate``). Reproducible with ``seed``.

    Args:
        hflip, vflip: flip probabilities.
        degrees, translate, scale: RandomAffine ranges (0 / None disable).
        brightness, contrast, saturation: ColorJitter strengths (image only).
    """

    def __init__(self, hflip: float = 0.5, vflip: float = 0.0, degrees: float = 10.0, translate: float = 0.05,
                 scale: tuple[float, float] | None = (0.9, 1.1), brightness: float = 0.2, contrast: float = 0.2,
                 saturation: float = 0.1, seed: int | None = None):
        from torchvision.transforms import v2

        self.hflip, self.vflip = hflip, vflip
        self.affine = (v2.RandomAffine(degrees=degrees, translate=(translate, translate) if translate else None,
                                       scale=scale) if (degrees or translate or scale) else None)
        self.color = (v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation)
                      if (brightness or contrast or saturation) else None)
        self.rng = random.Random(seed)

    def apply(self, image: np.ndarray, masks: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray],
                                                                           tuple[bool, bool]]:
        """One image and any number of its masks, transformed together.

        Args:
            image: (H, W, 3) uint8.  masks: name -> (H, W) bool.
        Returns:
            (image, masks, (hflipped, vflipped)).
        """
        from torchvision import tv_tensors

        h = self.rng.random() < self.hflip
        v = self.rng.random() < self.vflip
        names = list(masks)
        stack = np.stack([masks[n] for n in names]) if names else np.zeros((0,) + image.shape[:2], bool)
        if h:
            image, stack = image[:, ::-1], stack[:, :, ::-1]
        if v:
            image, stack = image[::-1], stack[:, ::-1]
        img_t = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        mask_t = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(stack)).to(torch.uint8))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.rng.randrange(2**31))
            if self.affine is not None:
                img_t, mask_t = self.affine(img_t, mask_t)
            if self.color is not None:
                img_t = self.color(img_t)
        out = mask_t.numpy().astype(bool)
        return img_t.permute(1, 2, 0).contiguous().numpy(), {n: out[i] for i, n in enumerate(names)}, (h, v)

    def __call__(self, sample: Sample) -> Sample:
        masks = {} if sample.mask is None else {"mask": sample.mask}
        image, out, (h, v) = self.apply(sample.image, masks)
        prompts = [flip_prompt(p, horizontal=h, vertical=v) for p in sample.prompts]
        meta = {**sample.meta, "flipped": (h, v)}
        return replace(sample, image=image, mask=out.get("mask"), prompts=prompts, meta=meta)
