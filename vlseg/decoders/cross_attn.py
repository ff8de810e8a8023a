"""``cross-attn``: multi-scale text <-> pixel cross-attention over token-level text states (CRIS / LSMS family),
a pixel decoder that fuses several encoder layers, and an optional light high-resolution convolutional branch on
the raw image (1/2 and 1/4 scale) so thin structures and boundaries are not blocky at the patch grid."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..features import ImageFeatures, TextFeatures
from . import DECODERS
from .base import DecoderOutput, TokenFusionDecoder
from .blocks import ConvNormAct, FiLM, repeat_k, resize_to, tokens_to_map


class BiCrossAttention(nn.Module):
    """Pixels attend to words, then words attend to pixels (both pre-norm, residual).

    pix: (B, N, d); txt: (B, L, d); txt_mask: (B, L) bool (True = real token).
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n1, self.n2, self.n3, self.n4 = (nn.LayerNorm(dim) for _ in range(4))
        self.p2t = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.t2p = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, pix: Tensor, txt: Tensor, txt_mask: Tensor) -> tuple[Tensor, Tensor]:
        q = self.n1(pix)
        kv = self.n2(txt)
        pix = pix + self.p2t(q, kv, kv, key_padding_mask=~txt_mask, need_weights=False)[0]
        pix = pix + self.mlp(self.n3(pix))
        kvp = self.n4(pix)
        txt = txt + self.t2p(self.n2(txt), kvp, kvp, need_weights=False)[0]
        return pix, txt


class HighResBranch(nn.Module):
    """(B, 3, H, W) -> features at 1/2 (B, c1, H/2, W/2) and 1/4 (B, c2, H/4, W/4)."""

    def __init__(self, c1: int = 16, c2: int = 32):
        super().__init__()
        self.s2 = nn.Sequential(ConvNormAct(3, c1, stride=2), ConvNormAct(c1, c1))
        self.s4 = nn.Sequential(ConvNormAct(c1, c2, stride=2), ConvNormAct(c2, c2))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f2 = self.s2(x)
        return f2, self.s4(f2)


@DECODERS.register("cross-attn")
class CrossAttnDecoder(TokenFusionDecoder):
    """Args (keyword-only):
        vision_width, text_width, text_dim, patch_size, layers, dim: as ``TokenFusionDecoder``.  heads: attention heads.
        high_res: add the raw-image branch (1/2, 1/4).  presence: add a presence head.
    Output logits are predicted at 1/2 resolution as a dot product of pixel embeddings with the prompt query,
    then resized to (H, W).
    """

    OPTIONS = frozenset({"layers", "dim", "heads", "high_res", "high_res_channels"})

    def __init__(self, *, vision_width: int, text_width: int, text_dim: int, patch_size: int,
                 layers: tuple[int, ...], dim: int = 128, heads: int = 4, high_res: bool = True,
                 high_res_channels: tuple[int, int] = (16, 32), presence: bool = True):
        super().__init__(vision_width=vision_width, text_width=text_width, text_dim=text_dim, patch_size=patch_size,
                         layers=layers, dim=dim)
        self.fuse = nn.ModuleList(BiCrossAttention(dim, heads) for _ in self.layers)
        c1, c2 = high_res_channels if high_res else (0, 0)
        self.high_res = HighResBranch(c1, c2) if high_res else None
        d2, d4 = dim // 2, dim // 4
        self.up8 = ConvNormAct(dim, dim)
        self.up4 = ConvNormAct(dim + c2, d2)
        self.up2 = ConvNormAct(d2 + c1, d4)
        self.films = nn.ModuleList([FiLM(dim, dim, channel_last=False), FiLM(dim, d2, channel_last=False),
                                    FiLM(dim, d4, channel_last=False)])
        self.query = nn.Linear(dim, d4)
        self.bias = nn.Parameter(torch.zeros(1))
        self.presence_head = self.make_presence_head(dim) if presence else None

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int) -> DecoderOutput:
        """image: B images; text: B * K prompts -> logits (B * K, H, W), presence (B * K,)."""
        H, W = pixel_values.shape[-2:]
        vis = [proj(t) for proj, t in zip(self.vis_proj, image.layers)]  # per image: (B, N, d)
        txt = self.txt_proj(text.tokens)  # (BK, L, d)
        mask = text.mask
        pix = None
        for v, fuse in zip(vis[::-1], self.fuse):  # deep to shallow
            v = repeat_k(v, k)
            pix = v if pix is None else pix + v
            pix, txt = fuse(pix, txt, mask)
        assert pix is not None  # layers is never empty
        query = self.prompt_query(txt, text)  # (BK, d)
        x = tokens_to_map(pix, image.grid)  # (BK, d, gh, gw)
        size = lambda s: (math.ceil(H / s), math.ceil(W / s))  # noqa: E731
        x = self.films[0](self.up8(resize_to(x, size(8))), query)
        hr2 = hr4 = None
        if self.high_res is not None:
            hr2, hr4 = self.high_res(pixel_values)  # once per image
        x = resize_to(x, size(4) if hr4 is None else tuple(hr4.shape[-2:]))
        if hr4 is not None:
            x = torch.cat([x, repeat_k(hr4, k)], 1)
        x = self.films[1](self.up4(x), query)
        x = resize_to(x, size(2) if hr2 is None else tuple(hr2.shape[-2:]))
        if hr2 is not None:
            x = torch.cat([x, repeat_k(hr2, k)], 1)
        x = self.films[2](self.up2(x), query)  # (BK, d/4, H/2, W/2)
        q = self.query(query)
        logits = torch.einsum("bchw,bc->bhw", x, q) / math.sqrt(q.shape[-1]) + self.bias
        logits = resize_to(logits.unsqueeze(1), (H, W))[:, 0]
        return DecoderOutput(logits=logits, presence=self.presence_logits(query, pix))
