"""Encoder base classes. Every backend's towers subclass these and produce the dataclasses of ``vlseg.features``
(the contract, and the dimension glossary)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn

from ..features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures


class _Encoder(nn.Module):
    """What image and text towers share: the LoRA host (``backbone``), the parameters that stay trainable when the
    tower is frozen, and gradient checkpointing as a declared capability."""

    #: where LoRA goes: an upstream module whose attributes are backend-specific (typed loosely on purpose)
    backbone: Any
    #: parameter-name prefixes (within this module) that stay trainable when the encoder is frozen
    trainable_prefixes: tuple[str, ...] = ()

    def blocks(self) -> Sequence[nn.Module]:
        """The repeated blocks whose activations gradient checkpointing recomputes (empty: not supported)."""
        return ()

    def set_gradient_checkpointing(self, enable: bool = True) -> bool:
        """Recompute each block's activations in backward instead of storing them (also in eval mode, so frozen
        towers carrying LoRA save memory too). Returns whether it is applied; a tower without blocks warns."""
        blocks = list(self.blocks())
        if not blocks:
            if enable:
                warnings.warn(f"{type(self).__name__} does not support gradient checkpointing; it is not applied",
                              stacklevel=2)
            return False
        for blk in blocks:
            set_block_checkpointing(blk, enable)
        return True


class ImageEncoder(_Encoder):
    """Base class of image encoders. Subclasses set ``info`` and ``backbone`` and implement ``forward``."""

    info: ImageEncoderInfo

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


class TextEncoder(_Encoder):
    """Base class of text encoders. Subclasses set ``info`` and ``backbone`` and implement both methods."""

    info: TextEncoderInfo

    def warn_truncated(self, texts: Sequence[str]) -> None:
        """Warn when a prompt is longer than ``info.max_length`` tokens (the tokenizer cuts it to fit). Only texts
        long enough to possibly exceed the limit are counted (a token covers at least one byte). Raises ValueError
        for text that is not valid Unicode (lone surrogates), which no tokenizer can encode."""
        from .tokenizers import count_tokens

        limit = self.info.max_length
        for i, t in enumerate(texts):
            try:
                n_bytes = len(t.encode("utf-8"))
            except UnicodeEncodeError as e:  # lone surrogates (e.g. from a bad decode): no tokenizer takes them
                raise ValueError(f"Prompt {t[:40]!r} is not valid Unicode text ({e.reason} at position "
                                 f"{e.start})") from e
            if n_bytes + 2 <= limit:
                continue
            n = count_tokens(getattr(self, "tokenizer", None), t)
            if n > limit:
                warnings.warn(f"A prompt is longer than the {limit} tokens this text encoder reads; it was truncated "
                              f"to its first {limit} tokens", stacklevel=3)
                return

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        """Strings -> {"input_ids": (K, L) long, "attention_mask": (K, L) long}, cut to ``info.max_length``."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) ids and mask -> TextFeatures with tokens (K, L, Dt), mask (K, L), pooled (K, D)."""
        raise NotImplementedError

    def encode_frozen(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """The part of ``forward`` that stays fixed while the tower is frozen (everything but ``project``), so
        training can cache it per prompt. ``forward == project(encode_frozen(...))``."""
        return self.forward(input_ids, attention_mask)

    def project(self, features: TextFeatures) -> TextFeatures:
        """The trainable head applied after ``encode_frozen`` (identity unless a tower has one)."""
        return features


def check_options(cfg: Any, allowed: set[str]) -> None:
    """Refuse backend options the backend does not know (typos would otherwise be ignored)."""
    unknown = set(cfg.options) - allowed
    if unknown:
        raise ValueError(f"Unknown {cfg.type} encoder option(s) {sorted(unknown)}; valid: {sorted(allowed)}")


@dataclass
class EncoderPair:
    """What an encoder builder returns: either part may be None (a builder may provide only one tower)."""

    image: ImageEncoder | None = None
    text: TextEncoder | None = None


def run_blocks(blocks: Sequence[nn.Module], x: Tensor, layers: Sequence[int],
               call: Callable[[nn.Module, Tensor], Tensor]) -> list[Tensor]:
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


def set_block_checkpointing(block: nn.Module, enable: bool) -> None:
    """Make ``block`` recompute its activations in backward (torch.utils.checkpoint) whenever gradients are on.

    The block's own ``forward`` is wrapped on the instance, so parameter names (and checkpoints) do not change and
    every caller of the block (ours or the backend's own loop) gets it."""
    from torch.utils.checkpoint import checkpoint

    own = block.__dict__.get("forward")
    if not enable:
        if own is not None and hasattr(own, "__wrapped_forward__"):
            del block.forward
        return
    if own is not None and hasattr(own, "__wrapped_forward__"):
        return
    inner = block.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return checkpoint(inner, *args, use_reentrant=False, **kwargs)
        return inner(*args, **kwargs)

    forward.__wrapped_forward__ = inner  # type: ignore[attr-defined]
    block.forward = forward  # type: ignore[method-assign]


def is_checkpointing(block: nn.Module) -> bool:
    """Whether ``set_block_checkpointing`` is on for ``block``."""
    return hasattr(block.__dict__.get("forward"), "__wrapped_forward__")


__all__ = ["EncoderPair", "ImageEncoder", "ImageEncoderInfo", "ImageFeatures", "TextEncoder", "TextEncoderInfo",
           "TextFeatures", "check_options", "is_checkpointing", "run_blocks", "set_block_checkpointing"]
