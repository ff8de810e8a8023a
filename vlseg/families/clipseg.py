"""``clipseg`` family: upstream CLIPSeg (``CIDAS/clipseg-rd64-refined``, rd64, rd16) loaded through transformers and
run through vlseg's stages. Unlike transformers' forward, the vision tower is not under ``no_grad`` (LoRA on it
trains), it stops after the deepest extracted layer, the image is encoded once for K prompts, and the per-layer
reductions run once per image. Weights stay in the upstream layout (``decoder.net`` is ``CLIPSegDecoder``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from .._hub import download_hint
from ..encoders.hf import PositionCache
from ..encoders.tokenizers import SimpleClipTokenizer
from ..config import ModelConfig
from ..decoders.base import DecoderOutput, FusionDecoder
from ..decoders.blocks import repeat_k, resize_to
from ..encoders.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageEncoder,
    ImageEncoderInfo,
    ImageFeatures,
    TextEncoder,
    TextEncoderInfo,
    TextFeatures,
    run_blocks,
)
from ..model import VLSegModel
from ..processing import ImageProcessor
from . import FAMILIES

CLIP_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def _first(x: Any) -> Tensor:
    return x[0] if isinstance(x, tuple) else x


class CLIPSegVisionEncoder(ImageEncoder):
    """CLIPSeg's CLIP ViT: tokens (B, 1 + N, C) per requested layer, hidden_states[i + 1] in transformers terms."""

    def __init__(self, clip: nn.Module, size: int, mean: Sequence[float], std: Sequence[float], resample: int):
        super().__init__()
        self.backbone = clip.vision_model
        self._projection = clip.visual_projection
        self._pos = PositionCache()
        vc = clip.config.vision_config
        self.info = ImageEncoderInfo(
            width=vc.hidden_size, num_layers=vc.num_hidden_layers, patch_size=vc.patch_size, image_size=size,
            embed_dim=clip.config.projection_dim, num_prefix_tokens=1, mean=tuple(mean), std=tuple(std),
            resample=resample, lora_targets=CLIP_TARGETS,
        )

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures; see ImageEncoder.forward."""
        vm = self.backbone
        x = vm.pre_layrnorm(self._pos(vm.embeddings, pixel_values))
        blocks = vm.encoder.layers
        outs = run_blocks(blocks, x, list(layers) + ([len(blocks) - 1] if pooled else []),
                          lambda blk, h: _first(blk(h, None)))
        pooled_t = self._projection(vm.post_layernorm(outs.pop()[:, 0])) if pooled else None
        p = self.info.patch_size
        h, w = pixel_values.shape[-2:]
        return ImageFeatures(tokens=outs, grid=(h // p, w // p), num_prefix_tokens=1, pooled=pooled_t,
                             image_size=(h, w))


class _ClipText(nn.Module):
    def __init__(self, clip: nn.Module):
        super().__init__()
        self.text_model = clip.text_model
        self.text_projection = clip.text_projection


class CLIPSegTextEncoder(TextEncoder):
    """CLIPSeg's CLIP text tower: token states (K, L, Dt) and the projected pooled embedding CLIPSeg conditions on."""

    def __init__(self, clip: nn.Module, tokenizer: Any):
        super().__init__()
        self.backbone = _ClipText(clip)
        self.tokenizer = tokenizer
        tc = clip.config.text_config
        self.info = TextEncoderInfo(width=tc.hidden_size, embed_dim=clip.config.projection_dim,
                                    max_length=tc.max_position_embeddings, lora_targets=CLIP_TARGETS)

    def tokenize(self, texts: Sequence[str]) -> dict[str, Tensor]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.info.max_length,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> TextFeatures:
        """(K, L) -> TextFeatures (tokens (K, L, Dt), mask (K, L), pooled (K, D))."""
        out = self.backbone.text_model(input_ids=input_ids, attention_mask=attention_mask)
        pooled = self.backbone.text_projection(out.pooler_output)
        return TextFeatures(tokens=out.last_hidden_state, mask=attention_mask.bool(), pooled=pooled)


class CLIPSegDecoderAdapter(FusionDecoder):
    """Runs the upstream ``CLIPSegDecoder`` (``self.net``, weights unchanged) on vlseg features.

    The per-layer reductions depend only on the image, so they run once per image before the K prompts are
    broadcast; the result equals transformers' forward (same modules, same order of operations).
    """

    def __init__(self, net: nn.Module, extract_layers: Sequence[int], patch_size: int):
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
        gh, gw = image.grid
        maps = out[:, 1:, :].transpose(1, 2).reshape(out.shape[0], -1, gh, gw)
        logits = net.transposed_convolution(maps)
        return DecoderOutput(logits=resize_to(logits, tuple(pixel_values.shape[-2:]))[:, 0])


def _load_upstream(config: ModelConfig, load_weights: bool = True) -> tuple[nn.Module, Any, dict[str, Any]]:
    from transformers import CLIPSegConfig, CLIPSegForImageSegmentation, CLIPSegProcessor

    inline = config.options.get("arch")
    src = config.pretrained if isinstance(config.pretrained, str) else config.source
    if not config.pretrained or (not load_weights and not (isinstance(src, str) and os.path.isdir(src))):
        if inline is None:
            if src is None:
                raise ValueError("clipseg config needs 'source' (hub id or folder) or options.arch")
            try:
                up_config = CLIPSegConfig.from_pretrained(src, revision=config.options.get("revision"))
            except OSError as e:
                raise download_hint(src, e) from e
        else:
            up_config = CLIPSegConfig(**inline)
        model = CLIPSegForImageSegmentation(up_config)
        size = int(config.image_size or 352)
        return model, SimpleClipTokenizer(), {"size": size, "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                                              "resample": 2}
    if src is None:
        raise ValueError("clipseg config needs 'source' (a hub id such as CIDAS/clipseg-rd64-refined or a folder)")
    if os.path.isdir(src):
        if not os.path.isfile(os.path.join(src, "config.json")):
            raise ValueError(f"{src} is not a CLIPSeg folder (no config.json)")
    revision = config.options.get("revision")
    try:
        if load_weights:
            model = CLIPSegForImageSegmentation.from_pretrained(src, revision=revision)
        else:
            model = CLIPSegForImageSegmentation(CLIPSegConfig.from_pretrained(src, revision=revision))
        processor = CLIPSegProcessor.from_pretrained(src, revision=revision)
    except OSError as e:
        raise download_hint(src, e) from e
    if model.config.model_type != "clipseg":
        raise ValueError(f"{src} holds a {model.config.model_type!r} model, not CLIPSeg")
    ip = processor.image_processor
    size = ip.size.get("height") if isinstance(ip.size, dict) else getattr(ip.size, "height", None)
    pp = {"size": int(size or 352), "mean": tuple(ip.image_mean), "std": tuple(ip.image_std),
          "resample": int(getattr(ip.resample, "value", ip.resample))}
    return model, processor.tokenizer, pp


@FAMILIES.register("clipseg")
def build_clipseg(config: ModelConfig, load_weights: bool = True) -> VLSegModel:
    upstream, tokenizer, pp = _load_upstream(config, load_weights)
    upstream.eval()
    clip = upstream.clip
    size = int(config.image_size or pp["size"])
    image = CLIPSegVisionEncoder(clip, size, pp["mean"], pp["std"], pp["resample"])
    text = CLIPSegTextEncoder(clip, tokenizer)
    decoder = CLIPSegDecoderAdapter(upstream.decoder, upstream.config.extract_layers,
                                    upstream.config.vision_config.patch_size)
    processor = ImageProcessor(size=size, mean=tuple(pp["mean"]), std=tuple(pp["std"]), resample=pp["resample"])
    model = VLSegModel(config, image, text, decoder, processor)
    if config.lora is not None:
        model.apply_lora(config.lora)
    return model


__all__ = ["build_clipseg"]
