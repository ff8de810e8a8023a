"""transformers backends: ``hf-clip`` (CLIPModel, SiglipModel, ... any dual encoder with ``vision_model`` and
``text_model``) and ``hf-text`` (any AutoModel text encoder, e.g. PubMedBERT or MiniLM, plus a learned projection
to the joint width). Weights are read from safetensors only."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import EncoderConfig
from ..features import CLIP_MEAN, CLIP_STD, ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures
from ..sources import SourceError, download_hint, parse_source, require_safetensors, resolve_folder
from . import ENCODERS
from .base import EncoderPair, ImageEncoder, TextEncoder, check_options, run_blocks

HF_ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
HF_MLP_TARGETS = ("fc1", "fc2")
BERT_TARGETS = ("query", "key", "value")
#: text padding each dual-encoder family was trained with (declared per model type; default: pad to the longest)
TEXT_PADDING = {"siglip": "max_length", "siglip2": "max_length"}


def source_folder(cfg: EncoderConfig) -> Path | None:
    """The local folder of the encoder's source (hub repos fetched, safetensors only), or None for an inline
    architecture without a source."""
    src = cfg.weights_source or cfg.name
    if not src:
        return None
    try:
        return resolve_folder(parse_source(src, revision=cfg.revision))
    except SourceError:
        raise
    except Exception as e:  # pragma: no cover - unexpected hub client errors
        raise download_hint(src, e) from e


def load_hf_model(cfg: EncoderConfig, auto_cls: Any, load_weights: bool = True) -> tuple[Any, Path | None]:
    """-> (model, its source folder). ``from_pretrained`` (weights, safetensors only) when weights are wanted,
    else ``from_config``: from ``cfg.arch["config"]`` when given (offline), else the source's config."""
    import transformers

    if cfg.builds_from_arch(load_weights) and "config" in (cfg.arch or {}):
        conf = dict(cfg.arch["config"])  # type: ignore[index]
        return auto_cls.from_config(transformers.AutoConfig.for_model(conf.pop("model_type"), **conf)), None
    folder = source_folder(cfg)
    if folder is None:
        raise ValueError(f"{cfg.type} encoder config needs a 'name' (hub id or folder) or an 'arch'")
    try:
        if cfg.weights_source is not None and load_weights:
            require_safetensors(folder, f"{cfg.type} encoder {cfg.weights_source!r}")
            return auto_cls.from_pretrained(str(folder), use_safetensors=True), folder
        return auto_cls.from_config(transformers.AutoConfig.from_pretrained(str(folder))), folder
    except (OSError, ValueError) as e:
        if "does not appear to have" in str(e) or "Unrecognized" in str(e) or "model_type" in str(e):
            raise ValueError(f"{folder} is not a {auto_cls.__name__} checkpoint: {e}") from e
        raise download_hint(str(folder), e) from e


def hf_image_processor(folder: Path | None) -> dict[str, Any]:
    """Preprocessing (size, mean, std, resample) from a folder's image-processor config; {} when it has none."""
    if folder is None or not any((folder / n).is_file() for n in ("preprocessor_config.json",
                                                                 "processor_config.json")):
        return {}
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(folder))  # present but broken: the error surfaces
    size = getattr(proc, "size", None) or {}
    size = dict(size) if not isinstance(size, dict) else size
    resample = getattr(proc, "resample", 3)
    return {
        "mean": tuple(proc.image_mean), "std": tuple(proc.image_std),
        "resample": int(getattr(resample, "value", resample) or 3),
        "size": size.get("height") or size.get("shortest_edge"),
    }


def hf_tokenizer(cfg: EncoderConfig, folder: Path | None) -> Any:
    """The tokenizer of the source folder, or of ``options.tokenizer`` (a hub id or folder)."""
    from transformers import AutoTokenizer

    tok_src = cfg.options.get("tokenizer")
    if tok_src is not None:
        folder = resolve_folder(parse_source(tok_src, revision=cfg.revision))
    if folder is None:
        raise ValueError(f"{cfg.type} encoder with an inline architecture needs options.tokenizer (a hub id or folder)")
    return AutoTokenizer.from_pretrained(str(folder))


class PositionCache:
    """Embeds pixels for a CLIP-style ViT, reusing the interpolated position embedding for a given input size at
    inference (transformers re-interpolates it bicubically on every call when the size differs from training).
    Gives the same result as ``embeddings(pixel_values, interpolate_pos_encoding=True)``. Safe to share between
    threads: entries are keyed by input size and weight version, and a lookup never sees another size's entry."""

    def __init__(self, max_entries: int = 8) -> None:
        self.entries: dict[tuple[Any, ...], Tensor] = {}
        self.max_entries = max_entries

    def __call__(self, emb: Any, pixel_values: Tensor) -> Tensor:
        if not hasattr(emb, "class_embedding") or torch.is_grad_enabled():
            return emb(pixel_values, interpolate_pos_encoding=True)
        h, w = pixel_values.shape[-2:]
        weight = emb.position_embedding.weight
        key = (h, w, weight.data_ptr(), weight._version, weight.device, weight.dtype)
        value = self.entries.get(key)
        if value is None:
            n = (h // emb.patch_size) * (w // emb.patch_size)
            probe = weight.new_empty(1, n + 1, weight.shape[-1])
            value = emb.interpolate_pos_encoding(probe, h, w)
            if len(self.entries) >= self.max_entries:
                self.entries.pop(next(iter(self.entries)), None)
            self.entries[key] = value
        patches = emb.patch_embedding(pixel_values.to(emb.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = emb.class_embedding.expand(pixel_values.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + value


class HFVisionEncoder(ImageEncoder):
    """The vision tower of a transformers dual encoder (CLIP, CLIPSeg's CLIP: CLS prefix; SigLIP: no prefix, MAP
    head). ``model`` is the whole dual encoder (``vision_model``, optional ``visual_projection``)."""

    def __init__(self, model: Any, preprocess: dict[str, Any]):
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

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.encoder.layers

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
            if getattr(vm, "head", None) is not None and getattr(vm, "use_head", True):
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
    """The text tower of a transformers dual encoder (CLIP, CLIPSeg's CLIP, SigLIP): token states + projected
    pooled output.

    Args:
        model: the whole dual encoder (``text_model``, optional ``text_projection``).
        tokenizer: called like a transformers tokenizer.
        padding: ``"longest"`` (CLIP) or ``"max_length"`` (models trained on fixed-length text, SigLIP: then no
            attention mask is passed, as in training).
    """

    def __init__(self, model: Any, tokenizer: Any, padding: str = "longest"):
        super().__init__()
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        self.backbone = model.text_model
        self._projection = getattr(model, "text_projection", None)
        self.tokenizer = tokenizer
        self.padding = padding
        tc = model.config.text_config
        self.info = TextEncoderInfo(
            width=tc.hidden_size, embed_dim=int(getattr(model.config, "projection_dim", 0) or tc.hidden_size),
            max_length=int(tc.max_position_embeddings), lora_targets=HF_ATTN_TARGETS + HF_MLP_TARGETS,
        )

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.encoder.layers

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        self.warn_truncated(texts)
        enc = self.tokenizer(list(texts), padding=True if self.padding == "longest" else "max_length",
                             truncation=True, max_length=self.info.max_length, return_tensors="pt")
        ids = enc["input_ids"]
        return {"input_ids": ids, "attention_mask": enc.get("attention_mask", torch.ones_like(ids))}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        mask = attention_mask if self.padding == "longest" else None
        out = self.backbone(input_ids=input_ids, attention_mask=mask)
        pooled = out.pooler_output
        if self._projection is not None:
            pooled = self._projection(pooled)
        return TextFeatures(tokens=out.last_hidden_state, mask=attention_mask.bool(), pooled=pooled)


@ENCODERS.register("hf-clip")
def build_hf_clip(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    from transformers import AutoModel

    check_options(cfg, {"mean", "std", "resample", "tokenizer"})
    model, folder = load_hf_model(cfg, AutoModel, load_weights)
    if not hasattr(model, "vision_model") or not hasattr(model, "text_model"):
        raise ValueError(f"{cfg.name!r} is a {type(model).__name__}, not a dual (vision + text) encoder like CLIPModel")
    if folder is None:  # built from the architecture alone: preprocessing and CLIP's tokenizer without files
        from .tokenizers import SimpleClipTokenizer

        pp = dict((cfg.arch or {}).get("preprocess", {}))
        tokenizer: Any = SimpleClipTokenizer() if "tokenizer" not in cfg.options else hf_tokenizer(cfg, None)
    else:
        pp = hf_image_processor(folder)
        tokenizer = hf_tokenizer(cfg, folder)
    for k in ("mean", "std", "resample"):
        if k in cfg.options:
            pp[k] = cfg.options[k]
    padding = TEXT_PADDING.get(model.config.model_type, "longest")
    return EncoderPair(image=HFVisionEncoder(model, pp), text=HFDualTextEncoder(model, tokenizer, padding))


class HFTextEncoder(TextEncoder):
    """Any transformers text encoder (BERT, PubMedBERT, MiniLM, ...) with mean or CLS pooling and a learned
    (trainable) projection to ``embed_dim``."""

    def __init__(self, model: Any, tokenizer: Any, embed_dim: int | None, pooling: str, max_length: int):
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

    def blocks(self) -> Sequence[nn.Module]:
        layers = getattr(getattr(self.backbone, "encoder", None), "layer", None)
        return layers if layers is not None else ()

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        self.warn_truncated(texts)
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.info.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        return self.project(self.encode_frozen(input_ids, attention_mask))

    def encode_frozen(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """Backbone token states and the pooled state before the learned projection (pooled (K, Dt))."""
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            m = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TextFeatures(tokens=tokens, mask=attention_mask.bool(), pooled=pooled)

    def project(self, features: TextFeatures) -> TextFeatures:
        return TextFeatures(tokens=features.tokens, mask=features.mask, pooled=self.proj(features.pooled))


@ENCODERS.register("hf-text")
def build_hf_text(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    from transformers import AutoModel

    check_options(cfg, {"pooling", "embed_dim", "max_length", "tokenizer"})
    model, folder = load_hf_model(cfg, AutoModel, load_weights)
    tok = hf_tokenizer(cfg, folder)
    max_len = int(cfg.options.get("max_length", min(getattr(model.config, "max_position_embeddings", 512), 128)))
    enc = HFTextEncoder(model, tok, cfg.options.get("embed_dim"), cfg.options.get("pooling", "mean"), max_len)
    return EncoderPair(text=enc)
