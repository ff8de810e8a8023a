"""A timm CNN (ResNet family and any model timm can build with ``features_only``) as the image trunk.

Each stage of the CNN is one "layer": its feature map is resampled to the stride-``patch_size`` grid (average
pooling from finer stages, bilinear from coarser ones) and projected to ``width`` channels by a 1x1 convolution, so
decoders read the same token contract as from a ViT: layer ``i`` -> (B, N, width) with N = (H / p) * (W / p).
A CNN keeps locality (an inductive bias a small ViT trained from scratch lacks) at a similar CPU cost. The stages
finer than the grid are also given as they are (``ImageFeatures.fine``: resnet18's strides 2, 4 and 8), for decoders
that use them as skip connections (``query-mask`` with ``skips``), as a U-Net does.

    {"type": "timm-cnn", "pretrained": false, "options": {"model": "resnet18", "width": 192}}   # from scratch
    {"type": "timm-cnn", "name": "resnet18", "pretrained": true}                               # timm's weights

With ``name``, ``pretrained`` is: ``True`` timm's weights for it from the Hub (the ``model.safetensors`` of its
``timm/...`` repo, fetched as safe files only; a repo with only pickles is refused); a path: a ``.safetensors`` state
dict (or a folder holding ``model.safetensors``) of that timm model; ``False`` random weights. Without ``name`` (the
model in ``options``) the trunk always starts from random weights and trains with the decoder. The stage
projections are new layers: they train even when the CNN is frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import EncoderConfig
from ..features import IMAGENET_MEAN, IMAGENET_STD, ImageEncoderInfo, ImageFeatures
from ..sources import SourceError, resolve_folder
from . import ENCODERS
from .base import EncoderPair, ImageEncoder, check_options

_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "global_pool.")


def _load_file(model: nn.Module, path: str) -> None:
    """Load a safetensors state dict of the full timm model into its ``features_only`` wrapper (the classifier
    head's weights are dropped; any other missing or extra weight is an error naming them)."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "model.safetensors"
    if not p.is_file() or p.suffix != ".safetensors":
        raise SourceError(f"timm-cnn weights must be a .safetensors file or a folder holding model.safetensors; "
                          f"got {path!r} (vlseg never unpickles .pth/.bin files)")
    state = {k: v for k, v in load_file(str(p)).items() if not k.startswith(_HEAD_PREFIXES)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise SourceError(f"{p} does not hold this timm model's weights: {str(e).splitlines()[1].strip()}") from e
    if missing or unexpected:
        raise SourceError(f"{p} does not hold this timm model's weights: missing {sorted(missing)[:5]}"
                          f"{'...' if len(missing) > 5 else ''}, unexpected {sorted(unexpected)[:5]}"
                          f"{'...' if len(unexpected) > 5 else ''}")


def _hub_weights(model: str) -> Path:
    """The ``model.safetensors`` of timm's Hub repo for ``model`` (``timm/resnet18.a1_in1k``), fetched as safe files
    only (``vlseg.sources.resolve_folder``)."""
    import timm

    hub_id = getattr(timm.models.get_pretrained_cfg(model), "hf_hub_id", None)
    if not hub_id:
        raise SourceError(f"timm names no Hub weights for {model!r}; pass a .safetensors file as `pretrained`")
    folder = resolve_folder(f"hf-hub:{hub_id}")
    if not (folder / "model.safetensors").is_file():
        raise SourceError(f"{hub_id} on the Hub has no model.safetensors (vlseg never unpickles .bin/.pth files)")
    return folder / "model.safetensors"


class TimmCNNImageEncoder(ImageEncoder):
    """timm CNN stages -> per-stage tokens on one grid (no prefix tokens).

    Args:
        model: a timm model name (``resnet18``, ``resnet10t``, ``convnext_atto``, ...).
        width: C, the token width every stage is projected to.
        patch_size: p, the grid's stride in pixels (16: the stride of a ViT-B/16's tokens).
        image_size: native input side.
        pretrained: see the module docstring.
    """

    def __init__(self, *, model: str = "resnet18", width: int = 192, patch_size: int = 16, image_size: int = 224,
                 pretrained: bool | str = False):
        super().__init__()
        import timm

        try:  # always built with random weights: timm's own loader may fetch pickles, ours reads only safetensors
            self.backbone = timm.create_model(model, pretrained=False, features_only=True)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"timm has no model {model!r} (see timm.list_models())") from e
            raise
        if pretrained is True:
            _load_file(self.backbone, str(_hub_weights(model)))
        elif isinstance(pretrained, str):
            _load_file(self.backbone, pretrained)
        chans = self.backbone.feature_info.channels()
        self.reductions: list[int] = list(self.backbone.feature_info.reduction())
        if any(patch_size % r for r in self.reductions if r < patch_size):
            raise ValueError(f"patch_size {patch_size} must be a multiple of {model}'s finer stage strides "
                             f"{self.reductions}")
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in chans)
        self.norm = nn.ModuleList(nn.LayerNorm(width) for _ in chans)  # per token: no statistics across the image
        self.trainable_prefixes = ("proj.", "norm.")  # new layers: they train even when the CNN itself is frozen
        fine = [i for i, r in enumerate(self.reductions) if r < patch_size]
        self.fine_stages: list[int] = fine  # the stages finer than the grid, given as maps (``ImageFeatures.fine``)
        self.info = ImageEncoderInfo(
            width=width, num_layers=len(chans), patch_size=patch_size, image_size=image_size, embed_dim=width,
            num_prefix_tokens=0, mean=IMAGENET_MEAN, std=IMAGENET_STD, resample=2,
            lora_targets=("conv1", "conv2"), default_layers=tuple(range(1, len(chans))),
            fine_strides=tuple(self.reductions[i] for i in fine), fine_channels=tuple(chans[i] for i in fine),
        )

    def _stages(self, x: Tensor, last: int) -> list[Tensor]:
        """(B, 3, H, W) -> the feature maps of stages 0..``last`` (stage s: (B, C_s, H / r_s, W / r_s)). The CNN
        stops after stage ``last``: a stage no decoder reads costs no time (the main job's decoder never reads resnet18's
        stride-32 stage). timm's sequential feature wrapper (ResNets and most CNNs) is run module by module, as its
        own forward does (so hooks on ``backbone`` itself do not fire; hooks on its stages do); other wrappers, and
        gradient checkpointing, run whole."""
        net = self.backbone
        taps = getattr(net, "return_layers", None)
        if taps is None or last >= len(self.reductions) - 1 or getattr(net, "grad_checkpointing", False) \
                or not isinstance(net, nn.ModuleDict):
            return list(net(x))[: last + 1]
        out: list[Tensor] = []
        for name, module in net.items():
            x = module(x)
            if name in taps:
                if isinstance(x, (tuple, list)):  # as timm's own wrapper: a tuple tap is joined or its first taken
                    out.append(torch.cat(list(x), 1) if getattr(net, "concat", False) else x[0])
                else:
                    out.append(x)
                if len(out) > last:
                    break
        return out

    def forward(self, pixel_values: Tensor, layers: Sequence[int], pooled: bool = False) -> ImageFeatures:
        """(B, 3, H, W) -> ImageFeatures with one (B, (H/p) * (W/p), width) tensor per requested stage, and the
        stages finer than the grid as maps (B, C_s, H/s, W/s) in ``fine``."""
        h, w = pixel_values.shape[-2], pixel_values.shape[-1]
        grid = (h // self.info.patch_size, w // self.info.patch_size)
        n = len(self.proj)
        layers = [i % n for i in layers]
        feats = self._stages(pixel_values, max(layers + self.fine_stages + ([n - 1] if pooled else [])))
        tokens = []
        for i in layers:
            f, r = feats[i], self.reductions[i]
            if r < self.info.patch_size:  # finer stage: average r-pixel cells into p-pixel ones (constant kernel: ONNX)
                f = nn.functional.avg_pool2d(f, self.info.patch_size // r)
            elif r > self.info.patch_size or f.shape[-2:] != grid:
                f = nn.functional.interpolate(f, size=grid, mode="bilinear", align_corners=False)
            tokens.append(self.norm[i](self.proj[i](f).flatten(2).transpose(1, 2)))
        pooled_t = self.norm[n - 1](self.proj[n - 1](feats[-1]).mean((2, 3))) if pooled else None
        fine = [feats[i] for i in self.fine_stages]
        return ImageFeatures(tokens=tokens, grid=grid, num_prefix_tokens=0, pooled=pooled_t, image_size=(h, w),
                             fine=fine)


@ENCODERS.register("timm-cnn")
def build_timm_cnn(cfg: EncoderConfig, load_weights: bool = True) -> EncoderPair:
    check_options(cfg, {"model", "width", "patch_size", "image_size"})
    opts = dict(cfg.options)
    model = opts.pop("model", None) or cfg.name
    if not model:
        raise ValueError("timm-cnn encoder needs a timm model name ('name', or options 'model' for a trunk built "
                         "from scratch), such as 'resnet18'")
    pretrained = cfg.pretrained if load_weights and cfg.name else False  # unnamed: an architecture, never weights
    return EncoderPair(image=TimmCNNImageEncoder(model=model, pretrained=pretrained, **opts))


__all__ = ["TimmCNNImageEncoder", "build_timm_cnn"]
