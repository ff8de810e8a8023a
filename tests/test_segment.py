import numpy as np
import pytest
import torch
from PIL import Image

import vlseg


@pytest.mark.parametrize("arr", [
    np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8),
    np.random.default_rng(0).integers(0, 255, (37, 53), dtype=np.uint8),
    np.random.default_rng(0).integers(0, 65535, (37, 53), dtype=np.uint16),
    np.random.default_rng(0).random((37, 53, 3)).astype(np.float32),
    np.random.default_rng(0).random((37, 53, 1)) * 3000.0,
])
def test_inputs_and_sizes(tiny, arr):
    masks = vlseg.segment(tiny, arr, ["polyp", "vessel"])
    assert masks.shape == (2, 37, 53) and masks.dtype == bool
    probs = vlseg.segment(tiny, arr, ["polyp", "vessel"], return_probs=True)
    assert probs.dtype == np.float32 and probs.min() >= 0 and probs.max() <= 1


def test_path_pil_and_batches(tiny, tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8))
    p = tmp_path / "x.png"
    img.save(p)
    a = vlseg.segment(tiny, str(p), "polyp", return_probs=True)
    b = vlseg.segment(tiny, img, ["polyp"], return_probs=True)
    np.testing.assert_allclose(a, b)
    out = vlseg.segment(tiny, [img, p, np.zeros((20, 30), np.uint8)], ["polyp"], batch_size=2)
    assert [o.shape for o in out] == [(1, 40, 60), (1, 40, 60), (1, 20, 30)]


def test_threshold_and_presence_gate(tiny):
    img = np.zeros((32, 32, 3), np.uint8)
    probs = vlseg.segment(tiny, img, ["x"], return_probs=True)
    m = vlseg.segment(tiny, img, ["x"], threshold=0.0, presence_threshold=None)
    assert m.all()
    with torch.no_grad():
        tiny.decoder.presence_head[1].bias.fill_(-50.0)  # "absent" for everything
    gated = vlseg.segment(tiny, img, ["x"], threshold=0.0)
    assert not gated.any()
    np.testing.assert_allclose(vlseg.segment(tiny, img, ["x"], return_probs=True), probs, atol=1e-6)


@pytest.mark.parametrize("prompts,err", [([], "No prompts"), ("", "empty"), (["a", ""], "empty")])
def test_bad_prompts(tiny, prompts, err):
    with pytest.raises(ValueError, match=err):
        vlseg.segment(tiny, np.zeros((8, 8), np.uint8), prompts)


def test_bad_images(tiny, tmp_path):
    with pytest.raises(ValueError, match="Not an image"):
        vlseg.segment(tiny, 42, ["x"])
    with pytest.raises(ValueError, match="not found"):
        vlseg.segment(tiny, tmp_path / "missing.png", ["x"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="Unreadable.*bad.png"):
        vlseg.segment(tiny, bad, ["x"])
    good = tmp_path / "t.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(good)
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="trunc.png"):
        vlseg.segment(tiny, trunc, ["x"])
    with pytest.raises(ValueError, match="channel-first"):
        vlseg.segment(tiny, np.zeros((3, 40, 40), np.uint8), ["x"])
    with pytest.raises(ValueError, match="NaN"):
        vlseg.segment(tiny, np.full((10, 10), np.nan), ["x"])


def test_autocast_close(tiny):
    img = np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    a = vlseg.segment(tiny, img, ["x"], return_probs=True)
    b = vlseg.segment(tiny, img, ["x"], return_probs=True, autocast=True)
    assert np.abs(a - b).max() < 0.05


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror(tiny, tmp_path):
    """``flip=True`` averages the model's probabilities (and presence) on the image and on its left-right mirror,
    mirrored back; ``"model"`` follows the checkpoint's ``flip_tta``, which a save/load keeps."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    img[:, :20] = 255  # a bright band on the left only: the two views differ
    prompts = ["polyp", "retinal vessel"]
    plain = vlseg.segment(tiny, img, prompts, return_probs=True, flip=False)
    mirrored = vlseg.segment(tiny, np.ascontiguousarray(img[:, ::-1]), prompts, return_probs=True,
                             flip=False)[:, :, ::-1]
    assert np.abs(plain - mirrored).max() > 1e-3  # the model is not mirror-symmetric: the check below means something
    flipped = vlseg.segment(tiny, img, prompts, return_probs=True, flip=True)
    np.testing.assert_allclose(flipped, (plain + mirrored) / 2, atol=2e-5)
    a = vlseg.predict(tiny, img, prompts, presence_threshold=None, flip=False)
    b = vlseg.predict(tiny, np.ascontiguousarray(img[:, ::-1]), prompts, presence_threshold=None, flip=False)
    f = vlseg.predict(tiny, img, prompts, presence_threshold=None, flip=True)
    np.testing.assert_allclose(f.presence, (a.presence + b.presence) / 2, atol=1e-5)
    np.testing.assert_array_equal(f.masks, f.probs > 0.5)
    assert not tiny.config.flip_tta  # off unless a checkpoint says so
    np.testing.assert_allclose(vlseg.segment(tiny, img, prompts, return_probs=True), plain)
    tiny.config.flip_tta = True
    np.testing.assert_allclose(vlseg.segment(tiny, img, prompts, return_probs=True), flipped)
    tiny.save_pretrained(tmp_path / "ck")
    back = vlseg.load(tmp_path / "ck")
    assert back.config.flip_tta is True
    np.testing.assert_allclose(vlseg.segment(back, img, prompts, return_probs=True), flipped, atol=1e-6)
    with pytest.raises(ValueError, match="flip"):
        vlseg.segment(tiny, img, prompts, flip="yes")
