"""``query-mask``: a decoder whose cost per prompt stays small, so many prompts per image are cheap to train and run.

Per image (once, whatever the number of prompts): the encoder layers are fused into a patch map and a pixel decoder
upsamples it with a light convolutional branch on the raw image to per-pixel embeddings at 1/2 resolution.
Per prompt: text tokens and patch tokens attend to each other (token-level fusion at the patch grid), giving a
prompt query and a prompt-conditioned patch map. The mask is the coarse prompt map (where: which tile, which
instance) plus the dot product of the query with the fine per-pixel embeddings (what: thin vessels, membranes,
boundaries), as in MaskFormer / SAM's mask heads.

Shapes: image tokens (B, N, C) per layer; text (B * K) prompts; pixel embeddings (B, E, H/2, W/2); logits
(B * K, H, W).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..features import ImageFeatures, TextFeatures
from . import DECODERS
from .base import DecoderOutput, TokenFusionDecoder
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
    """

    OPTIONS = frozenset({"layers", "dim", "heads", "fusion_layers", "embed_dim", "high_res_channels", "gate"})

    def __init__(self, *, vision_width: int, text_width: int, text_dim: int, patch_size: int,
                 layers: tuple[int, ...], dim: int = 96, heads: int = 4, fusion_layers: int = 2, embed_dim: int = 32,
                 high_res_channels: tuple[int, int] = (16, 32), presence: bool = True, gate: bool = False):
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
        self.presence_head = self.make_presence_head(dim) if presence else None

    def pixel_embeddings(self, patches: Tensor, grid: tuple[int, int], pixel_values: Tensor) -> Tensor:
        """Per image: (B, N, d) fused patch tokens + (B, 3, H, W) -> (B, E, H/2, W/2) pixel embeddings."""
        x = self.up8(tokens_to_map(patches, grid))
        hr2, hr4 = self.high_res(pixel_values)
        x = self.up4(torch.cat([resize_to(x, (hr4.shape[-2], hr4.shape[-1])), hr4], 1))
        return self.up2(torch.cat([resize_to(x, (hr2.shape[-2], hr2.shape[-1])), hr2], 1))

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int) -> DecoderOutput:
        """image: B images; text: B * K prompts -> logits (B * K, H, W), presence (B * K,)."""
        h, w = pixel_values.shape[-2], pixel_values.shape[-1]
        vis = torch.stack([proj(t) for proj, t in zip(self.vis_proj, image.layers)]).sum(0)  # (B, N, d) per image
        embed = self.pixel_embeddings(vis, image.grid, pixel_values)  # (B, E, H/2, W/2), once per image
        pix = repeat_k(vis, k)  # (BK, N, d)
        txt = self.txt_proj(text.tokens)
        for fuse in self.fuse:
            pix, txt = fuse(pix, txt, text.mask)
        query = self.prompt_query(txt, text)  # (BK, d)
        b = image.batch_size
        coarse = torch.einsum("bnc,bc->bn", self.coarse(pix), query) / math.sqrt(query.shape[-1])
        coarse = coarse.reshape(b * k, 1, *image.grid)
        fine = torch.einsum("bchw,bkc->bkhw", embed, self.fine(query).reshape(b, k, -1)).reshape(b * k, 1, *embed.shape[-2:])
        coarse = resize_to(coarse, (fine.shape[-2], fine.shape[-1]))
        logits = coarse + (torch.sigmoid(coarse) * fine if self.gate else fine) + self.bias
        logits = resize_to(logits, (h, w))[:, 0]
        return DecoderOutput(logits=logits, presence=self.presence_logits(query, pix))
