"""vlseg checkpoints: ``config.json`` (format marker, version, ModelConfig) + ``model.safetensors``.

By default only trainable state is stored (decoder, LoRA, trainable projections, unfrozen encoders); frozen
pretrained encoders are rebuilt from their names on load. Never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A file or folder that is not a loadable vlseg checkpoint."""


def _encoders_rebuildable(config: ModelConfig) -> bool:
    """True when every frozen encoder can be rebuilt with the same weights from its name (pretrained weights)."""
    if config.options.get("merged_lora"):
        return False
    if config.family != "composed":
        return bool(config.pretrained)
    for enc in (config.image_encoder, config.text_encoder):
        assert enc is not None
        if enc.frozen and (not enc.pretrained or "config" in enc.options or "model_cfg" in enc.options):
            return False
    return True


def trainable_keys(model: Any) -> list[str]:
    """State-dict keys saved in a default (adapter/decoder-only) checkpoint."""
    frozen, prefixes = {}, {}
    for top, (enc, cfg) in zip(("image_encoder", "text_encoder"), model._encoder_configs()):
        frozen[top] = bool(cfg.frozen)
        prefixes[top] = enc.trainable_prefixes
    keys = []
    for k in model.state_dict():
        top, _, rest = k.partition(".")
        if top not in frozen or not frozen[top] or "lora_" in rest or rest.startswith(prefixes[top]):
            keys.append(k)
    return keys


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): clone the repeats."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, v in state.items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = v.clone().contiguous() if key in seen else v.contiguous()
        seen.add(key)
    return out


def save_model(model: Any, directory: str | os.PathLike, include_encoders: bool = False,
               overwrite: bool = True) -> str:
    from safetensors.torch import save_file

    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    cfg_file = path / CONFIG_NAME
    if cfg_file.exists():
        existing = _read_json(cfg_file)
        if "vlseg_format" not in existing:
            raise FileExistsError(f"{path} already holds a config.json that is not a vlseg checkpoint; "
                                  "refusing to overwrite it. Choose another folder.")
        if not overwrite:
            raise FileExistsError(f"{path} already holds a vlseg checkpoint; pass overwrite=True to replace it")
    path.mkdir(parents=True, exist_ok=True)
    bundle = include_encoders or not _encoders_rebuildable(model.config)
    full = model.state_dict()
    keys = list(full) if bundle else trainable_keys(model)
    state = _unshare({k: full[k].cpu() for k in keys})
    meta = {
        "vlseg_format": FORMAT_VERSION,
        "vlseg_version": __version__,
        "bundled_encoders": bundle,
        "num_tensors": len(state),
        "model": model.config.to_dict(),
    }
    # Write both files to temporaries and rename, so a crash never leaves a half-written checkpoint.
    with tempfile.NamedTemporaryFile(dir=path, suffix=".tmp", delete=False) as f:
        tmp_w = f.name
    save_file(state, tmp_w, metadata={"format": "pt", "vlseg_version": __version__})
    tmp_c = str(path / (CONFIG_NAME + ".tmp"))
    with open(tmp_c, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp_w, path / WEIGHTS_NAME)
    os.replace(tmp_c, cfg_file)
    return str(path)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{p} does not hold a JSON object")
    return d


def resolve_source(source: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, a path to its config.json/model.safetensors, or ``hf-hub:org/repo`` -> local folder."""
    s = str(source)
    if s.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(s[len("hf-hub:"):], revision=revision,
                                          allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, "README.md"]))
        except Exception as e:
            raise CheckpointError(f"Could not download {s}: {type(e).__name__}: {e}") from e
    p = Path(s)
    if p.is_file():
        if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"):
            raise CheckpointError(f"{p} is a pickle-based file; vlseg never unpickles files. Load checkpoints "
                                  "saved with save_pretrained (config.json + model.safetensors).")
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"No checkpoint at {s!r}: not a folder (use 'hf-hub:org/repo' for the Hub)")
    return p


def load_model(source: str | os.PathLike, revision: str | None = None, device: str | torch.device | None = None) -> Any:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .factory import build_model

    folder = resolve_source(source, revision)
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        hint = " It holds pickle files (.bin/.pt), which vlseg never loads." if any(folder.glob("*.bin")) else ""
        raise CheckpointError(f"{folder} is not a vlseg checkpoint: no {CONFIG_NAME}.{hint}")
    meta = _read_json(cfg_file)
    if "vlseg_format" not in meta:
        mt = meta.get("model_type")
        if mt:
            raise CheckpointError(
                f"{folder} is an upstream transformers folder (model_type={mt!r}), not a vlseg checkpoint. Build "
                f"from it with vlseg.create_model(<preset>, pretrained={str(folder)!r}).")
        raise CheckpointError(f"{folder} is not a vlseg checkpoint ({CONFIG_NAME} has no 'vlseg_format')")
    if int(meta["vlseg_format"]) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer vlseg (format {meta['vlseg_format']}, this vlseg "
                              f"{__version__} reads up to {FORMAT_VERSION}). Upgrade: pip install -U vlseg")
    try:
        config = ModelConfig.from_dict(meta["model"])
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: invalid model config: {e}") from e
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e
    bundled = bool(meta.get("bundled_encoders"))
    model = build_model(config, load_weights=not bundled)
    own = model.state_dict()
    expected = set(own) if bundled else set(trainable_keys(model))
    unexpected = sorted(set(state) - set(own))
    missing = sorted(expected - set(state))
    bad_shape = sorted(k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape))
    if unexpected or missing or bad_shape:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"{len(bad_shape)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} vs model "
                         f"{tuple(own[k].shape)}")
        raise CheckpointError(f"Weights in {weights} do not fit the config in {cfg_file}: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    model.eval()
    if device is not None:
        model.to(device)
    return model


def push_to_hub(model: Any, repo_id: str, include_encoders: bool = False, private: bool = False,
                commit_message: str = "Upload vlseg model", token: str | None = None) -> str:
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        save_model(model, tmp, include_encoders=include_encoders)
        (Path(tmp) / "README.md").write_text(model_card(model, repo_id), encoding="utf-8")
        info = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def model_card(model: Any, repo_id: str) -> str:
    c = model.config
    return (f"---\nlibrary_name: vlseg\ntags: [vlseg, medical-imaging, segmentation]\n---\n# {repo_id}\n\n"
            f"A vlseg model (family `{c.family}`, preset `{c.name}`).\n\n```python\nimport vlseg\n"
            f"model = vlseg.load(\"hf-hub:{repo_id}\")\nmasks = vlseg.segment(model, \"image.png\", [\"polyp\"])\n```\n")
