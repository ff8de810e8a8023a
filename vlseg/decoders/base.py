"""Decoder base class and output. Decoders know only the feature dataclasses (vlseg/features.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures


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
