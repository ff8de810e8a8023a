"""Shared tester for every fusion decoder (STYLE P8): shapes at odd sizes, backward, save/load, LoRA, determinism."""

import pytest
import torch

import vlseg
from vlseg.features import ImageEncoderInfo, ImageFeatures, TextEncoderInfo, TextFeatures

DECODERS = {
    "film": {"layers": [0, 1, 2], "reduce_dim": 16, "heads": 2},
    "cross-attn": {"layers": [0, 1, 2], "dim": 32, "heads": 2},
    "query-mask": {"layers": [0, 1, 2], "dim": 32, "heads": 2, "embed_dim": 8},
}


def features(b, grid, c=24, layers=3, prefix=1):
    n = grid[0] * grid[1]
    return ImageFeatures(tokens=[torch.randn(b, prefix + n, c) for _ in range(layers)], grid=grid,
                         num_prefix_tokens=prefix)


def text(bk, length=5, dt=20, d=12):
    mask = torch.ones(bk, length, dtype=torch.bool)
    mask[0, 3:] = False
    return TextFeatures(torch.randn(bk, length, dt), mask, torch.randn(bk, d))


@pytest.fixture(params=sorted(DECODERS))
def decoder(request):
    cls = vlseg.decoders.DECODERS.get(request.param)
    img = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=64)
    txt = TextEncoderInfo(width=20, embed_dim=12)
    return cls.from_config(DECODERS[request.param], img, txt, presence=True)


@pytest.mark.parametrize("hw", [(64, 64), (40, 72), (45, 61), (9, 17)])
def test_shapes_at_odd_sizes(decoder, hw):
    b, k = 2, 3
    grid = (-(-hw[0] // 8), -(-hw[1] // 8))
    out = decoder(features(b, grid), text(b * k), torch.randn(b, 3, *hw), k)
    assert out.logits.shape == (b * k, *hw)
    assert out.presence.shape == (b * k,)
    assert torch.isfinite(out.logits).all()


def test_backward_reaches_every_parameter(decoder):
    out = decoder(features(2, (4, 5)), text(4), torch.randn(2, 3, 32, 40), 2)
    (out.logits.mean() + out.presence.mean()).backward()
    missing = [n for n, p in decoder.named_parameters() if p.grad is None]
    assert not missing, missing


def test_prompt_dependence(decoder):
    """Different prompts for the same image give different masks (the text is used)."""
    f = features(1, (4, 4))
    t = text(2)
    out = decoder(f, t, torch.randn(1, 3, 32, 32), 2)
    assert not torch.allclose(out.logits[0], out.logits[1])


def test_determinism(decoder):
    decoder.eval()
    f, t, pv = features(1, (4, 4)), text(2), torch.randn(1, 3, 32, 32)
    a = decoder(f, t, pv, 2).logits
    b = decoder(f, t, pv, 2).logits
    assert torch.equal(a, b)


def test_cross_attn_uses_token_states():
    img = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=64)
    dec = vlseg.decoders.DECODERS.get("cross-attn").from_config(DECODERS["cross-attn"], img,
                                                                TextEncoderInfo(width=20, embed_dim=12), True).eval()
    f, t, pv = features(1, (4, 4)), text(1), torch.randn(1, 3, 32, 32)
    a = dec(f, t, pv, 1).logits
    t2 = TextFeatures(t.tokens.clone(), t.mask, t.pooled)
    t2.tokens[:, 1] += 1.0  # same pooled embedding, different token states
    assert not torch.allclose(a, dec(f, t2, pv, 1).logits)
    t3 = TextFeatures(t.tokens.clone(), t.mask, t.pooled)
    t3.tokens[:, 3:] += 100.0  # padded (masked) positions of prompt 0 must not reach the pixels
    torch.testing.assert_close(dec(f, t3, pv, 1).logits, a)


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_model_level_save_load_lora(name, tmp_path):
    m = vlseg.create_model("tiny-test", pretrained=False, decoder={"name": name, "options": DECODERS[name]},
                           lora={"r": 2, "text": True})
    assert m.trainable_summary()["image_encoder"]["trainable"] > 0
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
        a = m(x, ["polyp", "vessel"]).logits
    m.save_pretrained(tmp_path / "ck")
    m2 = vlseg.load(tmp_path / "ck")
    with torch.no_grad():
        b = m2(x, ["polyp", "vessel"]).logits
    torch.testing.assert_close(a, b)


def test_query_mask_runs_its_pixel_decoder_once_per_image():
    """query-mask runs its pixel decoder once per image, whatever the number of prompts."""
    cls = vlseg.decoders.DECODERS.get("query-mask")
    img = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=128)
    dec = cls.from_config(DECODERS["query-mask"], img, TextEncoderInfo(width=20, embed_dim=12), presence=True).eval()
    f, pv = features(1, (16, 16)), torch.randn(1, 3, 128, 128)
    calls = []
    h = dec.up2.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        out = dec(f, text(8), pv, 8)
    h.remove()
    assert out.logits.shape == (8, 128, 128) and len(calls) == 1


def skip_features(b, grid, patch=8, fine=((2, 6), (4, 7), (8, 9))):
    f = features(b, grid, prefix=0)
    h, w = grid[0] * patch, grid[1] * patch
    f.image_size = (h, w)
    f.fine = [torch.randn(b, c, h // s, w // s) for s, c in fine]
    return f


def test_query_mask_skips_use_the_fine_maps():
    """With ``skips`` the pixel decoder reads the encoder's stride-2/4/8 maps (a U-Net's skip connections): every
    skip layer gets a gradient, and a change in one fine map at one corner changes the mask there far more than far
    away (the pixel decoder's GroupNorm couples the whole map a little)."""
    cls = vlseg.decoders.DECODERS.get("query-mask")
    img = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=64, num_prefix_tokens=0,
                           fine_strides=(2, 4, 8), fine_channels=(6, 7, 9))
    dec = cls.from_config(dict(DECODERS["query-mask"], skips=True), img, TextEncoderInfo(width=20, embed_dim=12),
                          presence=True)
    assert dec.skip_strides == (2, 4, 8)
    torch.manual_seed(0)
    f, t, pv = skip_features(2, (8, 8)), text(4), torch.randn(2, 3, 64, 64)
    out = dec(f, t, pv, 2)
    assert out.logits.shape == (4, 64, 64)
    out.logits.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.skip.parameters())
    dec.eval()
    with torch.no_grad():
        a = dec(f, t, pv, 2).logits
        f.fine[1][:, :, :2, :2] += 5.0  # stride 4: the top-left 8x8 pixels
        b = dec(f, t, pv, 2).logits
    d = (a - b).abs()
    assert d[:, :8, :8].max() > 1e-2 and d[:, :8, :8].max() > 10 * d[:, 40:, 40:].max()


def test_query_mask_skips_say_what_is_missing():
    cls = vlseg.decoders.DECODERS.get("query-mask")
    txt = TextEncoderInfo(width=20, embed_dim=12)
    vit = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=64)
    with pytest.raises(ValueError, match="needs an image encoder that gives finer maps"):
        cls.from_config(dict(DECODERS["query-mask"], skips=True), vit, txt, presence=True)
    cnn = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=64, num_prefix_tokens=0,
                           fine_strides=(2, 4, 8), fine_channels=(6, 7, 9))
    dec = cls.from_config(dict(DECODERS["query-mask"], skips=True), cnn, txt, presence=True)
    f = features(1, (4, 4), prefix=0)  # tokens only, as a cache or an old ONNX export gives them
    f.image_size = (32, 32)
    with pytest.raises(ValueError, match=r"stride-\[2, 4, 8\] maps as skip connections.*carry none of its 3"):
        dec(f, text(2), torch.randn(1, 3, 32, 32), 2)


def test_query_mask_mlp_presence_head():
    """``presence_head: mlp`` scores query x image interactions and the prompt map's peak: every one of its
    parameters gets a gradient from the presence loss alone, and the coarse prompt map does too (its peak is an
    input); an unknown kind is named."""
    cls = vlseg.decoders.DECODERS.get("query-mask")
    img = ImageEncoderInfo(width=24, num_layers=3, patch_size=8, image_size=64)
    txt = TextEncoderInfo(width=20, embed_dim=12)
    dec = cls.from_config(dict(DECODERS["query-mask"], presence_head="mlp"), img, txt, presence=True)
    assert dec.presence_head[1].in_features == 4 * 32 + 2
    torch.manual_seed(0)
    out = dec(features(2, (4, 4)), text(6), torch.randn(2, 3, 32, 32), 3)
    assert out.presence.shape == (6,) and torch.isfinite(out.presence).all()
    assert out.presence.std() > 0  # differs across prompts and images
    out.presence.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dec.presence_head.parameters())
    assert dec.coarse.weight.grad is not None and dec.coarse.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="presence_head must be one of"):
        cls.from_config(dict(DECODERS["query-mask"], presence_head="deep"), img, txt, presence=True)
