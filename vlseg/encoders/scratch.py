"""A small from-scratch image trunk (conv stem + transformer blocks), trainable, for users without pretrained image
weights and for offline CPU work. Same token contract as the pretrained ViTs."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..config import EncoderConfig
from . import ENCODERS
from ..features import IMAGENET_MEAN, IMAGENET_STD, ImageEncoderInfo, ImageFeatures
from .base import EncoderPair, ImageEncoder, check_options, run_blocks


class ConvStem(nn.Module):
    """(B, 3, H, W) -> (B, C, H / p, W / p) with log2(p) stride-2 conv stages (a better inductive bias than one
    patchify conv when training from scratch on little data)."""

    def __init__(self, width: int, patch_size: int):
        super().__init__()
        stages = int(math.log2(patch_size))
        if 2**stages != patch_size:
            raise ValueError(f"scratch encoder patch_size must be a power of two, got {patch_size}")
        chans = [3] + [max(width // 2 ** (stages - i), 16) for i in range(1, stages)] + [width]
        layers: list[nn.Module] = []
        for i in range(stages):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.GELU()]
        self.net = nn.Sequential(*layers[:-1])  # no activation after the last stage

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class Block(nn.Module):
    """Pre-norm transformer block with plain Linear layers (``qkv``, ``proj``, ``fc1``, ``fc2``), so LoRA wrappers
    are honoured in every mode (``nn.TransformerEncoderLayer``'s inference fast path reads weights directly).

    x: (B, N, C) -> (B, N, C).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        a = nn.functional.scaled_dot_product_attention(q, k, v)  # (B, heads, N, c / heads)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ScratchImageEncoder(ImageEncoder):
    """Conv stem + ``depth`` pre-norm transformer blocks on the patch grid (no prefix tokens)."""

    def __init__(self, *, width: int = 192, depth: int = 4, heads: int = 3, patch_size: int = 16,
                 image_size: int = 224, mlp_ratio: float = 4.0):
        super().__init__()
        self.backbone = nn.Module()
        self.backbone.stem = ConvStem(width, patch_size)
        g = image_size // patch_size
        self.backbone.pos = nn.Parameter(torch.randn(1, width, g, g) * 0.02)
        self.backbone.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(depth))
        self.backbone.norm = nn.LayerNorm(width)
        self.info = ImageEncoderInfo(
            width=width, num_layers=depth, patch_size=patch_size, image_size=image_size, embed_dim=width,
            num_prefix_tokens=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=2,
            lora_targets=("qkv", "proj", "fc1", "fc2"),
        )

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.blocks

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures; see ImageEncoder.forward."""
        b = self.backbone
        x = b.stem(pixel_values)
        gh, gw = x.shape[-2:]
        pos = b.pos if b.pos.shape[-2:] == (gh, gw) else nn.functional.interpolate(
            b.pos, size=(gh, gw), mode="bicubic", align_corners=False)
        x = (x + pos).flatten(2).transpose(1, 2)  # (B, N, C)
        run_to = list(layers) + ([len(b.blocks) - 1] if pooled else [])
        outs = run_blocks(b.blocks, x, run_to, lambda blk, h: blk(h))
        pooled_t = b.norm(outs.pop()).mean(1) if pooled else None
        return ImageFeatures(tokens=outs, grid=(gh, gw), num_prefix_tokens=0, pooled=pooled_t,
                             image_size=(pixel_values.shape[-2], pixel_values.shape[-1]))


@ENCODERS.register("scratch")
def build_scratch(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    check_options(cfg, {"width", "depth", "heads", "patch_size", "image_size", "mlp_ratio"})
    return EncoderPair(image=ScratchImageEncoder(**cfg.options))
