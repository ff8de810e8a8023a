"""``query-mask``: a decoder whose cost per prompt stays small, so many prompts per image are cheap to train and run.

Per image (once, whatever the number of prompts): the encoder layers are fused into a patch map and a pixel decoder
upsamples it with a light convolutional branch on the raw image to per-pixel embeddings at 1/2 resolution.
Per prompt: text tokens and patch tokens attend to each other (token-level fusion at the patch grid), giving a
prompt query and a prompt-conditioned patch map. The mask is the coarse prompt map (where: which tile, which
instance) plus the dot product of the query with the fine per-pixel embeddings (what: thin vessels, membranes,
boundaries), as in MaskFormer / SAM's mask heads. With ``skips`` (an encoder that gives finer maps, such as a
``timm-cnn`` trunk) the pixel decoder also adds the encoder's stride-8/4/2 maps as skip connections, as a U-Net does.

Shapes: image tokens (B, N, C) per layer; text (B * K) prompts; pixel embeddings (B, E, H/2, W/2); logits
(B * K, H, W).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from ..features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures
from . import DECODERS
from .base import PRESENCE_HEADS, DecoderOutput, TokenFusionDecoder, token_decoder_from_config
from .blocks import ConvNormAct, repeat_k, resize_to, tokens_to_map
from .cross_attn import BiCrossAttention, HighResBranch


@DECODERS.register("query-mask")
class QueryMaskDecoder(TokenFusionDecoder):
    """Args (keyword-only):
        vision_width, text_width, text_dim, patch_size, layers, dim: as ``TokenFusionDecoder``.  heads: attention heads.
        fusion_layers: text <-> patch cross-attention layers.  embed_dim: E, the per-pixel embedding width.
        high_res_channels: channels of the raw-image branch at 1/2 and 1/4.  presence: add a presence head.
        gate: the coarse prompt map gates the fine term (``coarse + sigmoid(coarse) * fine``), so fine detail only
            shows where the prompt points (no fine activations on the wrong tile or instance).
        skips: {stride: channels} of the encoder's fine maps to use as skip connections (strides 8, 4, 2 are
            used where present); in a config, ``"skips": true`` takes them from the encoder's info.
        presence_head: ``linear`` (default) or ``mlp`` (``TokenFusionDecoder.make_presence_head``; its evidence is
            the prompt map's peak: its maximum and the mean of its top 5% of cells).
    """

    OPTIONS = frozenset({"layers", "dim", "heads", "fusion_layers", "embed_dim", "high_res_channels", "gate",
                         "skips", "presence_head"})

    def __init__(self, *, vision_width: int, text_width: int, text_dim: int, patch_size: int,
                 layers: tuple[int, ...], dim: int = 96, heads: int = 4, fusion_layers: int = 2, embed_dim: int = 32,
                 high_res_channels: tuple[int, int] = (16, 32), presence: bool = True, gate: bool = False,
                 skips: dict[int, int] | None = None, presence_head: str = "linear"):
        super().__init__(vision_width=vision_width, text_width=text_width, text_dim=text_dim, patch_size=patch_size,
                         layers=layers, dim=dim)
        self.gate = gate
        self.fuse = nn.ModuleList(BiCrossAttention(dim, heads) for _ in range(fusion_layers))
        c1, c2 = high_res_channels
        self.high_res = HighResBranch(c1, c2)
        self.up8 = ConvNormAct(dim, dim)
        self.up4 = ConvNormAct(dim + c2, dim // 2)
        self.up2 = ConvNormAct(dim // 2 + c1, embed_dim)
        self.coarse = nn.Linear(dim, dim)  # prompt map channels scored by the query
        self.fine = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, embed_dim))
        self.bias = nn.Parameter(torch.zeros(1))
        if presence_head not in PRESENCE_HEADS:
            raise ValueError(f"query-mask option presence_head must be one of {PRESENCE_HEADS}, got {presence_head!r}")
        self.presence_kind = presence_head
        self.presence_head = self.make_presence_head(dim, presence_head, evidence=2) if presence else None
        self.fine_strides = tuple(skips or {})  # every fine map the encoder gives, in its order (finest first)
        skips = {s: c for s, c in (skips or {}).items() if s in (2, 4, 8)}
        self.skip_strides = tuple(sorted(skips))  # the fine maps read, by stride
        width = {8: dim, 4: c2, 2: c1}  # a skip is projected to the width of the path it joins
        self.skip = nn.ModuleDict({str(s): nn.Conv2d(skips[s], width[s], 1) for s in self.skip_strides})
        self.mix8 = ConvNormAct(dim, dim) if 8 in skips else None

    @classmethod
    def from_config(cls, options: dict[str, Any], image_info: ImageEncoderInfo, text_info: TextEncoderInfo,
                    presence: bool) -> Any:
        opts = dict(options)
        if opts.pop("skips", False):
            if not image_info.fine_strides:
                raise ValueError("query-mask option 'skips' needs an image encoder that gives finer maps (a "
                                 "timm-cnn trunk); this one gives tokens only")
            opts["skips"] = dict(zip(image_info.fine_strides, image_info.fine_channels))
        return token_decoder_from_config(cls, opts, set(cls.OPTIONS), image_info, text_info, presence)

    def pixel_embeddings(self, patches: Tensor, grid: tuple[int, int], pixel_values: Tensor,
                         fine: dict[int, Tensor] | None = None) -> Tensor:
        """Per image: (B, N, d) fused patch tokens + (B, 3, H, W) [+ skip maps (B, C_s, H/s, W/s) by stride s]
        -> (B, E, H/2, W/2) pixel embeddings."""
        fine = fine or {}
        x = self.up8(tokens_to_map(patches, grid))
        if self.mix8 is not None:
            f8 = fine[8]
            x = self.mix8(resize_to(x, (f8.shape[-2], f8.shape[-1])) + self.skip["8"](f8))
        hr2, hr4 = self.high_res(pixel_values)
        if 4 in self.skip_strides:
            hr4 = hr4 + self.skip["4"](resize_to(fine[4], (hr4.shape[-2], hr4.shape[-1])))
        if 2 in self.skip_strides:
            hr2 = hr2 + self.skip["2"](resize_to(fine[2], (hr2.shape[-2], hr2.shape[-1])))
        x = self.up4(torch.cat([resize_to(x, (hr4.shape[-2], hr4.shape[-1])), hr4], 1))
        return self.up2(torch.cat([resize_to(x, (hr2.shape[-2], hr2.shape[-1])), hr2], 1))

    def skip_maps(self, image: ImageFeatures) -> dict[int, Tensor]:
        """The fine maps this decoder reads, by stride (an error naming the problem when the features lack them)."""
        if not self.skip_strides:
            return {}
        if len(image.fine) != len(self.fine_strides):
            raise ValueError(f"this query-mask decoder reads the image encoder's stride-{list(self.skip_strides)} "
                             f"maps as skip connections, but the image features carry {len(image.fine) or 'none'} "
                             f"of its {len(self.fine_strides)} fine maps (features from a cache keep only tokens)")
        return dict(zip(self.fine_strides, image.fine))

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int) -> DecoderOutput:
        """image: B images; text: B * K prompts -> logits (B * K, H, W), presence (B * K,)."""
        h, w = pixel_values.shape[-2], pixel_values.shape[-1]
        vis = torch.stack([proj(t) for proj, t in zip(self.vis_proj, image.layers)]).sum(0)  # (B, N, d) per image
        embed = self.pixel_embeddings(vis, image.grid, pixel_values, self.skip_maps(image))  # once per image
        pix = repeat_k(vis, k)  # (BK, N, d)
        txt = self.txt_proj(text.tokens)
        for fuse in self.fuse:
            pix, txt = fuse(pix, txt, text.mask)
        query = self.prompt_query(txt, text)  # (BK, d)
        b = image.batch_size
        coarse = torch.einsum("bnc,bc->bn", self.coarse(pix), query) / math.sqrt(query.shape[-1])
        evidence = None
        if self.presence_kind == "mlp":  # the prompt map's peak: its maximum, the mean of its top 5%
            top = coarse.topk(max(1, coarse.shape[1] // 20), dim=1).values
            evidence = torch.stack([top[:, 0], top.mean(1)], -1)
        coarse = coarse.reshape(b * k, 1, *image.grid)
        fine = torch.einsum("bchw,bkc->bkhw", embed, self.fine(query).reshape(b, k, -1)).reshape(b * k, 1, *embed.shape[-2:])
        coarse = resize_to(coarse, (fine.shape[-2], fine.shape[-1]))
        logits = coarse + (torch.sigmoid(coarse) * fine if self.gate else fine) + self.bias
        logits = resize_to(logits, (h, w))[:, 0]
        return DecoderOutput(logits=logits, presence=self.presence_logits(query, pix, evidence))
