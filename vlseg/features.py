"""The feature contract (STYLE P1): what encoders produce and decoders, heads and caches consume. Decoders and
families import only this module, never an encoder backend.

Dimension glossary (used in every docstring of vlseg):
    B  images in a batch             K  prompts per image          L  text tokens
    T  image tokens incl. prefix     N  patch tokens = gh * gw     P  prefix tokens (CLS, ...)
    C  image token width             Dt text token width           D  joint (pooled) embedding width
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageEncoderInfo:
    """Static facts about an image encoder, in one vocabulary for every backend.

    Attributes:
        width: token width C.             num_layers: transformer blocks (layer indices count from 0).
        patch_size: pixels per token.     image_size: native input side.
        embed_dim: pooled embedding width D (0 if the encoder has none).
        num_prefix_tokens: P (1 for a CLS token, 0 for none).
        mean, std, resample: preprocessing (PIL resample code: 2 bilinear, 3 bicubic).
        lora_targets: default LoRA target module names for peft.
        default_layers: layers a decoder reads when its config does not say.
        fine_strides, fine_channels: the finer-than-token feature maps the encoder also gives (a CNN's early stages,
            stride s_i in pixels with C_i channels, finest first); empty for a ViT.
    """

    width: int
    num_layers: int
    patch_size: int
    image_size: int
    embed_dim: int = 0
    num_prefix_tokens: int = 1
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    resample: int = 3
    lora_targets: tuple[str, ...] = ()
    default_layers: tuple[int, ...] = ()
    fine_strides: tuple[int, ...] = ()
    fine_channels: tuple[int, ...] = ()

    def resolve_layers(self, layers: Sequence[int] | None) -> tuple[int, ...]:
        """Validate layer indices (negative = from the end); default: 3 evenly spaced layers."""
        if not layers:
            layers = self.default_layers or tuple(
                sorted({max(0, round(self.num_layers * f) - 1) for f in (1 / 3, 2 / 3, 1.0)})
            )
        out = []
        for i in layers:
            j = i + self.num_layers if i < 0 else i
            if not 0 <= j < self.num_layers:
                raise ValueError(f"Layer index {i} is out of range for an encoder with {self.num_layers} layers")
            out.append(j)
        return tuple(out)


@dataclass(frozen=True)
class TextEncoderInfo:
    """Static facts about a text encoder.

    Attributes:
        width: token-state width Dt.      embed_dim: pooled/projected width D.
        max_length: longest token sequence.
        lora_targets: default LoRA target module names for peft.
    """

    width: int
    embed_dim: int
    max_length: int = 77
    lora_targets: tuple[str, ...] = ()


@dataclass
class ImageFeatures:
    """Per-layer tokens of a batch of images.

    Attributes:
        tokens: one tensor per requested layer, each (B, P + N, C), prefix tokens first.
        grid: (gh, gw) with N = gh * gw.
        num_prefix_tokens: P.
        pooled: (B, D) pooled image embedding, or None when not requested.
        image_size: (H, W) of the pixel values that produced them.
        fine: the encoder's finer-than-token maps, each (B, C_i, H / s_i, W / s_i) as its ``ImageEncoderInfo``
            lists them (a CNN's early stages; decoders may use them as skip connections); empty for a ViT or
            when not requested.
    """

    tokens: list[Tensor]
    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    pooled: Tensor | None = None
    image_size: tuple[int, int] = (0, 0)
    fine: list[Tensor] = field(default_factory=list)

    @property
    def layers(self) -> list[Tensor]:
        """Patch tokens only, each (B, N, C)."""
        p = self.num_prefix_tokens
        return [t[:, p:] for t in self.tokens] if p else list(self.tokens)

    @property
    def batch_size(self) -> int:
        return self.tokens[0].shape[0]


@dataclass
class TextFeatures:
    """Encoded prompts.

    Attributes:
        tokens: (K, L, Dt) token states.
        mask: (K, L) bool, True where a token is real.
        pooled: (K, D) pooled/projected prompt embedding.
    """

    tokens: Tensor
    mask: Tensor
    pooled: Tensor

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def index(self, idx: Tensor | list[int]) -> TextFeatures:
        """Select prompts (e.g. expand unique prompts back to the requested order)."""
        idx_t = torch.as_tensor(idx, device=self.pooled.device, dtype=torch.long)
        return TextFeatures(self.tokens[idx_t], self.mask[idx_t], self.pooled[idx_t])

    @staticmethod
    def cat(items: Sequence[TextFeatures]) -> TextFeatures:
        """Concatenate along K, padding token states to the longest L."""
        length = max(t.tokens.shape[1] for t in items)
        toks, masks = [], []
        for t in items:
            pad = length - t.tokens.shape[1]
            toks.append(nn.functional.pad(t.tokens, (0, 0, 0, pad)))
            masks.append(nn.functional.pad(t.mask, (0, pad), value=False))
        return TextFeatures(torch.cat(toks), torch.cat(masks), torch.cat([t.pooled for t in items]))

    def trimmed(self) -> list[TextFeatures]:
        """Split into one TextFeatures per prompt, each cut to its own length (for caching)."""
        out = []
        for i in range(len(self)):
            n = max(int(self.mask[i].sum()), 1)
            last = int(self.mask[i].nonzero().max()) + 1 if self.mask[i].any() else n
            out.append(TextFeatures(self.tokens[i : i + 1, :last], self.mask[i : i + 1, :last], self.pooled[i : i + 1]))
        return out


@dataclass
class BoxPrompts:
    """Box prompts for families whose ``capabilities.boxes`` is True: one row per (image, prompt) pair, B * K rows
    grouped by image (image b's prompts are rows b*K .. b*K+K-1).

    Attributes:
        boxes: (R, N, 4) float, (x0, y0, x1, y1) normalised to [0, 1] by the image's width and height.
        labels: (R, N) long: 1 a positive box, 0 a negative box, -1 padding (a row of padding has no boxes).
    """

    boxes: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.boxes.dim() != 3 or self.boxes.shape[-1] != 4 or tuple(self.labels.shape) != tuple(self.boxes.shape[:2]):
            raise ValueError(f"BoxPrompts needs boxes (R, N, 4) and labels (R, N), got {tuple(self.boxes.shape)} and "
                             f"{tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def has_boxes(self) -> Tensor:
        """(R,) bool: rows with at least one box."""
        return (self.labels >= 0).any(-1)


@dataclass
class QueryOutputs:
    """Per-query predictions of families that detect instances (``capabilities.instances``, e.g. SAM 3): Q queries
    for each (image, prompt) pair; the semantic mask of a prompt is the union of its kept queries' masks.

    Attributes:
        mask_logits: (B, K, Q, h, w) instance mask logits at the family's mask resolution.
        boxes: (B, K, Q, 4) (x0, y0, x1, y1) normalised to [0, 1].
        scores: (B, K, Q) instance probabilities (the presence score included where the family has one).
        keep: (B, K, Q) bool, the queries kept as instances (score above the family's threshold).
        raw: family-specific tensors its training loss reads (SAM 3: ``pred_logits``, ``semantic_seg``, ...).
    """

    mask_logits: Tensor
    boxes: Tensor
    scores: Tensor
    keep: Tensor
    raw: dict[str, Tensor] = field(default_factory=dict)
