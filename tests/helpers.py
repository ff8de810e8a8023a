"""Offline builders for upstream-format folders with tiny random weights (tests only)."""

from __future__ import annotations

import os
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = SHARED / "data"


def write_clip_tokenizer(out: str | os.PathLike) -> None:
    from vlseg.encoders.tokenizers import write_clip_tokenizer as write

    write(out)


def tiny_clip_config(model_type: str = "clip", image_size: int = 64, patch: int = 8) -> dict:
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)
    return dict(
        model_type=model_type,
        text_config=dict(common, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(common, image_size=image_size, patch_size=patch),
        **({"projection_dim": 24} if model_type == "clip" else {}),
    )


def write_tiny_hf_clip(out: str | os.PathLike, seed: int = 0) -> str:
    """A transformers CLIPModel folder (config + safetensors + tokenizer + image processor), random weights."""
    import torch
    from transformers import AutoConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    d = tiny_clip_config()
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    CLIPModel(config).save_pretrained(out)
    write_clip_tokenizer(out)
    CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}).save_pretrained(out)
    return str(out)


def write_tiny_clipseg(out: str | os.PathLike, seed: int = 0) -> str:
    """A tiny CLIPSeg folder in the upstream layout (``vlseg.write_upstream_clipseg(tiny=True)``)."""
    from vlseg import write_upstream_clipseg

    return write_upstream_clipseg(out, tiny=True, seed=seed)


def tiny_biomedclip_like(tmp: str | os.PathLike) -> dict:
    """An open_clip encoder config shaped like BiomedCLIP (timm ViT trunk + HF BERT text, CLS pooler, MLP proj)."""
    from transformers import BertConfig

    bert = Path(tmp) / "tiny-bert"
    BertConfig(vocab_size=49408, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(bert)
    return {"type": "open_clip", "pretrained": False, "arch": {"model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_model_pretrained": False,
                     "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 32},
    }}}


def with_strong_lora(model, r: int = 4):
    """LoRA r on both towers with random (not zero) B matrices, so the adapters change the outputs."""
    import torch

    model.apply_lora({"r": r, "image": True, "text": True})
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    return model


def spy_on_auto_calibration(monkeypatch, model) -> dict:
    """Make ``precision='auto'`` on ``model`` calibrate through a spy (int8 offered, fp32 chosen) and return the dict
    it fills with the ``images`` and ``prompts`` it was handed."""
    from vlseg import precision as P

    seen: dict = {}

    def spy(model, images=None, prompts=None, **kw):
        seen["images"], seen["prompts"] = images, prompts
        return P.Calibration("fp32", {"fp32": 1.0}, {}, {"fp32": True}, {}, "cpu", "", "k")

    monkeypatch.setattr(P, "calibrate", spy)
    monkeypatch.setattr(P, "available_modes", lambda device="cpu", info=None: ["fp32", "int8"])
    P._RESOLVED.pop(model, None)
    return seen
