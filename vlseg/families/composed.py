"""``composed`` family: any image encoder + any text encoder from the registries + a vlseg fusion decoder."""

from __future__ import annotations

from ..config import ModelConfig
from ..decoders import DECODERS
from ..encoders import build_encoders
from ..model import VLSegModel
from ..processing import ImageProcessor
from . import FAMILIES


@FAMILIES.register("composed")
def build_composed(config: ModelConfig, load_weights: bool = True) -> VLSegModel:
    assert config.image_encoder and config.text_encoder and config.decoder  # checked in ModelConfig
    image, text = build_encoders(config.image_encoder, config.text_encoder, load_weights)
    decoder = DECODERS.get(config.decoder.name).from_config(
        dict(config.decoder.options), image.info, text.info, config.presence)
    size = config.image_size or image.info.image_size
    if size % image.info.patch_size:
        raise ValueError(f"image_size {size} must be a multiple of the encoder patch size {image.info.patch_size}")
    image.set_image_size(size)
    processor = ImageProcessor(size=size, mean=image.info.mean, std=image.info.std, resample=image.info.resample,
                               pad=bool(config.options.get("pad_to_square", False)))
    model = VLSegModel(config, image, text, decoder, processor)
    if config.lora is not None:
        model.apply_lora(config.lora)
    return model
