"""``sam3`` family: Meta's SAM 3 through transformers (``Sam3Model``, ``Sam3LiteTextModel``, ``Sam3VideoModel``), run
through vlseg's stages. transformers' modules and forward are reused as they are; only the order of work changes:

    encode_image  the Perception Encoder ViT (``vision_encoder.backbone``), once per image
                  -> ImageFeatures with one (B, N, C) token tensor (what a FeatureCache stores)
    encode_text   CLIP text tower + ``text_projection`` (``get_text_features``), once per prompt string (LRU cache)
                  -> TextFeatures: tokens (K, L, D), mask (K, L); cut to 32 tokens (a warning says so)
    decode        FPN neck once per image, features expanded to the K prompts, then ``Sam3Model.forward(
                  vision_embeds=, text_embeds=, attention_mask=, input_boxes=)`` -> per-query masks, boxes, scores
                  and the presence logit (SegOutput.instances / .presence); the semantic mask of a prompt is the
                  union of the queries whose sigmoid(pred_logits) * sigmoid(presence) > ``score_threshold``,
                  as ``Sam3Processor.post_process_instance_segmentation`` computes it.
    video         ``Sam3VideoModel`` sharing this model's detector (objects are tracked, not re-detected), frames
                  streamed one by one (``Family.track_video``, used by ``vlseg.segment_video``).

Sources: ``facebook/sam3`` (gated; a ``sam3_video`` folder, from which the detector and the tracker are loaded),
a ``sam3`` or ``sam3_lite_text`` folder (no tracker: videos are segmented frame by frame), or an architecture
(``arch``: a transformers config dict) built offline with random weights. Weights: safetensors only. The SAM
License applies to Meta's weights.

Family options (``ModelConfig.family_options``):
    score_threshold   instance score cut (default 0.3, as transformers' post-processing).
    train_geometry    train the box (geometry) encoder; off by default, since it gets gradients only from box
                      prompts and text-only training must leave it as it is.
    video             ``Sam3VideoModel`` settings for tracking (``score_threshold_detection``, ``new_det_thresh``,
                      ``hotstart_delay``, ...).
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..config import ModelConfig
from ..decoders.base import DecoderOutput, FusionDecoder
from ..encoders.base import ImageEncoder, TextEncoder
from ..features import BoxPrompts, ImageEncoderInfo, ImageFeatures, QueryOutputs, TextEncoderInfo, TextFeatures
from ..model import VLSegModel
from ..processing import ImageProcessor
from ..sources import SourceError, cache_root, download_hint, parse_source, require_safetensors, resolve_folder
from . import register_family
from .base import Capabilities, Family

#: SAM 3's text context: CLIP position embeddings for 32 tokens; its processor pads (but does not cut) to 32
TEXT_LENGTH = 32
SAM3_MEAN = SAM3_STD = (0.5, 0.5, 0.5)
VIT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")
TEXT_LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
#: logit written where a prompt keeps no query (sigmoid ~ 2e-9)
EMPTY_LOGIT = -20.0
#: Sam3VideoModel attributes the ``video`` family option may set
VIDEO_SETTINGS = ("score_threshold_detection", "new_det_thresh", "det_nms_thresh", "assoc_iou_thresh",
                  "trk_assoc_iou_thresh", "hotstart_delay", "hotstart_unmatch_thresh", "hotstart_dup_thresh",
                  "init_trk_keep_alive", "max_trk_keep_alive", "min_trk_keep_alive", "max_num_objects",
                  "recondition_every_nth_frame", "fill_hole_area")
FAMILY_OPTIONS = {"score_threshold", "train_geometry", "video"}


# ----------------------------------------------------------------------------- towers
class Sam3ImageEncoder(ImageEncoder):
    """SAM 3's vision tower: the ViT (``backbone.backbone``) runs here; its FPN neck (``backbone.neck``, frozen with
    it) runs in the decoder, once per image, so only the ViT tokens need caching. A video-capable model also keeps
    the tracker here (``tracker_model``, ``tracker_neck``): frozen image-side weights, rebuilt from the source."""

    def __init__(self, sam: Any, size: int, mean: Sequence[float], std: Sequence[float],
                 video: Any = None):
        super().__init__()
        self.backbone = sam.vision_encoder
        vit = sam.config.vision_config.backbone_config
        patch = vit.patch_size if isinstance(vit.patch_size, int) else vit.patch_size[0]
        self.info = ImageEncoderInfo(
            width=vit.hidden_size, num_layers=vit.num_hidden_layers, patch_size=patch, image_size=size,
            embed_dim=0, num_prefix_tokens=0, mean=(mean[0], mean[1], mean[2]), std=(std[0], std[1], std[2]), resample=2,
            lora_targets=VIT_LORA_TARGETS, default_layers=(vit.num_hidden_layers - 1,))
        if video is not None:
            self.tracker_model = video.tracker_model
            self.tracker_neck = video.tracker_neck
        self.__dict__["video"] = video  # the Sam3VideoModel (not a submodule: its parts are registered elsewhere)

    def blocks(self) -> Sequence[nn.Module]:
        return self.backbone.backbone.layers

    def set_image_size(self, size: int) -> None:
        if size != self.info.image_size:
            raise ValueError(f"SAM 3's input size is fixed when it is built ({self.info.image_size}); create it "
                             f"with create_model(..., image_size={size})")

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, S, S) -> ImageFeatures with the last ViT layer's tokens (B, N, C); N = (S / 14)^2."""
        self.info.resolve_layers(layers)
        tokens = self.backbone.backbone(pixel_values).last_hidden_state
        p = self.info.patch_size
        h, w = pixel_values.shape[-2:]
        return ImageFeatures(tokens=[tokens], grid=(h // p, w // p), num_prefix_tokens=0,
                             pooled=tokens.mean(1) if pooled else None, image_size=(h, w))


class Sam3TextEncoder(TextEncoder):
    """SAM 3's text tower: CLIP (or LiteText's MobileCLIP) + ``text_projection`` to the detector width, through
    ``get_text_features``. Prompts are cut to 32 tokens (with a warning); the pooled embedding is the masked mean of
    the projected tokens."""

    def __init__(self, sam: Any, tokenizer: Any):
        super().__init__()
        self.backbone = sam.text_encoder
        self._projection = sam.text_projection
        self.tokenizer = tokenizer
        self.__dict__["sam"] = sam
        width = int(sam.config.detr_encoder_config.hidden_size)
        self.info = TextEncoderInfo(width=width, embed_dim=width, max_length=TEXT_LENGTH,
                                    lora_targets=TEXT_LORA_TARGETS)

    def blocks(self) -> Sequence[nn.Module]:
        inner = getattr(self.backbone, "text_model", self.backbone)
        return getattr(getattr(inner, "encoder", inner), "layers", ())

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        self.warn_truncated(texts)
        enc = self.tokenizer(list(texts), padding="max_length", max_length=TEXT_LENGTH, truncation=True,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, D) projected, mask (K, L), pooled (K, D))."""
        tokens = self.__dict__["sam"].get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output
        mask = attention_mask.bool()
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp(min=1.0)
        return TextFeatures(tokens=tokens, mask=mask, pooled=pooled)


# ----------------------------------------------------------------------------- decoder
@dataclass
class Sam3DecoderOutput(DecoderOutput):
    """DecoderOutput plus the per-query predictions (B, K, Q, ...)."""

    instances: QueryOutputs | None = None


def _rows(t: Tensor, k: int) -> Tensor:
    """(B, ...) -> (B * K, ...), image-major; a free view for one image."""
    if k == 1:
        return t
    if t.shape[0] == 1:
        return t.expand(k, *t.shape[1:])
    return t.repeat_interleave(k, dim=0)


class Sam3Decoder(FusionDecoder):
    """SAM 3's detector on vlseg features: geometry (box) encoder, DETR encoder/decoder with the presence token,
    dot-product scoring and mask decoder, called through transformers' ``Sam3Model.forward``.

    Args:
        sam: the transformers model whose detector modules are registered here.
        score_threshold: instance score cut, sigmoid(pred_logits) * sigmoid(presence) > score_threshold.
        train_geometry: whether the geometry encoder is trainable (and saved with trainable-only checkpoints).
    """

    def __init__(self, sam: Any, score_threshold: float = 0.3, train_geometry: bool = False):
        super().__init__()
        self.__dict__["sam"] = sam
        for name in ("geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder", "dot_product_scoring"):
            setattr(self, name, getattr(sam, name))
        self.layers = (sam.config.vision_config.backbone_config.num_hidden_layers - 1,)
        self.score_threshold = float(score_threshold)
        self.train_geometry = bool(train_geometry)
        self.geometry_encoder.requires_grad_(self.train_geometry)

    @property
    def frozen_prefixes(self) -> tuple[str, ...]:
        """Parts kept at their upstream weights (rebuilt from the source, so trainable-only checkpoints skip them)."""
        return () if self.train_geometry else ("geometry_encoder.",)

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int,
                boxes: BoxPrompts | None = None) -> Sam3DecoderOutput:
        """image: B images; text: B * K prompts; boxes: optional, B * K rows -> logits (B * K, h, w) at the mask
        resolution (h = 4 S / 14), presence (B * K,), instances (B, K, Q, ...)."""
        from transformers.modeling_outputs import BaseModelOutputWithPooling
        from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

        sam = self.__dict__["sam"]
        tokens = image.tokens[0]
        b, _, c = tokens.shape
        gh, gw = image.grid
        fpn, pos = sam.vision_encoder.neck(tokens.reshape(b, gh, gw, c).permute(0, 3, 1, 2))  # once per image
        feats, mask = _pad_text(text.tokens, text.mask)
        rows = b * k
        with_boxes = boxes.has_boxes() if boxes is not None else torch.zeros(rows, dtype=torch.bool)
        if boxes is not None and len(boxes) != rows:
            raise ValueError(f"{len(boxes)} box-prompt rows for {rows} (image, prompt) pairs")
        # A prompt with boxes never shares a forward with prompts without: any geometry input (even all padding)
        # adds the geometry encoder's CLS token and changes a text-only result.
        groups = [g for g in (torch.nonzero(~with_boxes).flatten(), torch.nonzero(with_boxes).flatten()) if len(g)]
        parts: dict[str, list[Tensor]] = {}
        order = torch.cat(groups)
        for gi, idx in enumerate(groups):
            boxed = bool(with_boxes[idx[0]])
            sel = idx.to(tokens.device)
            if len(groups) == 1:  # all rows: views, no copies
                vis = [_rows(t, k) for t in fpn], [_rows(t, k) for t in pos]
            else:
                img_idx = sel // k
                vis = [t[img_idx] for t in fpn], [t[img_idx] for t in pos]
            kw: dict[str, Any] = {}
            if boxed:
                assert boxes is not None
                kw["input_boxes"], kw["input_boxes_labels"] = _sam3_boxes(boxes.boxes[idx], boxes.labels[idx],
                                                                          tokens.device)
            out = _detect(sam, vis, BaseModelOutputWithPooling(pooler_output=feats[sel]), mask[sel], tokens,
                          Sam3VisionEncoderOutput, boxed, **kw)
            for name in ("pred_masks", "pred_boxes", "pred_logits", "presence_logits", "semantic_seg"):
                parts.setdefault(name, []).append(getattr(out, name))
        raw = {name: torch.cat(v) if len(v) > 1 else v[0] for name, v in parts.items()}
        if len(groups) > 1:  # back to row order
            inverse = torch.argsort(order).to(tokens.device)
            raw = {name: v[inverse] for name, v in raw.items()}
        return self._outputs(raw, b, k)

    def _outputs(self, raw: dict[str, Tensor], b: int, k: int) -> Sam3DecoderOutput:
        masks, logits = raw["pred_masks"], raw["pred_logits"]
        presence = raw["presence_logits"][:, 0]
        scores = logits.sigmoid() * presence.sigmoid()[:, None]  # (R, Q), as post_process_instance_segmentation
        keep = scores > self.score_threshold
        with torch.no_grad():
            floor = torch.full_like(masks, EMPTY_LOGIT)
        semantic = torch.where(keep[..., None, None], masks, floor).amax(1)  # (R, h, w): union of kept queries
        q, (h, w) = masks.shape[1], masks.shape[-2:]
        inst = QueryOutputs(mask_logits=masks.reshape(b, k, q, h, w), boxes=raw["pred_boxes"].reshape(b, k, q, 4),
                            scores=scores.reshape(b, k, q), keep=keep.reshape(b, k, q), raw=raw)
        return Sam3DecoderOutput(logits=semantic, presence=presence, instances=inst)


def _pad_text(tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Cached prompts are trimmed to their own length: pad back to SAM 3's 32 positions (masked, so the padding's
    values never reach the output)."""
    pad = TEXT_LENGTH - tokens.shape[1]
    if pad <= 0:
        return tokens, mask.long()
    return nn.functional.pad(tokens, (0, 0, 0, pad)), nn.functional.pad(mask.long(), (0, pad))


def _sam3_boxes(boxes: Tensor, labels: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """vlseg boxes (xyxy in [0, 1], label -1 = padding) -> SAM 3's (cx, cy, w, h) in [0, 1], padding label -10."""
    x0, y0, x1, y1 = boxes.float().unbind(-1)
    cxcywh = torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], -1)
    labels = torch.where(labels < 0, torch.full_like(labels, -10), labels).long()
    return cxcywh.to(device), labels.to(device)


def _detect(sam: Any, vis: tuple[list[Tensor], list[Tensor]], text: Any, mask: Tensor, ref: Tensor,
            out_cls: Any, boxed: bool, **kw: Any) -> Any:
    fpn, pos = vis
    vision = out_cls(last_hidden_state=None, fpn_hidden_states=tuple(fpn), fpn_position_encoding=tuple(pos))
    if boxed and ref.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # torchvision's roi_align (geometry encoder) fails under CPU bf16 autocast: run this group in float32
        with torch.autocast("cpu", enabled=False):
            vision = out_cls(last_hidden_state=None, fpn_hidden_states=tuple(t.float() for t in fpn),
                             fpn_position_encoding=tuple(t.float() for t in pos))
            text.pooler_output = text.pooler_output.float()
            return sam(vision_embeds=vision, text_embeds=text, attention_mask=mask, **kw)
    return sam(vision_embeds=vision, text_embeds=text, attention_mask=mask, **kw)


# ----------------------------------------------------------------------------- building
def offline_clip_tokenizer() -> Any:
    """SAM 3's tokenizer (CLIP BPE, 32 tokens, pad = ``<|endoftext|>``) without the Hub: written once by
    ``vlseg.write_clip_tokenizer`` under ``$VLSEG_CACHE/offline-arch/clip-bpe``."""
    from transformers import CLIPTokenizer

    from ..encoders.tokenizers import write_clip_tokenizer

    folder = cache_root() / "offline-arch" / "clip-bpe"
    if not (folder / "tokenizer_config.json").is_file():
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        write_clip_tokenizer(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:  # another process wrote it first
            shutil.rmtree(tmp, ignore_errors=True)
    return CLIPTokenizer.from_pretrained(str(folder), model_max_length=TEXT_LENGTH)


def _patch(config: Any) -> int:
    vit = _detector_config(config).vision_config.backbone_config
    return vit.patch_size if isinstance(vit.patch_size, int) else vit.patch_size[0]


def _detector_config(config: Any) -> Any:
    return config.detector_config if config.model_type == "sam3_video" else config


def _set_image_size(config: Any, size: int) -> None:
    """Input side S (a multiple of 14) for the detector and, for a video model, the tracker (transformers
    propagates it to the nested configs); the weights do not depend on it."""
    patch = _patch(config)
    if size % patch:
        raise ValueError(f"SAM 3's image_size must be a multiple of its patch size {patch}, got {size}")
    config.image_size = size
    if config.model_type == "sam3_video":
        config.low_res_mask_size = 4 * size // patch


def _config_from_arch(arch: dict[str, Any]) -> Any:
    from transformers import AutoConfig

    d = dict(arch)
    model_type = d.pop("model_type", "sam3")
    if model_type not in ("sam3", "sam3_lite_text", "sam3_video"):
        raise ValueError(f"sam3 arch has model_type {model_type!r}; expected sam3, sam3_lite_text or sam3_video")
    return AutoConfig.for_model(model_type, **d)


def _processor_settings(folder: Path | None) -> dict[str, Any]:
    """Input side, mean and std from a folder's image processor (``processor_config.json``); {} without one."""
    if folder is None or not any((folder / n).is_file() for n in ("processor_config.json",
                                                                 "preprocessor_config.json")):
        return {}
    from transformers import AutoImageProcessor

    proc = AutoImageProcessor.from_pretrained(str(folder))
    size = getattr(proc, "size", None)
    height = size.get("height") if isinstance(size, dict) else getattr(size, "height", None)
    return {"size": int(height) if height else None, "mean": tuple(proc.image_mean), "std": tuple(proc.image_std)}


def _tokenizer(folder: Path | None) -> Any:
    if folder is not None and any((folder / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), model_max_length=TEXT_LENGTH)
    return offline_clip_tokenizer()


def _model_class(model_type: str) -> Any:
    import transformers

    classes = {"sam3": "Sam3Model", "sam3_lite_text": "Sam3LiteTextModel", "sam3_video": "Sam3VideoModel"}
    if model_type not in classes:
        raise ValueError(f"not a SAM 3 model: model_type {model_type!r} (expected one of {sorted(classes)})")
    return getattr(transformers, classes[model_type])


def load_upstream(config: ModelConfig, load_weights: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """-> (transformers model: Sam3Model / Sam3LiteTextModel / Sam3VideoModel, tokenizer, preprocessing).

    Weights come from ``pretrained`` (a folder or hub id) or ``source`` when ``pretrained`` is True; with
    ``pretrained=False`` (or ``load_weights=False`` and a remote source) the architecture is built with random
    weights from ``arch``, else from the source's config.json."""
    from transformers import AutoConfig

    where = config.pretrained if isinstance(config.pretrained, str) else (config.source if config.pretrained
                                                                          else None)
    folder: Path | None = None
    if where is not None and (load_weights or parse_source(where).kind == "local"):
        folder = resolve_folder(parse_source(where, revision=config.revision))
        if not (folder / "config.json").is_file():
            raise ValueError(f"{folder} is not a SAM 3 folder (no config.json)")
        up_config = AutoConfig.from_pretrained(str(folder))
    elif config.arch is not None:
        up_config = _config_from_arch(config.arch)
    elif config.source is not None:  # the architecture of the source, without its weights
        src_folder = resolve_folder(parse_source(config.source, revision=config.revision),
                                    patterns=("*.json", "*.txt"))
        up_config = AutoConfig.from_pretrained(str(src_folder))
    else:
        raise ValueError("a sam3 config needs 'source' (hub id or folder), 'arch', or pretrained=<folder>")
    cls = _model_class(up_config.model_type)
    pp = _processor_settings(folder)
    native = int(_detector_config(up_config).image_size)
    size = int(config.image_size or pp.get("size") or native)
    if size != native:
        _set_image_size(up_config, size)
    if folder is not None and load_weights:
        require_safetensors(folder, "SAM 3 model")
        try:
            model, info = cls.from_pretrained(str(folder), config=up_config, use_safetensors=True,
                                              output_loading_info=True)
        except OSError as e:
            raise download_hint(str(folder), e) from e
        missing = [k for k in info.get("missing_keys", ()) if not k.endswith(("position_ids", "inv_freq"))]
        if missing:
            raise SourceError(f"{folder}: {len(missing)} weight(s) missing from the checkpoint, e.g. {missing[:3]}; "
                              "they would be random. Is this a SAM 3 checkpoint for this transformers version?")
    else:
        model = cls(up_config)
    model.eval()
    return model, _tokenizer(folder), {"size": size, "mean": pp.get("mean", SAM3_MEAN), "std": pp.get("std", SAM3_STD)}


def write_upstream_folder(out: str | os.PathLike[str], preset: str = "tiny-test-sam3", seed: int = 0,
                          spread_heads: bool = True) -> str:
    """Write a folder in the upstream (transformers) layout with random weights, offline: the preset's ``arch``
    built by transformers, ``save_pretrained`` (config.json + model.safetensors) and its processor (image
    processor, video processor for ``sam3_video``, the offline CLIP tokenizer). For tests and benchmarks:
    ``create_model(preset, pretrained=folder)`` and transformers' own ``Sam3Processor`` / ``Sam3Model`` read it.

    ``spread_heads`` re-initialises the detector heads (not the towers) with unit-scale weights: with
    transformers' default init every query of a random model scores sigmoid(0) * sigmoid(0) = 0.25, so any
    threshold keeps all queries or none."""
    from transformers import Sam3ImageProcessor, Sam3Processor, Sam3VideoProcessor
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    from ..presets import get_model_config

    config = get_model_config(preset)
    if config.family != "sam3" or config.arch is None:
        raise ValueError(f"{preset!r} is not a sam3 preset with an 'arch'")
    up_config = _config_from_arch(config.arch)
    size = int(config.image_size or _detector_config(up_config).image_size)
    if size != int(_detector_config(up_config).image_size):
        _set_image_size(up_config, size)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _model_class(up_config.model_type)(up_config).eval()
        if spread_heads:
            det = model.detector_model if up_config.model_type == "sam3_video" else model
            with torch.no_grad():
                for name, mod in det.named_modules():
                    if name.startswith(("text_encoder", "vision_encoder")):
                        continue
                    if isinstance(mod, nn.Linear):
                        nn.init.normal_(mod.weight, std=mod.in_features ** -0.5)
                        if mod.bias is not None:
                            nn.init.normal_(mod.bias, std=0.1)
                    elif isinstance(mod, nn.Embedding):
                        nn.init.normal_(mod.weight, std=1.0)
    folder = Path(out)
    model.save_pretrained(folder)
    s, m = {"height": size, "width": size}, 4 * size // _patch(up_config)
    image_proc = Sam3ImageProcessor(size=s, mask_size={"height": m, "width": m}, image_mean=list(SAM3_MEAN),
                                    image_std=list(SAM3_STD))
    tokenizer = offline_clip_tokenizer()
    if up_config.model_type == "sam3_video":
        video_proc = Sam2VideoVideoProcessor(size=s, image_mean=list(SAM3_MEAN), image_std=list(SAM3_STD))
        Sam3VideoProcessor(image_processor=image_proc, video_processor=video_proc,
                           tokenizer=tokenizer).save_pretrained(folder)
    else:
        Sam3Processor(image_processor=image_proc, tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


# ----------------------------------------------------------------------------- the family
@register_family
class Sam3(Family):
    name = "sam3"
    precision_modes = ("fp32",)  # lower-precision copies of its towers are not validated yet
    capabilities = Capabilities(task="sam3-segmentation", boxes=True, video_tracking=True, instances=True)
    summary = "SAM 3 (transformers): its own detector; instances, presence, box prompts, video tracking"

    def validate(self, config: ModelConfig) -> None:
        if config.source is None and config.arch is None and not isinstance(config.pretrained, str):
            raise ValueError("A 'sam3' model config needs 'source' (hub id or folder) or 'arch'")
        opts = config.family_options
        unknown = set(opts) - FAMILY_OPTIONS
        if unknown:
            raise ValueError(f"Unknown sam3 family option(s) {sorted(unknown)}; valid: {sorted(FAMILY_OPTIONS)}")
        thr = opts.get("score_threshold", 0.3)
        if isinstance(thr, bool) or not isinstance(thr, (int, float)) or not 0.0 <= thr <= 1.0:
            raise ValueError(f"sam3 score_threshold must be a number in [0, 1], got {thr!r}")
        if not isinstance(opts.get("train_geometry", False), bool):
            raise ValueError(f"sam3 train_geometry must be true or false, got {opts['train_geometry']!r}")
        video = opts.get("video", {})
        if not isinstance(video, dict) or set(video) - set(VIDEO_SETTINGS):
            raise ValueError(f"sam3 'video' options must be a mapping with keys among {list(VIDEO_SETTINGS)}, "
                             f"got {video!r}")

    def describe(self, config: ModelConfig) -> str:
        where = config.source or "arch (random weights)"
        return f"{where}  {self.summary}"

    def build(self, config: ModelConfig, load_weights: bool = True) -> VLSegModel:
        where = config.pretrained if isinstance(config.pretrained, str) else config.source
        files = bool(config.pretrained) and where is not None and (
            load_weights or parse_source(where).kind == "local")
        upstream, tokenizer, pp = load_upstream(config if files else config.replace(pretrained=False), load_weights)
        video = upstream if upstream.config.model_type == "sam3_video" else None
        sam = upstream.detector_model if video is not None else upstream
        opts = config.family_options
        image = Sam3ImageEncoder(sam, pp["size"], pp["mean"], pp["std"], video=video)
        text = Sam3TextEncoder(sam, tokenizer)
        decoder = Sam3Decoder(sam, opts.get("score_threshold", 0.3), opts.get("train_geometry", False))
        processor = ImageProcessor(size=pp["size"], mean=tuple(pp["mean"]), std=tuple(pp["std"]), resample=2)
        model = VLSegModel(config, image, text, decoder, processor, family=self)
        if config.lora is not None:
            model.apply_lora(config.lora)
        return model

    # ------------------------------------------------------------------------- video
    def track_video(self, model: VLSegModel, frames: Iterator[np.ndarray], prompts: list[str], threshold: float = 0.5,
                    **options: Any) -> Iterator[dict[str, Any]]:
        """Text-prompted tracking with ``Sam3VideoModel``: every frame runs the ViT once (shared by detector and
        tracker), the detector for each prompt (text features from the model's prompt cache), and the tracker,
        which carries objects found earlier from frame to frame (new objects start only from confident
        detections). Frames are consumed one at a time; the session keeps only the frames and tracker memories the
        tracker can still read. Outputs are held back ``hotstart_delay`` frames (as transformers'
        ``propagate_in_video_iterator`` does) so objects removed early are hidden everywhere.

        Args:
            options: ``Sam3VideoModel`` settings for this call (see ``VIDEO_SETTINGS``), over the ``video`` family
                option.
        Yields:
            per frame ``{"index", "masks": (K, H, W) bool, "objects": [per prompt {"ids", "scores", "boxes" (N, 4)
            xyxy pixels, "masks" (N, H, W)}]}``.
        """
        video = model.image_encoder.video
        if video is None:
            raise NotImplementedError("this sam3 model has no tracker (built from a detector-only checkpoint)")
        settings = {**model.config.family_options.get("video", {}), **options}
        bad = set(settings) - set(VIDEO_SETTINGS)
        if bad:
            raise ValueError(f"Unknown SAM 3 video setting(s) {sorted(bad)}; valid: {list(VIDEO_SETTINGS)}")
        saved = {k: getattr(video, k) for k in settings}
        was_training = model.training
        if was_training:
            model.eval()
        try:
            for k, v in settings.items():
                setattr(video, k, v)
            yield from _track(model, video, frames, prompts, threshold)
        finally:
            for k, v in saved.items():
                setattr(video, k, v)
            if was_training:
                model.train()


def _video_postprocessor(model: VLSegModel) -> Any:
    """transformers' Sam3VideoProcessor (its post-processing: hidden objects, per-prompt non-overlap, boxes)."""
    proc = model.__dict__.get("_sam3_video_processor")
    if proc is None:
        from transformers import Sam3ImageProcessor, Sam3VideoProcessor
        from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

        s = model.processor.size
        size = {"height": s, "width": s}
        mean, std = list(model.processor.mean), list(model.processor.std)
        proc = Sam3VideoProcessor(
            image_processor=Sam3ImageProcessor(size=size, image_mean=mean, image_std=std),
            video_processor=Sam2VideoVideoProcessor(size=size, image_mean=mean, image_std=std),
            tokenizer=model.text_encoder.tokenizer)
        model.__dict__["_sam3_video_processor"] = proc
    return proc


@torch.inference_mode()
def _track(model: VLSegModel, video: Any, frames: Iterator[np.ndarray], prompts: list[str],
           threshold: float) -> Iterator[dict[str, Any]]:
    from transformers.modeling_outputs import BaseModelOutputWithPooling
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession

    dev, dtype = model.device, model.dtype
    video.to(dev)  # the tracker lives with the image encoder; this is a no-op once there
    post = _video_postprocessor(model)
    session = Sam3VideoInferenceSession(inference_device=dev, inference_state_device=dev, video_storage_device=dev,
                                        dtype=dtype)
    unique = list(dict.fromkeys(prompts))
    feats = model.encode_text(unique)  # the model's prompt cache: each prompt encoded once, ever
    tokens, mask = _pad_text(feats.tokens, feats.mask)
    prompt_id = {}
    for i, p in enumerate(unique):
        pid = session.add_prompt(p)
        prompt_id[p] = pid
        session.prompt_embeddings[pid] = BaseModelOutputWithPooling(pooler_output=tokens[i:i + 1])
        session.prompt_attention_masks[pid] = mask[i:i + 1]
    shift = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else None
    cfg = video.tracker_model.config
    window = max(int(cfg.num_maskmem), int(cfg.max_object_pointers_in_encoder)) + 1
    empty = torch.empty(0, device=dev)
    buffer: list[tuple[Any, tuple[int, int]]] = []

    def finish(out: Any, size: tuple[int, int]) -> dict[str, Any]:
        if shift:  # threshold != 0.5: masks are logit > 0 after the shift
            out.obj_id_to_mask = {i: m - shift for i, m in out.obj_id_to_mask.items()}
        res = post.postprocess_outputs(session, out, original_sizes=[list(size)])
        h, w = size
        per_prompt, masks = [], np.zeros((len(prompts), h, w), bool)
        ids = res["object_ids"].tolist()
        for k, p in enumerate(prompts):
            mine = [j for j, o in enumerate(ids) if session.prompts.get(session.obj_id_to_prompt_id.get(o)) == p]
            m = res["masks"][mine].cpu().numpy().astype(bool)
            if len(mine):
                masks[k] = m.any(0)
            per_prompt.append({"ids": np.asarray([ids[j] for j in mine], np.int64),
                               "scores": res["scores"][mine].float().cpu().numpy(),
                               "boxes": res["boxes"][mine].float().cpu().numpy(), "masks": m})
        return {"index": int(out.frame_idx), "masks": masks, "objects": per_prompt}

    for t, frame in enumerate(frames):
        frame = np.asarray(frame)
        pv = model.processor([frame], device=dev, dtype=dtype)
        out = video(inference_session=session, frame=pv[0], frame_idx=t)
        _prune(session, t, window, empty)
        if video.hotstart_delay > 0:
            buffer.append((out, frame.shape[:2]))
            session.hotstart_removed_obj_ids.update(out.removed_obj_ids)
            if len(buffer) >= video.hotstart_delay:
                yield finish(*buffer.pop(0))
        else:
            yield finish(out, frame.shape[:2])
    for item in buffer:
        yield finish(*item)


def _prune(session: Any, t: int, window: int, empty: Tensor) -> None:
    """Drop what the tracker can no longer read: pixel values of past frames (replaced, not deleted: the session
    counts frames by its dict's length) and per-frame tracker memories older than ``window`` frames."""
    frames = session.processed_frames
    if frames is not None and t > 0:
        frames[t - 1] = empty
    old = t - window
    if old < 0:
        return
    for per_obj in session.output_dict_per_obj.values():
        per_obj["non_cond_frame_outputs"].pop(old, None)


__all__ = ["Sam3", "Sam3Decoder", "Sam3ImageEncoder", "Sam3TextEncoder", "load_upstream", "offline_clip_tokenizer",
           "write_upstream_folder"]
