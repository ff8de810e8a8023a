"""``film``: a CLIPSeg-style decoder. Chosen layers are reduced to a small width, the first (deepest) one is
FiLM-conditioned on the pooled prompt embedding, light transformer blocks mix tokens, and a refined transposed-conv
stack upsamples by the patch size."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures
from . import DECODERS
from .base import DecoderOutput, FusionDecoder, check_options
from .blocks import FiLM, repeat_k, resize_to, tokens_to_map, upsample_logits


@DECODERS.register("film")
class FiLMDecoder(FusionDecoder):
    """Args (keyword-only):
        vision_width: C of the image tokens.   text_dim: D of the pooled prompt embedding.
        patch_size: p.                         layers: encoder blocks to read (e.g. (3, 6, 9)).
        reduce_dim: R, the decoder width.      heads, mlp_dim: transformer block sizes.
        refine: CLIPSeg's refined upsampling.  presence: add a presence head.
    Shapes: see ``FusionDecoder.forward``; internally tokens are (B * K, N, R).
    """

    def __init__(self, *, vision_width: int, text_dim: int, patch_size: int, layers: tuple[int, ...],
                 reduce_dim: int = 64, heads: int = 4, mlp_dim: int | None = None, refine: bool = True,
                 presence: bool = True):
        super().__init__()
        self.layers = tuple(layers)
        self.patch_size = patch_size
        self.reduces = nn.ModuleList(nn.Linear(vision_width, reduce_dim) for _ in self.layers)
        self.film = FiLM(text_dim, reduce_dim)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(reduce_dim, heads, mlp_dim or 4 * reduce_dim, dropout=0.0,
                                       activation="relu", batch_first=True)
            for _ in self.layers
        )
        self.upsample = upsample_logits(patch_size, reduce_dim, refine)
        self.presence_head = nn.Sequential(nn.LayerNorm(reduce_dim), nn.Linear(reduce_dim, 1)) if presence else None

    @classmethod
    def from_config(cls, options: dict[str, Any], image_info: ImageEncoderInfo, text_info: TextEncoderInfo,
                    presence: bool) -> FiLMDecoder:
        check_options(cls, options, {"layers", "reduce_dim", "heads", "mlp_dim", "refine"})
        opts = dict(options)
        layers = image_info.resolve_layers(opts.pop("layers", None))
        return cls(vision_width=image_info.width, text_dim=text_info.embed_dim, patch_size=image_info.patch_size,
                   layers=layers, presence=presence, **opts)

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int) -> DecoderOutput:
        """image: B images; text: B * K prompts -> logits (B * K, H, W), presence (B * K,)."""
        # Reduce per image (cheap, before repeating for the K prompts), deepest layer first as in CLIPSeg.
        reduced = [red(t) for red, t in zip(self.reduces, image.layers)][::-1]
        out = None
        for i, (r, block) in enumerate(zip(reduced, self.blocks)):
            r = repeat_k(r, k)
            out = r if out is None else out + r
            if i == 0:
                out = self.film(out, text.pooled)
            out = block(out)
        assert out is not None  # layers is never empty
        maps = tokens_to_map(out, image.grid)
        logits = resize_to(self.upsample(maps), (pixel_values.shape[-2], pixel_values.shape[-1]))[:, 0]
        presence = self.presence_head(out.mean(1))[:, 0] if self.presence_head is not None else None
        return DecoderOutput(logits=logits, presence=presence)
