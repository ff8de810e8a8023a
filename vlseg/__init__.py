"""vlseg: vision-language medical image segmentation.

    import vlseg
    model = vlseg.create_model("biomedclip-film")
    masks = vlseg.segment(model, "image.png", ["polyp", "instrument"])
    model.save_pretrained("runs/x"); model = vlseg.load("runs/x")

Public modules: ``vlseg.data`` (datasets, clinical formats), ``vlseg.prompts`` (prompt library and generators),
``vlseg.training`` (losses, feature cache, deterministic batches, training state: what ``finetune/`` uses),
``vlseg.evaluation`` (metrics reports), ``vlseg.visualize`` (overlays), ``vlseg.naming`` (safe output names).
"""

from . import data, prompts  # noqa: I001  (vlseg.data.from_manifest, vlseg.prompts.generate, ...)
from .checkpoint import CheckpointError
from .config import DecoderConfig, EncoderConfig, LoraSpec, ModelConfig
from .decoders import list_decoders
from .encoders import list_encoders
from .encoders.tokenizers import write_clip_tokenizer
from .fixtures import write_upstream_clipseg
from .factory import create_model, load, load_or_create
from .families import list_families
from .inference import Prediction, predict, segment, segment_volume
from .video import segment_video
from .io import read_image
from .model import SegOutput, VLSegModel
from .presets import add_encoder_config, add_model_config, get_model_config, list_encoder_presets, list_models
from .sources import SourceError
from .version import __version__
from .vqa.inference import answer
from .volumes import VolumeMasks

__all__ = [
    "CheckpointError",
    "DecoderConfig",
    "EncoderConfig",
    "LoraSpec",
    "ModelConfig",
    "Prediction",
    "SegOutput",
    "SourceError",
    "VLSegModel",
    "VolumeMasks",
    "__version__",
    "add_encoder_config",
    "add_model_config",
    "answer",
    "create_model",
    "data",
    "get_model_config",
    "list_decoders",
    "list_encoder_presets",
    "list_encoders",
    "list_families",
    "list_models",
    "load",
    "load_or_create",
    "predict",
    "prompts",
    "read_image",
    "segment",
    "segment_video",
    "segment_volume",
    "write_clip_tokenizer",
    "write_upstream_clipseg",
]
