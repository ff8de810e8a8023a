"""transformers backends: ``hf-clip`` (CLIPModel, SiglipModel, ... any dual encoder with ``vision_model`` and
``get_text_features``) and ``hf-text`` (any AutoModel text encoder, e.g. PubMedBERT or MiniLM, plus a learned
projection to the joint width)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .._hub import download_hint, resolve_pretrained_path
from ..config import EncoderConfig
from . import ENCODERS
from .base import (
    CLIP_MEAN,
    CLIP_STD,
    EncoderPair,
    ImageEncoder,
    ImageEncoderInfo,
    ImageFeatures,
    TextEncoder,
    TextEncoderInfo,
    TextFeatures,
    run_blocks,
)

HF_ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
HF_MLP_TARGETS = ("fc1", "fc2")
BERT_TARGETS = ("query", "key", "value")


def _source(cfg: EncoderConfig) -> str:
    src = cfg.pretrained if isinstance(cfg.pretrained, str) else cfg.name
    if not src:
        raise ValueError(f"{cfg.type} encoder config needs a 'name' (hub id) or a local folder as 'pretrained'")
    return resolve_pretrained_path(src)


def load_hf_model(cfg: EncoderConfig, auto_cls: Any, load_weights: bool = True) -> nn.Module:
    """``from_pretrained`` (weights) or ``from_config`` (random); ``options.config`` builds an inline architecture."""
    import transformers

    inline = cfg.options.get("config")
    if inline is not None:
        inline = dict(inline)
        model_type = inline.pop("model_type")
        config = transformers.AutoConfig.for_model(model_type, **inline)
        return auto_cls.from_config(config)
    src = _source(cfg)
    try:
        if cfg.pretrained and load_weights:
            return auto_cls.from_pretrained(src, revision=cfg.revision)
        config = transformers.AutoConfig.from_pretrained(src, revision=cfg.revision)
        return auto_cls.from_config(config)
    except (OSError, ValueError) as e:
        if not os.path.isdir(src) and ("does not appear to have" in str(e) or "Unrecognized" in str(e)):
            raise ValueError(f"{src!r} is not a {auto_cls.__name__} checkpoint: {e}") from e
        raise download_hint(src, e) from e


def _hf_image_processor(src: str | None, revision: str | None) -> dict[str, Any]:
    if src is None:
        return {}
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(src, revision=revision)
    except Exception:  # a bare model folder without processor files: fall back to the defaults
        return {}
    size = getattr(proc, "size", None) or {}
    return {
        "mean": tuple(proc.image_mean), "std": tuple(proc.image_std),
        "resample": int(getattr(proc, "resample", 3) or 3),
        "size": size.get("height") or size.get("shortest_edge"),
    }


def _hf_tokenizer(cfg: EncoderConfig, src: str | None) -> Any:
    from transformers import AutoTokenizer

    tok_src = cfg.options.get("tokenizer") or src
    if tok_src is None:
        raise ValueError(f"{cfg.type} encoder with an inline config needs options.tokenizer (a hub id or folder)")
    try:
        return AutoTokenizer.from_pretrained(resolve_pretrained_path(tok_src), revision=cfg.revision)
    except OSError as e:
        raise download_hint(tok_src, e) from e


class PositionCache:
    """Embeds pixels for a CLIP-style ViT, reusing the interpolated position embedding for a given input size at
    inference (transformers re-interpolates it bicubically on every call when the size differs from training).
    Gives the same result as ``embeddings(pixel_values, interpolate_pos_encoding=True)``."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Tensor | None = None

    def __call__(self, emb: nn.Module, pixel_values: Tensor) -> Tensor:
        if not hasattr(emb, "class_embedding") or torch.is_grad_enabled():
            return emb(pixel_values, interpolate_pos_encoding=True)
        h, w = pixel_values.shape[-2:]
        weight = emb.position_embedding.weight
        key = (h, w, weight.data_ptr(), weight._version, weight.device, weight.dtype)
        if key != self.key:
            n = (h // emb.patch_size) * (w // emb.patch_size)
            probe = weight.new_empty(1, n + 1, weight.shape[-1])
            self.value, self.key = emb.interpolate_pos_encoding(probe, h, w), key
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.value


class HFVisionEncoder(ImageEncoder):
    """The vision tower of a transformers dual encoder (CLIP: CLS prefix; SigLIP: no prefix, MAP head)."""

    def __init__(self, model: nn.Module, preprocess: dict[str, Any]):
        super().__init__()
        self.backbone = model.vision_model
        self._projection = getattr(model, "visual_projection", None)
        self._pos = PositionCache()
        vc = model.config.vision_config
        has_cls = hasattr(self.backbone.embeddings, "class_embedding")
        self.info = ImageEncoderInfo(
            width=vc.hidden_size, num_layers=vc.num_hidden_layers, patch_size=vc.patch_size,
            image_size=int(preprocess.get("size") or vc.image_size),
            embed_dim=int(getattr(model.config, "projection_dim", 0) or vc.hidden_size),
            num_prefix_tokens=1 if has_cls else 0,
            mean=tuple(preprocess.get("mean", CLIP_MEAN)), std=tuple(preprocess.get("std", CLIP_STD)),
            resample=int(preprocess.get("resample", 3)), lora_targets=HF_ATTN_TARGETS + HF_MLP_TARGETS,
        )

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures; see ImageEncoder.forward."""
        vm = self.backbone
        x = self._pos(vm.embeddings, pixel_values)
        pre = getattr(vm, "pre_layrnorm", None)
        if pre is not None:
            x = pre(x)
        blocks = vm.encoder.layers
        run_to = list(layers) + ([len(blocks) - 1] if pooled else [])
        outs = run_blocks(blocks, x, run_to, lambda blk, h: _first(blk(h, None)))
        pooled_t = None
        if pooled:
            last = outs.pop()
            if hasattr(vm, "head") and vm.head is not None and getattr(vm, "use_head", True):
                pooled_t = vm.head(vm.post_layernorm(last))
            else:
                pooled_t = vm.post_layernorm(last[:, 0])
                if self._projection is not None:
                    pooled_t = self._projection(pooled_t)
        p = self.info.patch_size
        h, w = pixel_values.shape[-2:]
        return ImageFeatures(tokens=outs, grid=(h // p, w // p), num_prefix_tokens=self.info.num_prefix_tokens,
                             pooled=pooled_t, image_size=(h, w))


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


class HFDualTextEncoder(TextEncoder):
    """The text tower of a transformers dual encoder (CLIP / SigLIP): token states + projected pooled output."""

    def __init__(self, model: nn.Module, tokenizer: Any):
        super().__init__()
        self.backbone = model.text_model
        self._projection = getattr(model, "text_projection", None)
        self.tokenizer = tokenizer
        tc = model.config.text_config
        self.pad_to_max = model.config.model_type == "siglip"  # SigLIP was trained on max_length padding
        self.info = TextEncoderInfo(
            width=tc.hidden_size, embed_dim=int(getattr(model.config, "projection_dim", 0) or tc.hidden_size),
            max_length=int(tc.max_position_embeddings), lora_targets=HF_ATTN_TARGETS + HF_MLP_TARGETS,
        )

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding="max_length" if self.pad_to_max else True, truncation=True,
                             max_length=self.info.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc.get("attention_mask", torch.ones_like(enc["input_ids"]))}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        out = self.backbone(input_ids=input_ids, attention_mask=None if self.pad_to_max else attention_mask)
        pooled = out.pooler_output
        if self._projection is not None:
            pooled = self._projection(pooled)
        return TextFeatures(tokens=out.last_hidden_state, mask=attention_mask.bool(), pooled=pooled)


@ENCODERS.register("hf-clip")
def build_hf_clip(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    from transformers import AutoModel

    arch = cfg.options.get("offline_arch")
    if arch is not None and not cfg.pretrained:
        # Random weights need only the architecture: built from the preset's description, no network.
        from transformers import AutoConfig

        from .tokenizers import SimpleClipTokenizer

        conf = dict(arch["config"])
        model = AutoModel.from_config(AutoConfig.for_model(conf.pop("model_type"), **conf))
        return EncoderPair(image=HFVisionEncoder(model, dict(arch.get("preprocess", {}))),
                           text=HFDualTextEncoder(model, SimpleClipTokenizer()))
    model = load_hf_model(cfg, AutoModel, load_weights)
    if not hasattr(model, "vision_model") or not hasattr(model, "text_model"):
        raise ValueError(f"{cfg.name!r} is a {type(model).__name__}, not a dual (vision + text) encoder like CLIPModel")
    src = None if "config" in cfg.options else _source(cfg)
    pp = _hf_image_processor(src, cfg.revision)
    for k in ("mean", "std", "resample"):
        if k in cfg.options:
            pp[k] = cfg.options[k]
    return EncoderPair(image=HFVisionEncoder(model, pp), text=HFDualTextEncoder(model, _hf_tokenizer(cfg, src)))


class HFTextEncoder(TextEncoder):
    """Any transformers text encoder (BERT, PubMedBERT, MiniLM, ...) with mean or CLS pooling and a learned
    (trainable) projection to ``embed_dim``."""

    def __init__(self, model: nn.Module, tokenizer: Any, embed_dim: int | None, pooling: str, max_length: int):
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        self.backbone = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        width = model.config.hidden_size
        embed_dim = embed_dim or width
        self.proj = nn.Linear(width, embed_dim)  # learned: trainable even when the backbone is frozen
        self.trainable_prefixes = ("proj.",)
        self.info = TextEncoderInfo(width=width, embed_dim=embed_dim, max_length=max_length, lora_targets=BERT_TARGETS)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.info.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TextFeatures(tokens=tokens, mask=attention_mask.bool(), pooled=self.proj(pooled))


@ENCODERS.register("hf-text")
def build_hf_text(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    from transformers import AutoModel

    model = load_hf_model(cfg, AutoModel, load_weights)
    src = None if "config" in cfg.options else _source(cfg)
    tok = _hf_tokenizer(cfg, src)
    max_len = int(cfg.options.get("max_length", min(getattr(model.config, "max_position_embeddings", 512), 128)))
    enc = HFTextEncoder(model, tok, cfg.options.get("embed_dim"), cfg.options.get("pooling", "mean"), max_len)
    return EncoderPair(text=enc)
