"""The encoder contract (STYLE P1). Decoders see only these dataclasses, never open_clip/transformers types.

Dimension glossary (used in every docstring of vlseg):
    B  images in a batch             K  prompts per image          L  text tokens
    T  image tokens incl. prefix     N  patch tokens = gh * gw     P  prefix tokens (CLS, ...)
    C  image token width             Dt text token width           D  joint (pooled) embedding width
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

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
    """

    tokens: list[Tensor]
    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    pooled: Tensor | None = None
    image_size: tuple[int, int] = (0, 0)

    @property
    def layers(self) -> list[Tensor]:
        """Patch tokens only, each (B, N, C)."""
        p = self.num_prefix_tokens
        return [t[:, p:] for t in self.tokens] if p else list(self.tokens)

    @property
    def batch_size(self) -> int:
        return self.tokens[0].shape[0]

    def map(self, fn) -> ImageFeatures:  # type: ignore[no-untyped-def]
        """Apply ``fn`` to every tensor (tokens and pooled)."""
        return replace(
            self,
            tokens=[fn(t) for t in self.tokens],
            pooled=None if self.pooled is None else fn(self.pooled),
        )

    def repeat_interleave(self, k: int) -> ImageFeatures:
        """(B, ...) -> (B * K, ...): each image repeated for its K prompts (a view-free but cheap copy)."""
        return self if k == 1 else self.map(lambda t: t.repeat_interleave(k, dim=0))


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


class ImageEncoder(nn.Module):
    """Base class of image encoders.

    Subclasses set ``info`` and ``backbone`` (where LoRA goes) and implement ``forward``. A frozen encoder freezes
    every parameter except LoRA and those under ``trainable_prefixes``.
    """

    info: ImageEncoderInfo
    backbone: nn.Module
    #: parameter-name prefixes (within this module) that stay trainable when the encoder is frozen
    trainable_prefixes: tuple[str, ...] = ()

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """Encode images.

        Args:
            pixel_values: (B, 3, H, W) normalised images; H and W multiples of ``info.patch_size``.
            layers: block indices to return (counted from 0); blocks past the deepest one are not run
                unless ``pooled`` is requested.
            pooled: also compute the pooled embedding (runs the whole encoder).
        Returns:
            ImageFeatures with one (B, P + N, C) tensor per requested layer.
        """
        raise NotImplementedError

    def set_image_size(self, size: int) -> None:
        """Prepare the encoder for square inputs of side ``size`` (e.g. resample fixed position embeddings).
        Encoders that interpolate position embeddings on the fly need nothing."""
        if size % self.info.patch_size:
            raise ValueError(f"image size {size} must be a multiple of the patch size {self.info.patch_size}")
        self.info = replace(self.info, image_size=size)


class TextEncoder(nn.Module):
    """Base class of text encoders. Subclasses set ``info`` and ``backbone`` and implement both methods."""

    info: TextEncoderInfo
    backbone: nn.Module
    #: parameter-name prefixes (within this module) that stay trainable when the encoder is frozen
    trainable_prefixes: tuple[str, ...] = ()

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Strings -> {"input_ids": (K, L) long, "attention_mask": (K, L) long}."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) ids and mask -> TextFeatures with tokens (K, L, Dt), mask (K, L), pooled (K, D)."""
        raise NotImplementedError


@dataclass
class EncoderPair:
    """What an encoder builder returns: either part may be None (a builder may provide only one tower)."""

    image: ImageEncoder | None = None
    text: TextEncoder | None = None
    extras: dict[str, object] = field(default_factory=dict)


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, layers: Sequence[int], call) -> list[Tensor]:  # type: ignore[no-untyped-def]
    """Run ``blocks`` in order, stopping after the deepest requested layer; return the requested outputs.

    ``call(block, x)`` runs one block (backends differ in block signatures).
    """
    want = set(layers)
    last = max(layers)
    outs: dict[int, Tensor] = {}
    for i, blk in enumerate(blocks):
        if i > last:
            break
        x = call(blk, x)
        if i in want:
            outs[i] = x
    return [outs[i] for i in layers]
