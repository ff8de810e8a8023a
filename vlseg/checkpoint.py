"""vlseg checkpoint files: ``config.json`` (format marker, versions, the ModelConfig) + ``model.safetensors``.

File IO only: writing atomically, finding and reading a checkpoint folder (local or ``hf-hub:``), uploading one.
Building models from them is ``vlseg.factory``'s job. Only JSON and safetensors are ever read: nothing is
unpickled.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .sources import PICKLE_SUFFIXES, SourceError, parse_source, resolve_folder
from .version import __version__

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class CheckpointError(ValueError):
    """A file or folder that is not a loadable vlseg checkpoint."""


@dataclass
class Checkpoint:
    """What a checkpoint folder holds.

    Attributes:
        folder: where it was read from.
        meta: the whole ``config.json``.
        model: its ``model`` entry (a ModelConfig dict as written, not yet migrated).
        state: the tensors of ``model.safetensors`` (on CPU).
        bundled: whether the frozen encoders' weights are inside (else they are rebuilt from their sources).
    """

    folder: Path
    meta: dict[str, Any]
    model: dict[str, Any]
    state: dict[str, torch.Tensor]
    bundled: bool

    @property
    def config_version(self) -> int:
        v = self.model.get("config_version", 1)
        return v if isinstance(v, int) else 1


def _unshare(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): clone the repeats."""
    seen: set[tuple[int, Any]] = set()
    out = {}
    for k, v in state.items():
        v = v.detach().cpu()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else (id(v), 0)
        out[k] = v.clone().contiguous() if key in seen else v.contiguous()
        seen.add(key)
    return out


def write_checkpoint(directory: str | os.PathLike[str], model_config: dict[str, Any],
                     state: dict[str, torch.Tensor], bundled: bool, overwrite: bool = True) -> str:
    """Write a checkpoint folder; returns its path.

    Both files are written to temporaries and renamed, so a crash never leaves a half-written checkpoint. Refuses
    to overwrite a folder holding something else than a vlseg checkpoint, or (``overwrite=False``) any checkpoint.
    """
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
    tensors = _unshare(state)
    meta = {"vlseg_format": FORMAT_VERSION, "vlseg_version": __version__, "bundled_encoders": bool(bundled),
            "num_tensors": len(tensors), "model": model_config}
    with tempfile.NamedTemporaryFile(dir=path, suffix=".tmp", delete=False) as f:
        tmp_w = f.name
    tmp_c = str(path / (CONFIG_NAME + ".tmp"))
    try:
        save_file(tensors, tmp_w, metadata={"format": "pt", "vlseg_version": __version__})
        with open(tmp_c, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
        for t in (tmp_w, tmp_c):  # on disk before the renames, so a power cut cannot leave empty files behind them
            _fsync(t)
        os.replace(tmp_w, path / WEIGHTS_NAME)
        os.replace(tmp_c, cfg_file)
        _fsync(path)
    finally:
        for t in (tmp_w, tmp_c):
            if os.path.exists(t):
                os.unlink(t)
    return str(path)


def _fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's (or a folder's entries') data to disk, where the platform allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on Windows; nothing to flush there
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not support fsync on folders
        pass
    finally:
        os.close(fd)


def _read_json(p: Path) -> dict[str, Any]:
    try:
        with open(p, encoding="utf-8") as f:
            d = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{p} does not hold a JSON object")
    return d


def checkpoint_folder(source: str | os.PathLike[str], revision: str | None = None) -> Path:
    """A local folder, a path to its config.json/model.safetensors, or ``hf-hub:org/repo`` -> local folder."""
    src = parse_source(source, revision=revision, bare_hub_ids=False)
    if src.kind == "hub":
        try:
            return resolve_folder(src, patterns=(CONFIG_NAME, WEIGHTS_NAME, "README.md"))
        except SourceError as e:
            raise CheckpointError(f"Could not download {src}: {e}") from e
    p = Path(src.location)
    if p.is_file():
        if p.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{p} is a pickle-based file; vlseg never unpickles files. Load checkpoints "
                                  "saved with save_pretrained (config.json + model.safetensors).")
        p = p.parent
    if not p.is_dir():
        raise CheckpointError(f"No checkpoint at {str(source)!r}: not a folder (use 'hf-hub:org/repo' for the Hub)")
    return p


def read_meta(folder: Path) -> dict[str, Any]:
    """The validated ``config.json`` of a vlseg checkpoint folder."""
    cfg_file = folder / CONFIG_NAME
    if not cfg_file.is_file():
        hint = " It holds pickle files (.bin/.pt), which vlseg never loads." if any(
            f.suffix in PICKLE_SUFFIXES for f in folder.iterdir()) else ""
        raise CheckpointError(f"{folder} is not a vlseg checkpoint: no {CONFIG_NAME}.{hint}")
    meta = _read_json(cfg_file)
    if "vlseg_format" not in meta:
        mt = meta.get("model_type")
        if mt:
            raise CheckpointError(
                f"{folder} is an upstream transformers folder (model_type={mt!r}), not a vlseg checkpoint. Build "
                f"from it with vlseg.create_model(<preset>, pretrained={str(folder)!r}).")
        raise CheckpointError(f"{folder} is not a vlseg checkpoint ({CONFIG_NAME} has no 'vlseg_format')")
    fmt = meta["vlseg_format"]
    if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer vlseg (format {fmt!r}, this vlseg {__version__} "
                              f"reads up to {FORMAT_VERSION}). Upgrade: pip install -U vlseg")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{cfg_file} has no 'model' config")
    return meta


def read_checkpoint(source: str | os.PathLike[str], revision: str | None = None) -> Checkpoint:
    """Find and read a checkpoint (see ``checkpoint_folder``). Raises CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = checkpoint_folder(source, revision)
    meta = read_meta(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise CheckpointError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from e
    nan = [k for k, v in state.items() if v.is_floating_point() and bool(torch.isnan(v).any())]
    if nan:  # e.g. saved after training diverged: every mask would silently come out empty
        raise CheckpointError(f"{weights} holds NaN values in {len(nan)} tensor(s), e.g. {nan[:3]}; it cannot "
                              "give meaningful masks (did training diverge?)")
    return Checkpoint(folder=folder, meta=meta, model=meta["model"], state=state,
                      bundled=bool(meta.get("bundled_encoders")))


def upload_folder(folder: str | os.PathLike[str], repo_id: str, config: Any, private: bool = False,
                  commit_message: str = "Upload vlseg model", token: str | None = None) -> str:
    """Upload a saved checkpoint folder (plus a model card) to the Hub; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    (Path(folder) / "README.md").write_text(model_card(config, repo_id), encoding="utf-8")
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    return str(getattr(info, "commit_url", info))


def model_card(config: Any, repo_id: str) -> str:
    return (f"---\nlibrary_name: vlseg\ntags: [vlseg, medical-imaging, segmentation]\n---\n# {repo_id}\n\n"
            f"A vlseg model (family `{config.family}`, preset `{config.name}`).\n\n```python\nimport vlseg\n"
            f"model = vlseg.load(\"hf-hub:{repo_id}\")\nmasks = vlseg.segment(model, \"image.png\", [\"polyp\"])\n```\n")
