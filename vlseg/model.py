"""VLSegModel: image encoder + text encoder + fusion decoder, for every family.

Shapes (glossary in vlseg/features.py): pixel_values (B, 3, H, W); K prompts per image; logits (B, K, H, W);
presence (B, K). The image encoder runs once per image for all its K prompts, and only up to the deepest layer the
decoder reads; prompt embeddings are cached (LRU) at inference.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import checkpoint
from .config import LoraSpec, ModelConfig
from .decoders.base import FusionDecoder
from .encoders.base import ImageEncoder, TextEncoder
from .features import BoxPrompts, ImageFeatures, QueryOutputs, TextFeatures
from .lora import has_lora
from .processing import ImageProcessor

if TYPE_CHECKING:
    from .families.base import Family

Prompts = str | Sequence[str] | Sequence[Sequence[str]]


@dataclass
class SegOutput:
    """Attributes:
    logits: (B, K, H, W) mask logits at the pixel-value size (families that detect instances may give them at
        their mask resolution).
    presence: (B, K) presence logits, or None when the decoder has no presence head.
    instances: per-query predictions of families that detect instances (``capabilities.instances``), else None.
    """

    logits: Tensor
    presence: Tensor | None = None
    instances: QueryOutputs | None = None


def normalize_prompts(prompts: Prompts, batch_size: int, allow_empty: bool = False) -> tuple[list[str], int, bool]:
    """-> (flat list of B * K prompts grouped by image, K, shared).

    ``prompts`` is one string, K strings shared by the batch, or B lists of K strings each. Empty strings are
    rejected unless ``allow_empty`` (the p0 "no text" level used in training and ablations).
    """
    items: list[Any] = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError("No prompts given: pass at least one prompt string, e.g. ['polyp']")
    if all(isinstance(p, str) for p in items):
        _check_strings(items, allow_empty)
        return items * batch_size if batch_size > 1 else items, len(items), True
    prompts = items
    if not all(isinstance(p, (list, tuple)) for p in prompts):
        raise TypeError("prompts must be a string, a list of strings, or one list of strings per image")
    if len(prompts) != batch_size:
        raise ValueError(f"Got {len(prompts)} prompt lists for {batch_size} images; pass one list per image")
    ks = {len(p) for p in prompts}
    if len(ks) != 1 or 0 in ks:
        raise ValueError(f"Every image needs the same non-zero number of prompts, got {sorted(len(p) for p in prompts)}")
    flat = [s for p in prompts for s in p]
    _check_strings(flat, allow_empty)
    return flat, ks.pop(), False


def _check_strings(prompts: list[str], allow_empty: bool = False) -> None:
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise TypeError(f"Prompt {i} is a {type(p).__name__}, not a string")
        if not allow_empty and not p.strip():
            raise ValueError(f"Prompt {i} is empty; give a description such as 'polyp'")


class VLSegModel(nn.Module):
    """A text-prompted segmentation model.

    Args:
        config: the ModelConfig it was built from (saved with every checkpoint).
        image_encoder, text_encoder: modules following the encoder contract (encoders/base.py).
        decoder: a FusionDecoder (or a native family's decoder adapter).
        processor: the image processor matching the encoder (size, mean/std, resample).
        family: the Family that built it (decides what a checkpoint must bundle).
    """

    text_cache_size = 1024
    cache_frozen_prompts = False  # training: cache a frozen text tower's output per prompt (see encode_text)

    def __init__(self, config: ModelConfig, image_encoder: ImageEncoder, text_encoder: TextEncoder,
                 decoder: FusionDecoder, processor: ImageProcessor, *, family: Family):
        super().__init__()
        self.config = config
        self.family = family
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder
        self.decoder = decoder
        self.processor = processor
        self._text_cache: OrderedDict[str, TextFeatures] = OrderedDict()
        self._frozen_text_cache: OrderedDict[str, TextFeatures] = OrderedDict()  # training: the fixed part
        self._cache_lock = threading.Lock()
        self.stats = {"image_encoder_calls": 0, "text_encoder_calls": 0, "text_cache_hits": 0}
        self.freeze_encoders()

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return next(self.decoder.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.decoder.parameters()).dtype

    # ---------------------------------------------------------------- freezing
    def freeze_encoders(self) -> None:
        """Freeze the encoder backbones named frozen in the config (requires_grad_(False) + eval); LoRA stays
        trainable. Never ``no_grad`` in forward, so adapters and partial unfreezing get gradients."""
        for enc, frozen in self._towers():
            if frozen:
                for name, p in enc.named_parameters():
                    p.requires_grad_("lora_" in name or name.startswith(enc.trainable_prefixes))
                enc.eval()

    def unfreeze(self, which: str) -> None:
        """Make an encoder fully trainable ('image' or 'text'); recorded in the config so checkpoints keep it."""
        if which not in ("image", "text"):
            raise ValueError(f"unfreeze takes 'image' or 'text', got {which!r}")
        enc = self.image_encoder if which == "image" else self.text_encoder
        enc.requires_grad_(True)
        setattr(self.config, f"freeze_{which}", False)
        self.train(self.training)

    def _towers(self) -> list[tuple[Any, bool]]:
        """(encoder, frozen) for the image and the text tower."""
        return [(self.image_encoder, self.config.freeze_image), (self.text_encoder, self.config.freeze_text)]

    def train(self, mode: bool = True) -> VLSegModel:
        super().train(mode)
        if mode:
            self._text_cache.clear()  # weights may change while training (the cache only fills in eval mode)
        for enc, frozen in self._towers():
            if frozen:
                enc.eval()  # frozen encoders keep eval behaviour (dropout off, BN stats fixed)
        return self

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles carry no lock and no cached embeddings (``copy.deepcopy(model)`` works)."""
        state = dict(self.__dict__)
        state.update(_cache_lock=None, _text_cache=OrderedDict(), _frozen_text_cache=OrderedDict())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._cache_lock = threading.Lock()

    def _apply(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        self._text_cache.clear()  # device/dtype changes invalidate cached embeddings
        self._frozen_text_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def clear_cache(self) -> None:
        """Drop cached prompt embeddings (call after changing text-encoder weights by hand)."""
        with self._cache_lock:
            self._text_cache.clear()
            self._frozen_text_cache.clear()

    # ---------------------------------------------------------------- stages
    def encode_image(self, pixel_values: Tensor) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures of the layers the decoder reads (the encoder stops after the deepest)."""
        self._check_pixels(pixel_values)
        self.stats["image_encoder_calls"] += 1
        return self.image_encoder(pixel_values, self.decoder.layers)

    def encode_text(self, prompts: Sequence[str]) -> TextFeatures:
        """K strings -> TextFeatures (K, ...). Repeated prompts are encoded once. At inference (eval mode and no
        gradient) embeddings come from an LRU cache keyed by the prompt string. In training, a frozen text tower
        without LoRA runs its fixed part without gradient and only its trainable head (``project``) learns: with
        ``cache_frozen_prompts`` each new prompt's fixed part is encoded alone and cached (prompts that repeat, e.g.
        VQA questions), else a step's prompts are encoded together in one call, uncached (generated prompts that
        rarely repeat: one call instead of one per prompt)."""
        unique = list(dict.fromkeys(prompts))
        order = {p: i for i, p in enumerate(unique)}
        if not (self.training or torch.is_grad_enabled()):
            feats = self._cached(unique, self._text_cache, lambda ps: self._run_text_encoder(ps))
        elif self.config.freeze_text and not has_lora(self.text_encoder):
            # Either way a prompt's features never depend on which prompts earlier steps happened to batch it with
            # (float sums differ with padding): a cached prompt was encoded alone, an uncached one with its own step's
            # prompts. So a resumed run matches an uninterrupted one.
            with torch.no_grad():
                if self.cache_frozen_prompts:
                    fixed = self._cached(unique, self._frozen_text_cache, lambda ps: TextFeatures.cat(
                        [self._run_text_encoder([p], True) for p in ps]))
                else:
                    fixed = self._run_text_encoder(unique, True)
            feats = self.text_encoder.project(fixed)
        else:
            feats = self._run_text_encoder(unique)
        if len(unique) == len(prompts):
            return feats
        return feats.index([order[p] for p in prompts])

    def _cached(self, unique: list[str], cache: OrderedDict[str, TextFeatures],
                encode: Any) -> TextFeatures:
        """Features of ``unique`` prompts from ``cache`` (LRU), encoding the missing ones."""
        with self._cache_lock:
            found = {p: cache[p] for p in unique if p in cache}
        missing = [p for p in unique if p not in found]
        self.stats["text_cache_hits"] += len(unique) - len(missing)
        if missing:  # encoded outside the lock: concurrent callers may both encode a new prompt (same result)
            found.update(zip(missing, encode(missing).trimmed()))
        with self._cache_lock:
            for p in unique:
                cache[p] = found[p]
                cache.move_to_end(p)
            while len(cache) > self.text_cache_size:
                cache.popitem(last=False)
        return TextFeatures.cat([found[p] for p in unique])

    def _run_text_encoder(self, prompts: list[str], frozen_part: bool = False) -> TextFeatures:
        enc = self.text_encoder.tokenize(prompts)
        dev = self.device
        self.stats["text_encoder_calls"] += 1
        run = self.text_encoder.encode_frozen if frozen_part else self.text_encoder
        return run(enc["input_ids"].to(dev), enc["attention_mask"].to(dev))

    def decode(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int,
               boxes: BoxPrompts | None = None) -> SegOutput:
        """B images x (B * K) prompts (and optional box prompts, one row per prompt) -> SegOutput (B, K, H, W)."""
        if boxes is not None and not self.family.capabilities.boxes:
            raise ValueError(f"{self.family.name!r} models take no box prompts; use a family whose "
                             "capabilities.boxes is True (e.g. sam3)")
        out = self.decoder(image, text, pixel_values, k) if boxes is None else \
            self.decoder(image, text, pixel_values, k, boxes=boxes)
        b = image.batch_size
        logits = out.logits.reshape(b, k, *out.logits.shape[-2:])
        presence = out.presence.reshape(b, k) if out.presence is not None else None
        return SegOutput(logits=logits, presence=presence, instances=getattr(out, "instances", None))

    def forward(self, pixel_values: Tensor, prompts: Prompts, image_features: ImageFeatures | None = None,
                boxes: BoxPrompts | None = None) -> SegOutput:
        """Args:
            pixel_values: (B, 3, H, W) normalised images (see ``self.processor``).
            prompts: K strings shared by the batch, or B lists of K strings ("" = no text, the p0 level).
            image_features: precomputed ``encode_image(pixel_values)`` (e.g. from a FeatureCache) to skip the
                image encoder.
            boxes: box prompts, one row per (image, prompt) pair (families with ``capabilities.boxes`` only).
        Returns:
            SegOutput: logits (B, K, H, W), presence (B, K) or None, instances or None.
        """
        flat, k, shared = normalize_prompts(prompts, pixel_values.shape[0], allow_empty=True)
        image = self.encode_image(pixel_values) if image_features is None else image_features
        if shared:
            text = self.encode_text(flat[:k])
            b = pixel_values.shape[0]
            text = text if b == 1 else text.index([j for _ in range(b) for j in range(k)])
        else:
            text = self.encode_text(flat)
        return self.decode(image, text, pixel_values, k, boxes=boxes)

    def _check_pixels(self, pixel_values: Tensor) -> None:
        if not isinstance(pixel_values, Tensor) or pixel_values.dim() != 4 or pixel_values.shape[1] != 3:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, Tensor) else type(pixel_values).__name__
            raise ValueError(f"pixel_values must be a (B, 3, H, W) tensor, got {shape}")
        p = self.image_encoder.info.patch_size
        h, w = pixel_values.shape[-2:]
        if h % p or w % p:
            nh, nw = -(-h // p) * p, -(-w // p) * p
            raise ValueError(
                f"Image height {h} and width {w} must be multiples of the patch size {p}. Resize or pad to "
                f"({nh}, {nw}); vlseg.segment does this for you."
            )

    def set_gradient_checkpointing(self, enable: bool = True) -> dict[str, bool]:
        """Trade compute for memory in the encoders (recompute block activations in backward). Returns which
        towers apply it; a tower that cannot warns."""
        return {which: enc.set_gradient_checkpointing(enable)
                for which, enc in (("image", self.image_encoder), ("text", self.text_encoder))}

    # ---------------------------------------------------------------- LoRA
    def apply_lora(self, spec: LoraSpec | dict[str, Any] | None = None) -> dict[str, int]:
        """Inject LoRA adapters (peft) per ``spec`` (default: ``config.lora``); records the spec in the config."""
        from .lora import inject_lora

        spec = spec if spec is not None else self.config.lora
        if spec is None:
            raise ValueError("No LoRA spec: pass LoraSpec(...) or set config.lora")
        if isinstance(spec, dict):
            spec = LoraSpec.from_dict(spec)
        counts = {}
        if spec.image:
            t = spec.image_targets or self.image_encoder.info.lora_targets
            counts["image"] = inject_lora(self.image_encoder.backbone, tuple(t), spec, "image",
                                          max_block=max(self.decoder.layers))
        if spec.text:
            t = spec.text_targets or self.text_encoder.info.lora_targets
            counts["text"] = inject_lora(self.text_encoder.backbone, tuple(t), spec, "text")
        self.config.lora = spec
        self.freeze_encoders()
        self.clear_cache()
        return counts

    def merge_lora(self) -> int:
        """Fold LoRA into the encoder weights for inference (no adapter overhead). The merged model is saved with
        its encoders bundled (the adapters no longer exist separately)."""
        from .lora import merge_lora

        n = merge_lora(self.image_encoder.backbone) + merge_lora(self.text_encoder.backbone)
        if n:
            self.config.lora = None
            self.config.merged_lora = True
        self.clear_cache()
        return n

    def trainable_summary(self) -> dict[str, dict[str, int]]:
        """Trainable and total parameter counts per top-level module (and 'total')."""
        out: dict[str, dict[str, int]] = {}
        for name, child in self.named_children():
            params = list(child.parameters())
            out[name] = {"trainable": sum(p.numel() for p in params if p.requires_grad),
                         "total": sum(p.numel() for p in params)}
        out["total"] = {k: sum(v[k] for v in out.values()) for k in ("trainable", "total")}
        return out

    def format_trainable_summary(self) -> str:
        rows = [f"{'module':<16}{'trainable':>14}{'total':>14}"]
        for name, v in self.trainable_summary().items():
            rows.append(f"{name:<16}{v['trainable']:>14,}{v['total']:>14,}")
        return "\n".join(rows)

    # ---------------------------------------------------------------- checkpoints
    def checkpoint_keys(self, include_encoders: bool = False) -> list[str]:
        """State-dict keys a checkpoint holds: everything when the encoders are bundled (asked, or frozen parts
        that cannot be rebuilt from their source), else only trainable state (decoder, LoRA, trainable
        projections, unfrozen encoders). A native decoder's ``frozen_prefixes`` (upstream parts kept at their
        source weights, e.g. SAM 3's box encoder in text-only training) are rebuilt like frozen encoders."""
        keys = list(self.state_dict())
        if include_encoders or not self.family.rebuildable(self.config):
            return keys
        towers = {"image_encoder": (self.config.freeze_image, self.image_encoder.trainable_prefixes),
                  "text_encoder": (self.config.freeze_text, self.text_encoder.trainable_prefixes)}
        decoder_frozen = tuple(getattr(self.decoder, "frozen_prefixes", ()))
        out = []
        for k in keys:
            top, _, rest = k.partition(".")
            frozen, prefixes = towers.get(top, (False, ()))
            if top == "decoder" and decoder_frozen and rest.startswith(decoder_frozen):
                continue
            if not frozen or "lora_" in rest or rest.startswith(prefixes):
                out.append(k)
        return out

    def save_pretrained(self, save_directory: str | os.PathLike[str], include_encoders: bool = False,
                        overwrite: bool = True) -> str:
        """Write ``config.json`` + ``model.safetensors`` (trainable weights only unless ``include_encoders``).

        Encoders built without pretrained weights are always bundled (they cannot be rebuilt from a name).
        Returns the folder path. Load it back with ``vlseg.load``.
        """
        keys = self.checkpoint_keys(include_encoders)
        full = self.state_dict()
        return checkpoint.write_checkpoint(save_directory, self.config.to_dict(), {k: full[k] for k in keys},
                                           bundled=len(keys) == len(full), overwrite=overwrite)

    def push_to_hub(self, repo_id: str, include_encoders: bool = False, private: bool = False,
                    commit_message: str = "Upload vlseg model", token: str | None = None) -> str:
        """Save to a temporary folder and upload it to the Hugging Face Hub; returns the commit URL."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, include_encoders=include_encoders)
            return checkpoint.upload_folder(tmp, repo_id, self.config, private=private,
                                            commit_message=commit_message, token=token)
