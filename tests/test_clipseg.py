import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vlseg
from helpers import SHARED


def _reference(folder, image, prompts):
    from transformers import CLIPSegForImageSegmentation, CLIPSegProcessor

    proc = CLIPSegProcessor.from_pretrained(folder)
    up = CLIPSegForImageSegmentation.from_pretrained(folder).eval()
    inputs = proc(text=prompts, images=[image] * len(prompts), padding=True, return_tensors="pt")
    with torch.inference_mode():
        return torch.sigmoid(up(**inputs).logits)


@pytest.mark.parametrize("size", [(64, 64), (90, 121)])
def test_parity_with_transformers_pipeline(clipseg_dir, size):
    rng = np.random.default_rng(1)
    image = Image.fromarray((rng.random((*size, 3)) * 255).astype("uint8"))
    prompts = ["a polyp", "the grasper's tip", "the larger lesion on the left"]
    ref = _reference(clipseg_dir, image, prompts)  # (K, 64, 64) at the model resolution
    model = vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir)
    probs = vlseg.segment(model, image, prompts, return_probs=True)
    assert probs.shape == (3, *size)
    ref_full = torch.nn.functional.interpolate(ref[None], size=size, mode="bilinear", align_corners=False)[0]
    assert np.abs(probs - ref_full.numpy()).max() < 1e-3
    with torch.inference_mode():  # and at the model's own resolution, before the resize back
        pv = model.processor([np.asarray(image)])
        own = torch.sigmoid(model(pv, prompts).logits[0])
    assert (own - ref).abs().max() < 1e-3


def test_shared_tool_folder_loads(tmp_path):
    tool = SHARED / "tools" / "make_upstream_clipseg.py"
    if not tool.exists():
        pytest.skip(f"{tool} is absent (../shared next to the checkout)")
    subprocess.run([sys.executable, str(tool), str(tmp_path), "--tiny"], check=True, capture_output=True)
    # vlseg's own writer (tests, benchmarks) writes the same layout: the same files, processor and architecture
    # class (its tiny model is deeper, 6 blocks, and refined, so its weights are not the tool's)
    ours = Path(vlseg.write_upstream_clipseg(tmp_path / "ours", tiny=True))
    assert {p.name for p in ours.iterdir()} == {p.name for p in tmp_path.iterdir() if p.name != "ours"}
    theirs_proc, ours_proc = (json.loads((d / "processor_config.json").read_text()) for d in (tmp_path, ours))
    assert ours_proc == theirs_proc
    theirs_cfg, ours_cfg = (json.loads((d / "config.json").read_text()) for d in (tmp_path, ours))
    assert ours_cfg["architectures"] == theirs_cfg["architectures"] == ["CLIPSegForImageSegmentation"]
    assert ours_cfg["vision_config"]["image_size"] == theirs_cfg["vision_config"]["image_size"] == 64
    image = Image.fromarray(np.full((50, 70, 3), 127, np.uint8))
    model = vlseg.create_model("clipseg-rd64-refined", pretrained=str(tmp_path))
    probs = vlseg.segment(model, image, ["polyp"], return_probs=True)
    ref = _reference(str(tmp_path), image, ["polyp"])
    ref_full = torch.nn.functional.interpolate(ref[None], size=(50, 70), mode="bilinear", align_corners=False)[0]
    assert np.abs(probs - ref_full.numpy()).max() < 1e-3


def test_one_pass_and_early_stop(clipseg_dir):
    model = vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir)
    layers = model.image_encoder.backbone.encoder.layers
    ran = []
    hooks = [b.register_forward_hook(lambda mod, i, o, j=j: ran.append(j)) for j, b in enumerate(layers)]
    calls = []
    hooks.append(model.image_encoder.register_forward_hook(lambda *a: calls.append(1)))
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64), ["a", "b", "c", "d"])
    for h in hooks:
        h.remove()
    assert calls == [1]
    assert ran == [0, 1, 2, 3]  # extract_layers (1, 2, 3): blocks 4 and 5 of 6 are not run


def test_vision_lora_trains(clipseg_dir):
    """Unlike transformers' forward (no_grad around the vision tower), LoRA on CLIPSeg's vision tower gets gradients."""
    model = vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir, lora={"r": 2})
    model.train()
    out = model(torch.randn(2, 3, 64, 64), ["polyp"])
    out.logits.mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n and n.startswith("image_encoder")]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    frozen = [n for n, p in model.named_parameters() if p.requires_grad and not ("lora_" in n or n.startswith("decoder."))]
    assert not frozen


def test_checkpoint_keeps_upstream_decoder(clipseg_dir, tmp_path):
    model = vlseg.create_model("clipseg-rd64-refined", pretrained=clipseg_dir)
    model.save_pretrained(tmp_path)
    m2 = vlseg.load(tmp_path)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(model(x, ["a"]).logits, m2(x, ["a"]).logits)


def test_random_architecture_offline():
    model = vlseg.create_model("clipseg-rd16", pretrained=False, arch={
        "vision_config": {"patch_size": 16, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 10,
                          "num_attention_heads": 2, "image_size": 64},
        "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
        "projection_dim": 16, "reduce_dim": 16}, image_size=64)
    masks = vlseg.segment(model, np.zeros((40, 30), np.uint8), ["x"])
    assert masks.shape == (1, 40, 30) and masks.dtype == bool
