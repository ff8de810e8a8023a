import pytest
import torch

import vlseg
from helpers import tiny_biomedclip_like


def _grads_reach_exactly_configured(m, prompts=("polyp", "vessel")):
    m.train()
    out = m(torch.randn(2, 3, m.processor.size, m.processor.size), list(prompts))
    (out.logits.mean() + out.presence.mean()).backward()
    for name, p in m.named_parameters():
        is_lora = "lora_" in name
        is_dec = name.startswith("decoder.")
        extra = name.startswith("text_encoder.proj.")  # hf-text learned projection (outside the backbone)
        if is_lora or is_dec or extra:
            assert p.requires_grad, name
            assert p.grad is not None, f"no gradient reached {name}"
        else:
            assert not p.requires_grad, f"frozen parameter {name} is trainable"
            assert p.grad is None, f"frozen parameter {name} got a gradient"
    # LoRA B starts at zero, so A's grad is zero at init; B's grad must be non-zero.
    assert any(p.grad.abs().sum() > 0 for n, p in m.named_parameters() if "lora_B" in n)


@pytest.mark.parametrize("which", [{"image": True, "text": False}, {"image": False, "text": True},
                                   {"image": True, "text": True}])
def test_gradients_reach_exactly_lora_and_decoder_open_clip(which):
    m = vlseg.create_model("tiny-test", pretrained=False, lora={"r": 2, **which})
    _grads_reach_exactly_configured(m)
    names = [n for n, _ in m.named_parameters() if "lora_" in n]
    assert any(n.startswith("image_encoder") for n in names) == which["image"]
    assert any(n.startswith("text_encoder") for n in names) == which["text"]


def test_default_targets_match_every_backend(tmp_path, hf_clip_dir):
    """Default LoRA target names match modules in each backend (names differ by library version)."""
    bio = tiny_biomedclip_like(tmp_path)
    hf = {"type": "hf-clip", "name": hf_clip_dir}
    cases = [
        dict(image_encoder=bio, text_encoder=bio),
        dict(image_encoder=hf, text_encoder=hf),
        dict(image_encoder={"type": "scratch", "pretrained": False, "options": {"width": 32, "depth": 3, "heads": 2,
                                                                                 "patch_size": 8, "image_size": 64}},
             text_encoder=hf),
    ]
    for kw in cases:
        m = vlseg.create_model("tiny-test", pretrained=False, **kw)
        counts = m.apply_lora({"r": 2, "text": True})
        assert counts["image"] > 0 and counts["text"] > 0, kw
        _grads_reach_exactly_configured(m)


def test_merge_keeps_outputs(tiny):
    tiny.apply_lora({"r": 2, "text": True})
    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        x = torch.randn(1, 3, 64, 64)
        a = tiny(x, ["polyp"]).logits
        assert tiny.merge_lora() > 0
        b = tiny(x, ["polyp"]).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not any("lora_" in n for n, _ in tiny.named_parameters())
    assert tiny.config.lora is None


def test_bad_targets_clear_error(tiny):
    with pytest.raises(ValueError, match="match no module"):
        tiny.apply_lora({"r": 2, "image_targets": ["nope"]})


@pytest.mark.parametrize("which", ["image", "text"])
def test_lora_active_at_inference(tiny, which):
    """Adapters change outputs in eval mode under inference_mode (no fused fast path skips them)."""
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        base = tiny(x, ["polyp"]).logits.clone()
    tiny.apply_lora({"r": 2, "image": which == "image", "text": which == "text"})
    with torch.no_grad():
        for n, p in tiny.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    with torch.inference_mode():
        assert not torch.allclose(tiny(x, ["polyp"]).logits, base)


def test_merged_attention_lora_keeps_every_tensor_and_round_trips(tmp_path):
    """Merging LoRA on open_clip's nn.MultiheadAttention keeps in_proj_weight / out_proj.weight as parameters, so a
    merged model (saved with its encoders) loads back with the same output."""
    m = vlseg.create_model("tiny-test", pretrained=False)
    keys = set(m.state_dict())
    m.apply_lora({"r": 2, "image": True, "text": True})
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before = m(x, ["polyp"]).logits
    assert m.merge_lora() > 0
    assert set(m.state_dict()) == keys
    m2 = vlseg.load(m.save_pretrained(tmp_path / "merged"))
    with torch.no_grad():
        torch.testing.assert_close(m2(x, ["polyp"]).logits, before, atol=1e-5, rtol=1e-4)
