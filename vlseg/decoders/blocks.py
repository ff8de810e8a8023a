"""Shared decoder blocks."""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F


class FiLM(nn.Module):
    """Feature-wise linear modulation: x * (1 + gamma(c)) + beta(c).

    x: (B, ..., C) with ``channel_last`` or (B, C, H, W); c: (B, D).
    """

    def __init__(self, cond_dim: int, channels: int, channel_last: bool = True):
        super().__init__()
        self.mul = nn.Linear(cond_dim, channels)
        self.add = nn.Linear(cond_dim, channels)
        self.channel_last = channel_last

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        g, b = self.mul(cond), self.add(cond)
        if self.channel_last:
            shape = (cond.shape[0],) + (1,) * (x.dim() - 2) + (-1,)
        else:
            shape = (cond.shape[0], -1) + (1,) * (x.dim() - 2)
        return x * g.view(shape) + b.view(shape)


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 8):
        super().__init__(
            nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
            nn.GroupNorm(math.gcd(groups, cout), cout),
            nn.GELU(),
        )


def upsample_logits(patch_size: int, dim: int, refine: bool) -> nn.Module:
    """Transposed-conv upsampling by ``patch_size`` from (B, dim, gh, gw) to (B, 1, gh * p, gw * p).

    ``refine``: CLIPSeg's "complex" variant, conv3x3 then two transposed convs (p/4 then 4, or sqrt splits).
    """
    if not refine:
        return nn.ConvTranspose2d(dim, 1, patch_size, stride=patch_size)
    a = patch_size // 4 if patch_size % 4 == 0 and patch_size >= 4 else 1
    b = patch_size // a
    return nn.Sequential(
        nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(),
        nn.ConvTranspose2d(dim, max(dim // 2, 1), a, stride=a), nn.ReLU(),
        nn.ConvTranspose2d(max(dim // 2, 1), 1, b, stride=b),
    )


def resize_to(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of (B, C, h, w) to ``size`` (no-op if equal)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def tokens_to_map(x: Tensor, grid: tuple[int, int]) -> Tensor:
    """(B, N, C) -> (B, C, gh, gw)."""
    b, n, c = x.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"{n} tokens do not fill a {grid[0]}x{grid[1]} grid")
    return x.transpose(1, 2).reshape(b, c, grid[0], grid[1])


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """(B, L, C), (B, L) bool -> (B, C)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


def repeat_k(x: Tensor, k: int) -> Tensor:
    return x if k == 1 else x.repeat_interleave(k, dim=0)


__all__ = ["FiLM", "ConvNormAct", "upsample_logits", "resize_to", "tokens_to_map", "masked_mean", "repeat_k"]
