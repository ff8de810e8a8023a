"""vlseg: vision-language medical image segmentation.

    import vlseg
    model = vlseg.create_model("biomedclip-film")
    masks = vlseg.segment(model, "image.png", ["polyp", "instrument"])
    model.save_pretrained("runs/x"); model = vlseg.load("runs/x")
"""

from .checkpoint import CheckpointError
from .checkpoint import load_model as load
from .config import DecoderConfig, EncoderConfig, LoraSpec, ModelConfig
from .decoders import list_decoders
from .encoders import list_encoders
from .factory import add_model_config, create_model, get_model_config, list_models, load_or_create
from .inference import Prediction, predict, segment
from .model import SegOutput, VLSegModel
from .version import __version__

from . import data, prompts  # noqa: E402  (vlseg.data.from_manifest, vlseg.prompts.generate, ...)

__all__ = [
    "CheckpointError",
    "DecoderConfig",
    "EncoderConfig",
    "LoraSpec",
    "ModelConfig",
    "Prediction",
    "SegOutput",
    "VLSegModel",
    "__version__",
    "add_model_config",
    "data",
    "create_model",
    "get_model_config",
    "list_decoders",
    "list_encoders",
    "list_models",
    "load",
    "load_or_create",
    "predict",
    "prompts",
    "segment",
]
