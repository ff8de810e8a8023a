"""Decoder base class and output. Decoders know only the feature dataclasses (vlseg/features.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures
from .blocks import masked_mean


PRESENCE_HEADS = ("linear", "mlp")


@dataclass
class DecoderOutput:
    """Attributes:
    logits: (B * K, H, W) mask logits at the pixel-value size (image b's prompts are rows b*K .. b*K+K-1).
    presence: (B * K,) logit that the prompted structure is present, or None.
    """

    logits: Tensor
    presence: Tensor | None = None


class FusionDecoder(nn.Module):
    """Joins image features (B images) with text features (B * K prompts) into mask logits.

    Subclasses set ``layers`` (the encoder blocks they read, so the encoder stops after the deepest) and implement
    ``forward``. Per-image work (token projections, the high-resolution branch) is done once per image, before the
    features are repeated for the K prompts.
    """

    layers: tuple[int, ...]

    @classmethod
    def from_config(cls, options: dict[str, Any], image_info: ImageEncoderInfo, text_info: TextEncoderInfo,
                    presence: bool) -> FusionDecoder:
        raise NotImplementedError

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int) -> DecoderOutput:
        """Args:
            image: features of B images (tokens (B, P + N, C) per layer, in ``self.layers`` order).
            text: features of B * K prompts, grouped by image.
            pixel_values: (B, 3, H, W) the encoder's input (used by high-resolution branches).
            k: prompts per image.
        Returns:
            DecoderOutput with logits (B * K, H, W).
        """
        raise NotImplementedError


def check_options(cls: type, options: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(options) - allowed
    if unknown:
        raise ValueError(f"Unknown option(s) {sorted(unknown)} for decoder {cls.__name__}; valid: {sorted(allowed)}")


def token_decoder_from_config(cls: Any, options: dict[str, Any], allowed: set[str], image_info: ImageEncoderInfo,
                              text_info: TextEncoderInfo, presence: bool) -> Any:
    """``from_config`` of decoders that read image tokens and text token states (cross-attn, query-mask): options
    checked against ``allowed``, layers resolved, widths taken from the encoder infos."""
    check_options(cls, options, allowed)
    opts = dict(options)
    layers = image_info.resolve_layers(opts.pop("layers", None))
    if "high_res_channels" in opts:
        opts["high_res_channels"] = tuple(opts["high_res_channels"])
    return cls(vision_width=image_info.width, text_width=text_info.width, text_dim=text_info.embed_dim,
               patch_size=image_info.patch_size, layers=layers, presence=presence, **opts)


class TokenFusionDecoder(FusionDecoder):
    """Decoders that fuse per-layer image tokens with text token states (cross-attn, query-mask). What they share:
    the input projections (``vis_proj`` per layer, ``txt_proj``, ``pool_proj``), the prompt query, the presence
    head and ``from_config`` (subclasses list their options in ``OPTIONS``).

    Args (keyword-only): vision_width: C.  text_width: Dt.  text_dim: D (pooled).  patch_size: p.
        layers: encoder blocks read, shallow to deep.  dim: decoder width d.
    """

    OPTIONS: frozenset[str] = frozenset()

    def __init__(self, *, vision_width: int, text_width: int, text_dim: int, patch_size: int,
                 layers: tuple[int, ...], dim: int):
        super().__init__()
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.vis_proj = nn.ModuleList(nn.Sequential(nn.LayerNorm(vision_width), nn.Linear(vision_width, dim))
                                      for _ in self.layers)
        self.txt_proj = nn.Linear(text_width, dim)
        self.pool_proj = nn.Linear(text_dim, dim)
        self.presence_head: nn.Module | None = None
        self.presence_kind = "linear"

    @classmethod
    def from_config(cls, options: dict[str, Any], image_info: ImageEncoderInfo, text_info: TextEncoderInfo,
                    presence: bool) -> Any:
        return token_decoder_from_config(cls, options, set(cls.OPTIONS), image_info, text_info, presence)

    @staticmethod
    def make_presence_head(dim: int, kind: str = "linear", evidence: int = 0) -> nn.Module:
        """``linear``: scores [prompt query, mean fused patch token] (2d) -> one presence logit. ``mlp``: an MLP on
        [query, mean and max fused patch token, query * mean token] (4d) plus ``evidence`` scalars the decoder adds
        (query-mask: the peak of its prompt map), so presence can depend on how query and image interact."""
        if kind == "linear":
            return nn.Sequential(nn.LayerNorm(2 * dim), nn.Linear(2 * dim, 1))
        if kind == "mlp":
            return nn.Sequential(nn.LayerNorm(4 * dim + evidence), nn.Linear(4 * dim + evidence, dim), nn.GELU(),
                                 nn.Linear(dim, 1))
        raise ValueError(f"presence_head must be one of {PRESENCE_HEADS}, got {kind!r}")

    def prompt_query(self, txt: Tensor, text: TextFeatures) -> Tensor:
        """(BK, L, d) fused text tokens -> (BK, d): their masked mean plus the projected pooled embedding."""
        return masked_mean(txt, text.mask) + self.pool_proj(text.pooled)

    def presence_logits(self, query: Tensor, pix: Tensor, evidence: Tensor | None = None) -> Tensor | None:
        """(BK, d) query, (BK, N, d) fused patch tokens [, (BK, e) evidence scalars for the ``mlp`` head] -> (BK,)
        presence logits, or None without a head."""
        if self.presence_head is None:
            return None
        mean = pix.mean(1)
        if self.presence_kind == "linear":
            return self.presence_head(torch.cat([query, mean], -1))[:, 0]
        parts = [query, mean, pix.amax(1), query * mean] + ([evidence] if evidence is not None else [])
        return self.presence_head(torch.cat(parts, -1))[:, 0]
