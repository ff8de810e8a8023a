"""``clipseg`` family: upstream CLIPSeg (``CIDAS/clipseg-rd64-refined``, rd64, rd16) loaded through transformers and
run through vlseg's stages. Unlike transformers' forward, the vision tower is not under ``no_grad`` (LoRA on it
trains), it stops after the deepest extracted layer, the image is encoded once for K prompts, and the per-layer
reductions run once per image. CLIPSeg's CLIP is a transformers dual encoder, so its towers are the ``hf-clip``
backend's; the decoder weights stay in the upstream layout (``decoder.net`` is ``CLIPSegDecoder``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..config import ModelConfig
from ..decoders.base import DecoderOutput, FusionDecoder
from ..decoders.blocks import repeat_k, resize_to
from ..encoders.hf import HFDualTextEncoder, HFVisionEncoder
from ..encoders.tokenizers import SimpleClipTokenizer
from ..features import IMAGENET_MEAN, IMAGENET_STD, ImageFeatures, TextFeatures
from ..model import VLSegModel
from ..processing import ImageProcessor
from ..sources import download_hint, parse_source, require_safetensors, resolve_folder
from . import register_family
from .base import Family, rename_prefixes


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


class CLIPSegDecoderAdapter(FusionDecoder):
    """Runs the upstream ``CLIPSegDecoder`` (``self.net``, weights unchanged) on vlseg features.

    The per-layer reductions depend only on the image, so they run once per image before the K prompts are
    broadcast; the result equals transformers' forward (same modules, same order of operations).
    """

    def __init__(self, net: Any, extract_layers: Sequence[int], patch_size: int):
        super().__init__()
        self.net = net
        self.layers = tuple(extract_layers)
        self.patch_size = patch_size

    def forward(self, image: ImageFeatures, text: TextFeatures, pixel_values: Tensor, k: int) -> DecoderOutput:
        """image: B images (tokens incl. CLS); text: B * K prompts -> logits (B * K, H, W)."""
        net = self.net
        cond = text.pooled
        acts = image.tokens[::-1]
        out = None
        for i, (act, layer, reduce) in enumerate(zip(acts, net.layers, net.reduces)):
            r = repeat_k(reduce(act), k)
            out = r if out is None else r + out
            if i == net.conditional_layer:
                out = net.film_mul(cond)[:, None] * out + net.film_add(cond)[:, None]
            out = _first(layer(out, attention_mask=None))
        assert out is not None
        gh, gw = image.grid
        maps = out[:, 1:, :].transpose(1, 2).reshape(out.shape[0], -1, gh, gw)
        logits = net.transposed_convolution(maps)
        return DecoderOutput(logits=resize_to(logits, (pixel_values.shape[-2], pixel_values.shape[-1]))[:, 0])


def _random_upstream(config: ModelConfig) -> tuple[Any, Any, dict[str, Any]]:
    """The architecture (from ``config.arch``, else the source's config.json) with random weights."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation

    if config.arch is not None:
        up_config = CLIPSegConfig(**config.arch)
    else:
        if config.source is None:
            raise ValueError("clipseg config needs 'source' (hub id or folder) or 'arch'")
        folder = resolve_folder(parse_source(config.source, revision=config.revision))
        up_config = CLIPSegConfig.from_pretrained(str(folder))
    pp = {"size": int(config.image_size or 352), "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resample": 2}
    return CLIPSegForImageSegmentation(up_config), SimpleClipTokenizer(), pp


def _load_upstream(config: ModelConfig, load_weights: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """-> (CLIPSegForImageSegmentation, tokenizer, preprocessing) from the upstream folder (safetensors only)."""
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor

    where = config.pretrained if isinstance(config.pretrained, str) else config.source
    if where is None:
        raise ValueError("clipseg config needs 'source' (a hub id such as CIDAS/clipseg-rd64-refined or a folder)")
    folder = resolve_folder(parse_source(where, revision=config.revision))
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a CLIPSeg folder (no config.json)")
    try:
        if load_weights:
            require_safetensors(folder, "CLIPSeg model")
            model = CLIPSegForImageSegmentation.from_pretrained(str(folder), use_safetensors=True)
        else:
            model = CLIPSegForImageSegmentation(CLIPSegConfig.from_pretrained(str(folder)))
        processor = CLIPSegProcessor.from_pretrained(str(folder))
    except OSError as e:
        raise download_hint(str(folder), e) from e
    if model.config.model_type != "clipseg":
        raise ValueError(f"{folder} holds a {model.config.model_type!r} model, not CLIPSeg")
    ip = processor.image_processor
    size = ip.size.get("height") if isinstance(ip.size, dict) else getattr(ip.size, "height", None)
    pp = {"size": int(size or 352), "mean": tuple(ip.image_mean), "std": tuple(ip.image_std),
          "resample": int(getattr(ip.resample, "value", ip.resample))}
    return model, processor.tokenizer, pp


@register_family
class CLIPSeg(Family):
    name = "clipseg"
    summary = "upstream CLIPSeg (transformers), its own decoder"

    def validate(self, config: ModelConfig) -> None:
        if config.source is None and config.arch is None and not isinstance(config.pretrained, str):
            raise ValueError("A 'clipseg' model config needs 'source' (hub id or folder) or 'arch'")

    def build(self, config: ModelConfig, load_weights: bool = True) -> VLSegModel:
        where = config.pretrained if isinstance(config.pretrained, str) else config.source
        upstream_files = config.pretrained and (load_weights or (where is not None and parse_source(where).kind
                                                                 == "local"))
        upstream, tokenizer, pp = (_load_upstream(config, load_weights) if upstream_files
                                   else _random_upstream(config))
        upstream.eval()
        clip = upstream.clip
        size = int(config.image_size or pp["size"])
        image = HFVisionEncoder(clip, {**pp, "size": size})
        text = HFDualTextEncoder(clip, tokenizer)
        decoder = CLIPSegDecoderAdapter(upstream.decoder, upstream.config.extract_layers,
                                        upstream.config.vision_config.patch_size)
        processor = ImageProcessor(size=size, mean=tuple(pp["mean"]), std=tuple(pp["std"]), resample=pp["resample"])
        model = VLSegModel(config, image, text, decoder, processor, family=self)
        if config.lora is not None:
            model.apply_lora(config.lora)
        return model

    def migrate_state_dict(self, state: dict[str, torch.Tensor], config_version: int) -> dict[str, torch.Tensor]:
        """0.1.0 kept CLIPSeg's text tower and projection under ``text_encoder.backbone.{text_model,
        text_projection}`` and the image projection as ``image_encoder._projection``; the towers are now the
        ``hf-clip`` backend's."""
        if config_version >= 2:
            return state
        return rename_prefixes(state, {"text_encoder.backbone.text_model.": "text_encoder.backbone.",
                                       "text_encoder.backbone.text_projection.": "text_encoder._projection."})
