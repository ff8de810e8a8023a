"""Image processor: (H, W, 3) uint8 arrays -> normalised pixel values, and logits back to the original size.

The resize matches transformers' torchvision image processors (uint8 resize with antialias, then fused
rescale + normalise), so a native family reproduces its upstream pipeline exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

_MODES = {0: "NEAREST", 2: "BILINEAR", 3: "BICUBIC"}


@dataclass(frozen=True)
class ImageProcessor:
    """Resize to ``size`` x ``size`` (aspect not kept, as CLIPSeg and medvlsm do), rescale 1/255, normalise.

    Attributes:
        size: output side.  mean, std: per channel.  resample: PIL code (0 nearest, 2 bilinear, 3 bicubic).
    """

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = 2

    def __call__(self, images: Sequence[np.ndarray], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> Tensor:
        """List of (H, W, 3) uint8 -> (B, 3, size, size) pixel values on ``device``."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms.v2 import functional as tvF

        mode = InterpolationMode[_MODES.get(self.resample, "BILINEAR")]
        out = []
        for arr in images:
            if not arr.flags.writeable:
                arr = arr.copy()
            t = torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W) uint8, no copy
            if tuple(t.shape[-2:]) != (self.size, self.size):
                t = tvF.resize(t, [self.size, self.size], interpolation=mode, antialias=True)
            out.append(t)
        x = torch.stack(out).to(device=device, dtype=torch.float32)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1) * 255.0
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1) * 255.0
        return ((x - mean) / std).to(dtype)

    def masks(self, masks: Sequence[np.ndarray], device: torch.device | str = "cpu") -> Tensor:
        """List of (H, W) bool masks -> (B, size, size) float targets with the images' geometry (nearest)."""
        out = []
        for m in masks:
            m = np.asarray(m, dtype=np.uint8)
            t = torch.from_numpy(np.ascontiguousarray(m))[None, None].float()
            if tuple(t.shape[-2:]) != (self.size, self.size):
                t = F.interpolate(t, size=(self.size, self.size), mode="nearest-exact")
            out.append(t[0, 0])
        return torch.stack(out).to(device)

    def postprocess(self, maps: Tensor, size: tuple[int, int]) -> Tensor:
        """(K, h, w) maps (probabilities) -> (K, H, W) at the original image size (bilinear)."""
        full = (int(size[0]), int(size[1]))
        if tuple(maps.shape[-2:]) != full:
            maps = F.interpolate(maps.unsqueeze(0).float(), size=full, mode="bilinear", align_corners=False)[0]
        return maps
