"""``vqa`` family: a composed model (registry encoders + a grounding FusionDecoder) plus question ⇄ patch fusion
and answer heads (``vlseg.vqa.model.VQAModel``). Its models train with the ``vqa`` task (``vlseg.vqa.task``)."""

from __future__ import annotations

from ..config import ModelConfig
from ..model import VLSegModel
from . import register_family
from .base import Capabilities
from .composed import Composed


@register_family
class VQAFamily(Composed):
    name = "vqa"
    precision_modes = ("fp32",)  # lower-precision copies of its towers are not validated yet
    capabilities = Capabilities(task="vqa")
    summary = "question-patch fusion, closed + open-vocabulary answer heads, answers grounded as masks"

    def validate(self, config: ModelConfig) -> None:
        from ..vqa.model import check_family_options

        super().validate(config)
        if not config.presence:
            raise ValueError("A 'vqa' model needs presence=true: the decoder's presence head scores whether an "
                             "answer refers to a region")
        check_family_options(config.family_options)

    def describe(self, config: ModelConfig) -> str:
        from ..vqa.model import vocab_of

        vocab = vocab_of(config.family_options)
        return f"{super().describe(config)}  answers={vocab.name} ({len(vocab.answers)})"

    def build(self, config: ModelConfig, load_weights: bool = True) -> VLSegModel:
        from ..vqa.model import VQAModel

        base = super().build(config, load_weights)  # encoders, grounding decoder, processor, LoRA
        return VQAModel(base.config, base.image_encoder, base.text_encoder, base.decoder, base.processor,
                        family=self)


def _register_task() -> None:
    """The ``vqa`` training task lives with the VQA code; it needs the [train] extra (pydantic, ...)."""
    try:
        from ..vqa import task  # noqa: F401  (registers "vqa")
    except ImportError:  # a base install: models work, training needs `pip install vlseg[train]`
        pass


_register_task()
