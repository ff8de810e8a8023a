"""Untrusted files: only safetensors and JSON (plus tokenizer text files) are read from checkpoints and upstream
folders, pickles are never unpickled even when they sit next to safetensors, hub fetches skip pickles and pin a
revision when asked, and no code path sets ``trust_remote_code``."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vlseg
from vlseg.sources import PICKLE_SUFFIXES, SAFE_PATTERNS

ROOT = Path(__file__).resolve().parents[1]
CODE = sorted([*(ROOT / "vlseg").rglob("*.py"), *(ROOT / "demo").rglob("*.py"), *(ROOT / "finetune").rglob("*.py")])
#: ``X.from_pretrained`` calls that read no weights (configs, tokenizers, processors)
NO_WEIGHTS = ("Config", "Tokenizer", "Processor", "ImageProcessor")


def trap(marker: Path) -> bytes:
    """A pickle that creates ``marker`` if anything ever unpickles it."""
    class Trap:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    return pickle.dumps(Trap())


def _calls(path: Path) -> list[tuple[ast.Call, str]]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return [(n, ast.unparse(n.func)) for n in ast.walk(tree) if isinstance(n, ast.Call)]


def test_source_never_unpickles_or_trusts_remote_code():
    """Static check of every module: no torch.load / pickle / numpy pickles, no trust_remote_code other than False,
    and every weight-loading ``from_pretrained`` passes ``use_safetensors=True``."""
    problems = []
    for path in CODE:
        rel = path.relative_to(ROOT)
        for call, func in _calls(path):
            kw = {k.arg: k.value for k in call.keywords}
            if func in ("torch.load", "pickle.load", "pickle.loads", "joblib.load", "torch.jit.load"):
                problems.append(f"{rel}:{call.lineno}: {func}")
            if "trust_remote_code" in kw and not (isinstance(kw["trust_remote_code"], ast.Constant)
                                                  and kw["trust_remote_code"].value is False):
                problems.append(f"{rel}:{call.lineno}: trust_remote_code={ast.unparse(kw['trust_remote_code'])}")
            if "allow_pickle" in kw and not (isinstance(kw["allow_pickle"], ast.Constant)
                                             and kw["allow_pickle"].value is False):
                problems.append(f"{rel}:{call.lineno}: allow_pickle")
            if "weights_only" in kw and not (isinstance(kw["weights_only"], ast.Constant)
                                             and kw["weights_only"].value is True):
                problems.append(f"{rel}:{call.lineno}: weights_only={ast.unparse(kw['weights_only'])}")
            if func.endswith(".from_pretrained") and not func.removesuffix(".from_pretrained").endswith(NO_WEIGHTS):
                v = kw.get("use_safetensors")
                if not (isinstance(v, ast.Constant) and v.value is True):
                    problems.append(f"{rel}:{call.lineno}: {func}(...) without use_safetensors=True")
        text = path.read_text(encoding="utf-8")
        if "import pickle" in text or "trust_remote_code=True" in text:
            problems.append(f"{rel}: mentions pickle import / trust_remote_code=True")
    assert not problems, "\n".join(problems)


def test_hub_fetches_only_safe_files():
    assert not any(p.endswith(PICKLE_SUFFIXES) or p in ("*", "*.*") for p in SAFE_PATTERNS)


def _fake_hub(monkeypatch, folder: Path) -> list[dict]:
    """Route snapshot_download to ``folder`` and record how it was called."""
    import huggingface_hub

    calls: list[dict] = []

    def snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": list(allow_patterns or []), **kw})
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_hub_checkpoint_pins_revision_and_skips_pickles(tmp_path, monkeypatch, tiny):
    ck = Path(tiny.save_pretrained(tmp_path / "ck"))
    calls = _fake_hub(monkeypatch, ck)
    vlseg.load("hf-hub:org/repo", revision="0123abc")
    vlseg.load("hf-hub:org/repo@v2")
    vlseg.load("hf-hub:org/repo")
    assert [(c["repo_id"], c["revision"]) for c in calls] == [("org/repo", "0123abc"), ("org/repo", "v2"),
                                                              ("org/repo", None)]
    for c in calls:
        assert not any(p.endswith(PICKLE_SUFFIXES) or "*" == p for p in c["allow_patterns"]), c


def test_hub_upstream_source_pins_revision(tmp_path, monkeypatch, clipseg_dir):
    calls = _fake_hub(monkeypatch, Path(clipseg_dir))
    m = vlseg.create_model("clipseg-rd64-refined", revision="deadbeef")
    assert m.config.revision == "deadbeef"
    assert calls and all(c["revision"] == "deadbeef" for c in calls)
    assert all(set(c["allow_patterns"]) <= set(SAFE_PATTERNS) for c in calls)


def test_upstream_folder_with_pickle_next_to_safetensors_reads_safetensors(tmp_path, clipseg_dir):
    """transformers would pick the safetensors file anyway with use_safetensors=True; the trap proves the pickle is
    never opened."""
    up = tmp_path / "up"
    shutil.copytree(clipseg_dir, up)
    (up / "pytorch_model.bin").write_bytes(trap(tmp_path / "UNPICKLED"))
    a = vlseg.create_model("clipseg-rd64-refined", pretrained=str(up))
    b = vlseg.create_model("clipseg-rd64-refined", pretrained=str(clipseg_dir))
    assert not (tmp_path / "UNPICKLED").exists()
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sb)


def _open_clip_folder(folder: Path, seed: int = 1) -> dict[str, torch.Tensor]:
    """A local open_clip folder (open_clip_config.json + weights) of the tiny-test architecture."""
    import open_clip

    cfg = json.loads((ROOT / "vlseg" / "model_configs" / "encoders" / "tiny-openclip.json").read_text())
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg["arch"]["model_cfg"]}))
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in open_clip.CLIP(**cfg["arch"]["model_cfg"]).state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return state


def _open_clip_model(folder: Path) -> vlseg.VLSegModel:
    enc = {"type": "open_clip", "name": str(folder), "pretrained": True}
    return vlseg.create_model("tiny-test", image_encoder=enc, text_encoder=enc)


def test_open_clip_folder_reads_safetensors_not_the_pickle_open_clip_prefers(tmp_path):
    """open_clip itself ranks ``open_clip_pytorch_model.bin`` above ``model.safetensors``; vlseg loads the
    safetensors file and never the pickle."""
    folder = tmp_path / "oc"
    state = _open_clip_folder(folder)
    (folder / "open_clip_model.safetensors").rename(folder / "model.safetensors")
    (folder / "open_clip_pytorch_model.bin").write_bytes(trap(tmp_path / "UNPICKLED"))
    m = _open_clip_model(folder)
    assert not (tmp_path / "UNPICKLED").exists()
    got = dict(m.image_encoder.backbone.named_parameters())
    assert torch.equal(got["class_embedding"], state["visual.class_embedding"])


def test_open_clip_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = tmp_path / "oc"
    _open_clip_folder(folder)
    (folder / "open_clip_model.safetensors").unlink()
    (folder / "open_clip_pytorch_model.bin").write_bytes(trap(tmp_path / "UNPICKLED"))
    with pytest.raises(vlseg.SourceError, match=r"only pickle weights \(open_clip_pytorch_model\.bin\).*save_file"):
        _open_clip_model(folder)
    assert not (tmp_path / "UNPICKLED").exists()


def test_open_clip_pretrained_file_must_be_safetensors(tmp_path):
    p = tmp_path / "weights.pt"
    p.write_bytes(trap(tmp_path / "UNPICKLED"))
    enc = {"type": "open_clip", "name": "ViT-B-32"}
    with pytest.raises(vlseg.SourceError, match="not a safetensors file"):
        vlseg.create_model("tiny-test", pretrained=str(p), image_encoder=enc, text_encoder=enc)
    assert not (tmp_path / "UNPICKLED").exists()


def test_training_state_files_are_not_pickles(tmp_path, tiny):
    from vlseg.training import load_train_state, rng_state, save_checkpoint_atomic

    opt = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-3)
    loss = sum(p.sum() for p in tiny.decoder.parameters())
    loss.backward()
    opt.step()
    state = {"step": 3, "best": 0.5, "rng": rng_state(), "optimizer": opt.state_dict()}
    last = save_checkpoint_atomic(tiny, tmp_path, "last", state)
    names = sorted(p.name for p in last.iterdir())
    assert names == ["config.json", "model.safetensors", "trainer_state.json", "trainer_state.safetensors"]
    for p in last.iterdir():
        head = p.read_bytes()[:2]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK"), f"{p.name} looks like a pickle / zip"
    json.loads((last / "trainer_state.json").read_text())
    back = load_train_state(last)
    assert back["step"] == 3 and back["optimizer"]["state"].keys() == opt.state_dict()["state"].keys()
    assert vlseg.load(last) is not None
