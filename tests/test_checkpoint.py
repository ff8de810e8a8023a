import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import vlseg
from vlseg import CheckpointError


def _fill_lora(m):
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)


def test_trainable_only_checkpoint_with_pretrained_encoder(hf_clip_dir, tmp_path):
    """Encoders from a local upstream folder are rebuilt by name: the file holds only LoRA + decoder."""
    m = vlseg.create_model("clip-b16-xattn", pretrained=hf_clip_dir, image_size=64,
                           decoder={"name": "cross-attn", "options": {"layers": [0, 1, 2], "dim": 32}},
                           lora={"r": 2, "text": True})
    _fill_lora(m)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = m(x, ["polyp", "vessel"])
    out = m.save_pretrained(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["bundled_encoders"] is False and meta["model"]["image_encoder"]["pretrained"] == hf_clip_dir
    keys = set(load_file(f"{out}/model.safetensors"))
    assert keys and all(k.startswith("decoder.") or "lora_" in k for k in keys)
    n_saved = sum(load_file(f"{out}/model.safetensors")[k].numel() for k in keys)
    assert n_saved == m.trainable_summary()["total"]["trainable"]
    m2 = vlseg.load(out)
    with torch.no_grad():
        b = m2(x, ["polyp", "vessel"])
    torch.testing.assert_close(a.logits, b.logits)
    torch.testing.assert_close(a.presence, b.presence)


def test_random_encoders_are_bundled(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "ck")
    meta = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert meta["bundled_encoders"] is True
    assert len(load_file(tmp_path / "ck" / "model.safetensors")) == len(tiny.state_dict())


def test_include_encoders_round_trip(hf_clip_dir, tmp_path):
    m = vlseg.create_model("clip-b16-film", pretrained=hf_clip_dir, image_size=64,
                           decoder={"name": "film", "options": {"layers": [0, 2], "reduce_dim": 8}})
    m.save_pretrained(tmp_path / "ck", include_encoders=True)
    m2 = vlseg.load(tmp_path / "ck")
    for (k, v), (k2, v2) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        vlseg.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(CheckpointError, match="not a vlseg checkpoint"):
        vlseg.load(tmp_path)
    with pytest.raises(CheckpointError, match="No checkpoint"):
        vlseg.load(tmp_path / "missing")


def test_upstream_folder_is_explained(clipseg_dir):
    with pytest.raises(CheckpointError, match="upstream transformers folder"):
        vlseg.load(clipseg_dir)


def test_pickle_refused(tmp_path):
    p = tmp_path / "model.bin"
    p.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles"):
        vlseg.load(p)


def test_newer_version_refused(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    meta["model"]["config_version"] = 99
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer vlseg"):
        vlseg.load(tmp_path)
    meta["model"]["config_version"] = 1
    meta["vlseg_format"] = 7
    (tmp_path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="newer vlseg"):
        vlseg.load(tmp_path)


def test_weights_that_do_not_fit(tiny, tmp_path):
    tiny.save_pretrained(tmp_path)
    w = tmp_path / "model.safetensors"
    state = load_file(w)
    k = next(k for k in state if k.startswith("decoder.") and state[k].dim() == 2)
    state[k] = torch.zeros(3, 3)
    save_file(state, w)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        vlseg.load(tmp_path)
    del state[k]
    save_file(state, w)
    with pytest.raises(CheckpointError, match="missing"):
        vlseg.load(tmp_path)
    w.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="safetensors"):
        vlseg.load(tmp_path)


def test_never_overwrites_foreign_folder(tiny, tmp_path):
    (tmp_path / "config.json").write_text('{"my": "data"}')
    with pytest.raises(FileExistsError, match="not a vlseg checkpoint"):
        tiny.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"my": "data"}
    tiny.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        tiny.save_pretrained(tmp_path / "ok", overwrite=False)


def test_hub_source_offline_is_clear():
    with pytest.raises(CheckpointError, match="Could not download hf-hub:org/repo"):
        vlseg.load("hf-hub:org/repo")


def test_push_to_hub_uploads_checkpoint(tiny, monkeypatch):
    import huggingface_hub

    seen = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=True):
            seen["repo"] = repo_id

        def upload_folder(self, repo_id, folder_path, commit_message):
            import os

            seen["files"] = sorted(os.listdir(folder_path))
            return "https://hub/commit/1"

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert tiny.push_to_hub("me/tiny") == "https://hub/commit/1"
    assert seen == {"repo": "me/tiny", "files": ["README.md", "config.json", "model.safetensors"]}


def test_input_size_other_than_the_trunks_round_trips(tmp_path):
    """A scratch trunk built for 64 px and trained at 32 px keeps its position grid (interpolated per input size),
    so its checkpoints load as they were saved (0.1.0 main-job checkpoints are like this)."""
    enc = {"type": "scratch", "pretrained": False,
           "options": {"width": 32, "depth": 2, "heads": 2, "patch_size": 16, "image_size": 64}}
    m = vlseg.create_model("tiny-test", pretrained=False, image_encoder=enc, freeze_image=False, image_size=32,
                           decoder={"name": "film", "options": {"layers": [0, 1], "reduce_dim": 8}})
    assert m.image_encoder.backbone.pos.shape[-2:] == (4, 4)
    x = torch.randn(1, 3, 32, 32)
    m2 = vlseg.load(m.save_pretrained(tmp_path / "ck"))
    with torch.no_grad():
        torch.testing.assert_close(m(x, ["polyp"]).logits, m2(x, ["polyp"]).logits)
