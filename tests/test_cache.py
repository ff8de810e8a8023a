import pytest
import torch

import vlseg
from vlseg.cache import FeatureCache, fingerprint


def test_cache_equals_encoder_and_counts(tiny, tmp_path):
    cache = FeatureCache(tiny, directory=tmp_path)
    x = torch.randn(3, 3, 64, 64)
    a = cache.encode(tiny, x, ["a", "b", "c"])
    assert (cache.hits, cache.misses) == (0, 3)
    b = cache.encode(tiny, x[[2, 0]], ["c", "a"])
    assert (cache.hits, cache.misses) == (2, 3)
    ref = tiny.encode_image(x)
    for t, r in zip(a.tokens, ref.tokens):
        torch.testing.assert_close(t, r)
    torch.testing.assert_close(b.tokens[0], ref.tokens[0][[2, 0]])
    with torch.no_grad():
        out_cached = tiny(x, ["polyp"], image_features=a).logits
        out = tiny(x, ["polyp"]).logits
    torch.testing.assert_close(out_cached, out)
    # a new cache on the same folder reads the disk copy
    cache2 = FeatureCache(tiny, directory=tmp_path)
    c = cache2.encode(tiny, x[:1], ["a"])
    assert cache2.hits == 1 and torch.equal(c.tokens[0], a.tokens[0][:1])


def test_fingerprint_changes_with_weights_and_config(tiny):
    fp = fingerprint(tiny)
    other = vlseg.create_model("tiny-test", pretrained=False)  # other random weights
    assert fingerprint(other) != fp
    layers = vlseg.create_model("tiny-test", pretrained=False, decoder={"name": "film", "options": {"layers": [0, 1]}})
    layers.image_encoder.load_state_dict(tiny.image_encoder.state_dict())
    assert fingerprint(layers) != fp


def test_cache_refuses_trainable_or_lora_encoder(tiny):
    tiny.apply_lora({"r": 2})
    with pytest.raises(ValueError, match="LoRA"):
        FeatureCache(tiny)
    m = vlseg.create_model("tiny-test", pretrained=False)
    m.unfreeze("image")
    with pytest.raises(ValueError, match="trainable"):
        FeatureCache(m)


def test_memory_bound(tiny):
    x = torch.randn(4, 3, 64, 64)
    per_image = sum(t[:1].numel() * 4 for t in tiny.encode_image(x[:1]).tokens)
    cache = FeatureCache(tiny, max_bytes=2 * per_image)
    cache.encode(tiny, x, list("abcd"))
    assert len(cache.mem) == 2 and cache.bytes <= 2 * per_image
