"""``composed`` family: any image encoder + any text encoder from the registries + a vlseg fusion decoder."""

from __future__ import annotations

from ..config import ModelConfig
from ..decoders import DECODERS
from ..encoders import build_encoders
from ..model import VLSegModel
from ..processing import ImageProcessor
from . import register_family
from .base import Family


@register_family
class Composed(Family):
    name = "composed"
    summary = "registry encoders + a vlseg fusion decoder"

    def validate(self, config: ModelConfig) -> None:
        missing = [n for n in ("image_encoder", "text_encoder", "decoder") if getattr(config, n) is None]
        if missing:
            raise ValueError(f"A 'composed' model config needs {missing}")

    def with_pretrained(self, config: ModelConfig, pretrained: bool | str) -> ModelConfig:
        """Named encoders take ``pretrained``; inline architectures (no name) only follow ``pretrained=False``."""
        config = config.replace()
        for enc in (config.image_encoder, config.text_encoder):
            if enc is not None and (enc.name or not pretrained):
                enc.pretrained = pretrained
        return config

    def rebuildable(self, config: ModelConfig) -> bool:
        if config.merged_lora:
            return False
        pairs = ((config.image_encoder, config.freeze_image), (config.text_encoder, config.freeze_text))
        return all(enc is not None and (not frozen or enc.weights_source is not None) for enc, frozen in pairs)

    def describe(self, config: ModelConfig) -> str:
        assert config.image_encoder is not None and config.decoder is not None
        enc = config.image_encoder
        return f"{enc.type}:{enc.name or 'inline'}  decoder={config.decoder.name}"

    def build(self, config: ModelConfig, load_weights: bool = True) -> VLSegModel:
        assert config.image_encoder and config.text_encoder and config.decoder  # validate() checked
        image, text = build_encoders(config.image_encoder, config.text_encoder, load_weights)
        decoder = DECODERS.get(config.decoder.name).from_config(
            dict(config.decoder.options), image.info, text.info, config.presence)
        size = config.image_size or image.info.image_size
        if size % image.info.patch_size:
            raise ValueError(f"image_size {size} must be a multiple of the encoder patch size {image.info.patch_size}")
        image.set_image_size(size)
        processor = ImageProcessor(size=size, mean=image.info.mean, std=image.info.std, resample=image.info.resample)
        model = VLSegModel(config, image, text, decoder, processor, family=self)
        if config.lora is not None:
            model.apply_lora(config.lora)
        return model
